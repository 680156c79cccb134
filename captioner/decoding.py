"""Caption decoding: greedy, sampling and beam search, all batched, all through one step interface.

The decoder is seen only through `StepModel` (the im2txt two-method interface): `init_state` once per
image, then `step` once per generated token. Every strategy stops a caption at <end>, never emits
`suppress_ids`, can block repeated n-grams, and returns `Hypothesis` objects best first.

`Hypothesis.log_prob` is always the model's own log-softmax value summed over the generated tokens
(<end> included when emitted): no temperature, no top-k/top-p renormalisation, and no renormalisation
after suppressed or blocked tokens are removed. `Hypothesis.score` is that log-prob divided by
length ** length_penalty (length = tokens emitted, <end> included), and is the ranking key everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from captioner.config import DecodeConfig

State = tuple[Tensor, ...]  # every tensor has the batch (or batch*beam) in dim 0

_NEG_INF = float("-inf")


class StepModel(Protocol):
    """What decoding needs from a caption model.

    `init_state` runs once per image (the model keeps its image term, e.g. W_ih·v, inside the state so
    it is computed once and just repeated/reordered with the beams); `step` feeds one token per row and
    returns log-softmax scores for the next token.
    """

    def init_state(self, image_features: Tensor) -> State:  # (batch, feature_dim) -> tensors (batch, ...)
        ...

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:  # (rows,) -> (rows, vocab), state
        ...


@dataclass
class Hypothesis:
    """One caption. `tokens` has neither <start> nor the final <end>."""

    tokens: list[int]
    log_prob: float  # sum of the model's log-probs of the emitted tokens, <end> included when emitted
    score: float  # log_prob / length ** length_penalty, length = emitted tokens incl. <end>
    finished: bool  # emitted <end>; False when cut at max_length


def decode(
    model: StepModel,
    image_features: Tensor,
    config: DecodeConfig,
    start_id: int,
    end_id: int,
    suppress_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """Caption every image with `config.strategy`; for each image, `config.n_best` hypotheses best first.

    Beam search returns fewer for an image only when fewer captions with a finite log-prob exist (a toy
    vocabulary, or suppression and n-gram blocking leaving nothing to emit).
    """
    if config.strategy == "greedy":
        return greedy(model, image_features, config, start_id, end_id, suppress_ids)
    if config.strategy == "sample":
        return sample(model, image_features, config, start_id, end_id, suppress_ids, generator)
    return beam_search(model, image_features, config, start_id, end_id, suppress_ids)


@torch.inference_mode()
def greedy(
    model: StepModel,
    image_features: Tensor,
    config: DecodeConfig,
    start_id: int,
    end_id: int,
    suppress_ids: Sequence[int] = (),
) -> list[list[Hypothesis]]:
    """Most likely token at every step, all images at once. One hypothesis per image."""
    if config.n_best != 1:
        raise ValueError(f"greedy decoding gives one caption per image, but n_best is {config.n_best}; "
                         "use strategy 'beam' or 'sample' for several")
    state = checked_init_state(model, image_features)
    return _decode_rows(model, state, config, start_id, end_id, suppress_ids,
                        choose=lambda log_probs: log_probs.argmax(dim=1), group_size=1)


@torch.inference_mode()
def sample(
    model: StepModel,
    image_features: Tensor,
    config: DecodeConfig,
    start_id: int,
    end_id: int,
    suppress_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
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

    return _decode_rows(model, state, config, start_id, end_id, suppress_ids, choose, group_size=n_samples)


@torch.inference_mode()
def beam_search(
    model: StepModel,
    image_features: Tensor,
    config: DecodeConfig,
    start_id: int,
    end_id: int,
    suppress_ids: Sequence[int] = (),
) -> list[list[Hypothesis]]:
    """Beam search over all images at once: one `step` of shape (batch*beam_size, ...) per time step.

    At each step the top 2*beam_size extensions of an image's live beams are taken (cumulative
    log-prob). An <end> among the top beam_size of them is a finished hypothesis and goes to the image's
    pool (the n_best best by score); the beam slots are refilled with the best beam_size extensions that
    are not <end>, so a finished beam frees its slot for the next-best candidate. Live beams still open
    at max_length are cut there and compete with the pool (finished=False).

    An image stops early once its pool is full and no live beam can reach the worst pooled score; the
    bound uses only that log-probs never increase, so it holds for any length_penalty and early stopping
    never changes the result. With length_penalty 0, beam_size 1 gives exactly the greedy caption;
    with length_penalty > 0, beam_size 1 keeps searching past greedy's <end> for a longer caption that
    scores higher.
    """
    beam_size, n_best, max_length = config.beam_size, config.n_best, config.max_length
    if n_best > beam_size:
        raise ValueError(f"n_best ({n_best}) cannot exceed beam_size ({beam_size})")
    length_penalty = config.length_penalty
    device = image_features.device
    state = checked_init_state(model, image_features)
    batch = state[0].size(0)
    state = tuple(s.repeat_interleave(beam_size, dim=0) for s in state)  # each (batch*beam, ...)
    suppress = suppress_tensor(suppress_ids, end_id, device)

    # Cumulative log-prob of each live beam; only beam 0 is alive at first (the others are copies).
    live_scores = torch.full((batch, beam_size), _NEG_INF, device=device)  # (active, beam)
    live_scores[:, 0] = 0.0
    tokens = torch.full((batch * beam_size,), start_id, dtype=torch.long, device=device)
    history = torch.empty((batch * beam_size, 0), dtype=torch.long, device=device)  # (active*beam, t)
    pool = HypothesisPool(batch, n_best, max_length, end_id, device)
    # Images still searching. Once an image stops early its rows leave every tensor, so later steps
    # cost only what is still running (with a length penalty most images run long, a few stop early).
    active = torch.arange(batch, device=device)

    for length in range(1, max_length + 1):
        n_active = active.numel()
        log_probs, state = model.step(tokens, state)
        log_probs = blocked(log_probs, history, suppress, config.no_repeat_ngram_size)  # (active*beam, V)
        vocab = log_probs.size(1)
        candidates = (live_scores.view(-1, 1) + log_probs).view(n_active, beam_size * vocab)
        n_candidates = min(2 * beam_size, beam_size * vocab)
        cand_scores, cand_index = candidates.topk(n_candidates, dim=1)  # (active, n_cand), best first
        cand_parent = torch.div(cand_index, vocab, rounding_mode="floor")  # beam it extends
        cand_token = cand_index % vocab
        cand_is_end = cand_token == end_id

        # <end> within the top beam_size candidates: a finished hypothesis.
        top_scores = cand_scores[:, :beam_size]  # (active, beam)
        finishing = cand_is_end[:, :beam_size] & torch.isfinite(top_scores)
        if finishing.any():
            parents = cand_parent[:, :beam_size]
            finished_tokens = history.view(n_active, beam_size, length - 1).gather(
                1, parents.unsqueeze(2).expand(-1, -1, history.size(1)))  # (active, beam, length-1)
            lengths = torch.full_like(parents, length)
            pool.add(length_normalise(top_scores, lengths, length_penalty).masked_fill(~finishing, _NEG_INF),
                     top_scores, finished_tokens, finished=True, images=active)

        # Refill the slots with the best candidates that are not <end> (there are always beam_size of
        # them among 2*beam_size, since each beam contributes a single <end>).
        rank = torch.arange(n_candidates, device=device)
        keep = (rank + cand_is_end.long() * n_candidates).argsort(dim=1)[:, :beam_size]  # (active, beam)
        live_scores = cand_scores.gather(1, keep).masked_fill(cand_is_end.gather(1, keep), _NEG_INF)
        tokens = cand_token.gather(1, keep).view(-1)  # (active*beam,)
        beam_offset = torch.arange(n_active, device=device).unsqueeze(1) * beam_size  # (active, 1)
        parent_rows = (beam_offset + cand_parent.gather(1, keep)).view(-1)  # (active*beam,)
        state = tuple(s.index_select(0, parent_rows) for s in state)
        history = torch.cat([history.index_select(0, parent_rows), tokens.unsqueeze(1)], dim=1)
        if length == max_length:
            break

        # Early stop once no live beam can beat the worst of an image's n best finished ones.
        going_on = ~(pool.worst_score()[active] >= best_possible_score(live_scores.amax(dim=1), length, max_length,
                                                                       length_penalty))  # (active,)
        if not bool(going_on.all()):
            if not bool(going_on.any()):
                active = active[:0]
                break
            active, live_scores, tokens, history, state = keep_images(going_on, beam_size, active, live_scores,
                                                                      tokens, history, state)

    # Beams still open were cut at max_length (images that stopped early have none left).
    if active.numel():
        cut_lengths = torch.full_like(live_scores, history.size(1))
        pool.add(length_normalise(live_scores, cut_lengths, length_penalty), live_scores,
                 history.view(active.numel(), beam_size, history.size(1)), finished=False, images=active)
    return pool.hypotheses()


def best_possible_score(best_live: Tensor, length: int, max_length: int, length_penalty: float) -> Tensor:
    """The highest length-normalised score a live beam with log-prob `best_live` (active,) can still reach:
    its log-prob can only fall, so the best is at the shortest or the longest remaining length (which one
    depends on the sign of length_penalty)."""
    return torch.maximum(
        length_normalise(best_live, torch.full_like(best_live, length + 1), length_penalty),
        length_normalise(best_live, torch.full_like(best_live, max_length), length_penalty))


def keep_images(going_on: Tensor, rows_per_image: int, active: Tensor, live_scores: Tensor, tokens: Tensor,
                history: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor, Tensor, State]:
    """Drop the images whose search is over (`going_on` False, (active,)) from the search's tensors: per-image
    `active` and `live_scores`, and `tokens`, `history` and `state` with `rows_per_image` rows per image."""
    rows = going_on.repeat_interleave(rows_per_image)
    return (active[going_on], live_scores[going_on], tokens[rows], history[rows],
            tuple(s[rows] for s in state))


class HypothesisPool:
    """The n_best best hypotheses of each image, best first, as tensors (no per-image Python work)."""

    def __init__(self, batch: int, n_best: int, max_length: int, pad_id: int, device: torch.device):
        self.n_best, self.max_length, self.pad_id = n_best, max_length, pad_id
        self.scores = torch.full((batch, n_best), _NEG_INF, device=device)
        self.log_probs = torch.full((batch, n_best), _NEG_INF, device=device)
        self.tokens = torch.full((batch, n_best, max_length), pad_id, dtype=torch.long, device=device)
        self.lengths = torch.zeros((batch, n_best), dtype=torch.long, device=device)  # without <end>
        self.finished = torch.zeros((batch, n_best), dtype=torch.bool, device=device)

    def worst_score(self) -> Tensor:  # (batch,); -inf while the pool is not full
        return self.scores[:, -1]

    def add(self, scores: Tensor, log_probs: Tensor, tokens: Tensor, finished: bool, images: Tensor) -> None:
        """Offer hypotheses for the pool rows `images` (k,): scores, log_probs (k, m); tokens (k, m, length).
        A score of -inf means no hypothesis."""
        length = tokens.size(2)
        tokens = torch.nn.functional.pad(tokens, (0, self.max_length - length), value=self.pad_id)
        all_scores = torch.cat([self.scores[images], scores], dim=1)  # (k, n_best + m)
        self.scores[images], best = all_scores.topk(self.n_best, dim=1)
        self.log_probs[images] = torch.cat([self.log_probs[images], log_probs], dim=1).gather(1, best)
        new_lengths = torch.full_like(scores, length, dtype=torch.long)
        self.lengths[images] = torch.cat([self.lengths[images], new_lengths], dim=1).gather(1, best)
        new_finished = torch.full_like(scores, finished, dtype=torch.bool)
        self.finished[images] = torch.cat([self.finished[images], new_finished], dim=1).gather(1, best)
        self.tokens[images] = torch.cat([self.tokens[images], tokens], dim=1).gather(
            1, best.unsqueeze(2).expand(-1, -1, self.max_length))

    def hypotheses(self) -> list[list[Hypothesis]]:
        scores, log_probs = self.scores.tolist(), self.log_probs.tolist()
        tokens, lengths, finished = self.tokens.tolist(), self.lengths.tolist(), self.finished.tolist()
        return [[Hypothesis(tokens[i][j][:lengths[i][j]], log_probs[i][j], scores[i][j], finished[i][j])
                 for j in range(self.n_best) if scores[i][j] != _NEG_INF]
                for i in range(len(scores))]


def _decode_rows(
    model: StepModel,
    state: State,
    config: DecodeConfig,
    start_id: int,
    end_id: int,
    suppress_ids: Sequence[int],
    choose: Callable[[Tensor], Tensor],
    group_size: int,
) -> list[list[Hypothesis]]:
    """One caption per state row, the next token picked by `choose`; rows are grouped per image."""
    rows = state[0].size(0)
    device = state[0].device
    suppress = suppress_tensor(suppress_ids, end_id, device)
    tokens = torch.full((rows,), start_id, dtype=torch.long, device=device)
    history = torch.empty((rows, 0), dtype=torch.long, device=device)  # (rows, t)
    log_prob = torch.zeros(rows, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)  # emitted tokens, <end> included
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for _ in range(config.max_length):
        log_probs, state = model.step(tokens, state)
        log_probs = blocked(log_probs, history, suppress, config.no_repeat_ngram_size)  # (rows, vocab)
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


def blocked(log_probs: Tensor, history: Tensor, suppress: Tensor, no_repeat_ngram_size: int) -> Tensor:
    """A float32 copy of log_probs (rows, vocab) with suppressed tokens, and tokens that would repeat an
    n-gram already in that row's history (rows, t), set to -inf."""
    log_probs = log_probs.float()
    if suppress.numel():
        log_probs = log_probs.index_fill(1, suppress, _NEG_INF)
    n = no_repeat_ngram_size
    if n and history.size(1) >= n:
        windows = history.unfold(1, n, 1)  # (rows, t-n+1, n): every n-gram so far
        suffix = history[:, history.size(1) - n + 1:]  # (rows, n-1): what the next token would extend
        seen = (windows[..., :-1] == suffix.unsqueeze(1)).all(dim=2)  # (rows, t-n+1)
        banned = torch.zeros_like(log_probs).scatter_add_(1, windows[..., -1], seen.to(log_probs.dtype))
        log_probs = log_probs.masked_fill(banned > 0, _NEG_INF)
    return log_probs


