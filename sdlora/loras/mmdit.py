"""SD3 LoRA files in the original-MMDiT kohya layout, and sdlora's own form of the same LoRA.

sd-scripts' `lora_sd3` names SD3 layers after Stability's checkpoint (`lora_unet_joint_blocks_0_x_block_attn_qkv`),
and that is the layout ComfyUI (its generic `lora_unet_` + state-dict key mapping) and Forge load. There q, k and v
are one fused layer (rows q | k | v) and two adaLN layers keep their halves as (shift, scale). Inside sdlora an SD3
LoRA is keyed by diffusers module (`lora_unet_transformer_blocks_0_attn_to_q`), one module per Linear of
SD3Transformer2DModel in its own row order, so every tool that works layer by layer (merge, mix, resize, hooks,
diffusers' layout) needs nothing SD3-specific. This module is the file boundary, both ways and exact:

- three separate LoRAs (A_j [r_j, in], B_j [D, r_j], alpha_j) are one LoRA of the fused layer with
  down = cat(A_q, A_k, A_v), up = block-diag(B_q, B_k, B_v) and alpha = sum(alpha_j), so alpha / rank is kept (a part
  trained at another alpha / rank ratio has it folded into its B block); a missing part is a zero block;
- a fused LoRA splits back into its blocks when its up is block-diagonal in q, k, v order (what sdlora and
  sd-scripts' split_qkv write), else (one down shared by three ups, what sd-scripts trains by default) into three
  LoRAs sharing that down, each with the fused alpha; writing three parts with one down and one alpha gives that
  fused LoRA back as it was;
- the swapped adaLN layers' up rows change halves both ways (down is unchanged).
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraFileError
from ..families import mmdit
from ..families.mmdit import PREFIX, internal_path, is_file_layout, is_internal, original_path  # noqa: F401
from .modules import LoraModule, is_plain


def _plain(base: str, m) -> LoraModule:
    if not is_plain(m):
        raise LoraFileError(f"layer {base} is {m.kind}: SD3's fused q/k/v and adaLN layers take plain LoRA only")
    return m


def _swap(m: LoraModule) -> LoraModule:
    return LoraModule(m.down, mmdit.swap_halves(m.up), m.alpha)


def _maybe_swap(base: str, m, orig: str):
    rows, width = m.weight_shape[0], m.weight_shape[1]
    return _swap(_plain(base, m)) if mmdit.swapped(orig, rows, width) else m


def to_file(mods: dict) -> dict:
    """sdlora's SD3 modules -> the kohya file's (fused q/k/v, adaLN halves in the original order); layers of other
    parts (text encoders) pass through."""
    out, groups = {}, {}
    for base, m in mods.items():
        path = internal_path(base)
        if path is None:
            out[base] = m
            continue
        orig, part = mmdit.original(path)
        name = PREFIX + orig.replace(".", "_")
        if part is None:
            out[name] = _maybe_swap(base, m, orig)
        else:
            groups.setdefault(name, {})[part] = _plain(base, m)
    out.update({name: fuse(parts) for name, parts in groups.items()})
    return out


def fuse(parts: dict[int, LoraModule]) -> LoraModule:
    """One LoRA of a fused qkv layer from its q (0), k (1), v (2) parts' LoRAs (see the module's rules)."""
    if len(parts) == 3 and len({p.alpha for p in parts.values()}) == 1 and \
            all(torch.equal(parts[0].down, parts[j].down) for j in (1, 2)):
        return LoraModule(parts[0].down, torch.cat([parts[j].up for j in range(3)]), parts[0].alpha)
    width, present = next(iter(parts.values())).up.shape[0], [parts[j] for j in range(3) if j in parts]
    ranks = [m.rank for m in present]
    alpha = sum(m.alpha for m in present)
    scale = alpha / sum(ranks)
    same = [math.isclose(m.scale, scale, rel_tol=1e-9) for m in present]
    up = torch.zeros(3 * width, sum(ranks), dtype=present[0].up.dtype if all(same) else torch.float32)
    col = 0
    for j in range(3):
        if j in parts:
            m = parts[j]
            block = m.up if math.isclose(m.scale, scale, rel_tol=1e-9) else m.up.float() * (m.scale / scale)
            up[j * width:(j + 1) * width, col:col + m.rank] = block
            col += m.rank
    return LoraModule(torch.cat([m.down for m in present]), up, alpha)


def split(m: LoraModule) -> dict[int, LoraModule]:
    """A fused qkv layer's LoRA -> its q (0), k (1), v (2) parts (a part with no rows of its own is left out)."""
    width = m.up.shape[0] // 3
    cols = []
    for j in range(3):
        used = torch.nonzero(m.up[j * width:(j + 1) * width].abs().sum(0)).flatten().tolist()
        cols.append(used)
    if [c for used in cols for c in used] == list(range(m.rank)):  # block-diagonal in q, k, v order
        return {j: LoraModule(m.down[used[0]:used[-1] + 1], m.up[j * width:(j + 1) * width, used[0]:used[-1] + 1],
                              m.alpha * len(used) / m.rank) for j, used in enumerate(cols) if used}
    return {j: LoraModule(m.down, m.up[j * width:(j + 1) * width], m.alpha) for j in range(3)}


def from_file(mods: dict) -> dict:
    """A kohya SD3 file's modules -> sdlora's (q/k/v split, adaLN halves in diffusers' order); layers of other
    parts pass through; an original name sdlora has no diffusers module for is an error naming it."""
    out = {}
    for base, m in mods.items():
        orig = original_path(base)
        if orig is None:
            if base.startswith(PREFIX) and not internal_path(base):
                raise LoraFileError(f"layer {base} is no layer of an SD3 transformer (MMDiT)")
            out[base] = m
            continue
        paths = mmdit.diffusers_paths(orig)
        if len(paths) == 3:
            lora = _plain(base, m)
            if lora.up.shape[0] % 3:
                raise LoraFileError(f"layer {base}: a fused qkv LoRA needs 3 x width rows, not {lora.up.shape[0]}")
            out.update({PREFIX + paths[j].replace(".", "_"): part for j, part in split(lora).items()})
        else:
            out[PREFIX + paths[0].replace(".", "_")] = _maybe_swap(base, m, orig)
    return out
