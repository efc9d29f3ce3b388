"""Structural checks of LoRA files: what would make a file load wrongly (or not at all) somewhere, and whether a
LoRA fits a model."""

from __future__ import annotations

import re

import torch

from ..errors import LoraFileError
from ..families import FALLBACK, FAMILIES
from .layout import BUNDLE, ROLES, _split_key, parse_modules
from .modules import DoraModule, LohaModule, LokrModule, LoraModule, fits

# a kohya key: a base name, then alpha or a tensor name of one of the module types
KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[123]?)_[A-Za-z0-9_]+\.("
                       + "|".join(re.escape(k) for roles in ROLES.values() for k in ("alpha", *roles)) + ")$")


def validate_kohya(tensors: dict[str, torch.Tensor], family: str = FALLBACK.name) -> list[str]:
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
    if len(alphas) > 1 and (family not in FAMILIES or FAMILIES[family].diffusers_reads_kohya):
        problems.append(f"alpha differs between modules ({alphas}); diffusers mis-scales such files")
    stems = {_split_key(k)[0] for k in tensors if not k.startswith(BUNDLE)}  # the file's own modules
    for stem in sorted(stems):
        if f"{stem}.alpha" not in tensors:
            problems.append(f"{stem} has no .alpha (A1111 would use scale 1.0, diffusers alpha = rank)")
    for base, m in mods.items():
        if base.startswith("lora_te") and "_text_model_encoder_layers_" not in base:
            problems.append(f"{base}: text-encoder name lacks 'text_model_' (A1111 and ComfyUI ignore it)")
        prefix = base.split("_text_model_")[0] if base.startswith("lora_te") else ""
        if prefix and family in FAMILIES and prefix not in {s.kohya_prefix for s in FAMILIES[family].text_encoders}:
            problems.append(f"{base}: {prefix}_ is not a text-encoder prefix of {FAMILIES[family].title}")
        if isinstance(m, LoraModule) and m.up.shape[1] != m.rank:
            problems.append(f"{base}: lora_up {tuple(m.up.shape)} does not match rank {m.rank}")
        problems += _lycoris_problems(base, m)
    tucker = [b for b, m in mods.items() if isinstance(getattr(m, "inner", m), LokrModule)
              and getattr(m, "inner", m).t2 is not None]
    if tucker:
        problems.append(f"ComfyUI skips {len(tucker)} LoKr conv layers with a Tucker core lokr_t2 (e.g. {tucker[0]}: "
                        "its torch.kron fails on the rebuilt w2); `sdlora convert FILE --to kohya -o OUT` writes them "
                        "without the core, which every client applies")
    outputs = [b for b, m in mods.items() if isinstance(m, DoraModule) and m.axis == "output"]
    if outputs:
        problems.append(f"{len(outputs)} DoRA layers have an output-axis dora_scale (e.g. {outputs[0]}): "
                        "AUTOMATIC1111 v1.10 applies it wrongly (it expects [1, in]) and ComfyUI only approximates "
                        "it; LyCORIS >= 3.2 reads it")
    return problems


def _lycoris_problems(base: str, m) -> list[str]:
    """Shapes A1111 or ComfyUI misread: 2-D dora_scale on a conv (A1111 broadcasts it against the kernel), 4-D
    hada_w*_b / lokr_w2_b without a Tucker core (ComfyUI multiplies them with torch.mm)."""
    out = []
    if isinstance(m, DoraModule):
        if len(m.weight_shape) == 4 and m.magnitude.dim() != 4:
            out.append(f"{base}: a conv layer's dora_scale must be 4-D, not {tuple(m.magnitude.shape)}")
        m = m.inner
    flat = [t for t in (getattr(m, "w1b", None), getattr(m, "w2b", None)) if t is not None]
    if isinstance(m, (LohaModule, LokrModule)) and getattr(m, "t1", None) is None and m.t2 is None \
            and any(t.dim() != 2 for t in flat):
        out.append(f"{base}: {m.kind} factors *_b must be 2-D [r, in*kh*kw] (ComfyUI multiplies them with torch.mm)")
    return out


def check_fits(mods: dict, shapes: dict[str, tuple], what: str = "") -> None:
    """Raise when any LoRA layer has no layer in the model (with the count) or another shape (naming it).

    `shapes` maps kohya base names to the model layer's weight shape; `what` prefixes the message (a file name)."""
    lead = f"{what}: " if what else ""
    missing = [b for b in mods if b not in shapes]
    if missing:
        raise LoraFileError(f"{lead}{len(missing)} of {len(mods)} LoRA layers match no layer of the model "
                            f"(first: {missing[0]}); was it made for another model family?")
    for base, m in mods.items():
        if not fits(m, shapes[base]):
            raise LoraFileError(f"{lead}LoRA layer {base} has shape {m.weight_shape} but the model's layer is "
                                f"{tuple(shapes[base])} (LoRA made for another model family or size)")
