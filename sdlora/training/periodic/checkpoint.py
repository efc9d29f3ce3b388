"""Resumable training state: LoRA weights, optimizer, LR schedule and step, written atomically."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from ...config import PER_LAYER_KEYS, SIGN_FLIP, Config, SliderConfig
from ...errors import TrainingError
from ...io import torch_save

STATE_VERSION = 2  # 2: LoRA states keyed by model part (unet, text_encoder, ...)
# Settings that must match for a resume to continue the same run.
RESUME_KEYS = (("model", "path"), ("lora", "rank"), ("lora", "alpha"), ("lora", "targets"),
               ("lora", "train_text_encoder"), ("train", "seed"), ("train", "batch_size"), ("train", "grad_accum"),
               ("pivotal", "token"), ("pivotal", "num_vectors"), ("pivotal", "ti_steps"), ("lora", "network"),
               ("lora", "network_args"), ("optim", "optimizer"), ("optim", "loraplus_ratio"), ("validation", "data"),
               ("validation", "split"), ("validation", "scorer"),
               *(("validation", k) for k in ("select_by", "prompts", "seeds", "image_steps", "image_size",
                                             "score_weights", "concept", "clip_model", "dino_model")),  # the best score
               *(("lora", k) for k in PER_LAYER_KEYS),  # per-block ranks and rates
               *(("slider", f.name) for f in fields(SliderConfig)))  # every setting of a slider


class UnreadableCheckpoint(TrainingError):
    """A checkpoint file that does not read back (torn, truncated or foreign)."""


def checkpoint_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_checkpoints")


def checkpoint_path(output: str | Path, step: int) -> Path:
    return checkpoint_dir(output) / f"step_{step:07d}.pt"


def save_state(path: Path, step: int, lora: dict, optimizer, lr_scheduler, config: dict, scaler=None,
               extra: dict | None = None) -> Path:
    torch_save({"version": STATE_VERSION, "step": step, "lora": lora, "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "config": config, **(extra or {})}, path)
    return path


def checkpoints(output: str | Path) -> list[Path]:
    """This output's checkpoints, oldest first."""
    folder = checkpoint_dir(output)
    return sorted(folder.glob("step_*.pt")) if folder.is_dir() else []


def latest_checkpoint(output: str | Path) -> Path | None:
    found = checkpoints(output)
    return found[-1] if found else None


def newest_readable(output: str | Path, config: dict, say=print) -> tuple[Path, dict] | None:
    """The newest checkpoint of this output that reads back whole, and its state; a torn or unreadable newer one
    (a power cut mid-write) is skipped with a message. Settings that changed since are an error, as in load_state."""
    for path in reversed(checkpoints(output)):
        try:
            return path, load_state(path, config)
        except UnreadableCheckpoint as e:
            say(f"skipping {path.name}: {e}")
    return None


def load_state(path: Path, config: dict) -> dict:
    """Read a checkpoint (tensors only, no arbitrary pickles) and check it belongs to this run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torn or foreign file
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "version" not in state:
        raise UnreadableCheckpoint(f"{path} is not an sdlora checkpoint")
    if state["version"] != STATE_VERSION:
        raise TrainingError(f"{path.name} was written by another sdlora version (checkpoint format "
                            f"{state['version']}, this one reads {STATE_VERSION}); train into a new output")
    if state["config"].get("config_version", 1) < SIGN_FLIP and state["config"].get("train", {}).get("timestep_mean"):
        raise TrainingError(f"cannot resume from {path.name}: its train.timestep_mean had the opposite sign before "
                            "config_version 2 (now diffusers' --logit_mean); train into a new output")
    defaults = Config()  # a checkpoint written before a setting existed ran with its default
    for section, key in RESUME_KEYS:
        old = state["config"].get(section, {}).get(key, getattr(getattr(defaults, section), key))
        new = config[section][key]
        if old != new:
            raise TrainingError(f"cannot resume from {path.name}: {section}.{key} was {old!r}, now {new!r}; "
                                "restore the setting or train into a new output")
    return state
