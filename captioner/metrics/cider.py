"""CIDEr-D as coco-caption computes it: one engine, whose document frequencies come from a parameter.

Each sentence becomes, for each n = 1..4, a vector of n-gram tf-idf weights with idf = log(images) -
log(max(1, df)). Per hypothesis and reference: the hypothesis weights are clipped to the reference's
(min), the cosine-style similarity is multiplied by a Gaussian length penalty exp(-delta^2 / (2 sigma^2))
(length = number of bigrams); the result is averaged over n, then over references, and times 10.

Where df (and "images") come from:
- `CiderD()`: every `compute_score` call counts them over the reference sets it scores, one document per
  image, as coco-caption's `Cider` does; a caption's score then depends on the images scored with it.
  This is the evaluation number.
- `CiderD(corpus_references)` (also spelled `CiderDReward(...)`): fixed by a corpus (the training
  references, one entry per image, each a list of tokenised captions). A training reward (SCST) and
  consensus re-ranking need frequencies that do not move; `score`, `score_images` and `score_pooled`
  then score token lists against the corpus's cached reference vectors. Scored against the same set it
  was built from, it gives `CiderD()`'s per-image scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from captioner.metrics.common import Hypotheses, ImageId, References, ngram_counts, prepare_inputs

TokenisedReferences = Sequence[Sequence[Sequence[str]]]  # per image: its tokenised reference captions


class _ReferenceSet:
    """One image's references as tf-idf entries under fixed document frequencies (built once, reused)."""

    __slots__ = ("entry_ref", "entry_ngram", "entry_weight", "norms", "lengths")

    def __init__(self, entry_ref: np.ndarray, entry_ngram: np.ndarray, entry_weight: np.ndarray,
                 norms: np.ndarray, lengths: np.ndarray):
        self.entry_ref = entry_ref  # (entries,) which reference of the image
        self.entry_ngram = entry_ngram  # (entries,) n-gram id
        self.entry_weight = entry_weight  # (entries,) count * idf
        self.norms = norms  # (refs, n) norm of each reference's weights per n-gram order
        self.lengths = lengths  # (refs,) length as CIDEr-D measures it (number of bigrams)


