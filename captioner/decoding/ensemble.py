"""Several trained decoders decoded jointly, as one `StepModel`.

At every step each member predicts the next word from its own state, and the ensemble's distribution is
the mean of the members' probabilities (its log-probs are the log of that mean). Members may read
different image features (say one trained on EfficientNet-Lite0 and one on Lite2): the ensemble takes
the members' features side by side, (B, D_1 + D_2 + ...), in member order, and hands each member its
slice. Every member must share one vocabulary, since the ensemble mixes distributions over the same ids.

    ensemble = load_ensemble(["runs/a/best.safetensors", "runs/b/best.safetensors"])
    hypotheses = decode(ensemble, features, DecodeConfig(strategy="beam", beam_size=3), ...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from captioner.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from captioner.model import CaptionDecoder

State = tuple[Tensor, ...]


class EnsembleDecoder(nn.Module):
    """Mean of the members' next-word probabilities; features are the members' features concatenated."""

    def __init__(self, members: Sequence[CaptionDecoder]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one decoder")
        sizes = {member.config.vocab_size for member in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members have different vocabulary sizes {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        self.feature_dims = [member.config.feature_dim for member in members]
        self._state_sizes: list[int] = []

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_dims)

    def split_features(self, image_features: Tensor) -> list[Tensor]:
        if image_features.size(1) != self.feature_dim:
            raise ValueError(f"the ensemble reads {'+'.join(map(str, self.feature_dims))} = {self.feature_dim} "
                             f"features per image (its members' features side by side), got {image_features.size(1)}")
        return list(torch.split(image_features, self.feature_dims, dim=1))

    def init_state(self, image_features: Tensor) -> State:
        state: list[Tensor] = []
        self._state_sizes = []
        for member, features in zip(self.members, self.split_features(image_features), strict=True):
            member_state = tuple(member.init_state(features))
            self._state_sizes.append(len(member_state))
            state.extend(member_state)
        return tuple(state)

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        new_state: list[Tensor] = []
        log_probs: list[Tensor] = []
        offset = 0
        for member, size in zip(self.members, self._state_sizes, strict=True):
            member_log_probs, member_state = member.step(tokens, state[offset:offset + size])
            log_probs.append(member_log_probs)
            new_state.extend(member_state)
            offset += size
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        return mixed, tuple(new_state)


def load_ensemble(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> tuple[EnsembleDecoder, list[Checkpoint]]:
    """Load checkpoints that share a vocabulary as one ensemble (and return the checkpoints)."""
    checkpoints = [load_checkpoint(path, device=device) for path in paths]
    first = checkpoints[0]
    for checkpoint in checkpoints[1:]:
        if checkpoint.vocab.words != first.vocab.words:
            raise CheckpointError(f"{checkpoint.path}: its vocabulary differs from {first.path}'s; an ensemble "
                                  "mixes next-word distributions, so every member must share one vocabulary")
    ensemble = EnsembleDecoder([checkpoint.model for checkpoint in checkpoints]).eval()
    return ensemble, checkpoints


def load_decoder(paths: Sequence[str | Path], device: str | torch.device = "cpu"
                 ) -> tuple[CaptionDecoder | EnsembleDecoder, list[Checkpoint]]:
    """One checkpoint's decoder as it is, or several as an ensemble; with the loaded checkpoints."""
    if len(paths) == 1:
        checkpoint = load_checkpoint(paths[0], device=device)
        return checkpoint.model, [checkpoint]
    return load_ensemble(paths, device=device)
