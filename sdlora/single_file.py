"""Single-file checkpoints (the original LDM/SGM layout of SD 1/2/XL, Stability's of SD3): detect, load offline,
write.

Nothing is downloaded. Each family reads and writes its own layout (`Family.single_file`: `families.ldm` for SD1,
SD2 and SDXL, `families.sd3`); this module finds the family a file belongs to and hands it over. The diffusers
configs are read from the checkpoint's tensor shapes on top of the configs sdlora ships (`sdlora/assets/<family>/`),
and CLIP's tokenizer is rebuilt from CLIP's BPE merges (`sdlora/assets/clip/`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import ModelError
from .families import FAMILIES, Family, folder_family
from .families.checkpoint import ASSETS, CLIP_VOCAB, PICKLES, CheckpointInfo, header, tensors  # noqa: F401
from .families.ldm import unclaimed
from .tokenizers import clip_tokenizer  # noqa: F401 - the tools' and tests' entry point to it


def detect_checkpoint(path: str | Path, allow_pickle: bool = False) -> CheckpointInfo:
    """Read family, sizes and prediction type from a single file's header (no tensor data is read).

    The first family (in table order) whose layout claims the file's keys reads it: SD3 by its MMDiT
    (`joint_blocks`), SD1/SD2/SDXL by their text encoders' key layout: `cond_stage_model.transformer.*` (SD1,
    CLIP-L), `cond_stage_model.model.*` (SD2, OpenCLIP-H), `conditioner.embedders.0/1.*` (SDXL). Prediction type: a
    `v_pred` key or `modelspec.prediction_type` metadata wins; otherwise SD1/SDXL are epsilon, SD3 flow, and SD2 is
    v_prediction unless its metadata or file name says 512 (the 512-base model); `reason` says which rule decided.
    `configs`: the shapes decide every size; what shapes cannot tell (head counts, norm groups, activation) comes
    from the file's `sdlora.diffusers_configs` header (written by `save_single_file`), else from the shipped family
    configs and the family's head width (SD2/XL) or head count (SD1). A `.ckpt` is only opened with
    `allow_pickle=True` (through `pickles.read_pickle`, which runs no code from it). Raises ModelError naming what was
    found when no family claims the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    shapes, meta = header(path, allow_pickle)
    family = next((f for f in FAMILIES.values() if f.single_file.claims(shapes)), None)
    if family is None:
        raise unclaimed(shapes, path, [f.single_file for f in FAMILIES.values()])
    prediction, reason, configs = family.single_file.info(shapes, meta, path)
    return CheckpointInfo(str(path), family.name, prediction, reason, configs)


def load_single_file(path: str | Path, prediction_type: str = "auto", allow_pickle: bool = False, *,
                     text_encoders: str = "", t5: bool | None = True, dtype: torch.dtype | None = None) -> dict:
    """Build the denoiser, vae, text encoder(s), tokenizer(s) and scheduler from one checkpoint file, offline.

    `prediction_type` 'auto' follows `detect_checkpoint`; 'epsilon' or 'v_prediction' overrides it. Tokenizers:
    a folder named `<file stem>.tokenizer/` (`.tokenizer_2/`, `.tokenizer_3/`) next to the file is used when present
    (tiny or custom models, written by `save_single_file`); otherwise CLIP's tokenizer, rebuilt from shipped files.
    SD3: `text_encoders` is where parts the file lacks come from, `t5` and `dtype` as `models.load_components` takes
    them (the other families load in fp32).
    """
    path = Path(path)
    info = detect_checkpoint(path, allow_pickle)
    return FAMILIES[info.family].single_file.load(path, info, allow_pickle, prediction_type=prediction_type,
                                                  text_encoders=text_encoders, t5=t5, dtype=dtype)


def to_ldm(family: str, parts: dict) -> dict:
    """diffusers state dicts ({'unet': ..., 'vae': ..., 'text_encoder': ...}) -> one state dict in `family`'s
    single-file layout."""
    return FAMILIES[family].single_file.to_original(parts)