class CiderD:
    """CIDEr-D; see the module notes. `corpus_references` None: document frequencies from the references
    each `compute_score` call scores; a corpus: fixed by it (and `score*` work on token lists)."""

    name = "CIDEr-D"

    def __init__(self, corpus_references: TokenisedReferences | None = None, sigma: float = 6.0, n: int = 4):
        if n < 1:
            raise ValueError(f"{type(self).__name__}: n must be >= 1, got {n}")
        self.sigma, self.n = sigma, n
        self._corpus: list[_ReferenceSet] | None = None
        if corpus_references is None:
            return
        if len(corpus_references) == 0:
            raise ValueError(f"{type(self).__name__}: the reference corpus is empty; pass the training references")
        self._ngram_ids: dict[tuple[str, ...], int] = {}
        counted = []  # per image, per reference: its n-gram counts
        documents = []  # per image: the distinct n-gram ids of its references
        for image, refs in enumerate(corpus_references):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"{type(self).__name__}: corpus image {image} needs a list of tokenised references, "
                                 f"got {refs!r}")
            ref_counts = [ngram_counts(ref, n) for ref in refs]
            seen = {self._ngram_ids.setdefault(g, len(self._ngram_ids)) for counts in ref_counts for g in counts}
            counted.append(ref_counts)
            documents.append(np.fromiter(seen, dtype=np.int64, count=len(seen)))
        doc_freq = np.bincount(np.concatenate(documents), minlength=len(self._ngram_ids))
        self.ref_len = float(np.log(float(len(corpus_references))))
        self._idf = self.ref_len - np.log(np.maximum(1.0, doc_freq))  # (n-grams,); grows for unseen ones
        self._order = np.array([len(g) - 1 for g in self._ngram_ids], dtype=np.int64)
        self._cache: dict[tuple[tuple[str, ...], ...], _ReferenceSet] = {}
        self._corpus: list[_ReferenceSet] = []
        for refs, ref_counts in zip(corpus_references, counted, strict=True):
            reference_set = self._reference_set(refs, ref_counts)
            self._corpus.append(reference_set)
            self._cache[tuple(tuple(ref) for ref in refs)] = reference_set

    def _require_corpus(self, what: str) -> list[_ReferenceSet]:
        if self._corpus is None:
            raise ValueError(f"{type(self).__name__}.{what}: needs fixed document frequencies; build the scorer "
                             "with corpus_references")
        return self._corpus

    def compute_score(self, references: References, hypotheses: Hypotheses, *, tokenized: bool = False
                      ) -> tuple[float, dict[ImageId, float]]:
        """(corpus score = mean over images, {image_id: score}) of raw (or `tokenized`) captions."""
        ids, refs, hyps = prepare_inputs(references, hypotheses, tokenized)
        if self._corpus is None:  # document frequencies of the reference sets scored here
            per_image = CiderD(refs, self.sigma, self.n).score_images(hyps, list(range(len(ids))))
        else:
            per_image = self.score(hyps, refs)
        return float(per_image.mean()), dict(zip(ids, per_image.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self._require_corpus("len"))

    def _reference_set(self, refs: Sequence[Sequence[str]], ref_counts: list[Counter] | None = None
                       ) -> _ReferenceSet:
        n = self.n
        if ref_counts is None:
            ref_counts = [ngram_counts(ref, n) for ref in refs]
        # N-grams outside the corpus (references given to `score` only) have df 0: idf = log(images).
        unseen = {g for counts in ref_counts for g in counts if g not in self._ngram_ids}
        if unseen:
            for ngram in unseen:
                self._ngram_ids[ngram] = len(self._ngram_ids)
            self._idf = np.append(self._idf, np.full(len(unseen), self.ref_len))
            self._order = np.append(self._order, [len(g) - 1 for g in unseen])
        entry_ref, entry_ngram, entry_count = [], [], []
        for index, counts in enumerate(ref_counts):
            for ngram, count in counts.items():
                entry_ref.append(index)
                entry_ngram.append(self._ngram_ids[ngram])
                entry_count.append(count)
        entry_ref_array = np.asarray(entry_ref, dtype=np.int64)
        entry_ngram_array = np.asarray(entry_ngram, dtype=np.int64)
        weight = np.asarray(entry_count, dtype=np.float64) * self._idf[entry_ngram_array]
        norms = np.sqrt(np.bincount(entry_ref_array * n + self._order[entry_ngram_array], weights=weight ** 2,
                                    minlength=len(refs) * n)).reshape(len(refs), n)
        lengths = np.array([max(len(ref) - 1, 0) if n >= 2 else 0 for ref in refs], dtype=np.float64)
        return _ReferenceSet(entry_ref_array, entry_ngram_array, weight, norms, lengths)

    def score(self, hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
              ) -> np.ndarray:
        """Per-hypothesis CIDEr-D (hypotheses, ) of tokenised hypotheses against their tokenised references."""
        if len(hypotheses) != len(references):
            raise ValueError(f"{type(self).__name__}.score: {len(hypotheses)} hypotheses but {len(references)} "
                             "reference lists; give one reference list per hypothesis")
        self._require_corpus("score")
        reference_sets = []
        for index, refs in enumerate(references):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"{type(self).__name__}.score: references[{index}] must be a non-empty list of "
                                 f"tokenised captions, got {refs!r}")
            key = tuple(tuple(ref) for ref in refs)
            reference_set = self._cache.get(key)
            if reference_set is None:
                reference_set = self._cache[key] = self._reference_set(refs)
            reference_sets.append(reference_set)
        return self._score(hypotheses, reference_sets)

    def score_pooled(self, hypotheses: Sequence[Sequence[str]], image_indices: Sequence[int]) -> np.ndarray:
        """Per-hypothesis CIDEr-D of every hypothesis against one pooled reference list: the references of
        all the corpus images `image_indices` together (as re-ranking scores candidates against several
        similar images' captions). Pooled from the cached vectors; equals `score` against the joined lists."""
        if len(image_indices) == 0:
            raise ValueError(f"{type(self).__name__}.score_pooled: give at least one corpus image")
        corpus = self._require_corpus("score_pooled")
        sets = [corpus[i] for i in image_indices]
        offsets = np.cumsum([0] + [len(s.lengths) for s in sets[:-1]])
        pooled = _ReferenceSet(np.concatenate([s.entry_ref + offset for s, offset in zip(sets, offsets, strict=True)]),
                               np.concatenate([s.entry_ngram for s in sets]),
                               np.concatenate([s.entry_weight for s in sets]),
                               np.concatenate([s.norms for s in sets]), np.concatenate([s.lengths for s in sets]))
        return self._score(hypotheses, [pooled] * len(hypotheses))

    def score_images(self, hypotheses: Sequence[Sequence[str]], image_indices: Sequence[int]) -> np.ndarray:
        """Per-hypothesis CIDEr-D against the references of corpus image `image_indices[i]`."""
        if len(hypotheses) != len(image_indices):
            raise ValueError(f"{type(self).__name__}.score_images: {len(hypotheses)} hypotheses but "
                             f"{len(image_indices)} image indices")
        try:
            reference_sets = [self._corpus[int(i)] for i in image_indices]
        except IndexError:
            raise ValueError(f"{type(self).__name__}.score_images: image indices must be in 0..{len(self._corpus) - 1}, "
                             f"got {min(image_indices)}..{max(image_indices)}") from None
        return self._score(hypotheses, reference_sets)

    def _score(self, hypotheses: Sequence[Sequence[str]], reference_sets: list[_ReferenceSet]) -> np.ndarray:
        n, num_hyps = self.n, len(hypotheses)
        if num_hyps == 0:
            return np.zeros(0)
        # The distinct reference sets of this call, their references numbered globally.
        slot_of: dict[int, int] = {}
        slots: list[_ReferenceSet] = []
        hyp_slot = np.empty(num_hyps, dtype=np.int64)
        for h, reference_set in enumerate(reference_sets):
            slot = slot_of.get(id(reference_set))
            if slot is None:
                slot = slot_of[id(reference_set)] = len(slots)
                slots.append(reference_set)
            hyp_slot[h] = slot
        refs_per_slot = np.array([len(s.lengths) for s in slots], dtype=np.int64)
        slot_first_ref = np.cumsum(refs_per_slot) - refs_per_slot
        ref_norms = np.concatenate([s.norms for s in slots])  # (refs, n)
        ref_lengths = np.concatenate([s.lengths for s in slots])  # (refs,)
        num_ids = len(self._idf) + 1
        ref_keys = np.concatenate([(s.entry_ref + first) * num_ids + s.entry_ngram
                                   for s, first in zip(slots, slot_first_ref, strict=True)])
        ref_weights = np.concatenate([s.entry_weight for s in slots])
        # A sentinel key larger than any real one keeps every searchsorted position in range.
        sort = np.argsort(ref_keys)
        ref_keys = np.append(ref_keys[sort], np.iinfo(np.int64).max)
        ref_weights = np.append(ref_weights[sort], 0.0)

        # Hypothesis entries; an n-gram no reference has gets id -1 (it only adds to the norm).
        entry_hyp, entry_ngram, entry_count, entry_order, hyp_lengths = [], [], [], [], []
        ngram_ids = self._ngram_ids
        for h, tokens in enumerate(hypotheses):
            for ngram, count in ngram_counts(tokens, n).items():
                entry_hyp.append(h)
                entry_ngram.append(ngram_ids.get(ngram, -1))
                entry_count.append(count)
                entry_order.append(len(ngram) - 1)
            hyp_lengths.append(max(len(tokens) - 1, 0) if n >= 2 else 0)
        entry_hyp_array = np.asarray(entry_hyp, dtype=np.int64)
        entry_ngram_array = np.asarray(entry_ngram, dtype=np.int64)
        entry_order_array = np.asarray(entry_order, dtype=np.int64)
        known = entry_ngram_array >= 0
        idf = np.where(known, self._idf[np.maximum(entry_ngram_array, 0)], self.ref_len)
        hyp_weight = np.asarray(entry_count, dtype=np.float64) * idf
        hyp_norms = np.sqrt(np.bincount(entry_hyp_array * n + entry_order_array, weights=hyp_weight ** 2,
                                        minlength=num_hyps * n)).reshape(num_hyps, n)

        # Pairs (hypothesis, one of its references), numbered hypothesis-major.
        pairs_per_hyp = refs_per_slot[hyp_slot]
        pair_first = np.cumsum(pairs_per_hyp) - pairs_per_hyp
        pair_hyp = np.repeat(np.arange(num_hyps), pairs_per_hyp)
        pair_rank = np.arange(len(pair_hyp)) - pair_first[pair_hyp]  # which reference of its image
        pair_ref = slot_first_ref[hyp_slot[pair_hyp]] + pair_rank

        # Every known hypothesis entry against every reference of its image: look up the reference weight.
        entries = np.flatnonzero(known)
        repeats = pairs_per_hyp[entry_hyp_array[entries]]
        match_entry = np.repeat(entries, repeats)
        match_rank = np.arange(len(match_entry)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
        match_pair = pair_first[entry_hyp_array[match_entry]] + match_rank
        keys = pair_ref[match_pair] * num_ids + entry_ngram_array[match_entry]
        position = np.searchsorted(ref_keys, keys)
        matched_ref_weight = np.where(ref_keys[position] == keys, ref_weights[position], 0.0)
        clipped = np.minimum(hyp_weight[match_entry], matched_ref_weight) * matched_ref_weight
        dots = np.bincount(match_pair * n + entry_order_array[match_entry], weights=clipped,
                           minlength=len(pair_hyp) * n).reshape(len(pair_hyp), n).astype(np.float64)

        denominator = hyp_norms[pair_hyp] * ref_norms[pair_ref]  # (pairs, n)
        similarity = np.divide(dots, denominator, out=dots.copy(), where=denominator != 0)
        delta = np.asarray(hyp_lengths, dtype=np.float64)[pair_hyp] - ref_lengths[pair_ref]
        similarity *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        per_hyp = np.bincount(pair_hyp, weights=similarity.mean(axis=1), minlength=num_hyps)
        return per_hyp / pairs_per_hyp * 10.0


class CiderDReward(CiderD):
    """`CiderD` with document frequencies fixed by `corpus_references` (required): the reward of
    self-critical training and the consensus of re-ranking."""

    def __init__(self, corpus_references: TokenisedReferences, sigma: float = 6.0, n: int = 4):
        super().__init__(corpus_references, sigma, n)
