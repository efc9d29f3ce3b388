"""The adapted layers of a LoRA file and the weight update each makes: plain LoRA (with LoCon's Tucker `lora_mid`),
LoHa, LoKr, and DoRA over any of them.

The updates are the ones AUTOMATIC1111 (v1.10 `extensions-builtin/Lora`: network_lora, network_hada, network_lokr,
network.py's `apply_weight_decompose`) and ComfyUI (`comfy/weight_adapter`) apply, which load all of them:
alpha/rank is applied to the raw product first, DoRA's decomposition after that, a user's strength last.
Each module's `delta(base)` is that update for a layer whose weight is `base` (fp32, in `base`'s shape); only DoRA
reads `base`'s values, the others only its shape (a LoHa/LoKr conv stores its factors flattened, [out, in*kh*kw]).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LoraFileError


class _Module:
    """What every module type shares: its tensors under kohya's suffixes decide dtype and finiteness."""

    alpha: float
    TENSORS: ClassVar[dict[str, str]]  # its tensors' names in kohya / LyCORIS files -> the field holding each

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors under kohya's / LyCORIS's names (those it has)."""
        return {k: getattr(self, f) for k, f in self.TENSORS.items() if getattr(self, f) is not None}

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors().values()) and math.isfinite(self.alpha)

    def is_zero(self) -> bool:
        """Its update is exactly zero (an untrained factor, or alpha 0): every type here is a product of its
        tensors times alpha / rank."""
        return self.scale == 0 or any(not torch.any(t != 0) for t in self.tensors().values())

    def map(self, fn):
        """The same module with `fn` applied to each of its tensors (to move them, cast them)."""
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, _Module):
                changes[f.name] = value.map(fn)
        return dataclasses.replace(self, **changes)


def _shaped(delta: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """`delta` in the shape of the layer's weight `base` (a flattened conv update is reshaped)."""
    if base is None or delta.shape == base.shape:
        return delta
    if delta.numel() != base.numel() or delta.shape[0] != base.shape[0]:
        raise LoraFileError(f"an update of shape {tuple(delta.shape)} does not fit a layer of shape "
                            f"{tuple(base.shape)}")
    return delta.reshape(base.shape)


def _full_rank(shape) -> int:
    return min(shape[0], math.prod(shape[1:]))


