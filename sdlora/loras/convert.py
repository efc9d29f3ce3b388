"""`sdlora convert`: rewrite a LoRA in the kohya or diffusers layout, numerically identical."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraFileError, SdloraError
from ..families import FALLBACK, FAMILIES
from ..io import check_output
from .files import load_lora, parse_lora, read_lora, save_kohya, write_embedding, write_lora
from .layout import NameMap, diffusers_tensors, guess_family, name_map, reference_name_map
from .metadata import apply_policy
from .modules import LoraModule


def names_for(mods: dict, meta: dict[str, str], model=None) -> NameMap:
    """The NameMap to read a LoRA's layer names against: `model`'s own modules (a path, or loaded Components), else
    the standard architecture of the family the file is for (its metadata, else its layer names and shapes; SD1/SD2
    naming when nothing says)."""
    if model:
        from ..models import load_model

        c = load_model(model) if isinstance(model, (str, Path)) else model
        return name_map(c.family, c.denoiser, c.text_encoders)
    from_meta, from_shape = guess_family(mods, meta)
    return reference_name_map(FAMILIES.get(from_meta or from_shape, FALLBACK))


def dtype_of(mods: dict):
    """The dtype of a file's LoRA tensors (an A1111 alpha may be int64: it does not count)."""
    import torch

    return next(iter(mods.values())).dtype if mods else torch.float16


def convert_lora(path: str | Path, to: str | None, output: str | Path, overwrite: bool = False,
                 model: str | None = None, metadata: str | None = None) -> Path:
    """Rewrite a LoRA in the kohya or diffusers layout, numerically identical; `to=None` keeps the layout and the
    tensors byte for byte. `metadata` public or none rewrites the header too (see metadata.apply_policy): public
    drops every absolute path and user name, none keeps only what loaders read.

    Layer names are mapped through the family's standard module naming (SGM names for SDXL), or through `model`'s
    live modules. kohya -> diffusers writes bundled embeddings beside it as `<name>_emb.safetensors` (for
    load_textual_inversion); diffusers -> kohya restores the file's `ss_network_alpha` when it has one and bundles
    that embedding file again, so a round trip is lossless."""
    if to not in ("kohya", "diffusers", None):
        raise SdloraError(f"--to must be kohya or diffusers, not {to!r}")
    if metadata not in ("public", "none", "full", None):
        raise SdloraError(f"--metadata must be public or none, not {metadata!r}")
    if to is None and metadata is None:
        raise SdloraError("say what to change: --to kohya|diffusers and/or --metadata public|none")
    check_output(output, [path], overwrite)
    if to is None:  # the header alone
        tensors, meta = read_lora(path)
        parse_lora(tensors, meta, path)  # a file that is no usable LoRA is refused here too
        return write_lora(output, tensors, apply_policy(meta, metadata))
    mods, emb, meta = load_lora(path)
    meta = apply_policy(meta, metadata or "full")
    if not mods:
        raise LoraFileError(f"{path}: holds no LoRA module to convert")
    names = names_for(mods, meta, model)
    dtype = dtype_of(mods)
    if to == "kohya":
        emb = emb or _sidecar_embeddings(Path(path))
        return save_kohya(output, _with_alpha(names.canonical(mods), meta.get("ss_network_alpha")), meta, emb, dtype)
    for token, parts in emb.items():  # diffusers rejects bundle_emb keys: a sidecar file per token instead
        name = f"{Path(output).stem}_emb" if len(emb) == 1 else f"{Path(output).stem}_{token}_emb"
        write_embedding(check_output(Path(output).with_name(name + ".safetensors"), [path], overwrite), token, parts)
    tensors, adapter_meta = diffusers_tensors(mods, names, dtype)
    meta = {k: v for k, v in meta.items() if k != "sshs_model_hash"}
    return write_lora(output, tensors, {**meta, **adapter_meta, "sdlora_format": "diffusers"})


def _sidecar_embeddings(path: Path) -> dict:
    """The embedding file a diffusers-layout LoRA carries beside it (`<stem>_emb.safetensors`, as `convert` and
    training write it), as {token: {part: tensor}}; {} when there is none."""
    from .files import read_lora

    side = path.with_name(f"{path.stem}_emb.safetensors")
    if not side.is_file():
        return {}
    tensors, meta = read_lora(side)
    if not meta.get("token"):
        raise LoraFileError(f"{side}: embedding file without a 'token' in its metadata; cannot bundle it")
    return {meta["token"]: tensors}


def _with_alpha(mods: dict[str, LoraModule], alpha: str | None) -> dict[str, LoraModule]:
    """Every module re-expressed with the given alpha (each delta unchanged), when it is a positive number."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        return mods
    return {b: m.with_alpha(a) for b, m in mods.items()} if a > 0 else mods
