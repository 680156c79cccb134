"""Caption metrics: BLEU-1..4, CIDEr-D and ROUGE-L behind one interface.

Every scorer has `compute_score(references, hypotheses) -> (corpus_score, per_image)`:

    references: {image_id: [reference caption, ...]}   (at least one per image)
    hypotheses: {image_id: generated caption}           (the same ids)

Both sides are raw strings, tokenised here with `captioner.text.tokenize` (lowercase, punctuation dropped,
as coco-caption's PTB step does) unless `tokenized=True` says they are already space-joined tokens.
The numbers agree with coco-caption (pycocoevalcap) given the same tokens; see docs/metrics.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from captioner.text import tokenize

ImageId = Hashable
References = Mapping[ImageId, Sequence[str]]
Hypotheses = Mapping[ImageId, str]

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L")

# coco-caption's BLEU adds these to numerators / denominators so that a zero count gives a tiny
# number rather than a division by zero; we add the same so per-image values match it.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def _preview(ids: Sequence[ImageId], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def _prepare(references: References, hypotheses: Hypotheses, tokenized: bool
             ) -> tuple[list[ImageId], list[list[list[str]]], list[list[str]]]:
    """Check the inputs and tokenise them -> (ids, refs[image][ref] tokens, hyps[image] tokens)."""
    missing = [i for i in references if i not in hypotheses]
    extra = [i for i in hypotheses if i not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"ids with references but no hypothesis ({len(missing)}): {_preview(missing)}")
        if extra:
            parts.append(f"ids with a hypothesis but no references ({len(extra)}): {_preview(extra)}")
        raise ValueError("references and hypotheses must have the same image ids; " + "; ".join(parts))

    split = str.split if tokenized else tokenize
    ids = list(references)
    all_refs, all_hyps = [], []
    for image_id in ids:
        refs = references[image_id]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"references[{image_id!r}] must be a list of caption strings, "
                             f"got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"references[{image_id!r}] is empty: every image needs at least one reference")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{image_id!r}] must contain only strings")
        hyp = hypotheses[image_id]
        # Accept COCO-style one-element lists as well as plain strings.
        if isinstance(hyp, (list, tuple)) and len(hyp) == 1:
            hyp = hyp[0]
        if not isinstance(hyp, str):
            raise ValueError(f"hypotheses[{image_id!r}] must be one caption string, got {type(hyp).__name__}")
        all_refs.append([split(r) for r in refs])
        all_hyps.append(split(hyp))
    return ids, all_refs, all_hyps


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """Counts of every 1..n-gram (as tuples) in `tokens`."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class Bleu:
    """BLEU-1..n as coco-caption computes it.

    Corpus: clipped n-gram matches and hypothesis n-gram counts are summed over all images; the
    effective reference length is, per image, the reference length closest to the hypothesis length
    (ties go to the shorter), summed; one brevity penalty on the totals; no smoothing.
    Per image: the same formula applied to one image's counts.
    corpus_score is [BLEU-1, ..., BLEU-n]; per_image maps id -> [b1, ..., bn].
    """

    name = "BLEU"

    def __init__(self, n: int = 4):
        if n < 1:
            raise ValueError(f"Bleu: n must be >= 1, got {n}")
        self.n = n

    def compute_score(self, references: References, hypotheses: Hypotheses, *, tokenized: bool = False
                      ) -> tuple[list[float], dict[ImageId, list[float]]]:
        ids, refs, hyps = _prepare(references, hypotheses, tokenized)
        n = self.n
        correct = np.zeros((len(ids), n))  # (images, n): clipped n-gram matches
        guess = np.zeros((len(ids), n))  # (images, n): n-grams in the hypothesis
        hyp_len = np.zeros(len(ids))
        ref_len = np.zeros(len(ids))  # closest reference length
        for row, (image_refs, hyp) in enumerate(zip(refs, hyps, strict=True)):
            max_ref_counts: Counter = Counter()
            for ref in image_refs:
                max_ref_counts |= _ngram_counts(ref, n)  # |= keeps the max count per n-gram
            for ngram, count in _ngram_counts(hyp, n).items():
                correct[row, len(ngram) - 1] += min(count, max_ref_counts[ngram])
            guess[row] = [max(0, len(hyp) - k) for k in range(n)]
            hyp_len[row] = len(hyp)
            ref_len[row] = min((abs(len(r) - len(hyp)), len(r)) for r in image_refs)[1]

        per_image = self._bleu(correct, guess, hyp_len, ref_len)
        corpus = self._bleu(correct.sum(0, keepdims=True), guess.sum(0, keepdims=True),
                            hyp_len.sum(keepdims=True), ref_len.sum(keepdims=True))[0]
        return corpus.tolist(), {image_id: scores.tolist() for image_id, scores in zip(ids, per_image, strict=True)}

    @staticmethod
    def _bleu(correct: np.ndarray, guess: np.ndarray, hyp_len: np.ndarray, ref_len: np.ndarray
              ) -> np.ndarray:
        """Rows of counts -> rows of BLEU-1..n: geometric mean of precisions times brevity penalty."""
        precisions = (correct + _BLEU_TINY) / (guess + _BLEU_SMALL)
        orders = np.arange(1, correct.shape[1] + 1)
        scores = np.cumprod(precisions, axis=1) ** (1.0 / orders)
        ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
        with np.errstate(over="ignore", under="ignore"):
            penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
        return scores * penalty[:, None]


