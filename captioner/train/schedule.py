"""Learning-rate schedules and the weight average (EMA) the trainer can keep beside the model."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from captioner.config import TrainConfig
from captioner.train.state import strip_prefix


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from `lr` to `min_lr` (teacher forcing on cached features)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def warmup_cosine(base: float, step: int, total_steps: int, warmup_steps: int) -> float:
    """`base` times a linear warm-up and a cosine decay to 0 over the whole run (CNN fine-tuning)."""
    return base * min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / total_steps))


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), kept in a second model.

    After update k: average = d·average + (1 − d)·weights with d = min(decay, (1 + k) / (10 + k)), so the
    first averages follow the weights closely instead of remembering the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight-average decay must be between 0 and 1 (exclusive), not {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current, 1.0 - decay)
            else:
                average.copy_(current)

    def tensors(self) -> dict[str, Tensor]:
        return {f"ema.{name}": value for name, value in self.model.state_dict().items()}

    def load(self, tensors: dict[str, Tensor], updates: int) -> None:
        self.model.load_state_dict(strip_prefix(tensors, "ema."))
        self.updates = updates