@dataclass
class LoraModule(_Module):
    """delta W = (alpha / rank) * up @ down; with LoCon's Tucker `mid` [r, r, kh, kw] between them (down and up 1x1)."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor    # [out, r] or [out, r, 1, 1]
    alpha: float
    mid: torch.Tensor | None = None

    TENSORS: ClassVar[dict[str, str]] = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"}

    @property
    def kind(self) -> str:
        return "lora" if self.mid is None else "lora_tucker"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the base layer's weight this module adapts."""
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (self.up.shape[0], self.down.shape[1], *kernel)

    @property
    def lora_rank(self) -> int:
        """The rank a plain LoRA needs to hold this update exactly."""
        return min(self.rank, _full_rank(self.weight_shape)) if self.mid is None else _full_rank(self.weight_shape)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The full weight update, in the shape of the base layer's weight (fp32)."""
        down, up = self.down.float(), self.up.float()
        if self.mid is not None:  # A1111 lyco_helpers.rebuild_cp_decomposition
            out = torch.einsum("n m k l, i n, m j -> i j k l", self.mid.float(), up.flatten(1), down.flatten(1))
            return _shaped(self.scale * out, base)
        if down.dim() == 2:
            return _shaped(self.scale * up @ down, base)
        out = up.flatten(1) @ down.flatten(1)
        return _shaped(self.scale * out.reshape(up.shape[0], *down.shape[1:]), base)

    def with_alpha(self, alpha: float) -> LoraModule:
        """The same update expressed with another alpha (up rescaled)."""
        if alpha == self.alpha:
            return self
        return dataclasses.replace(self, up=self.up.float() * (self.alpha / alpha), alpha=alpha)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker (CP) conv factor: core t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]
    (A1111 lyco_helpers.make_weight_cp, ComfyUI's einsum)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t.float(), wb.float(), wa.float())


@dataclass
class LohaModule(_Module):
    """LoHa: delta W = (alpha / rank) * (w1a @ w1b) ⊙ (w2a @ w2b), rank = w1b.shape[0]. A conv keeps w*_b flattened
    [r, in*kh*kw]; with Tucker cores t1/t2 the factors are rank-first, w*_a [r, out] and w*_b [r, in]."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind = "loha"
    TENSORS: ClassVar[dict[str, str]] = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a",
                                         "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2"}

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], *self.w1b.shape[1:])

    @property
    def lora_rank(self) -> int:
        """A Hadamard product of ranks r1 and r2 has rank <= r1 * r2."""
        full = _full_rank(self.weight_shape)
        return full if self.t1 is not None else min(self.w1b.shape[0] * self.w2b.shape[0], full)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if self.t1 is not None:
            out = _tucker(self.t1, self.w1a, self.w1b) * _tucker(self.t2, self.w2a, self.w2b)
        else:
            one = self.w1a.float().flatten(1) @ self.w1b.float().flatten(1)
            two = self.w2a.float().flatten(1) @ self.w2b.float().flatten(1)
            out = (one * two).reshape(self.weight_shape)
        return _shaped(self.scale * out, base)

    def with_alpha(self, alpha: float) -> LohaModule:
        if alpha == self.alpha:
            return self
        return dataclasses.replace(self, w1a=self.w1a.float() * (self.alpha / alpha), alpha=alpha)


@dataclass
class LokrModule(_Module):
    """LoKr: delta W = scale * w1 ⊗ w2, each side a full matrix (lokr_w1, lokr_w2) or a product a @ b (w2 also as a
    Tucker core lokr_t2). As A1111 and ComfyUI read it, the rank is w2_b's first dim, else w1_b's, and the scale is
    alpha / rank, or 1 when both sides are full (alpha is then ignored)."""

    alpha: float
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind = "lokr"
    TENSORS: ClassVar[dict[str, str]] = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2",
                                         "lokr_w2_a": "w2a", "lokr_w2_b": "w2b", "lokr_t2": "t2"}

    @property
    def rank(self) -> int | None:
        if self.w2b is not None:
            return self.w2b.shape[0]
        return self.w1b.shape[0] if self.w1b is not None else None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0

    def _shapes(self) -> tuple[tuple, tuple]:
        one = tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])
        if self.w2 is not None:
            two = tuple(self.w2.shape)
        elif self.t2 is not None:
            two = (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        else:
            two = (self.w2a.shape[0], self.w2b.shape[1])
        return one, two

    @property
    def weight_shape(self) -> tuple[int, ...]:
        one, two = self._shapes()
        return (one[0] * two[0], one[1] * two[1], *two[2:])

    @property
    def lora_rank(self) -> int:
        """rank(w1 ⊗ w2) = rank(w1) * rank(w2)."""
        one, two = self._shapes()
        r1 = self.w1b.shape[0] if self.w1 is None else _full_rank(one)
        r2 = self.w2b.shape[0] if self.w2 is None and self.t2 is None else _full_rank(two)
        return min(r1 * r2, _full_rank(self.weight_shape))

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2a, self.w2b)
        else:
            w2 = self.w2a.float() @ self.w2b.float()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return _shaped(self.scale * torch.kron(w1.contiguous(), w2.contiguous()), base)

    def without_tucker(self) -> LokrModule:
        """The same update with w2 as w2_a [out, r] @ w2_b [r, in*kh*kw] instead of a Tucker core: the conv form
        LyCORIS writes without use_tucker, at the same rank (so the same alpha/rank). Every client reads it; ComfyUI
        skips a layer with lokr_t2 (its torch.kron fails on the strided einsum that rebuilds w2)."""
        if self.t2 is None:
            return self
        w2b = torch.einsum("i j k l, j r -> i r k l", self.t2.float(), self.w2b.float()).flatten(1)
        return dataclasses.replace(self, w2a=self.w2a.float().T.contiguous(), w2b=w2b.contiguous(), t2=None)

    def with_alpha(self, alpha: float) -> LokrModule:
        if alpha == self.alpha or self.rank is None:  # both sides full: the loaders use scale 1 whatever alpha says
            return dataclasses.replace(self, alpha=alpha)
        ratio = self.alpha / alpha
        if self.w1 is not None:
            return dataclasses.replace(self, w1=self.w1.float() * ratio, alpha=alpha)
        return dataclasses.replace(self, w1a=self.w1a.float() * ratio, alpha=alpha)


AXES = ("input", "output")


def weight_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """‖w‖ per output row ([out, 1, ...]: peft, LyCORIS wd_on_out) or per input column ([1, in, ...]: A1111's
    apply_weight_decompose, LyCORIS before 3.2), over every other dimension."""
    ones = [1] * (w.dim() - 2)
    if axis == "output":
        return w.flatten(1).norm(dim=1).reshape(w.shape[0], 1, *ones)
    return w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, w.shape[1], *ones)


def magnitude_shape(axis: str, weight_shape) -> tuple[int, ...]:
    """dora_scale's shape as A1111 and ComfyUI read it: [1, in] / [1, in, 1, 1] (input) or [out, 1] /
    [out, 1, 1, 1] (output); never 1-D (ComfyUI broadcasts a 1-D one wrongly)."""
    ones = [1] * (len(weight_shape) - 2)
    return (1, weight_shape[1], *ones) if axis == "input" else (weight_shape[0], 1, *ones)


@dataclass
class DoraModule(_Module):
    """DoRA over any module: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ on `axis`, where ΔW is the inner module's update (alpha/rank
    applied); delta = W' - W. The magnitude m is stored as kohya's `dora_scale` (see `magnitude_shape`)."""

    inner: _Module
    magnitude: torch.Tensor
    axis: str  # "input" or "output"

    TENSORS: ClassVar[dict[str, str]] = {"dora_scale": "magnitude"}

    @property
    def kind(self) -> str:
        return "dora" if self.inner.kind == "lora" else f"{self.inner.kind}+dora"

    @property
    def rank(self):
        return self.inner.rank

    @property
    def alpha(self) -> float:
        return self.inner.alpha

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.inner.weight_shape

    @property
    def lora_rank(self) -> int:
        return _full_rank(self.weight_shape)  # m / ‖W + ΔW‖ rescales all of W: full rank in general

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None or base.is_meta:
            raise LoraFileError("a DoRA update depends on the base model's weights; give the base model (--model)")
        w = base.float()
        merged = w + self.inner.delta(base).to(w.device)
        norm = weight_norm(merged, self.axis)
        if self.magnitude.numel() != norm.numel():
            raise LoraFileError(f"dora_scale {tuple(self.magnitude.shape)} does not fit a layer of shape "
                                f"{tuple(base.shape)} on the {self.axis} axis")
        return merged * (self.magnitude.float().to(w.device).reshape(norm.shape) / norm) - w

    def is_zero(self) -> bool:
        return False  # m / ||W + dW|| rescales W even when dW is zero: only the base weight can tell

    def with_alpha(self, alpha: float) -> DoraModule:
        return dataclasses.replace(self, inner=self.inner.with_alpha(alpha))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.tensors(), **super().tensors()}


def is_plain(m) -> bool:
    """A plain LoRA (down/up, no Tucker mid, no DoRA): what diffusers loads and what ranks stack exactly."""
    return isinstance(m, LoraModule) and m.mid is None


def fits(m, shape) -> bool:
    """Whether module `m` adapts a layer whose weight has `shape` (a flattened LoHa/LoKr conv update fits its conv)."""
    shape, ws = tuple(shape), tuple(m.weight_shape)
    ok = ws == shape or (len(ws) == 2 and len(shape) == 4 and ws[0] == shape[0] and ws[1] == math.prod(shape[1:]))
    if ok and isinstance(m, DoraModule):
        ok = m.magnitude.numel() == shape[1 if m.axis == "input" else 0]
    return ok