class CiderD:
    """CIDEr-D as coco-caption's `Cider` scorer computes it.

    Each sentence becomes, for each n = 1..4, a vector of n-gram tf-idf weights, with document
    frequencies counted over the reference sets being scored (one document per image) and
    idf = log(images) - log(max(1, df)). Per image and reference: the hypothesis weights are clipped
    to the reference's (min), the cosine-style similarity is multiplied by a Gaussian length penalty
    exp(-delta^2 / (2 sigma^2)); the result is averaged over n, then over references, and times 10.
    Corpus score = mean over images. Scores depend on which images are scored together (see docs).
    """

    name = "CIDEr-D"

    def __init__(self, sigma: float = 6.0, n: int = 4):
        if n < 1:
            raise ValueError(f"CiderD: n must be >= 1, got {n}")
        self.sigma = sigma
        self.n = n

    def compute_score(self, references: References, hypotheses: Hypotheses, *, tokenized: bool = False
                      ) -> tuple[float, dict[ImageId, float]]:
        ids, refs, hyps = _prepare(references, hypotheses, tokenized)
        n = self.n
        ngram_ids: dict[tuple[str, ...], int] = {}

        # Flatten every sentence into (sentence, ngram id, count) entries; sentence s of image i.
        entry_sentence, entry_ngram, entry_count = [], [], []
        sentence_image, sentence_is_hyp, sentence_length = [], [], []
        image_ref_ngrams = []  # per image: the distinct n-gram ids of its references (for df)

        def add_sentence(tokens: list[str], image: int, is_hyp: bool) -> list[int]:
            s = len(sentence_image)
            sentence_image.append(image)
            sentence_is_hyp.append(is_hyp)
            # coco-caption measures length as the number of bigrams (0 when n < 2).
            sentence_length.append(max(len(tokens) - 1, 0) if n >= 2 else 0)
            found = []
            for ngram, count in _ngram_counts(tokens, n).items():
                ngram_id = ngram_ids.setdefault(ngram, len(ngram_ids))
                entry_sentence.append(s)
                entry_ngram.append(ngram_id)
                entry_count.append(count)
                found.append(ngram_id)
            return found

        for image, (image_refs, hyp) in enumerate(zip(refs, hyps, strict=True)):
            add_sentence(hyp, image, True)
            seen: set[int] = set()
            for ref in image_refs:
                seen.update(add_sentence(ref, image, False))
            image_ref_ngrams.append(seen)

        order_of = np.zeros(len(ngram_ids), dtype=np.int64)  # n-gram id -> n - 1
        for ngram, ngram_id in ngram_ids.items():
            order_of[ngram_id] = len(ngram) - 1
        doc_freq = np.zeros(len(ngram_ids))
        for seen in image_ref_ngrams:
            doc_freq[list(seen)] += 1
        idf = np.log(float(len(ids))) - np.log(np.maximum(1.0, doc_freq))

        entry_sentence = np.asarray(entry_sentence, dtype=np.int64)
        entry_ngram = np.asarray(entry_ngram, dtype=np.int64)
        weight = np.asarray(entry_count, dtype=np.float64) * idf[entry_ngram]
        entry_order = order_of[entry_ngram]
        sentence_image = np.asarray(sentence_image, dtype=np.int64)
        sentence_is_hyp = np.asarray(sentence_is_hyp, dtype=bool)
        sentence_length = np.asarray(sentence_length, dtype=np.float64)
        num_sentences = len(sentence_image)

        # (sentences, n): Euclidean norm of each sentence's weight vector per n-gram order.
        norms = np.sqrt(np.bincount(entry_sentence * n + entry_order, weights=weight ** 2,
                                    minlength=num_sentences * n)).reshape(num_sentences, n)

        # Look up, for every reference entry, the hypothesis weight of the same n-gram in its image.
        num_ngrams = max(len(ngram_ids), 1)
        entry_key = sentence_image[entry_sentence] * num_ngrams + entry_ngram
        is_hyp_entry = sentence_is_hyp[entry_sentence]
        # A sentinel key larger than any real one keeps every searchsorted position in range.
        hyp_keys = np.append(entry_key[is_hyp_entry], np.iinfo(np.int64).max)
        hyp_weights = np.append(weight[is_hyp_entry], 0.0)
        sort = np.argsort(hyp_keys, kind="stable")
        hyp_keys, hyp_weights = hyp_keys[sort], hyp_weights[sort]
        ref_entries = np.flatnonzero(~is_hyp_entry)
        position = np.searchsorted(hyp_keys, entry_key[ref_entries])
        found = hyp_keys[position] == entry_key[ref_entries]
        ref_weight = weight[ref_entries]
        matched_hyp_weight = np.where(found, hyp_weights[position], 0.0)
        clipped = np.minimum(matched_hyp_weight, ref_weight) * ref_weight
        # (sentences, n): clipped dot product with the image's hypothesis (rows of references only).
        dots = np.bincount(entry_sentence[ref_entries] * n + entry_order[ref_entries], weights=clipped,
                           minlength=num_sentences * n).reshape(num_sentences, n)

        hyp_of_image = np.flatnonzero(sentence_is_hyp)  # sentence index of each image's hypothesis
        ref_sentences = np.flatnonzero(~sentence_is_hyp)
        ref_image = sentence_image[ref_sentences]
        hyp_sentence = hyp_of_image[ref_image]
        denominator = norms[hyp_sentence] * norms[ref_sentences]  # (refs, n)
        similarity = np.divide(dots[ref_sentences], denominator, out=dots[ref_sentences].copy(),
                               where=denominator != 0)
        delta = sentence_length[hyp_sentence] - sentence_length[ref_sentences]
        similarity *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]

        refs_per_image = np.bincount(ref_image, minlength=len(ids))
        per_image = np.bincount(ref_image, weights=similarity.mean(axis=1), minlength=len(ids))
        per_image = per_image / refs_per_image * 10.0
        return float(per_image.mean()), dict(zip(ids, per_image.tolist(), strict=True))



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


