"""BLEU-1..4 as coco-caption computes it."""

from __future__ import annotations

from collections import Counter

import numpy as np

from captioner.metrics.common import Hypotheses, ImageId, References, ngram_counts, prepare_inputs

# coco-caption's BLEU adds these to numerators / denominators so that a zero count gives a tiny
# number rather than a division by zero; we add the same so per-image values match it.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


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
        ids, refs, hyps = prepare_inputs(references, hypotheses, tokenized)
        n = self.n
        correct = np.zeros((len(ids), n))  # (images, n): clipped n-gram matches
        guess = np.zeros((len(ids), n))  # (images, n): n-grams in the hypothesis
        hyp_len = np.zeros(len(ids))
        ref_len = np.zeros(len(ids))  # closest reference length
        for row, (image_refs, hyp) in enumerate(zip(refs, hyps, strict=True)):
            max_ref_counts: Counter = Counter()
            for ref in image_refs:
                max_ref_counts |= ngram_counts(ref, n)  # |= keeps the max count per n-gram
            for ngram, count in ngram_counts(hyp, n).items():
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
