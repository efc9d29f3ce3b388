"""One adapted layer of a LoRA file and the weight update it makes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LoraModule:
    """delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor    # [out, r] or [out, r, 1, 1]
    alpha: float

    kind = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the base layer's weight this module adapts."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """The full weight update, in the shape of the base layer's weight (fp32)."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return self.scale * up @ down
        out = up.flatten(1) @ down.flatten(1)
        return self.scale * out.reshape(up.shape[0], *down.shape[1:])

    def with_alpha(self, alpha: float) -> LoraModule:
        """The same update expressed with another alpha (up rescaled)."""
        if alpha == self.alpha:
            return self
        return LoraModule(self.down, self.up.float() * (self.alpha / alpha), alpha)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors under kohya's suffixes."""
        return {"lora_down.weight": self.down, "lora_up.weight": self.up}

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors().values()) and math.isfinite(self.alpha)

    def is_zero(self) -> bool:
        """Its update is exactly zero (an untrained up matrix, or alpha 0)."""
        return self.alpha == 0 or any(not torch.any(t != 0) for t in self.tensors().values())
