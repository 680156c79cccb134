"""Soft concept guidance: nudge a caption towards the words the CNN recognised, without forcing them.

`GuidedModel` wraps any `StepModel`. Each image has up to a few guide words, each a set of token ids (the
forms of one concept) with a bonus (weight x the concept's probability). Until a caption emits one of a
guide word's forms, every step's log-probs get that bonus on those forms and are renormalised
(log_softmax), so the step still returns a distribution: log-probs stay <= 0, which beam search's early
stop relies on. Once a form is emitted that word's bonus is gone, so the caption is not pushed to
repeat it. The pending bonuses ride in the state, so every search (greedy, beam, constrained) reorders
them with the beams for free.

Hypothesis log-probs and scores from a guided search are those of the guided distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from captioner.decoding import State, StepModel

GuideWord = tuple[Sequence[int], float]  # (token ids of the word's forms, bonus added to their log-probs)


def guidance_bonus(guide_words: Sequence[Sequence[GuideWord]], vocab_size: int) -> Tensor:
    """(batch, max words, vocab) bonuses from each image's guide words; unused slots are all zero."""
    if any(bonus < 0 for words in guide_words for _, bonus in words):
        raise ValueError("guidance bonuses must be >= 0")
    slots = max((len(words) for words in guide_words), default=0)
    bonus = torch.zeros(len(guide_words), max(slots, 1), vocab_size)
    for image, words in enumerate(guide_words):
        for slot, (token_ids, value) in enumerate(words):
            ids = [int(t) for t in token_ids]
            if any(not 0 <= t < vocab_size for t in ids):
                raise ValueError(f"guide words: image {image}, word {slot}: token ids {ids} outside the "
                                 f"vocabulary (size {vocab_size})")
            bonus[image, slot, ids] = float(value)
    return bonus


class GuidedModel:
    """A `StepModel` whose log-probs favour each image's guide words until they are said.

    bonus: (batch, words, vocab) from `guidance_bonus`, for the batch of image features that
    `init_state` will be given.
    """

    def __init__(self, model: StepModel, bonus: Tensor) -> None:
        self.model, self.bonus = model, bonus

    def init_state(self, image_features: Tensor) -> State:
        if self.bonus.size(0) != image_features.size(0):
            raise ValueError(f"GuidedModel: bonuses for {self.bonus.size(0)} images, features for "
                             f"{image_features.size(0)}")
        state = self.model.init_state(image_features)
        state = (state,) if isinstance(state, Tensor) else tuple(state)
        return (*state, self.bonus.to(image_features.device))

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        *inner, pending = state  # pending: (rows, words, vocab)
        # The token fed now was emitted at the previous step: a guide word it is a form of is said.
        said = pending.gather(2, tokens.view(-1, 1, 1).expand(-1, pending.size(1), 1)) > 0  # (rows, words, 1)
        pending = pending.masked_fill(said, 0.0)
        log_probs, inner = self.model.step(tokens, tuple(inner))
        guided = (log_probs.float() + pending.sum(dim=1)).log_softmax(dim=1)  # (rows, vocab)
        return guided, (*inner, pending)