def ldm_contents(family: str, models: dict, prediction: str) -> tuple[dict, dict[str, str]]:
    """(state dict, header) of a single file for diffusers models {'unet', 'vae', 'text_encoder'(, '_2')} (SD3:
    {'transformer', 'vae', 'text_encoder', 'text_encoder_2'(, 'text_encoder_3')}).

    A v-prediction model gets an empty `v_pred` key; the header records the diffusers configs
    (`sdlora.diffusers_configs`) so that non-standard sizes reload exactly."""
    models = {k: m for k, m in models.items() if m is not None}
    state = to_ldm(family, {k: m.state_dict() for k, m in models.items()})
    if prediction == "v_prediction":
        state["v_pred"] = torch.zeros(0)
    configs = {k: {n: v for n, v in (m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)).items()
                   if not n.startswith("_")} for k, m in models.items()}
    return state, {"sdlora.diffusers_configs": json.dumps(configs), "modelspec.prediction_type": prediction}


def _folder_models(folder: Path, family: Family) -> dict:
    """The denoiser, VAE and text encoders of a diffusers folder (a frozen encoder where the folder has it), fp32."""
    import diffusers
    import transformers

    models = {family.denoiser_attr: getattr(diffusers, family.denoiser_class).from_pretrained(
                  folder, subfolder=family.denoiser_attr),
              "vae": diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")}
    for slot in (*family.text_encoders, *family.frozen_encoders):
        if (folder / slot.attr).is_dir():
            models[slot.attr] = getattr(transformers, slot.model_class).from_pretrained(folder, subfolder=slot.attr)
    return models


def save_single_file(pipeline_folder: str | Path, out_path: str | Path) -> Path:
    """Write a diffusers folder as one `.safetensors` file in its family's original layout (fp32; SD3's T5 included
    where the folder has it).

    A v-prediction model gets an empty `v_pred` key. The header records the folder's diffusers configs
    (`sdlora.diffusers_configs`) so that non-standard sizes reload exactly; a tokenizer that is not CLIP's (and a
    frozen encoder's, SD3's T5) is copied next to the file as `<stem>.tokenizer/` (`.tokenizer_2/`, `.tokenizer_3/`),
    where `load_single_file` looks for it.
    """
    from safetensors.torch import save_file

    folder, out = Path(pipeline_folder), Path(out_path)
    family = folder_family(str(folder))
    models = _folder_models(folder, family)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    prediction = sched.get("prediction_type") or ("flow" if sched["_class_name"].startswith("FlowMatch") else
                                                  "epsilon")
    state, meta = ldm_contents(family.name, models, prediction)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    for slot in (*family.text_encoders, *family.frozen_encoders):
        if slot.attr not in models:
            continue
        if slot in family.frozen_encoders or models[slot.attr].config.vocab_size != CLIP_VOCAB:
            shutil.copytree(folder / slot.tokenizer_attr, out.with_suffix(f".{slot.tokenizer_attr}"),
                            dirs_exist_ok=True)
    return out


def save_tokenizers(out_path: str | Path, family: Family, tokenizers: list, encoders: list, frozen: list = ()) -> None:
    """Beside a single file, the tokenizers that are not CLIP's (`<stem>.tokenizer/`, `.tokenizer_2/`) and a frozen
    encoder's (SD3's T5: `.tokenizer_3/`), where `load_single_file` looks for them."""
    for slot, tok, enc in zip(family.text_encoders, tokenizers, encoders):
        if enc.config.vocab_size != CLIP_VOCAB:
            tok.save_pretrained(Path(out_path).with_suffix(f".{slot.tokenizer_attr}"))
    for slot, f in zip(family.frozen_encoders, frozen):
        if f.tokenizer is not None and f.present:
            f.tokenizer.save_pretrained(Path(out_path).with_suffix(f".{slot.tokenizer_attr}"))


def ckpt_to_safetensors(ckpt: str | Path, out_path: str | Path) -> Path:
    """Rewrite a pickled `.ckpt` as `.safetensors` (tensors only, read by `pickles.read_pickle`: no code from the
    file runs)."""
    from .io import save_safetensors

    state = tensors(Path(ckpt), allow_pickle=True)
    seen, unique = set(), {}
    for k, v in state.items():  # safetensors refuses tensors sharing memory: copy the repeats
        unique[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v.contiguous()
        seen.add(v.untyped_storage().data_ptr())
    save_safetensors(unique, out_path)
    return Path(out_path)
