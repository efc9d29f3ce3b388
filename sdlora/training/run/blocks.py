"""Rank, alpha and learning rate per block and per layer, in the spellings kohya users type.

sd-scripts' networks/lora.py lists a UNet's blocks (SD 1.x/2.x: 25, IN00-IN11, MID, OUT00-OUT11; SDXL: 23) and takes
`block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas` (one value per block) and `down_lr_weight`,
`mid_lr_weight`, `up_lr_weight` (multipliers of the UNet's learning rate; 0 = no LoRA in that block). Its newer
networks (lora_flux, lora_anima) take `network_reg_dims` / `network_reg_lrs`: `regex=value` pairs searched in each
layer's name, the first match winning, ahead of the global settings; sdlora adds `network_reg_alphas` and accepts them
for every family. The block tables themselves are the family's (`Family.kohya_blocks`); this module turns the
settings into one (rank, alpha, lr) per adapted layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...block_args import (
    BLOCK_LISTS,
    LR_WEIGHTS,
    PATTERNS,
    parse_list,
    parse_lr_weight,
    parse_patterns,
    uses_blocks,
    uses_patterns,
)
from ...errors import ConfigError


@dataclass(frozen=True)
class Layer:
    """What one adapted layer gets."""

    rank: int
    alpha: float
    lr: float


def lr_weights(lo, blocks) -> list[float] | None:
    """The lr multiplier of every entry of the block list (sd-scripts' `get_block_lr_weight`: weights at or under
    block_lr_zero_threshold become 0, the entries outside down/mid/up are 1), or None when none is given."""
    if not any(getattr(lo, n).strip() for n in LR_WEIGHTS):
        return None
    parts = []
    for name, n in zip(LR_WEIGHTS, (blocks.down, blocks.mid, blocks.up)):
        text = getattr(lo, name)
        values = parse_lr_weight(name, text, n) if text.strip() else [1.0] * n
        parts += [w if w > lo.block_lr_zero_threshold else 0.0 for w in values] if text.strip() else values
    return [1.0] * blocks.ends + parts + [1.0] * blocks.ends


def block_lists(cfg, blocks) -> dict[str, list | None]:
    """The four per-block lists at the model's length (None where not given); block_alphas defaults to lora.alpha
    (0: each block's rank), as sd-scripts defaults it to network_alpha."""
    lo, n = cfg.lora, len(blocks.names)
    out = {}
    for name in BLOCK_LISTS:
        text = getattr(lo, name)
        out[name] = parse_list(name, text) if text.strip() else None
        if out[name] is not None and len(out[name]) != n:
            raise ConfigError(f"lora.{name} needs {n} values ({blocks.names[0]}, {blocks.names[1]}, ..., "
                              f"{blocks.names[-1]}) for this model, got {len(out[name])}")
    if out["block_dims"] is not None and out["block_alphas"] is None:
        out["block_alphas"] = [lo.alpha or float(d) for d in out["block_dims"]]
    return out


def plan_layers(cfg, family, denoiser, names: list[str], kohya_name) -> dict[str, Layer] | None:
    """{module path: Layer} for the matched denoiser layers (a layer whose rank or lr comes out 0 is left out: it
    gets no LoRA); None when no per-block or per-layer setting is given. `kohya_name(path)` is the layer's name in
    a kohya file, which the regexes may match as well as the diffusers path."""
    lo = cfg.lora
    if not uses_blocks(lo) and not uses_patterns(lo):
        return None
    blocks = family.kohya_blocks
    if uses_blocks(lo) and blocks is None:
        raise ConfigError(f"block_dims and down/mid/up_lr_weight follow sd-scripts' UNet block list, which "
                          f"{family.title} has not: use network_reg_dims / network_reg_alphas / network_reg_lrs "
                          "(regular expressions over layer names)")
    lists = block_lists(cfg, blocks) if blocks is not None and uses_blocks(lo) else {}
    weights = lr_weights(lo, blocks) if lists else None
    regs = {name: parse_patterns(name, getattr(lo, name)) for name in PATTERNS}
    out = {}
    for path in names:
        conv = getattr(denoiser.get_submodule(path), "kernel_size", (1, 1)) != (1, 1)
        rank, alpha = _block_rank(cfg, lists, blocks, path, denoiser.config, conv)
        lr = cfg.optim.lr
        i = blocks.index(path, denoiser.config) if lists else None
        if weights is not None and i is not None:
            lr *= weights[i]
        spelled = (path, kohya_name(path))
        found = {name: next((v for rx, v in regs[name] if any(rx.search(s) for s in spelled)), None) for name in regs}
        if found["network_reg_dims"] is not None:
            rank = found["network_reg_dims"]
            alpha = lo.alpha or float(rank)
        if found["network_reg_alphas"] is not None:
            alpha = found["network_reg_alphas"] or float(rank)
        if found["network_reg_lrs"] is not None:
            lr = found["network_reg_lrs"]
        if rank and lr:
            out[path] = Layer(int(rank), float(alpha), float(lr))
    return out


def _block_rank(cfg, lists: dict, blocks, path: str, config, conv: bool) -> tuple[int, float]:
    """(rank, alpha) of a layer from the global settings and the block lists: Linear and 1x1 layers take block_dims /
    block_alphas; k x k convs conv_block_dims / conv_block_alphas, else conv_rank / conv_alpha (0: the block's rank,
    and alpha at the block's alpha/rank ratio), as sdlora's conv_rank does without blocks."""
    lo, args = cfg.lora, cfg.network_args
    rank, alpha = lo.rank, cfg.lora_alpha
    i = blocks.index(path, config) if lists else None
    if i is not None and lists["block_dims"] is not None:
        rank, alpha = lists["block_dims"][i], lists["block_alphas"][i] or float(lists["block_dims"][i])
    if not conv:
        return rank, alpha
    if i is not None and lists["conv_block_dims"] is not None:
        r = lists["conv_block_dims"][i]
        a = lists["conv_block_alphas"][i] if lists["conv_block_alphas"] is not None else \
            args["conv_alpha"] or r * cfg.lora_alpha / lo.rank
        a = a or float(r)  # an alpha of 0 is the rank, as sd-scripts reads it (not a LoRA scaled to nothing)
        return r, a
    r = args["conv_rank"] or rank
    return r, args["conv_alpha"] or (alpha * r / rank if rank else 0.0)


def kohya_namer(family, config):
    """diffusers module path -> the layer's name in the family's kohya file (SDXL: SGM names; SD3: the original
    MMDiT layer, q/k/v fused), which network_reg_* patterns may match."""
    from ...families import mmdit
    from ...loras.layout import DENOISER_PREFIX, denoiser_namer, kohya_base

    if family.fused_file_layers:  # its files name the original MMDiT layers (q/k/v fused): `loras.mmdit`
        def name(path: str) -> str:
            try:
                return kohya_base(DENOISER_PREFIX, mmdit.original(path)[0])
            except KeyError:
                return kohya_base(DENOISER_PREFIX, path)
        return name
    namer = denoiser_namer(family, config)
    return lambda path: kohya_base(DENOISER_PREFIX, namer(path))


def param_groups(params: dict[str, object], lrs: dict[str, float], lr: float) -> list[dict]:
    """The denoiser's adapter parameters {name: parameter} in one optimizer group per learning rate (each layer's
    from `lrs`, by module path; `lr` for the rest), the group at `lr` first (its rate is the one the log shows)."""
    by_lr: dict[float, list] = {lr: []}
    for name, p in params.items():
        path = re.split(r"\.(?:lora_|hada_|lokr_)", name, maxsplit=1)[0]
        by_lr.setdefault(lrs.get(path, lr), []).append(p)
    return [{"params": ps, "lr": r} for r, ps in by_lr.items() if ps]
