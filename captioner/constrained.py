"""Constrained beam search (Anderson et al. 2017, "Guided Open Vocabulary Image Captioning with Constrained
Beam Search"): captions forced to mention given words, e.g. the concepts the CNN recognised.

Each image has up to `MAX_CONSTRAINTS` constraints; a constraint is a set of token ids, any one of which
satisfies it (the forms of one word: "dog", "dogs", "puppy"). A small finite-state machine tracks which
constraints a caption has met so far: its states are the subsets of the constraints (1, 2 or 4 states),
written as bit masks, and a token moves a caption from state s to s | (the constraints it satisfies). Each
state keeps its own beam of `beam_size` captions, so a caption that has met a constraint never competes
with one that has not. Only captions that end in the state where every constraint is met are results.

The search is `decoding.beam_search` run per state: the same candidates (top 2*beam_size per state), the
same <end> handling, the same early stop, length penalty, n-gram blocking and suppression, one batched
`step` of shape (batch * states * beam_size, ...) per token. Images are searched in groups with the same
number of constraints, so an image without constraints costs what `beam_search` costs, and is searched
exactly as it searches it.

When no caption meeting an image's constraints finishes within max_length, or no caption with a finite
score meets them (blocked or suppressed forms), the image gets `beam_search`'s plain captions instead,
with `constraints_met=False`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from captioner.config import MAX_CONSTRAINTS, DecodeConfig
from captioner.decoding import (
    Hypothesis,
    HypothesisPool,
    StepModel,
    beam_search,
    best_possible_score,
    blocked,
    checked_init_state,
    keep_images,
    length_normalise,
    suppress_tensor,
)

Constraint = Sequence[int]  # token ids, any one of which meets the constraint
_NEG_INF = float("-inf")


@dataclass
class ConstrainedHypothesis(Hypothesis):
    """A caption from constrained search. constraints_met: False when it is the plain beam search's caption,
    given because no caption meeting the image's constraints was found."""

    constraints_met: bool = True


