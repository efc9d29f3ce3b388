"""`sdlora mix` (a weighted sum of LoRAs as one file) and `sdlora resize` (another rank, by SVD)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraFileError, SdloraError
from ..io import check_output
from . import lowrank
from .convert import dtype_of, names_for
from .files import check_weights, load_lora, save_kohya
from .layout import guess_family
from .lowrank import MixReport, ResizeReport
from .metadata import family_meta


def _family(mods: dict, meta: dict) -> str:
    from_meta, from_shape = guess_family(mods, meta)
    return from_shape or from_meta


def _load_modules(path) -> tuple[dict, dict, dict]:
    """A file's modules in its family's own spelling of the layer names (any layout), its embeddings and header."""
    mods, emb, meta = load_lora(path)
    if not mods:
        raise LoraFileError(f"{path}: holds no LoRA module")
    return names_for(mods, meta).canonical(mods), emb, meta


def mix_loras(loras: list[tuple[str, float]], output: str | Path, rank: int | None = None,
              overwrite: bool = False) -> MixReport:
    """Weighted sum of LoRAs as one file: exact by stacking ranks (rank None), or the best rank-`rank`
    approximation of each layer's summed delta (SVD), with its error. A layer missing from an input counts
    as zero there. Bundled embeddings are carried over (the first file wins a token clash)."""
    if not loras:
        raise SdloraError("mix needs at least one LoRA file")
    if rank is not None and rank < 1:
        raise SdloraError(f"--rank must be at least 1, not {rank}")
    check_weights(loras)
    check_output(output, [p for p, _ in loras], overwrite)
    inputs = [(_load_modules(p), w) for p, w in loras]
    families = {str(p): _family(mods, meta) for (p, _), ((mods, _, meta), _) in zip(loras, inputs)}
    if len(set(families.values()) - {""}) > 1:
        raise LoraFileError("cannot mix LoRAs for different model families: " +
                            ", ".join(f"{Path(p).name} is {f or 'unknown'}" for p, f in families.items()))
    report = MixReport(str(output), exact=rank is None, sources=[[str(p), w] for p, w in loras])
    mixed = lowrank.mix_modules([(mods, w) for (mods, _, _), w in inputs], rank, report)
    embeddings = {}
    for (_, emb, _), _ in reversed(inputs):
        embeddings.update(emb)
    meta = {**family_meta(inputs[0][0][2]), "sdlora_mix": json.dumps([[Path(p).name, w] for p, w in loras])}
    save_kohya(output, mixed, meta, embeddings, dtype_of(inputs[0][0][0]))
    return report


def resize_lora(path: str | Path, output: str | Path, rank: int | None = None, keep_energy: float | None = None,
                overwrite: bool = False) -> ResizeReport:
    """Each layer brought to `rank` (never above its own) or to the smallest rank keeping share `keep_energy`
    of its squared singular values, by SVD of the delta; per-layer and overall relative errors reported."""
    if (rank is None) == (keep_energy is None):
        raise SdloraError("resize needs exactly one of --rank or --keep-energy")
    if rank is not None and rank < 1:
        raise SdloraError(f"--rank must be at least 1, not {rank}")
    if keep_energy is not None and not 0 < keep_energy <= 1:
        raise SdloraError(f"--keep-energy must be in (0, 1], not {keep_energy}")
    check_output(output, [path], overwrite)
    mods, emb, meta = _load_modules(path)
    top = max(m.rank for m in mods.values())
    if rank is not None and rank > top:
        raise SdloraError(f"--rank {rank} is above the LoRA's rank {top}: resizing cannot add detail; "
                          f"choose {top} or less")
    report = ResizeReport(str(output))
    out = lowrank.resize_modules(mods, rank, keep_energy, report)
    save_kohya(output, out, {**meta, "sdlora_resized_from": str(Path(path).name)}, emb, dtype_of(mods))
    return report
