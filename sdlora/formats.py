"""LoRA files: the kohya layout (default; loads in A1111, ComfyUI, kohya and diffusers) and the diffusers/PEFT
layout, their metadata, and a structural validator. The rules are those of ../shared/reference/formats.md."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import LoraFileError
from .io import atomic_path

KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[12]?)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the adapter config


@dataclass
class LoraModule:
    """One LoRA'd layer: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor    # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The full weight update, in the shape of the base layer's weight (fp32)."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return self.scale * up @ down
        out = up.flatten(1) @ down.flatten(1)
        return self.scale * out.reshape(up.shape[0], *down.shape[1:])


# ---------------------------------------------------------------- names

def te_path(path: str) -> str:
    """CLIP module path with the 'text_model.' part that transformers 5 dropped (A1111/ComfyUI need it)."""
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_base(prefix: str, path: str) -> str:
    """kohya base name of a module: 'lora_unet_down_blocks_0_...' or 'lora_te_text_model_encoder_...'."""
    if prefix.startswith("lora_te"):
        path = te_path(path)
    return f"{prefix}_{path.replace('.', '_')}"


_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_path(path: str, layers_per_block: int, up_has_attention: tuple[bool, ...] = ()) -> str:
    """A diffusers UNet module path in the original SGM/LDM naming (what kohya writes for SDXL UNets):
    down_blocks.1.attentions.0.x -> input_blocks.4.1.x, mid_block.resnets.1 -> middle_block.2, ..."""
    n = layers_per_block + 1
    parts = path.split(".")
    head, rest = parts[:4], parts[4:]
    if parts[0] == "down_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        head = [f"input_blocks.{n * i + j + 1}.{1 if kind == 'attentions' else 0}"] if kind != "downsamplers"             else [f"input_blocks.{n * (i + 1)}.0.op"]
        if kind == "downsamplers":
            rest = rest[1:]  # "conv" is the op itself
    elif parts[0] == "up_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if kind == "upsamplers":
            head = [f"output_blocks.{n * i + layers_per_block}.{2 if up_has_attention[i] else 1}"]
        else:
            head = [f"output_blocks.{n * i + j}.{1 if kind == 'attentions' else 0}"]
    elif parts[0] == "mid_block":
        head, rest = [f"middle_block.{1 if parts[1] == 'attentions' else 2 * int(parts[2])}"], parts[3:]
    else:
        return path
    if "resnets" in path and rest and rest[0] in _RESNET_SGM:
        rest = [_RESNET_SGM[rest[0]]] + rest[1:]
    return ".".join(head + rest)


def sgm_namer(unet_config) -> callable:
    """path -> SGM path for a UNet config (layers per block and which up blocks have attention)."""
    up_attn = tuple("CrossAttn" in t for t in unet_config["up_block_types"])
    return lambda path: sgm_path(path, unet_config["layers_per_block"], up_attn)


def kohya_names(model: torch.nn.Module, prefix: str) -> dict[str, str]:
    """Map each module path of a live model to its kohya base name (the reverse map for loading)."""
    return {kohya_base(prefix, name): name for name, _ in model.named_modules() if name}


# ---------------------------------------------------------------- building state dicts

def _peft_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mods = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            mods[path] = (a, state[path + ".lora_B.weight"])
    return mods


def to_kohya(parts: dict[str, dict[str, torch.Tensor]], alpha: float, dtype=torch.float16,
             unet_path=None) -> dict[str, torch.Tensor]:
    """peft state dicts keyed by kohya prefix ('lora_unet', 'lora_te', ...) -> kohya tensors with an alpha each.
    `unet_path` renames UNet module paths (SDXL: `sgm_namer`)."""
    out = {}
    for prefix, state in parts.items():
        for path, (a, b) in _peft_modules(state).items():
            base = kohya_base(prefix, unet_path(path) if unet_path and prefix == "lora_unet" else path)
            out[f"{base}.lora_down.weight"] = a.to(dtype)
            out[f"{base}.lora_up.weight"] = b.to(dtype)
            out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


DIFFUSERS_PREFIX = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}


