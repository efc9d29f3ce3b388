"""What several subcommands share: the training progress bar, and FILE:WEIGHT arguments."""

from __future__ import annotations

import sys
from pathlib import Path

from ..callbacks import Callbacks


def parse_weighted(spec: str, default: float = 1.0) -> tuple[str, float]:
    """'file.safetensors:0.7' -> ('file.safetensors', 0.7); split on the last colon only when a number follows,
    so 'C:\\loras\\x.safetensors' stays one path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, default


class ProgressBar(Callbacks):
    """tqdm bar with loss, step rate and ETA; messages printed above it."""

    def __init__(self, label: str):
        self.label, self.bar, self.val = label, None, None

    def on_start(self, run):
        from tqdm import tqdm

        self.bar = tqdm(total=run.cfg.total_steps, initial=run.start_step, desc=Path(self.label).stem,
                        unit="step", dynamic_ncols=True)

    def on_step(self, step, stats):
        self.bar.update(1)
        extra = {"val": f"{self.val:.4f}"} if self.val is not None else {}
        self.bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", **extra)

    def on_validation(self, step, stats):
        self.val = stats.get("val_loss", self.val)
        parts = [f"loss {stats['val_loss']:.6g}"] if "val_loss" in stats else []
        if "score" in stats:
            parts.append(f"score {stats['score']:.4f} (" + ", ".join(
                f"{k} {stats[k]:.3f}" for k in ("likeness", "adherence", "preservation", "copying") if k in stats)
                + ")")
        best = " (best so far)" if stats.get("best_step") == step else ""
        if best or "score" in stats:
            self._say(f"step {step}: validation {'; '.join(parts)}{best}")

    def on_sample(self, step, paths):
        self._say(f"samples at step {step}: {Path(paths[0]).parent}")

    def on_checkpoint(self, step, path):
        self._say(f"checkpoint at step {step}: {path}")

    def on_message(self, text):
        self._say(text)

    def on_end(self, result):
        if self.bar:
            self.bar.close()

    def _say(self, text):
        (self.bar.write if self.bar else print)(text, file=sys.stderr)
