"""Beam search, batched over images, with optional constraints (captions made to mention given words).

One search serves both. Its state has a constraint dimension: each image keeps one beam of `beam_size`
captions per constraint state, one `step` of shape (batch * states * beam_size, ...) per token. Without
constraints there is one state and this is plain beam search.

Constraints (Anderson et al. 2017, "Guided Open Vocabulary Image Captioning with Constrained Beam
Search"): an image has up to `MAX_CONSTRAINTS`; a constraint is a set of token ids, any one of which meets
it (the forms of one word: "dog", "dogs", "puppy"). A small finite-state machine tracks which constraints a
caption has met so far: its states are the subsets of the constraints (1, 2 or 4 states), written as bit
masks, and a token moves a caption from state s to s | (the constraints it meets). A caption that has met
a constraint never competes with one that has not; only captions that end in the state where every
constraint is met are results. Images are searched in groups with the same number of constraints, so an
image without any costs what plain beam search costs, and is searched exactly as it searches it. When no
caption meeting an image's constraints finishes within max_length, or none with a finite score meets
them, the image gets the plain search's captions instead, with `constraints_met=False`.

At each step the top 2*beam_size extensions landing in each state are taken (cumulative log-prob). An
<end> among the accepting state's top beam_size of them is a finished hypothesis and goes to the image's
pool (the n_best best by score); each state's beam is refilled with its best beam_size extensions that
are not <end>, so a finished beam frees its slot for the next-best candidate. Live beams still open at
max_length are cut there and compete with the pool (finished=False).

An image stops early once its pool is full and no live beam can reach the worst pooled score; the bound
uses only that log-probs never increase, so it holds for any length_penalty and early stopping never
changes the result. With length_penalty 0, beam_size 1 gives exactly the greedy caption; with
length_penalty > 0, beam_size 1 keeps searching past greedy's <end> for a longer caption that scores
higher. The token rules (`captioner.decoding.rules`) apply at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from captioner.config import MAX_CONSTRAINTS, DecodeConfig
from captioner.decoding.rules import TokenRules
from captioner.decoding.step import Hypothesis, State, StepModel, checked_init_state, length_normalise

Constraint = Sequence[int]  # token ids, any one of which meets the constraint
_NEG_INF = float("-inf")


@torch.inference_mode()
def beam_search(model: StepModel, image_features: Tensor, config: DecodeConfig, start_id: int, end_id: int,
                suppress_ids: Sequence[int] = (), constraints: Sequence[Sequence[Constraint]] | None = None
                ) -> list[list[Hypothesis]]:
    """For each image, the `config.n_best` best captions by `Hypothesis.score`, best first; with
    `constraints` (one list of 0 to MAX_CONSTRAINTS token-id sets per image), the best that meet all of
    the image's constraints (see the module docstring).

    Returns fewer for an image only when fewer captions with a finite log-prob exist (a toy vocabulary,
    or the token rules leaving nothing to emit)."""
    if config.n_best > config.beam_size:
        raise ValueError(f"n_best ({config.n_best}) cannot exceed beam_size ({config.beam_size})")
    rules = TokenRules(suppress_ids, end_id, config.no_repeat_ngram_size, image_features.device)
    if constraints is None:
        return _search(model, image_features, config, start_id, end_id, rules)
    batch = image_features.size(0)
    if len(constraints) != batch:
        raise ValueError(f"constraints: got {len(constraints)} lists for {batch} images")
    counts = [len(c) for c in constraints]
    if max(counts, default=0) > MAX_CONSTRAINTS:
        raise ValueError(f"constraints: at most {MAX_CONSTRAINTS} per image, got {max(counts)}")
    if len(set(counts)) <= 1:
        return _constrained(model, image_features, config, start_id, end_id, rules, constraints)
    # Each image costs rows for 2**(the batch's most constraints) states, so images are searched in
    # groups of equal constraint count (a search's results do not depend on the other images).
    results: list[list[Hypothesis]] = [[] for _ in constraints]
    for count in sorted(set(counts)):
        group = [i for i, n in enumerate(counts) if n == count]
        found = _constrained(model, image_features[group], config, start_id, end_id, rules,
                             [constraints[i] for i in group])
        for i, hypotheses in zip(group, found, strict=True):
            results[i] = hypotheses
    return results


def _constrained(model: StepModel, image_features: Tensor, config: DecodeConfig, start_id: int, end_id: int,
                 rules: TokenRules, constraints: Sequence[Sequence[Constraint]]) -> list[list[Hypothesis]]:
    """The search for images with the same number of constraints; unmet ones get the plain captions."""
    if not constraints or not constraints[0]:  # no constraints: the plain search
        return _search(model, image_features, config, start_id, end_id, rules)
    results = _search(model, image_features, config, start_id, end_id, rules, constraints)
    unmet = [i for i, hypotheses in enumerate(results) if not hypotheses]
    results = [[replace(h, constraints_met=True) for h in hypotheses] for hypotheses in results]
    if unmet:
        plain = _search(model, image_features[unmet], config, start_id, end_id, rules)
        for i, hypotheses in zip(unmet, plain, strict=True):
            results[i] = [replace(h, constraints_met=False) for h in hypotheses]
    return results


def _search(model: StepModel, image_features: Tensor, config: DecodeConfig, start_id: int, end_id: int,
            rules: TokenRules, constraints: Sequence[Sequence[Constraint]] | None = None) -> list[list[Hypothesis]]:
    """The search itself; `constraints`: None, or the same number (1..MAX_CONSTRAINTS) for every image."""
    beam_size, n_best, max_length = config.beam_size, config.n_best, config.max_length
    length_penalty = config.length_penalty
    device = image_features.device
    state = checked_init_state(model, image_features)
    batch = state[0].size(0)
    n_constraints = len(constraints[0]) if constraints else 0
    n_states = 1 << n_constraints
    accepting = n_states - 1  # every constraint met (state 0 without constraints)
    slots = n_states * beam_size  # rows per image: each state's beam
    token_bits = None  # (batch, vocab), made once the first step shows the vocabulary size
    state_ids = torch.arange(n_states, device=device)
    state = tuple(s.repeat_interleave(slots, dim=0) for s in state)  # each (batch*states*beam, ...)

    # Cumulative log-prob of each live beam (active, state, beam): one caption alive per image at first,
    # in state 0 (nothing met yet); the other beams are copies of it.
    live_scores = torch.full((batch, n_states, beam_size), _NEG_INF, device=device)
    live_scores[:, 0, 0] = 0.0
    tokens = torch.full((batch * slots,), start_id, dtype=torch.long, device=device)
    history = torch.empty((batch * slots, 0), dtype=torch.long, device=device)  # (active*slots, t)
    pool = HypothesisPool(batch, n_best, max_length, end_id, device)  # captions in the accepting state
    # Images still searching. Once an image stops early its rows leave every tensor, so later steps
    # cost only what is still running (with a length penalty most images run long, a few stop early).
    active = torch.arange(batch, device=device)

    for length in range(1, max_length + 1):
        n_active = active.numel()
        log_probs, state = model.step(tokens, state)
        log_probs = rules.apply(log_probs, history)  # (active*slots, V)
        vocab = log_probs.size(1)
        extended = live_scores.unsqueeze(3) + log_probs.view(n_active, n_states, beam_size, vocab)
        if n_states == 1:  # plain search: every extension stays in the one state
            candidates = extended.view(n_active, 1, beam_size * vocab)
        else:
            if token_bits is None:
                token_bits = _token_bits(constraints, vocab, start_id, end_id).to(device)
            # The state each extension lands in: (active, from-state, vocab).
            lands_in = state_ids.view(1, -1, 1) | token_bits[active].unsqueeze(1)
            # For every target state, the extensions landing there: (active, to-state, from-state*beam*V).
            into = lands_in.unsqueeze(1).unsqueeze(3) == state_ids.view(1, -1, 1, 1, 1)
            candidates = extended.unsqueeze(1).masked_fill(~into, _NEG_INF).view(n_active, n_states, -1)
        n_candidates = min(2 * beam_size, candidates.size(2))
        cand_scores, cand_index = candidates.topk(n_candidates, dim=2)  # (active, to-state, n_cand), best first
        cand_parent = torch.div(cand_index, vocab, rounding_mode="floor")  # from-state*beam + beam
        cand_token = cand_index % vocab
        cand_is_end = cand_token == end_id  # <end> meets nothing, so it only comes from the same state

        # <end> within the accepting state's top beam_size candidates: a finished hypothesis.
        top_scores = cand_scores[:, accepting, :beam_size]  # (active, beam)
        finishing = cand_is_end[:, accepting, :beam_size] & torch.isfinite(top_scores)
        if finishing.any():
            parents = cand_parent[:, accepting, :beam_size]
            finished_tokens = history.view(n_active, slots, length - 1).gather(
                1, parents.unsqueeze(2).expand(-1, -1, history.size(1)))  # (active, beam, length-1)
            lengths = torch.full_like(parents, length)
            pool.add(length_normalise(top_scores, lengths, length_penalty).masked_fill(~finishing, _NEG_INF),
                     top_scores, finished_tokens, finished=True, images=active)

        # Each state's beam is refilled with its best candidates that are not <end> (at most beam_size of
        # the 2*beam_size are <end>: one per beam of that same state).
        rank = torch.arange(n_candidates, device=device)
        keep = (rank + cand_is_end.long() * n_candidates).argsort(dim=2)[:, :, :beam_size]  # (active, to, beam)
        live_scores = cand_scores.gather(2, keep).masked_fill(cand_is_end.gather(2, keep), _NEG_INF)
        tokens = cand_token.gather(2, keep).view(-1)  # (active*slots,)
        image_offset = torch.arange(n_active, device=device).view(-1, 1, 1) * slots
        parent_rows = (image_offset + cand_parent.gather(2, keep)).view(-1)  # (active*slots,)
        state = tuple(s.index_select(0, parent_rows) for s in state)
        history = torch.cat([history.index_select(0, parent_rows), tokens.unsqueeze(1)], dim=1)
        if length == max_length:
            break

        # Early stop once no live beam can beat the worst of an image's n best finished ones: a beam in any
        # state may still reach the accepting state, but its log-prob can only fall.
        best_live = live_scores.view(n_active, -1).amax(dim=1)  # (active,)
        going_on = ~(pool.worst_score()[active] >= best_possible_score(best_live, length, max_length,
                                                                       length_penalty))  # (active,)
        if not bool(going_on.all()):
            if not bool(going_on.any()):
                active = active[:0]
                break
            active, live_scores, tokens, history, state = keep_images(going_on, slots, active, live_scores,
                                                                      tokens, history, state)

    # The accepting state's beams still open were cut at max_length (images that stopped early have none).
    if active.numel():
        cut_scores = live_scores[:, accepting]  # (active, beam)
        cut_tokens = history.view(active.numel(), n_states, beam_size, -1)[:, accepting]
        cut_lengths = torch.full_like(cut_scores, history.size(1))
        pool.add(length_normalise(cut_scores, cut_lengths, length_penalty), cut_scores, cut_tokens,
                 finished=False, images=active)
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


def _token_bits(constraints: Sequence[Sequence[Constraint]], vocab: int, start_id: int, end_id: int) -> Tensor:
    """(batch, vocab): bit j of a token's entry is set when the token meets the image's constraint j."""
    token_bits = torch.zeros((len(constraints), vocab), dtype=torch.long)
    for image, image_constraints in enumerate(constraints):
        for j, constraint in enumerate(image_constraints):
            ids = sorted({int(t) for t in constraint})
            if not ids:
                raise ValueError(f"constraints: image {image}, constraint {j} has no token ids")
            bad = [t for t in ids if not 0 <= t < vocab or t in (end_id, start_id)]
            if bad:
                raise ValueError(f"constraints: image {image}, constraint {j}: token ids {bad} are not words of "
                                 f"the vocabulary (size {vocab}, <start> {start_id}, <end> {end_id})")
            token_bits[image, ids] |= 1 << j
    return token_bits
