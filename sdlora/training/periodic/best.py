"""The best validation so far: the loss's (lower is better) or the image score's (higher is better)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Best:
    """The best validation so far, its step, and validations since it improved: a loss (`key` "loss", lower is
    better) or an image score ("score", higher is better; NaN never improves). Checkpoints keep it as {key: value,
    "step": ..., "waited": ...}."""

    key: str = "loss"
    value: float = math.nan  # set in __post_init__: the worst value of its kind
    step: int = 0
    waited: int = 0

    def __post_init__(self):
        if math.isnan(self.value):
            self.value = -math.inf if self.higher else math.inf

    @property
    def higher(self) -> bool:
        return self.key == "score"

    def update(self, step: int, value: float) -> bool:
        """Record a validation; True when it is the new best. An image score that ties the best moves the best to
        this later step (a round of a few images ties often, and the later file has trained longer; on the shapes
        world it scored better by `sdlora eval` in 3 of the 4 runs that could tell), but only a strictly better
        value resets the patience that early stopping reads."""
        better = value > self.value if self.higher else value < self.value
        if better or (self.higher and value == self.value):
            self.value, self.step, self.waited = value, step, 0 if better else self.waited + 1
            return True
        self.waited += 1
        return False

    def state_dict(self) -> dict:
        return {self.key: self.value, "step": self.step, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step, self.waited = float(state[self.key]), int(state["step"]), int(state["waited"])
