"""`sdlora inspect`: what a LoRA file holds, and the problems that would make it load wrongly somewhere."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LoraFileError
from ..families import FAMILIES
from .checks import validate_kohya
from .files import damage, read_lora
from .layout import LORA_METADATA_KEY, detect_layout, guess_family, parse_modules, split_embeddings
from .metadata import private_paths
from .modules import DoraModule, is_plain
from .networks import LYCORIS, NETWORKS, network_of


@dataclass
class LoraInfo:
    """What a LoRA file holds, and the problems that would make it load wrongly somewhere."""

    path: str
    size_bytes: int
    layout: str
    family: str
    unet_modules: int
    te_modules: int
    kinds: dict[str, int]
    types: dict[str, int]   # adapter type -> modules: lora, lora_tucker, dora, loha, lokr, loha+dora, ...
    loads_in: str           # which clients load this file as it is meant
    ranks: list[int]
    alphas: list[float]
    embeddings: dict[str, dict[str, list[int]]]
    metadata: dict[str, str]
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.kinds.items())
        lines = [f"{self.path} ({self.size_bytes / 1e6:.2f} MB)",
                 f"  layout: {self.layout}   family: {self.family}",
                 f"  modules: UNet {self.unet_modules}, text encoder {self.te_modules} ({kinds})",
                 f"  type: {', '.join(f'{k} {n}' for k, n in self.types.items()) or '-'}; loads in: {self.loads_in}",
                 f"  rank: {_ranges(self.ranks)}   alpha: {_ranges(self.alphas)}"]
        for token, parts in self.embeddings.items():
            lines.append(f"  embedding <{token}>: " + ", ".join(f"{p} {s}" for p, s in parts.items()))
        for k, v in sorted(self.metadata.items()):
            lines.append(f"  {k}: {v[:97] + '...' if len(v) > 100 else v}")
        lines.append("  problems: none" if not self.problems else "  problems:")
        lines += [f"    - {p}" for p in self.problems]
        return "\n".join(lines)


def _ranges(values) -> str:
    return ", ".join(f"{v:g}" for v in values) if values else "-"


def module_kind(base: str) -> str:
    """attn1 / attn2 / attn (SD3's joint attention) / ff / adaln / proj / conv / te / other, from a base name."""
    if base.startswith("lora_te"):
        return "te"
    for kind, rx in (("attn1", r"_attn1_"), ("attn2", r"_attn2_"), ("attn", r"_attn_(to_|add_)"),
                     ("ff", r"_ff(_context)?_net_"), ("adaln", r"(norm1(_context)?|norm_out)_linear$"),
                     ("proj", r"_proj_(in|out)$"), ("conv", r"(conv\d?|conv_shortcut|conv_in|conv_out|_op)$")):
        if re.search(rx, base):
            return kind
    return "other"


def clients(layout: str, mods: dict, family: str = "") -> str:
    """Which clients load a file of this layout and these module types as it is meant (their loaders' code:
    A1111 v1.10 extensions-builtin/Lora, ComfyUI comfy/weight_adapter and comfy/lora.py, diffusers'
    lora_state_dict; SD3: ComfyUI's MMDiT key map, diffusers' SD3LoraLoaderMixin, which converts no other layout)."""
    axes = {m.axis for m in mods.values() if isinstance(m, DoraModule)}
    if not mods:
        return "-"
    said = FAMILIES[family].clients.get(layout) if family in FAMILIES else None
    if said:
        return said
    if layout == "diffusers":
        return "diffusers" + (" (peft's DoRA)" if axes else "") + "; not A1111 or ComfyUI (sdlora convert --to kohya)"
    if any(getattr(getattr(m, "inner", m), "t2", None) is not None for m in mods.values() if "lokr" in m.kind):
        return ("AUTOMATIC1111, LyCORIS; ComfyUI skips the LoKr layers with lokr_t2 (sdlora convert --to kohya "
                "fixes that); not diffusers")
    if any(network_of(getattr(m, "inner", m)).clients == LYCORIS or getattr(m, "mid", None) is not None
           for m in mods.values()):  # a LyCORIS type (also under DoRA), or LoCon's Tucker lora_mid
        return LYCORIS
    if axes:
        return NETWORKS["dora"].clients_by_axis["input" if axes == {"input"} else "output"]
    return NETWORKS["lora"].clients


def inspect_lora(path: str | Path) -> LoraInfo:
    """Read a LoRA file (ours, kohya's, A1111's or diffusers') and run the structural validator over it."""
    path = Path(path)
    tensors, meta = read_lora(path)
    lora, emb = split_embeddings(tensors)
    layout = detect_layout(lora)
    problems = []
    try:
        mods = parse_modules(tensors, meta)
    except LoraFileError as e:
        mods, problems = {}, [str(e)]
    if not mods and not emb and not problems:
        problems.append("holds no LoRA module: no tool can use it")
    problems += damage(mods, emb)
    from_meta, from_shape = guess_family(mods, meta)
    family = from_meta or from_shape or "unknown"
    if from_meta and from_shape and from_meta != from_shape:
        problems.append(f"metadata says {from_meta} but the layer shapes are {from_shape}")
    if layout == "kohya":
        problems += validate_kohya(tensors, family)
        missing = [k for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version")
                   if k not in meta]
        if missing:
            problems.append(f"metadata lacks {', '.join(missing)} (A1111 uses it to label and filter LoRAs)")
        te = [b for b in mods if b.startswith("lora_te")]
        if any(re.search(r"_self_attn_[qkv]_proj$", b) for b in te) and not any(b.endswith("_out_proj") for b in te) \
                and all(is_plain(m) for m in mods.values()):  # (diffusers loads no other type at all)
            problems.append("text-encoder attention without any out_proj: diffusers 0.42 drops its q/k/v layers")
    elif layout == "diffusers" and "ComfyUI" not in clients(layout, mods, family):
        problems.append("diffusers layout: A1111 and ComfyUI do not load it; `sdlora convert --to kohya` fixes that")
    zero = [b for b, m in mods.items() if m.is_zero()]
    if zero and len(zero) < len(mods):
        problems.append(f"{len(zero)} of {len(mods)} modules change nothing (zero update), e.g. {zero[0]}")
    problems += [f"privacy: {p}; `sdlora convert FILE --metadata public -o OUT` removes it"
                 for p in private_paths(meta)]
    kinds = Counter(module_kind(b) for b in mods)
    return LoraInfo(
        path=str(path), size_bytes=path.stat().st_size, layout=layout, family=family,
        unet_modules=sum(not b.startswith("lora_te") for b in mods),
        te_modules=sum(b.startswith("lora_te") for b in mods),
        kinds=dict(sorted(kinds.items())), types=dict(sorted(Counter(m.kind for m in mods.values()).items())),
        loads_in=clients(layout, mods, family), ranks=sorted({m.rank for m in mods.values() if m.rank is not None}),
        alphas=sorted({m.alpha for m in mods.values()}),
        embeddings={t: {p: list(v.shape) for p, v in parts.items()} for t, parts in emb.items()},
        metadata={k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec.", "sdlora_", "sshs_"))
                  or k == LORA_METADATA_KEY},
        problems=problems)
