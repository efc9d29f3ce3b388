"""`sdlora mix` (a weighted sum of LoRAs as one file) and `sdlora resize` (another rank, by SVD)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraFileError, SdloraError
from ..families import FALLBACK, FAMILIES
from ..io import check_output
from . import lowrank
from .convert import dtype_of, names_for
from .files import check_weights, load_lora, save_kohya
from .layout import guess_family, model_layers, reference_weights
from .lowrank import MixReport, ResizeReport
from .metadata import family_meta
from .modules import DoraModule, is_plain


def _family(mods: dict, meta: dict) -> str:
    from_meta, from_shape = guess_family(mods, meta)
    return from_shape or from_meta


def _read(paths: list, model: str | None) -> tuple[list[tuple[dict, dict, dict]], object]:
    """Each file's modules in its family's own spelling of the layer names (any layout), its embeddings and header;
    and the base model's Components, read (once) only when a file holds more than plain LoRAs and `model` is given."""
    files = []
    for path in paths:
        mods, emb, meta = load_lora(path)
        if not mods:
            raise LoraFileError(f"{path}: holds no LoRA module")
        files.append((mods, emb, meta))
    c = None
    if model and not all(is_plain(m) for mods, _, _ in files for m in mods.values()):
        from ..models import load_model

        c = load_model(model)
    return [(names_for(mods, meta, c).canonical(mods), emb, meta) for mods, emb, meta in files], c


def layer_weights(files: list[tuple[str, dict, dict]], model) -> dict | None:
    """The base weight of every layer, for files that hold more than plain LoRAs: DoRA reads the values (so it needs
    `model`), a LoHa/LoKr conv only the shape (the family's standard architecture gives it when there is no model).
    None when every module is a plain LoRA."""
    mods = [m for _, ms, _ in files for m in ms.values()]
    if all(is_plain(m) for m in mods):
        return None
    if model:
        return {b: layer.weight for b, layer in model_layers(model.family, model.denoiser, model.text_encoders).items()}
    dora = next((p for p, ms, _ in files if any(isinstance(m, DoraModule) for m in ms.values())), None)
    if dora:
        raise LoraFileError(f"{dora}: a DoRA update depends on the base model's weights (dora_scale rescales them); "
                            "pass --model with the base model")
    _, ms, meta = files[0]
    from_meta, from_shape = guess_family(ms, meta)
    return reference_weights(FAMILIES.get(from_meta or from_shape, FALLBACK))


def mix_loras(loras: list[tuple[str, float]], output: str | Path, rank: int | None = None,
              overwrite: bool = False, model: str | None = None) -> MixReport:
    """Weighted sum of LoRAs as one file: exact by stacking ranks (rank None), or the best rank-`rank`
    approximation of each layer's summed delta (SVD), with its error. A layer missing from an input counts
    as zero there. DoRA, LoHa and LoKr inputs become a plain LoRA by SVD (DoRA needs `model` and a `rank`).
    Bundled embeddings are carried over (the first file wins a token clash)."""
    if not loras:
        raise SdloraError("mix needs at least one LoRA file")
    if rank is not None and rank < 1:
        raise SdloraError(f"--rank must be at least 1, not {rank}")
    check_weights(loras)
    check_output(output, [p for p, _ in loras], overwrite)
    files, c = _read([p for p, _ in loras], model)
    inputs = list(zip(files, [w for _, w in loras]))
    families = {str(p): _family(mods, meta) for (p, _), (mods, _, meta) in zip(loras, files)}
    if len(set(families.values()) - {""}) > 1:
        raise LoraFileError("cannot mix LoRAs for different model families: " +
                            ", ".join(f"{Path(p).name} is {f or 'unknown'}" for p, f in families.items()))
    bases = layer_weights([(p, mods, meta) for (p, _), (mods, _, meta) in zip(loras, files)], c)
    report = MixReport(str(output), exact=rank is None and bases is None, sources=[[str(p), w] for p, w in loras])
    mixed = lowrank.mix_modules([(mods, w) for (mods, _, _), w in inputs], rank, report, bases)
    embeddings = {}
    for (_, emb, _), _ in reversed(inputs):
        embeddings.update(emb)
    meta = {**family_meta(inputs[0][0][2]), "sdlora_mix": json.dumps([[Path(p).name, w] for p, w in loras])}
    save_kohya(output, mixed, meta, embeddings, dtype_of(inputs[0][0][0]))
    return report


def resize_lora(path: str | Path, output: str | Path, rank: int | None = None, keep_energy: float | None = None,
                overwrite: bool = False, model: str | None = None) -> ResizeReport:
    """Each layer brought to `rank` (never above its own) or to the smallest rank keeping share `keep_energy`
    of its squared singular values, by SVD of the delta; per-layer and overall relative errors reported. DoRA,
    LoHa and LoKr files become a plain LoRA (DoRA needs `model`, the base its update depends on)."""
    if (rank is None) == (keep_energy is None):
        raise SdloraError("resize needs exactly one of --rank or --keep-energy")
    if rank is not None and rank < 1:
        raise SdloraError(f"--rank must be at least 1, not {rank}")
    if keep_energy is not None and not 0 < keep_energy <= 1:
        raise SdloraError(f"--keep-energy must be in (0, 1], not {keep_energy}")
    check_output(output, [path], overwrite)
    files, c = _read([path], model)
    mods, emb, meta = files[0]
    bases = layer_weights([(str(path), mods, meta)], c)
    top = max(m.lora_rank for m in mods.values())
    if rank is not None and rank > top:
        raise SdloraError(f"--rank {rank} is above the LoRA's rank {top}: resizing cannot add detail; "
                          f"choose {top} or less")
    report = ResizeReport(str(output))
    out = lowrank.resize_modules(mods, rank, keep_energy, report, bases)
    meta = {**meta, "sdlora_resized_from": str(Path(path).name)}
    if bases is not None:  # now a plain LoRA: LyCORIS's labels no longer apply
        kinds = sorted({m.kind for m in mods.values()})
        meta = {k: v for k, v in meta.items() if k not in ("ss_network_args", "sdlora_network", "sdlora_network_args")}
        meta.update({"ss_network_module": "networks.lora", "sdlora_converted_from": ",".join(kinds)})
    save_kohya(output, out, meta, emb, dtype_of(mods))
    return report
