"""SD3's transformer layers in the original MMDiT naming of Stability's checkpoints and kohya's SD3 LoRAs.

diffusers' SD3Transformer2DModel splits what the original model fuses: the q, k and v projections of each attention
are one `qkv` layer there (rows stacked q | k | v), and two adaLN layers (the last block's context modulation and the
final layer's) keep their (shift, scale) halves in the other order. These tables are the inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` (and the mapping ComfyUI's `mmdit_to_diffusers` builds), shared by
single-file writing and the kohya LoRA layout.
"""

from __future__ import annotations

import re

# diffusers module inside transformer_blocks.{i} -> (original module inside joint_blocks.{i}, row third of a fused qkv)
BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "attn.norm_q": ("x_block.attn.ln_q", None), "attn.norm_k": ("x_block.attn.ln_k", None),
    "attn.norm_added_q": ("context_block.attn.ln_q", None), "attn.norm_added_k": ("context_block.attn.ln_k", None),
    "attn2.norm_q": ("x_block.attn2.ln_q", None), "attn2.norm_k": ("x_block.attn2.ln_k", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
# modules outside the blocks
TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_JOINT = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")
_FROM_BLOCK = {}
for _d, (_o, _part) in BLOCK.items():
    _FROM_BLOCK.setdefault(_o, {})[_part] = _d
_FROM_TOP = {o: d for d, o in TOP.items()}


def original(path: str) -> tuple[str, int | None]:
    """diffusers module path -> (original module path, q/k/v third of a fused qkv or None); KeyError if unknown."""
    if m := _BLOCK.match(path):
        name, part = BLOCK[m[2]]
        return f"joint_blocks.{m[1]}.{name}", part
    return TOP[path], None


def diffusers_paths(path: str) -> list[str]:
    """Original module path -> its diffusers module path(s): three (q, k, v) for a fused qkv; KeyError if unknown."""
    if m := _JOINT.match(path):
        parts = _FROM_BLOCK[m[2]]
        return [f"transformer_blocks.{m[1]}.{parts[k]}" for k in sorted(parts, key=lambda p: -1 if p is None else p)]
    return [_FROM_TOP[path]]


def swapped(path: str, rows: int, width: int) -> bool:
    """Whether an original layer keeps its two adaLN halves as (shift, scale) where diffusers has (scale, shift): the
    final layer's, and the last block's context modulation (the only context adaLN with 2 x width rows)."""
    if path == "final_layer.adaLN_modulation.1":
        return True
    return path.endswith(".context_block.adaLN_modulation.1") and rows == 2 * width


def swap_halves(t, dim: int = 0):
    """(a, b) -> (b, a) along `dim`: its own inverse."""
    import torch

    a, b = t.chunk(2, dim=dim)
    return torch.cat([b, a], dim=dim)


def variant(config) -> tuple[str, str]:
    """(kohya's ss_base_model_version, ModelSpec architecture) of an SD3 transformer config, by its structure as
    sd-scripts decides it: no qk-norm is SD3 Medium, qk-norm with dual-attention layers SD3.5 Medium, else SD3.5
    Large."""
    cfg = dict(config)
    if not cfg.get("qk_norm"):
        kind = "medium"
    else:
        kind = "5-medium" if cfg.get("dual_attention_layers") else "5-large"
    return kind, f"stable-diffusion-3-{kind}/lora"


def unused_layers(config) -> set[str]:
    """Layers whose output SD3 discards: the last block keeps no context output, so its context query (which only
    makes context outputs) never reaches the prediction."""
    return {f"transformer_blocks.{dict(config)['num_layers'] - 1}.attn.add_q_proj"}


# ---------------------------------------------------------------- LoRA layer names
# kohya base names: sdlora's (diffusers paths, lora_unet_transformer_blocks_0_attn_to_q) and sd-scripts' lora_sd3
# (original paths, lora_unet_joint_blocks_0_x_block_attn_qkv)

PREFIX = "lora_unet_"
_INTERNAL_BLOCK = re.compile(r"^lora_unet_transformer_blocks_(\d+)_(.+)$")
_ORIGINAL_BLOCK = re.compile(r"^lora_unet_joint_blocks_(\d+)_(.+)$")
_D_BLOCK = {d.replace(".", "_"): d for d in BLOCK}
_D_TOP = {d.replace(".", "_"): d for d in TOP}
_O_BLOCK = {o.replace(".", "_"): o for o, _ in BLOCK.values()}
_O_TOP = {o.replace(".", "_"): o for o in TOP.values()}


def _path(base: str, block: re.Pattern, prefix: str, inside: dict, top: dict) -> str | None:
    if m := block.match(base):
        rest = inside.get(m[2])
        return f"{prefix}.{m[1]}.{rest}" if rest else None
    return top.get(base[len(PREFIX):]) if base.startswith(PREFIX) else None


def internal_path(base: str) -> str | None:
    """The diffusers module path of one of sdlora's SD3 layer names, or None."""
    return _path(base, _INTERNAL_BLOCK, "transformer_blocks", _D_BLOCK, _D_TOP)


def original_path(base: str) -> str | None:
    """The original MMDiT module path of a kohya SD3 layer name, or None."""
    return _path(base, _ORIGINAL_BLOCK, "joint_blocks", _O_BLOCK, _O_TOP)


def is_file_layout(mods) -> bool:
    """Whether these layer names are the original MMDiT ones (a kohya SD3 file)."""
    return any(b.startswith("lora_unet_joint_blocks_") or (original_path(b) and not internal_path(b)) for b in mods)


def is_internal(mods) -> bool:
    """Whether these layer names are sdlora's SD3 ones (diffusers module paths)."""
    return any(b.startswith("lora_unet_transformer_blocks_") or (internal_path(b) and not original_path(b))
               for b in mods)
