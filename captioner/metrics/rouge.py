"""ROUGE-L as coco-caption computes it."""

from __future__ import annotations

import numpy as np

from captioner.metrics.common import Hypotheses, ImageId, References, prepare_inputs


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
        ids, refs, hyps = prepare_inputs(references, hypotheses, tokenized)
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
