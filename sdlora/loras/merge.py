"""`sdlora merge` (bake LoRAs into a model: a diffusers folder or a single file) and `sdlora extract` (a LoRA from
the difference of two models)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError, SdloraError
from ..io import check_output, check_writable, make_private_dir_public, save_safetensors
from ..models import Components, load_model
from . import layout, lowrank
from .checks import check_fits
from .files import DTYPES, check_weights, load_lora, save_kohya
from .lowrank import ExtractReport
from .metadata import family_labels

log = logging.getLogger("sdlora")


def model_layers(c: Components, aliases: bool = True) -> dict[str, torch.nn.Module]:
    """kohya base name -> Linear/Conv2d module of a loaded model (see layout.model_layers)."""
    return layout.model_layers(c.family, c.denoiser, c.text_encoders, aliases)


@torch.no_grad()
def merge_into_model(model: str | Path | None, loras: list[tuple[str, float]], output: str | Path,
                     overwrite: bool = False, allow_pickle: bool = False, text_encoders: str = "") -> Path:
    """Bake LoRAs (each at its weight) into the base weights: W += weight * delta, each file's exact update for its
    type (LoRA: alpha / rank * up @ down; LoHa, LoKr, DoRA: see `modules`), all taken against the original weights.

    `output` ending in `.safetensors` is a single-file checkpoint in the original SD (LDM) key layout, as A1111 and
    ComfyUI load it (SD1, SD2, SDXL); anything else is a diffusers folder. Bundled embeddings go into the
    tokenizers and text encoders of a folder output (every encoder they have vectors for). SD3: `text_encoders`
    for a single file without them; the output is written in Stability's SD3 layout with T5 where the model has it.
    """
    from .apply import load_embeddings

    output = Path(output)
    if not loras:
        raise SdloraError("merge needs at least one --lora FILE[:WEIGHT]")
    check_weights(loras)
    check_output(output, [p for p in (model, *[p for p, _ in loras]) if p], overwrite)
    c = load_model(model, allow_pickle, text_encoders)
    layers = model_layers(c)
    loaded = [(path, w, *load_lora(path)[:2]) for path, w in loras]
    for path, _, mods, _ in loaded:
        check_fits(mods, {b: tuple(m.weight.shape) for b, m in layers.items()}, str(path))
    updates: dict[str, torch.Tensor] = {}
    for _, weight, mods, _ in loaded:  # every update against the original weight (DoRA reads it), as A1111 does
        for base, m in mods.items():
            w = layers[base].weight
            updates[base] = updates.get(base, 0) + weight * m.delta(w)
    for base, update in updates.items():
        w = layers[base].weight
        w.copy_((w.float() + update).to(w.dtype))
    if output.suffix == ".safetensors":
        if any(emb for *_, emb in loaded):
            log.warning("bundled embeddings cannot go into a single-file checkpoint; load them separately")
        from ..single_file import save_tokenizers

        state, header = ldm_file(c)
        save_safetensors(state, output, {**header, "sdlora_merged": json.dumps([[Path(p).name, w] for p, w in loras])})
        save_tokenizers(output, c.family, c.tokenizers, c.text_encoders, c.frozen_text)
        return output
    pipe = c.pipeline()
    for _, _, _, emb in loaded:
        load_embeddings(pipe, c.family, emb)
    return _save_folder(pipe, output)


def _save_folder(pipe, output: Path) -> Path:
    """save_pretrained into a temp folder beside `output`, then swap it in (never half a model)."""
    check_writable(output.with_name(output.name + ".probe"))  # its folder takes new files
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        make_private_dir_public(tmp)  # mkdtemp makes it 0700; what is inside follows the umask already
        pipe.save_pretrained(tmp, safe_serialization=True)
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output


def ldm_file(c: Components) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The whole model in the original single-file layout (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.* / conditioner.*), which A1111, ComfyUI and diffusers' from_single_file read."""
    from ..single_file import ldm_contents

    models = c.family.parts(c.denoiser, c.text_encoders, c.vae, [f.model for f in c.frozen_text])
    return ldm_contents(c.family.name, models, c.prediction_type)


# ---------------------------------------------------------------- extract

def _extractable(module: torch.nn.Module, conv_rank: int | None) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and (module.kernel_size == (1, 1) or conv_rank is not None)


@torch.no_grad()
def extract_lora(base: str | Path | None, tuned: str | Path, rank: int, output: str | Path, overwrite: bool = False,
                 conv_rank: int | None = None, text_encoder: bool = True, min_diff: float = 1e-6,
                 allow_pickle: bool = False, dtype: str = "fp16", text_encoders: str = "") -> ExtractReport:
    """A LoRA of rank `rank` from the difference of two models: every denoiser Linear and 1x1 conv layer (3x3 convs
    too at `conv_rank`) and the text encoders', by truncated SVD of tuned - base. Layers whose difference is below
    `min_diff` of the base weight's norm are skipped. `dtype`: fp16 (default), bf16 or fp32 tensors."""
    if rank < 1:
        raise SdloraError(f"--rank must be at least 1, not {rank}")
    check_output(output, [p for p in (base, tuned) if p], overwrite)
    a, b = load_model(base, allow_pickle, text_encoders), load_model(tuned, allow_pickle, text_encoders)
    layers_a, layers_b = model_layers(a, aliases=False), model_layers(b, aliases=False)
    report, mods, norms = ExtractReport(str(output)), {}, {}
    for name, ma in layers_a.items():
        if (name.startswith("lora_te") and not text_encoder) or not _extractable(ma, conv_rank):
            continue
        mb = layers_b.get(name)
        if mb is None or mb.weight.shape != ma.weight.shape:
            raise ModelError(f"layer {name} differs in shape between the two models: not the same architecture")
        diff = mb.weight.float() - ma.weight.float()
        if diff.norm() <= min_diff * ma.weight.float().norm():
            report.skipped.append(name)
            continue
        r = conv_rank if ma.weight.dim() == 4 and ma.weight.shape[-1] > 1 else rank
        mods[name], err = lowrank.low_rank(diff, r)
        norms[name] = float(diff.norm())
        report.add(name, mods[name].rank, err)
    if not mods:
        raise SdloraError("the two models have the same weights in every extractable layer: nothing to extract")
    meta = {"ss_network_module": "networks.lora", **family_labels(a.family, a.prediction_type, a.denoiser.config),
            "ss_network_args": json.dumps({"conv_dim": str(conv_rank or 0)}),
            "sdlora_extract": json.dumps({"base": a.name, "tuned": b.name, "rank": rank, "conv_rank": conv_rank})}
    save_kohya(output, mods, meta, dtype=DTYPES[dtype])
    return report.finish(norms)