def to_diffusers(parts: dict[str, dict[str, torch.Tensor]], alpha: float, rank: int,
                 dtype=torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/PEFT layout: alpha/rank folded into lora_B, plus the adapter config diffusers reads."""
    out, adapter_meta = {}, {}
    for prefix, state in parts.items():
        name = DIFFUSERS_PREFIX[prefix]
        targets = []
        for path, (a, b) in _peft_modules(state).items():
            full = te_path(path) if name.startswith("text_encoder") else path
            out[f"{name}.{full}.lora_A.weight"] = a.to(dtype)
            out[f"{name}.{full}.lora_B.weight"] = (b.float() * (alpha / rank)).to(dtype)
            targets.append(path)
        if targets:
            adapter_meta.update({f"{name}.r": rank, f"{name}.lora_alpha": rank, f"{name}.target_modules": targets})
    return out, {LORA_METADATA_KEY: json.dumps(adapter_meta, sort_keys=True)} if adapter_meta else {}


# ---------------------------------------------------------------- reading

def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a .safetensors LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors LoRA files are read (no pickles)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt headers
        raise LoraFileError(f"{path}: not a readable safetensors file ({e})") from None


def detect_layout(keys) -> str:
    """'kohya', 'diffusers' or 'unknown' from the key names."""
    keys = [k for k in keys if not k.startswith("bundle_emb.")]
    if keys and all(k.startswith("lora_") for k in keys):
        return "kohya"
    if keys and any(".lora_A." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    return "unknown"


def split_embeddings(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Separate `bundle_emb.<token>.<part>` tensors (A1111's bundle) from the LoRA tensors."""
    lora, emb = {}, defaultdict(dict)
    for k, v in tensors.items():
        if k.startswith("bundle_emb."):
            token, part = k[len("bundle_emb."):].rsplit(".", 1) if k.count(".") >= 2 else (k[11:], "")
            if token.endswith(".string_to_param"):  # SD1/SD2 A1111 layout: bundle_emb.<tok>.string_to_param.*
                token, part = token[: -len(".string_to_param")], "clip_l"
            emb[token][part] = v
        else:
            lora[k] = v
    return lora, dict(emb)


def kohya_modules(tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """Group kohya tensors by module base name; a missing alpha means alpha = rank (as in diffusers)."""
    groups = defaultdict(dict)
    for k, v in tensors.items():
        if k.startswith("bundle_emb."):
            continue
        base, _, kind = k.partition(".")
        groups[base][kind] = v
    mods = {}
    for base, g in groups.items():
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise LoraFileError(f"module {base} lacks lora_down or lora_up")
        alpha = float(g["alpha"].item()) if "alpha" in g else float(g["lora_down.weight"].shape[0])
        mods[base] = LoraModule(g["lora_down.weight"], g["lora_up.weight"], alpha)
    return mods


def modules_to_kohya(mods: dict[str, LoraModule], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Write modules back as kohya tensors with one alpha value for the whole file (exact in every client).

    A module trained with another alpha/rank ratio keeps its update: its `up` is multiplied by alpha_m / A.
    """
    if not mods:
        return {}
    common = next(iter(mods.values())).alpha
    out = {}
    for base, m in mods.items():
        up = m.up.float() * (m.alpha / common) if m.alpha != common else m.up
        out[f"{base}.lora_down.weight"] = m.down.to(dtype)
        out[f"{base}.lora_up.weight"] = up.to(dtype)
        out[f"{base}.alpha"] = torch.tensor(common, dtype=dtype)
    return out


# ---------------------------------------------------------------- writing

def tensor_hash(data: bytes) -> str:
    """sshs_model_hash: sha256 of a safetensors file's bytes after the header (A1111's LoRA hash)."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def write_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a LoRA file atomically, with every metadata value a string and the A1111 hash filled in."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    metadata["sshs_model_hash"] = tensor_hash(st_save(tensors, metadata=metadata))
    data = st_save(tensors, metadata=metadata)  # same tensor bytes, header now holds the hash
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# ---------------------------------------------------------------- checks

def validate_kohya(tensors: dict[str, torch.Tensor], family: str = "sd1") -> list[str]:
    """Problems that would make a kohya-layout file load wrongly (or not at all) in A1111/ComfyUI/diffusers."""
    problems = []
    for k in tensors:
        if not (KOHYA_KEY.match(k) or k.startswith("bundle_emb.")):
            problems.append(f"key {k} is not in the kohya layout")
    try:
        mods = kohya_modules(tensors)
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
        if family != "sdxl" and base.startswith(("lora_te1_", "lora_te2_")):
            problems.append(f"{base}: lora_te1_/lora_te2_ is for SDXL only")
        if m.up.shape[1] != m.rank:
            problems.append(f"{base}: lora_up {tuple(m.up.shape)} does not match rank {m.rank}")
    return problems


def check_fits(mods: dict[str, LoraModule], shapes: dict[str, tuple]) -> None:
    """Raise, naming the first mismatching layer, when a LoRA does not fit a model (other family or size).

    `shapes` maps kohya base names to the base layer's weight shape.
    """
    for base, m in mods.items():
        if base not in shapes:
            raise LoraFileError(f"LoRA layer {base} has no matching layer in the model (another family?)")
        want = tuple(shapes[base])
        got = (m.up.shape[0], *m.down.shape[1:])
        if got != want:
            raise LoraFileError(f"LoRA layer {base} has shape {got} but the model's layer is {want} "
                                "(LoRA made for another model family or size)")