@torch.inference_mode()
def constrained_beam_search(
    model: StepModel,
    image_features: Tensor,
    config: DecodeConfig,
    start_id: int,
    end_id: int,
    constraints: Sequence[Sequence[Constraint]],
    suppress_ids: Sequence[int] = (),
) -> list[list[ConstrainedHypothesis]]:
    """For each image, the `config.n_best` best captions (by `Hypothesis.score`) that meet all its
    `constraints[image]` (0 to MAX_CONSTRAINTS token-id sets), best first; see the module docstring."""
    beam_size, n_best, max_length = config.beam_size, config.n_best, config.max_length
    if n_best > beam_size:
        raise ValueError(f"n_best ({n_best}) cannot exceed beam_size ({beam_size})")
    length_penalty = config.length_penalty
    device = image_features.device
    state = checked_init_state(model, image_features)
    batch = state[0].size(0)
    if len(constraints) != batch:
        raise ValueError(f"constraints: got {len(constraints)} lists for {batch} images")
    counts = [len(c) for c in constraints]
    if len(set(counts)) > 1:
        # Each image costs rows for 2**(the batch's most constraints) states, so images are searched in
        # groups of equal constraint count (a search's results do not depend on the other images).
        results: list[list[ConstrainedHypothesis]] = [[] for _ in constraints]
        for count in sorted(set(counts)):
            group = [i for i, n in enumerate(counts) if n == count]
            found = constrained_beam_search(model, image_features[group], config, start_id, end_id,
                                            [constraints[i] for i in group], suppress_ids)
            for i, hypotheses in zip(group, found, strict=True):
                results[i] = hypotheses
        return results
    suppress = suppress_tensor(suppress_ids, end_id, device)
    n_constraints = max(counts, default=0)
    if n_constraints > MAX_CONSTRAINTS:
        raise ValueError(f"constraints: at most {MAX_CONSTRAINTS} per image, got {n_constraints}")
    token_bits = None  # (batch, vocab), made once the first step shows the vocabulary size
    n_states = 1 << n_constraints
    accepting = n_states - 1
    slots = n_states * beam_size  # rows per image: each state's beam
    state = tuple(s.repeat_interleave(slots, dim=0) for s in state)  # each (batch*states*beam, ...)

    # Cumulative log-prob of each live beam (active, state, beam): one caption alive per image at first,
    # in state 0 (nothing met yet).
    live_scores = torch.full((batch, n_states, beam_size), _NEG_INF, device=device)
    live_scores[:, 0, 0] = 0.0
    tokens = torch.full((batch * slots,), start_id, dtype=torch.long, device=device)
    history = torch.empty((batch * slots, 0), dtype=torch.long, device=device)  # (active*slots, t)
    pool = HypothesisPool(batch, n_best, max_length, end_id, device)  # captions meeting every constraint
    active = torch.arange(batch, device=device)
    state_ids = torch.arange(n_states, device=device)

    for length in range(1, max_length + 1):
        n_active = active.numel()
        log_probs, state = model.step(tokens, state)
        log_probs = blocked(log_probs, history, suppress, config.no_repeat_ngram_size)  # (active*slots, V)
        vocab = log_probs.size(1)
        if token_bits is None:
            token_bits = _token_bits(constraints, vocab, start_id, end_id).to(device)
        log_probs = log_probs.view(n_active, n_states, beam_size, vocab)
        # The state each extension lands in: (active, from-state, vocab).
        lands_in = state_ids.view(1, -1, 1) | token_bits[active].unsqueeze(1)
        extended = live_scores.unsqueeze(3) + log_probs  # (active, from-state, beam, V)
        # For every target state, the extensions landing there: (active, to-state, from-state*beam*V).
        into = lands_in.unsqueeze(1).unsqueeze(3) == state_ids.view(1, -1, 1, 1, 1)
        candidates = extended.unsqueeze(1).masked_fill(~into, _NEG_INF).view(n_active, n_states, -1)
        n_candidates = min(2 * beam_size, candidates.size(2))
        cand_scores, cand_index = candidates.topk(n_candidates, dim=2)  # (active, to-state, n_cand)
        cand_parent = torch.div(cand_index, vocab, rounding_mode="floor")  # from-state*beam + beam
        cand_token = cand_index % vocab
        cand_is_end = cand_token == end_id  # <end> meets nothing, so it only comes from the same state

        # <end> within the accepting state's top beam_size candidates: a result.
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

        # Early stop, as in beam_search: a beam in any state may still reach the accepting state, but its
        # log-prob can only fall.
        best_live = live_scores.view(n_active, -1).amax(dim=1)  # (active,)
        going_on = ~(pool.worst_score()[active] >= best_possible_score(best_live, length, max_length,
                                                                       length_penalty))  # (active,)
        if not bool(going_on.all()):
            if not bool(going_on.any()):
                active = active[:0]
                break
            active, live_scores, tokens, history, state = keep_images(going_on, slots, active, live_scores,
                                                                      tokens, history, state)

    # The accepting state's beams still open were cut at max_length.
    if active.numel():
        cut_scores = live_scores[:, accepting]  # (active, beam)
        cut_tokens = history.view(active.numel(), n_states, beam_size, -1)[:, accepting]
        cut_lengths = torch.full_like(cut_scores, history.size(1))
        pool.add(length_normalise(cut_scores, cut_lengths, length_penalty), cut_scores, cut_tokens,
                 finished=False, images=active)

    results = [
        [ConstrainedHypothesis(h.tokens, h.log_prob, h.score, h.finished) for h in hypotheses]
        for hypotheses in pool.hypotheses()]
    unmet = [i for i, hypotheses in enumerate(results) if not hypotheses]
    if unmet:
        plain = beam_search(model, image_features[unmet], config, start_id, end_id, suppress_ids)
        for i, hypotheses in zip(unmet, plain, strict=True):
            results[i] = [ConstrainedHypothesis(h.tokens, h.log_prob, h.score, h.finished, constraints_met=False)
                          for h in hypotheses]
    return results


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