class CiderDReward:
    """CIDEr-D of many hypotheses, with document frequencies fixed by a reference corpus.

    `CiderD` counts document frequencies over the set being scored, so a caption's score depends on
    the other images scored with it. For a training reward (self-critical training) the frequencies
    must stay fixed: here they come from `corpus_references` (the training references, one entry per
    image, each a list of tokenised captions), and the idf's reference length is log(images in the
    corpus). Everything else is `CiderD`'s formula: n = 1..4, idf = log(images) - log(max(1, df)),
    hypothesis weights clipped to the reference's, Gaussian length penalty (sigma 6), mean over n and
    over references, times 10. Scored against the same set it was built from, it equals `CiderD`'s
    per-image scores.

    Each corpus image's reference vectors are computed once, here; `score_images` scores hypotheses
    against corpus images by index, `score` against any reference lists (looked up in, or added to,
    the same cache). Scoring is vectorised over all hypotheses and references of a call.
    """

    name = "CIDEr-D"

    def __init__(self, corpus_references: Sequence[Sequence[Sequence[str]]], sigma: float = 6.0, n: int = 4):
        if n < 1:
            raise ValueError(f"CiderDReward: n must be >= 1, got {n}")
        if len(corpus_references) == 0:
            raise ValueError("CiderDReward: the reference corpus is empty; pass the training references")
        self.sigma, self.n = sigma, n
        self._ngram_ids: dict[tuple[str, ...], int] = {}
        counted = []  # per image, per reference: its n-gram counts
        documents = []  # per image: the distinct n-gram ids of its references
        for image, refs in enumerate(corpus_references):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"CiderDReward: corpus image {image} needs a list of tokenised references, "
                                 f"got {refs!r}")
            ref_counts = [_ngram_counts(ref, n) for ref in refs]
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

    def __len__(self) -> int:
        return len(self._corpus)

    def _reference_set(self, refs: Sequence[Sequence[str]], ref_counts: list[Counter] | None = None
                       ) -> _ReferenceSet:
        n = self.n
        if ref_counts is None:
            ref_counts = [_ngram_counts(ref, n) for ref in refs]
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
            raise ValueError(f"CiderDReward.score: {len(hypotheses)} hypotheses but {len(references)} "
                             "reference lists; give one reference list per hypothesis")
        reference_sets = []
        for index, refs in enumerate(references):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"CiderDReward.score: references[{index}] must be a non-empty list of "
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
            raise ValueError("CiderDReward.score_pooled: give at least one corpus image")
        sets = [self._corpus[i] for i in image_indices]
        offsets = np.cumsum([0] + [len(s.lengths) for s in sets[:-1]])
        pooled = _ReferenceSet(np.concatenate([s.entry_ref + offset for s, offset in zip(sets, offsets, strict=True)]),
                               np.concatenate([s.entry_ngram for s in sets]),
                               np.concatenate([s.entry_weight for s in sets]),
                               np.concatenate([s.norms for s in sets]), np.concatenate([s.lengths for s in sets]))
        return self._score(hypotheses, [pooled] * len(hypotheses))

    def score_images(self, hypotheses: Sequence[Sequence[str]], image_indices: Sequence[int]) -> np.ndarray:
        """Per-hypothesis CIDEr-D against the references of corpus image `image_indices[i]`."""
        if len(hypotheses) != len(image_indices):
            raise ValueError(f"CiderDReward.score_images: {len(hypotheses)} hypotheses but "
                             f"{len(image_indices)} image indices")
        try:
            reference_sets = [self._corpus[int(i)] for i in image_indices]
        except IndexError:
            raise ValueError(f"CiderDReward.score_images: image indices must be in 0..{len(self._corpus) - 1}, "
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
            for ngram, count in _ngram_counts(tokens, n).items():
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

class RougeL:
    """ROUGE-L as coco-caption computes it.

    Per image: LCS length against each reference gives precision (LCS / hypothesis length) and recall
    (LCS / reference length); the best precision and the best recall over references (possibly from
    different references) are combined as F = (1 + beta^2) P R / (R + beta^2 P). Corpus = mean.
    An empty hypothesis scores 0.
    """

    name = "ROUGE-L"

    def __init__(self, beta: float = 1.2):
        self.beta = beta

    def compute_score(self, references: References, hypotheses: Hypotheses, *, tokenized: bool = False
                      ) -> tuple[float, dict[ImageId, float]]:
        ids, refs, hyps = _prepare(references, hypotheses, tokenized)
        vocabulary: dict[str, int] = {}

        def encode(tokens: list[str], length: int, pad: int) -> list[int]:
            return [vocabulary.setdefault(t, len(vocabulary)) for t in tokens] + [pad] * (length - len(tokens))

        pair_image = [image for image, image_refs in enumerate(refs) for _ in image_refs]
        pair_refs = [ref for image_refs in refs for ref in image_refs]
        hyp_width = max(len(h) for h in hyps)
        ref_width = max(len(r) for r in pair_refs)
        # Different padding ids on each side, so padding never matches.
        hyp_ids = np.array([encode(h, hyp_width, -1) for h in hyps],
                           dtype=np.int64).reshape(len(hyps), hyp_width)  # (images, hyp_width)
        ref_ids = np.array([encode(r, ref_width, -2) for r in pair_refs],
                           dtype=np.int64).reshape(len(pair_refs), ref_width)  # (pairs, ref_width)
        pair_hyp_ids = hyp_ids[pair_image]  # (pairs, hyp_width)
        lcs = self._lcs_lengths(pair_hyp_ids, ref_ids)

        hyp_lengths = np.array([len(h) for h in hyps], dtype=np.float64)
        ref_lengths = np.array([len(r) for r in pair_refs], dtype=np.float64)
        pair_image = np.asarray(pair_image, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(hyp_lengths[pair_image] > 0, lcs / hyp_lengths[pair_image], 0.0)
            recall = np.where(ref_lengths > 0, lcs / ref_lengths, 0.0)
        best_precision = np.zeros(len(ids))
        best_recall = np.zeros(len(ids))
        np.maximum.at(best_precision, pair_image, precision)
        np.maximum.at(best_recall, pair_image, recall)
        beta2 = self.beta ** 2
        both = (best_precision > 0) & (best_recall > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            f_score = np.where(both, (1 + beta2) * best_precision * best_recall
                               / (best_recall + beta2 * best_precision), 0.0)
        return float(f_score.mean()), dict(zip(ids, f_score.tolist(), strict=True))

    @staticmethod
    def _lcs_lengths(hyp_ids: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
        """LCS length of each row pair, all rows at once: (pairs, hyp_width), (pairs, ref_width) -> (pairs,).

        Row i of the DP table is L[i, j] = max(L[i-1, j], L[i-1, j-1] + 1 if match, L[i, j-1]); the
        last term is a running maximum along j, so each row is one vectorised step.
        """
        pairs, ref_width = ref_ids.shape
        previous = np.zeros((pairs, ref_width + 1), dtype=np.int64)
        for i in range(hyp_ids.shape[1]):
            match = hyp_ids[:, i:i + 1] == ref_ids  # (pairs, ref_width)
            candidate = np.maximum(previous[:, 1:], np.where(match, previous[:, :-1] + 1, 0))
            previous[:, 1:] = np.maximum.accumulate(candidate, axis=1)
        return previous[:, -1].astype(np.float64)


def compute_scores(references: References, hypotheses: Hypotheses, *, tokenized: bool = False) -> dict:
    """BLEU-1..4, CIDEr-D and ROUGE-L of `hypotheses` against `references`.

    Returns {"BLEU-1": float, ..., "BLEU-4", "CIDEr-D", "ROUGE-L", "per_image": {id: {metric: float}}}.
    BLEU and ROUGE-L are on a 0..1 scale; CIDEr-D on its usual 0..10 scale.
    """
    if not tokenized:  # tokenise once and share it between the scorers
        ids, refs, hyps = _prepare(references, hypotheses, tokenized=False)
        references = {i: [" ".join(r) for r in rs] for i, rs in zip(ids, refs, strict=True)}
        hypotheses = {i: " ".join(h) for i, h in zip(ids, hyps, strict=True)}
    bleu, bleu_per_image = Bleu(4).compute_score(references, hypotheses, tokenized=True)
    cider, cider_per_image = CiderD().compute_score(references, hypotheses, tokenized=True)
    rouge, rouge_per_image = RougeL().compute_score(references, hypotheses, tokenized=True)

    scores: dict = {f"BLEU-{k + 1}": float(b) for k, b in enumerate(bleu)}
    scores["CIDEr-D"] = cider
    scores["ROUGE-L"] = rouge
    scores["per_image"] = {
        image_id: {**{f"BLEU-{k + 1}": b for k, b in enumerate(bleu_per_image[image_id])},
                   "CIDEr-D": cider_per_image[image_id], "ROUGE-L": rouge_per_image[image_id]}
        for image_id in bleu_per_image
    }
    return scores
