"""Decoding one caption per row: greedy decoding and sampling, batched over images.

Both advance every row one token per `step` and stop a row at <end>; the token rules
(`captioner.decoding.rules`) apply at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from captioner.config import DecodeConfig
from captioner.decoding.rules import TokenRules
from captioner.decoding.step import Hypothesis, State, StepModel, checked_init_state, length_normalise

_NEG_INF = float("-inf")


@torch.inference_mode()
def greedy(model: StepModel, image_features: Tensor, config: DecodeConfig, start_id: int, end_id: int,
           suppress_ids: Sequence[int] = ()) -> list[list[Hypothesis]]:
    """Most likely token at every step, all images at once. One hypothesis per image."""
    if config.n_best != 1:
        raise ValueError(f"greedy decoding gives one caption per image, but n_best is {config.n_best}; "
                         "use strategy 'beam' or 'sample' for several")
    state = checked_init_state(model, image_features)
    return decode_rows(model, state, config, start_id, end_id, suppress_ids,
                       choose=lambda log_probs: log_probs.argmax(dim=1), group_size=1)


@torch.inference_mode()
def sample(model: StepModel, image_features: Tensor, config: DecodeConfig, start_id: int, end_id: int,
           suppress_ids: Sequence[int] = (), generator: torch.Generator | None = None
           ) -> list[list[Hypothesis]]:
    """`config.n_best` independent samples per image, sorted by score (= log_prob when length_penalty is 0).

    Tokens are drawn from softmax(log_probs / temperature), restricted to the top_k tokens, then to the
    nucleus (the fewest top tokens whose probability reaches top_p; the top token is always kept).
    Randomness comes from `generator` if given, else from a generator seeded with `config.seed`, else
    from torch's global generator.
    """
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=image_features.device).manual_seed(config.seed)
    n_samples = config.n_best
    # Each image's state (image term included) is computed once and repeated for its samples.
    state = tuple(s.repeat_interleave(n_samples, dim=0) for s in checked_init_state(model, image_features))

    def choose(log_probs: Tensor) -> Tensor:  # (rows, vocab) -> (rows,)
        return _sample_tokens(log_probs, config, generator)

    return decode_rows(model, state, config, start_id, end_id, suppress_ids, choose, group_size=n_samples)


def decode_rows(model: StepModel, state: State, config: DecodeConfig, start_id: int, end_id: int,
                suppress_ids: Sequence[int], choose: Callable[[Tensor], Tensor], group_size: int
                ) -> list[list[Hypothesis]]:
    """One caption per state row, the next token picked by `choose`; rows are grouped per image."""
    rows = state[0].size(0)
    device = state[0].device
    rules = TokenRules(suppress_ids, end_id, config.no_repeat_ngram_size, device)
    tokens = torch.full((rows,), start_id, dtype=torch.long, device=device)
    history = torch.empty((rows, 0), dtype=torch.long, device=device)  # (rows, t)
    log_prob = torch.zeros(rows, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)  # emitted tokens, <end> included
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for _ in range(config.max_length):
        log_probs, state = model.step(tokens, state)
        log_probs = rules.apply(log_probs, history)  # (rows, vocab)
        # A row with every token blocked (only in degenerate set-ups) is made to end its caption.
        dead = ~torch.isfinite(log_probs).any(dim=1, keepdim=True)  # (rows, 1)
        is_end_column = torch.arange(log_probs.size(1), device=device) == end_id  # (vocab,)
        choice_log_probs = log_probs.masked_fill(dead & is_end_column, 0.0)
        # Finished rows keep being fed <end>; their outputs are ignored.
        tokens = choose(choice_log_probs).masked_fill(finished, end_id)  # (rows,)
        log_prob = log_prob + log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
        lengths += (~finished).long()
        finished = finished | (tokens == end_id)
        history = torch.cat([history, tokens.unsqueeze(1)], dim=1)
        if bool(finished.all()):
            break
    scores = length_normalise(log_prob, lengths, config.length_penalty)
    n_tokens = (lengths - finished.long()).tolist()
    history_list, log_prob_list, score_list = history.tolist(), log_prob.tolist(), scores.tolist()
    finished_list = finished.tolist()
    hypotheses = [Hypothesis(history_list[r][:n_tokens[r]], log_prob_list[r], score_list[r], finished_list[r])
                  for r in range(rows)]
    groups = [hypotheses[i:i + group_size] for i in range(0, rows, group_size)]
    return [sorted(group, key=lambda h: h.score, reverse=True) for group in groups]


def _sample_tokens(log_probs: Tensor, config: DecodeConfig, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row from the tempered, top-k and top-p filtered distribution."""
    logits = log_probs / config.temperature  # (rows, vocab)
    vocab = logits.size(1)
    if 0 < config.top_k < vocab:
        kept_logits, kept_ids = logits.topk(config.top_k, dim=1)  # (rows, top_k), best first
    elif config.top_p < 1.0:
        kept_logits, kept_ids = logits.sort(dim=1, descending=True)  # (rows, vocab)
    else:
        return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    if config.top_p < 1.0:
        probs = kept_logits.softmax(dim=1)
        mass_above = probs.cumsum(dim=1) - probs  # probability of the better-ranked tokens; 0 for the top
        kept_logits = kept_logits.masked_fill(mass_above >= config.top_p, _NEG_INF)
    choice = torch.multinomial(kept_logits.softmax(dim=1), 1, generator=generator)  # (rows, 1)
    return kept_ids.gather(1, choice).squeeze(1)
