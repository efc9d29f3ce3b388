"""Reading and writing LoRA and embedding files (.safetensors only: no pickles)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..errors import LoraFileError
from ..io import atomic_path, save_safetensors

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a .safetensors LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors LoRA files are read (no pickles)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt headers
        raise LoraFileError(f"{path}: not a readable safetensors file ({e})") from None


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


def write_embedding(path: str | Path, token: str, vectors: dict[str, torch.Tensor]) -> Path:
    """An embedding file for diffusers' `load_textual_inversion` and ComfyUI: {'clip_l' (, 'clip_g')}."""
    first = next(iter(vectors.values()))
    save_safetensors(vectors, path, {"token": token, "vectors": str(first.shape[0])})
    return Path(path)


def is_embedding_file(path: str | Path) -> bool:
    """An embedding file (`write_embedding`'s: a token and its vectors, no LoRA module), from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except Exception:  # noqa: BLE001 - an unreadable file is no embedding file (the LoRA tools say what is wrong)
        return False
    return "token" in meta and "vectors" in meta and not any("lora" in k or "." in k for k in keys)


def load_lora(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """(modules by kohya base name, bundled embeddings {token: {part: tensor}}, metadata) of a LoRA file of any
    layout. A file with no LoRA module, or with a key no layout explains, is an error naming it."""
    return parse_lora(*read_lora(path), path)


def parse_lora(tensors: dict, meta: dict, path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]],
                                                                      dict[str, str]]:
    """`load_lora` of a file already read (`read_lora`'s tensors and metadata)."""
    from .layout import parse_modules, split_embeddings

    try:
        mods = parse_modules(tensors, meta)
    except LoraFileError as e:
        raise LoraFileError(f"{path}: {e}") from None
    embeddings = split_embeddings(tensors)[1]
    if not mods and not embeddings:
        raise LoraFileError(f"{path}: holds no LoRA module")
    for problem in damage(mods, embeddings):
        raise LoraFileError(f"{path}: {problem}")
    return mods, embeddings, meta


def damage(mods: dict, embeddings: dict) -> list[str]:
    """What makes a LoRA unusable: NaN or infinite values, or an update that is zero everywhere."""
    problems = []
    bad = [b for b, m in mods.items() if not m.is_finite()]
    bad += [f"embedding {t}" for t, parts in embeddings.items()
            if not all(torch.isfinite(v).all() for v in parts.values())]
    if bad:
        problems.append(f"{len(bad)} module(s) hold NaN or infinite values (e.g. {bad[0]}): the file is damaged")
    if mods and all(m.is_zero() for m in mods.values()):
        problems.append("every module's update is zero, so it changes nothing (an untrained LoRA?)")
    return problems


def check_weights(loras: list[tuple[str, float]]) -> None:
    """Each (file, weight) pair's weight is a finite number (a NaN or 1e400 weight would poison a whole model)."""
    for path, weight in loras:
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LoraFileError(f"{path}: weight {weight!r} is not a finite number")


def save_kohya(path, mods: dict, meta: dict, embeddings: dict | None = None, dtype=torch.float16) -> Path:
    """Write modules in the kohya layout (one alpha per file, bundled embeddings kept) with refreshed
    ss_network_dim / ss_network_alpha."""
    from .layout import LORA_METADATA_KEY, bundle_tensors, common_alpha, kohya_tensors

    ranks = sorted({m.rank for m in mods.values() if m.rank is not None})
    meta = {k: v for k, v in meta.items() if k not in (LORA_METADATA_KEY, "sdlora_format", "sshs_model_hash")}
    meta.update({"ss_network_module": meta.get("ss_network_module", "networks.lora"),
                 "ss_network_dim": str(ranks[-1] if ranks else 0), "ss_network_alpha": f"{common_alpha(mods):g}"})
    tensors = kohya_tensors(mods, dtype)
    for token, parts in (embeddings or {}).items():
        tensors.update(bundle_tensors(token, parts))
    return write_lora(path, tensors, meta)
