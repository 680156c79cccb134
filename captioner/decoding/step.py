"""What decoding needs from a caption model, and what it gives back.

The decoder is seen only through `StepModel` (the im2txt two-method interface): `init_state` once per
image, then `step` once per generated token. Every strategy returns `Hypothesis` objects best first.

`Hypothesis.log_prob` is always the model's own log-softmax value summed over the generated tokens
(<end> included when emitted): no temperature, no top-k/top-p renormalisation, and no renormalisation
after tokens removed by the token rules (`captioner.decoding.rules`). `Hypothesis.score` is that log-prob
divided by length ** length_penalty (length = tokens emitted, <end> included), and is the ranking key
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

State = tuple[Tensor, ...]  # every tensor has the batch (or batch*beam) in dim 0


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
    # Beam search with constraints: True, the caption meets every constraint of its image; False, none that
    # does was found and this is the plain search's caption; None: the image had no constraints.
    constraints_met: bool | None = None


def length_normalise(log_probs: Tensor, lengths: Tensor, length_penalty: float) -> Tensor:
    """The ranking score: log_probs / lengths ** length_penalty (elementwise)."""
    if length_penalty == 0:
        return log_probs
    return log_probs / lengths.to(log_probs.dtype) ** length_penalty


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
