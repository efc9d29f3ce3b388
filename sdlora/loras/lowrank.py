"""LoRA math as plain functions: weighted concatenation (exact mix), low-rank SVD (resize, lossy mix, extract)
and relative errors. Concatenation works on plain `modules.LoraModule`s (delta W = alpha / rank * up @ down); every
other type (DoRA, LoHa, LoKr, Tucker LoCon) becomes a plain LoRA by SVD of its full delta, with the error reported.
Conv layers are handled on the flattened delta [out, in * kh * kw]. `bases` maps a layer to its base weight: DoRA
reads its values, a flattened LoHa/LoKr conv update its shape (a meta tensor will do)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import LoraFileError
from .modules import DoraModule, LoraModule, is_plain


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """||delta - approx||_F / ||delta||_F (0 when both are zero)."""
    norm = delta.float().norm()
    diff = (delta.float() - approx.float()).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def overall_error(errors: dict[str, float], norms: dict[str, float]) -> float:
    """The relative error of all layers together: sqrt(sum err_i^2 |D_i|^2) / sqrt(sum |D_i|^2)."""
    total = sum(n * n for n in norms.values())
    lost = sum((errors[k] * norms.get(k, 0.0)) ** 2 for k in errors)
    return math.sqrt(lost / total) if total > 0 else 0.0


def concat(parts: list[tuple[LoraModule, float]]) -> LoraModule:
    """Exact weighted sum of LoRA deltas as one LoRA: ranks stacked, each weight and scale folded into `up`."""
    downs = [m.down.float() for m, _ in parts]
    ups = [m.up.float() * (w * m.scale) for m, w in parts]
    down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    return LoraModule(down, up, float(down.shape[0]))  # alpha = rank: scale 1


def rank_for_energy(s: torch.Tensor, keep: float) -> int:
    """Smallest rank whose singular values keep share `keep` of the sum of squared singular values."""
    energy = (s.double() ** 2).cumsum(0)
    if energy[-1] <= 0:
        return 1
    return min(int((energy / energy[-1] < keep - 1e-12).sum()) + 1, len(s))


def low_rank(delta: torch.Tensor, rank: int | None = None,
             keep_energy: float | None = None) -> tuple[LoraModule, float]:
    """Best rank-r LoRA of a full delta (truncated SVD) and its relative error.

    `delta` is [out, in] or [out, in, kh, kw] (conv: `down` gets the kernel, `up` is 1x1). The singular values
    are split evenly between up and down (sqrt each), which keeps both in fp16 range.
    """
    shape = delta.shape
    flat = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(flat.double(), full_matrices=False)
    r = rank if rank is not None else rank_for_energy(s, keep_energy)
    r = max(1, min(r, len(s)))
    root = s[:r].sqrt()
    up, down = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
    if len(shape) == 4:
        down, up = down.reshape(r, *shape[1:]), up.reshape(shape[0], r, 1, 1)
    module = LoraModule(down, up, float(r))
    return module, relative_error(delta, module.delta())


def resize(module, rank: int | None = None, keep_energy: float | None = None,
           base: torch.Tensor | None = None) -> tuple[LoraModule, float]:
    """A module brought to a plain LoRA of another rank (or of the rank keeping `keep_energy`), with its relative
    error."""
    return low_rank(module.delta(base), rank, keep_energy)


def weighted_delta(parts: list[tuple[object, float]], base: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i * delta_i (the target of a mix)."""
    return sum(w * m.delta(base) for m, w in parts)