def length_normalise(log_probs: Tensor, lengths: Tensor, length_penalty: float) -> Tensor:
    """The ranking score: log_probs / lengths ** length_penalty (elementwise)."""
    if length_penalty == 0:
        return log_probs
    return log_probs / lengths.to(log_probs.dtype) ** length_penalty


def suppress_tensor(suppress_ids: Sequence[int], end_id: int, device: torch.device) -> Tensor:
    """The ids never to emit, sorted, as a tensor for `blocked`; refuses <end> among them."""
    ids = sorted({int(i) for i in suppress_ids})
    if end_id in ids:
        raise ValueError(f"suppress_ids contains the <end> id {end_id}; captions could never finish")
    return torch.tensor(ids, dtype=torch.long, device=device)


def checked_init_state(model: StepModel, image_features: Tensor) -> State:
    """`model.init_state`, as a tuple, checked to have the batch in dim 0 of every tensor."""
    state = model.init_state(image_features)
    if isinstance(state, Tensor):
        state = (state,)
    state = tuple(state)
    if not state:
        raise ValueError(f"{type(model).__name__}.init_state returned an empty state")
    batch = image_features.size(0)
    for i, s in enumerate(state):
        if s.dim() == 0 or s.size(0) != batch:
            raise ValueError(f"{type(model).__name__}.init_state: state[{i}] has shape {tuple(s.shape)}, but "
                             f"every state tensor must have the batch ({batch}) in dim 0")
    return state
