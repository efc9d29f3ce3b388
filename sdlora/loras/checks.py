"""Structural checks of LoRA files: what would make a file load wrongly (or not at all) somewhere, and whether a
LoRA fits a model."""

from __future__ import annotations

import re

import torch

from ..errors import LoraFileError
from ..families import FAMILIES
from .layout import BUNDLE, parse_modules
from .modules import LoraModule

KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[12]?)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def validate_kohya(tensors: dict[str, torch.Tensor], family: str = "sd1") -> list[str]:
    """Problems that would make a kohya-layout file load wrongly (or not at all) in A1111/ComfyUI/diffusers."""
    problems = [f"key {k} is not in the kohya layout" for k in tensors
                if not (KOHYA_KEY.match(k) or k.startswith(BUNDLE))]
    try:
        mods = parse_modules(tensors)
    except LoraFileError as e:
        return problems + [str(e)]
    if not mods:
        problems.append("no LoRA modules")
    alphas = sorted({m.alpha for m in mods.values()})
    if len(alphas) > 1:
        problems.append(f"alpha differs between modules ({alphas}); diffusers mis-scales such files")
    for base, m in mods.items():
        if f"{base}.alpha" not in tensors:
            problems.append(f"{base} has no .alpha (A1111 would use scale 1.0, diffusers alpha = rank)")
        if base.startswith("lora_te") and "_text_model_encoder_layers_" not in base:
            problems.append(f"{base}: text-encoder name lacks 'text_model_' (A1111 and ComfyUI ignore it)")
        prefix = base.split("_text_model_")[0] if base.startswith("lora_te") else ""
        if prefix and family in FAMILIES and prefix not in {s.kohya_prefix for s in FAMILIES[family].text_encoders}:
            problems.append(f"{base}: {prefix}_ is not a text-encoder prefix of {FAMILIES[family].title}")
        if m.up.shape[1] != m.rank:
            problems.append(f"{base}: lora_up {tuple(m.up.shape)} does not match rank {m.rank}")
    return problems


def check_fits(mods: dict[str, LoraModule], shapes: dict[str, tuple], what: str = "") -> None:
    """Raise when any LoRA layer has no layer in the model (with the count) or another shape (naming it).

    `shapes` maps kohya base names to the model layer's weight shape; `what` prefixes the message (a file name)."""
    lead = f"{what}: " if what else ""
    missing = [b for b in mods if b not in shapes]
    if missing:
        raise LoraFileError(f"{lead}{len(missing)} of {len(mods)} LoRA layers match no layer of the model "
                            f"(first: {missing[0]}); was it made for another model family?")
    for base, m in mods.items():
        if m.weight_shape != tuple(shapes[base]):
            raise LoraFileError(f"{lead}LoRA layer {base} has shape {m.weight_shape} but the model's layer is "
                                f"{tuple(shapes[base])} (LoRA made for another model family or size)")