def mix_modules(inputs: list[tuple[dict, float]], rank: int | None, report: LayerReport,
                bases: dict[str, torch.Tensor] | None = None) -> dict[str, LoraModule]:
    """Weighted sum of LoRAs, layer by layer: exact by concatenation (rank None, plain LoRAs) or truncated SVD to
    `rank`. Other types with rank None: SVD at the rank that holds their sum exactly (LoHa: r1*r2, LoKr:
    rank(w1)*rank(w2)); DoRA's update is full-rank, so it needs a `rank`. A layer missing from an input counts as zero
    there. Fills `report` with each layer's error."""
    out, norms = {}, {}
    for name in dict.fromkeys(b for mods, _ in inputs for b in mods):
        parts = [(mods[name], w) for mods, w in inputs if name in mods]
        shapes = {m.weight_shape for m, _ in parts}
        if len(shapes) > 1:
            raise LoraFileError(f"layer {name} has different shapes in the inputs ({sorted(shapes)}): "
                                "LoRAs for different model families cannot be mixed")
        if rank is None and all(is_plain(m) for m, _ in parts):
            out[name], err = concat(parts), 0.0
        else:
            if rank is None and any(isinstance(m, DoraModule) for m, _ in parts):
                raise LoraFileError(f"layer {name} is DoRA, whose update rescales the whole base weight (full "
                                    "rank): give --rank to mix it as a plain LoRA by SVD")
            target = weighted_delta(parts, (bases or {}).get(name))
            out[name], err = low_rank(target, rank or sum(m.lora_rank for m, _ in parts))
            norms[name] = float(target.norm())
        report.add(name, out[name].rank, err)
    report.finish(norms)
    return out


def resize_modules(mods: dict, rank: int | None, keep_energy: float | None, report: LayerReport,
                   bases: dict[str, torch.Tensor] | None = None) -> dict[str, LoraModule]:
    """Every layer as a plain LoRA at `rank` (never above the rank that holds it exactly) or at the rank keeping
    `keep_energy`; errors into `report`."""
    out, norms = {}, {}
    for name, m in mods.items():
        base = (bases or {}).get(name)
        delta = m.delta(base)  # resize's own target, once
        out[name], err = low_rank(delta, min(rank, m.lora_rank) if rank else None, keep_energy)
        norms[name] = float(delta.norm())
        report.add(name, out[name].rank, err)
    report.finish(norms)
    return out


@dataclass
class LayerReport:
    """Per-layer rank and relative error (Frobenius) of a lossy LoRA operation, and the totals."""

    output: str
    layers: list[dict] = field(default_factory=list)  # {"name", "rank", "error"}
    overall_error: float = 0.0
    worst_layer: str = ""
    worst_error: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, limit: int = 40) -> str:
        rows = sorted(self.layers, key=lambda r: -r["error"])[:limit]
        width = max([len(r["name"]) for r in rows] + [5])
        lines = [f"{'layer':<{width}}  rank  rel.error"]
        lines += [f"{r['name']:<{width}}  {r['rank']:>4}  {r['error']:.3e}" for r in rows]
        if len(self.layers) > limit:
            lines.append(f"... {len(self.layers) - limit} more layers (smaller errors)")
        lines.append(f"overall relative error {self.overall_error:.3e}; worst {self.worst_error:.3e} "
                     f"({self.worst_layer or '-'}); written {self.output}")
        return "\n".join(lines)

    __str__ = table

    def add(self, name: str, rank: int, error: float) -> None:
        self.layers.append({"name": name, "rank": rank, "error": error})

    def finish(self, norms: dict[str, float]) -> LayerReport:
        """Overall error (weighted by each layer's delta norm) and the worst layer."""
        errors = {r["name"]: r["error"] for r in self.layers}
        self.overall_error = overall_error(errors, norms)
        if errors and max(errors.values()) > 0:
            self.worst_layer = max(errors, key=errors.get)
            self.worst_error = errors[self.worst_layer]
        return self


@dataclass
class MixReport(LayerReport):
    exact: bool = True
    sources: list[list] = field(default_factory=list)


@dataclass
class ResizeReport(LayerReport):
    pass


@dataclass
class ExtractReport(LayerReport):
    skipped: list[str] = field(default_factory=list)  # layers whose difference was ~0
