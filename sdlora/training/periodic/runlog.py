"""Where a run's numbers go: the JSON-lines log beside the output (training lines with `loss`, validation lines
with `val_loss`), and tensorboard or wandb through accelerate's trackers when `output.log_with` asks for them."""

from __future__ import annotations

import json
from pathlib import Path

from ...io import atomic_write_text


def log_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_log.jsonl")


def tracker_kwargs(cfg) -> dict:
    """Accelerator arguments for the configured tracker (none: no arguments)."""
    if cfg.output.log_with == "none":
        return {}
    out = Path(cfg.output.path)
    return {"log_with": cfg.output.log_with, "project_dir": str(out.with_name(out.stem + "_logs"))}


def start_trackers(acc, cfg) -> None:
    """Open the tracker run (named after the output) with the flattened config as its hyper-parameters."""
    if cfg.output.log_with == "none":
        return
    out = Path(cfg.output.path)
    flat = {f"{section}/{k}": (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for section, values in cfg.to_dict().items() if isinstance(values, dict) for k, v in values.items()}
    kwargs = {"wandb": {"name": out.stem, "dir": str(out.with_name(out.stem + "_logs"))}}
    acc.init_trackers("sdlora", config=flat, init_kwargs=kwargs)


def trim(path: Path, step: int) -> None:
    """Drop log lines past `step` (training and validation lines written before an interruption, and about to be
    trained again), and a torn line (a power cut or a full disk mid-write)."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = [x for x in lines if (rec := _record(x)) is not None and rec.get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(x + "\n" for x in kept))


def _record(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


class RunLog:
    """Writes one JSON line per record (main process only) and forwards it to the trackers."""

    def __init__(self, acc, path: Path, main: bool):
        self.acc, self.file = acc, open(path, "a") if main else None  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({k: int(v) if k == "step" else round(float(v), 8) for k, v in record.items()})
                        + "\n")
        self.file.flush()
        if self.acc.trackers:
            self.acc.log({k: float(v) for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def images(self, step: int, paths: list[str], key: str = "samples") -> None:
        """Sample (or validation) images to the trackers under `key` (the PNGs are already on disk)."""
        if self.file is None or not self.acc.trackers:
            return
        import numpy as np
        from PIL import Image

        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({key: np.stack(images)}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({key: images}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
