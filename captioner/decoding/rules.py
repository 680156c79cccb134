"""The per-step token rules: which next tokens a caption may not take, for every decoding strategy.

Greedy decoding, sampling and beam search all call `TokenRules.apply` on the model's log-probs at every
step, before choosing, so a rule written here holds for every strategy. The rules: never emit the
suppressed ids (<pad>, <start>, <unk>), and, with `no_repeat_ngram_size` n > 0, never a token that would
repeat an n-gram already in the caption. A removed token gets -inf; the others keep the model's own
log-probs (no renormalisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_NEG_INF = float("-inf")


class TokenRules:
    """The rules of one search (see the module docstring); `apply` is its per-step hot path."""

    def __init__(self, suppress_ids: Sequence[int], end_id: int, no_repeat_ngram_size: int,
                 device: torch.device) -> None:
        ids = sorted({int(i) for i in suppress_ids})
        if end_id in ids:
            raise ValueError(f"suppress_ids contains the <end> id {end_id}; captions could never finish")
        self.suppress = torch.tensor(ids, dtype=torch.long, device=device)
        self.no_repeat_ngram_size = no_repeat_ngram_size

    def apply(self, log_probs: Tensor, history: Tensor) -> Tensor:
        """A float32 copy of log_probs (rows, vocab) with the tokens the rules remove set to -inf, given each
        row's tokens so far, `history` (rows, t)."""
        log_probs = log_probs.float()
        if self.suppress.numel():
            log_probs = log_probs.index_fill(1, self.suppress, _NEG_INF)
        n = self.no_repeat_ngram_size
        if n and history.size(1) >= n:
            windows = history.unfold(1, n, 1)  # (rows, t-n+1, n): every n-gram so far
            suffix = history[:, history.size(1) - n + 1:]  # (rows, n-1): what the next token would extend
            seen = (windows[..., :-1] == suffix.unsqueeze(1)).all(dim=2)  # (rows, t-n+1)
            banned = torch.zeros_like(log_probs).scatter_add_(1, windows[..., -1], seen.to(log_probs.dtype))
            log_probs = log_probs.masked_fill(banned > 0, _NEG_INF)
        return log_probs
