"""Resumable training state: LoRA weights, optimizer, LR schedule and step, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..errors import TrainingError
from ..io import torch_save

STATE_VERSION = 1
# Settings that must match for a resume to continue the same run.
RESUME_KEYS = (("model", "path"), ("lora", "rank"), ("lora", "alpha"), ("lora", "targets"),
               ("lora", "train_text_encoder"), ("train", "seed"), ("train", "batch_size"), ("train", "grad_accum"),
               ("pivotal", "token"), ("pivotal", "num_vectors"), ("pivotal", "ti_steps"), ("lora", "network"),
               ("lora", "network_args"))


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


def latest_checkpoint(output: str | Path) -> Path | None:
    folder = checkpoint_dir(output)
    found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def load_state(path: Path, config: dict) -> dict:
    """Read a checkpoint (tensors only, no arbitrary pickles) and check it belongs to this run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torn or foreign file
        raise TrainingError(f"cannot read checkpoint {path}: {e}") from None
    for section, key in RESUME_KEYS:
        # a checkpoint written before a setting existed ran with its default
        old = state["config"][section].get(key, getattr(getattr(Config(), section), key))
        new = config[section][key]
        if old != new:
            raise TrainingError(f"cannot resume from {path.name}: {section}.{key} was {old!r}, now {new!r}; "
                                "restore the setting or train into a new output")
    return state
