"""What every family's single-file checkpoint shares: reading a file's header and tensors (safetensors, or a pickle
read by `sdlora.pickles`, which runs no code from it), the configs sdlora ships (`sdlora/assets/<family>/`) and the
ones its own files carry, and loading weights into a model built on the meta device. The families' own layouts
(`ldm` for SD1/SD2/SDXL, `sd3`) call these; nothing here knows a family.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ModelError
from ..pickles import PICKLES, read_pickle

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP_VOCAB = 49408
HOW = ("its configs are not in the file; load its diffusers folder instead, or write the file with "
       "`python scripts/make_single_file.py FOLDER FILE`, which records them")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file holds, read from its header: family, prediction type and the diffusers configs."""

    path: str
    family: str           # a FAMILIES key
    prediction_type: str  # epsilon | v_prediction | flow
    reason: str           # where prediction_type came from
    configs: dict         # diffusers config per part: unet (or transformer), vae, text_encoder[, _2, _3]

    @property
    def model_channels(self) -> int:
        return self.configs["unet"]["block_out_channels"][0]

    @property
    def context_dim(self) -> int:
        return self.configs["unet"]["cross_attention_dim"]


class SingleFileLayout(Protocol):
    """A family's single-file checkpoints, as `sdlora.single_file` uses them (Family.single_file)."""

    def claims(self, shapes: dict) -> bool:
        """Whether a file with these keys (key -> shape) is this family's."""

    def info(self, shapes: dict, meta: dict, path: Path) -> tuple[str, str, dict]:
        """(prediction type, where it came from, diffusers config per part) of a file it claims."""

    def part_configs(self, configs: dict, text_encoders: str = "") -> dict:
        """Every part's config, those the file lacks from `text_encoders` or the shipped ones."""

    def load(self, path: Path, info: CheckpointInfo, allow_pickle: bool, **options) -> dict:
        """The pipeline's parts: denoiser, vae, text encoders, tokenizers, scheduler."""

    def to_original(self, parts: dict) -> dict:
        """diffusers state dicts per part -> one state dict in the file's layout."""


def header(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(key -> shape, string metadata) without reading the tensor data of a .safetensors file."""
    if path.suffix.lower() in PICKLES:
        state = pickle_state(path, allow_pickle)
        meta = {"global_step": str(state.pop("global_step"))} if "global_step" in state else {}
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}, meta
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ModelError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def pickle_state(path: Path, allow_pickle: bool) -> dict:
    if not allow_pickle:
        raise ModelError(f"{path}: {path.suffix} checkpoints are pickles that can run code; convert it with "
                         f"`python scripts/make_single_file.py --from-ckpt {path} OUT.safetensors` "
                         "or pass allow_pickle=True")
    obj = read_pickle(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict", obj), dict):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a checkpoint's dictionary of weights")
    state = dict(obj.get("state_dict", obj))
    if "global_step" in obj:
        state["global_step"] = obj["global_step"]
    return state


def tensors(path: Path, allow_pickle: bool) -> dict:
    if path.suffix.lower() in PICKLES:
        return {k: v for k, v in pickle_state(path, allow_pickle).items() if isinstance(v, torch.Tensor)}
    from safetensors.torch import load_file

    return load_file(str(path))


def blocks(shapes: dict, prefix: str, pattern: str) -> set[int]:
    """The numbers `pattern`'s group captures in the keys under `prefix` (block indices)."""
    rx = re.compile(re.escape(prefix) + pattern)
    return {int(m[1]) for k in shapes if (m := rx.match(k))}


def asset(family: str, part: str) -> dict:
    """A shipped config of a family's part (sdlora/assets/<family>/<part>/)."""
    name = "scheduler_config.json" if part == "scheduler" else \
        "tokenizer_config.json" if part.startswith("tokenizer") else "config.json"
    return json.loads((ASSETS / family / part / name).read_text())


def own_configs(meta: dict, path) -> dict:
    """The diffusers configs a file made by sdlora carries in its header (none: {}); a broken header is one line."""
    try:
        return json.loads(meta.get("sdlora.diffusers_configs", "{}"))
    except json.JSONDecodeError:
        raise ModelError(f"{path}: its sdlora.diffusers_configs header is not valid JSON") from None


def build(model, state: dict, what: str, path: Path, dtype: torch.dtype = torch.float32):
    """Load `state` into a model built on the meta device (in `dtype`); every weight must be there with its
    shape."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    if missing:
        raise ModelError(f"{path}: {what} weights are incomplete ({len(missing)} missing, e.g. '{missing[0]}'); "
                         "the file is truncated or not a standard checkpoint")
    try:
        model.load_state_dict({k: state[k].to(dtype) for k in want}, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: {what} weights do not fit the detected config: "
                         f"{str(e).splitlines()[-1].strip()}") from None
    return model.eval()


def scheduler(family: str, **overrides):
    """The family's shipped sampling scheduler (with `overrides` on its config)."""
    import diffusers

    sched = asset(family, "scheduler")
    return getattr(diffusers, sched["_class_name"]).from_config({**sched, **overrides})
