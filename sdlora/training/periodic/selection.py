"""One validation round (the held-out loss and/or the image scores), which best it counts for (`--select-by`), what
the best file and each checkpoint's LoRA file carry about it, and the library's reading of a run's scores from its
log (the UI's per-checkpoint scores, `sdlora compare`, the demo's score curve, a replay under other weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ...config import SCORE_PARTS

RECORD_KEYS = ("val_loss", "score", *SCORE_PARTS)  # what a validation line of the log may hold besides its step


def validate(state, step: int) -> tuple[bool, dict, str]:
    """Measure the weights as they are (call inside `optim.evaluation()`): the loss of the held-out images and the
    scores of the validation images (rendered and scored on the main process, then shared, so every process
    decides alike). Returns (whether the best by `select_by` improved, the log record, the sheet's path or '')."""
    record, sheet = {"step": step}, ""
    improved = {}
    if state.validation is not None:
        record["val_loss"] = state.validation.loss(state)
        improved["loss"] = state.validation.best.update(step, record["val_loss"])
    iv = state.image_validation
    if iv is not None:
        values, made = [math.nan] * (1 + len(SCORE_PARTS)), None
        if state.acc.is_main_process:
            scores, made = iv.run(state, step)
            values = [scores.get(k, math.nan) for k in ("score", *SCORE_PARTS)]
        values = _shared(state, values)
        record.update({k: v for k, v in zip(("score", *SCORE_PARTS), values) if not math.isnan(v)})
        record.setdefault("score", math.nan)
        improved["images"] = iv.best.update(step, record["score"])
        iv.last = dict(record)
        if made is not None:
            from .image_validation import save_sheet

            sheet = save_sheet(state, step, made)
    return improved.get(state.cfg.select_by, False), record, sheet


def _shared(state, values: list[float]) -> list[float]:
    """The main process's values on every process."""
    if state.world == 1:
        return values
    import torch
    from accelerate.utils import broadcast

    return broadcast(torch.tensor(values, dtype=torch.float64, device=state.device), from_process=0).cpu().tolist()


def selected(state):
    """The `Best` that `select_by` follows (the loss's or the image score's), or None without validation."""
    by = state.cfg.select_by
    if by == "images" and state.image_validation is not None:
        return state.image_validation.best
    if by == "loss" and state.validation is not None:
        return state.validation.best
    return None


def describe(state) -> str:
    """'validation score 0.875' / 'validation loss 0.0334': the selected best's value."""
    best = selected(state)
    if best is None:
        return ""
    return f"validation score {best.value:.4g}" if best.higher else f"validation loss {best.value:.6g}"


def best_metadata(state, record: dict) -> dict[str, str]:
    """The best file's metadata: its step, what chose it, and the validation's numbers."""
    meta = {"sdlora_best_step": str(record["step"]), "sdlora_best_by": state.cfg.select_by}
    if "val_loss" in record:
        meta["sdlora_best_val_loss"] = repr(record["val_loss"])
    if "score" in record:
        meta["sdlora_best_score"] = repr(record["score"])
    return {**meta, **step_metadata(state, record["step"])}


def step_metadata(state, step: int) -> dict[str, str]:
    """`sdlora_scores` for the LoRA file of `step`, when the images were validated at that step."""
    iv = state.image_validation
    if iv is None or iv.last.get("step") != step:
        return {}
    return {"sdlora_scores": json.dumps({k: v for k, v in iv.last.items() if k != "step"})}


def validation_stats(state, record: dict, sheet: str) -> dict:
    """What `on_validation` gets: the record's numbers, the best so far by what selects, and the sheet."""
    stats = {k: v for k, v in record.items() if k != "step"}
    best = selected(state)
    stats.update(select_by=state.cfg.select_by, best_step=best.step if best is not None else 0)
    if state.validation is not None:
        stats["best_val_loss"] = state.validation.best.value
    if state.image_validation is not None:
        stats["best_score"] = state.image_validation.best.value
    if sheet:
        stats["images"] = [sheet]
    return stats


def validation_history(log: str | Path) -> list[dict]:
    """Every validation line of a run's JSON-lines log (step, val_loss and/or score and its parts), in order; a
    resumed run's log holds each step once."""
    path = Path(log)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and any(k in rec for k in ("val_loss", "score")):
            out.append({k: rec[k] for k in ("step", *RECORD_KEYS) if k in rec})
    return out


def checkpoint_scores(output: str | Path) -> list[dict]:
    """Each checkpoint of the run writing `output` (oldest first) with its step, LoRA file and the validation of its
    step when there was one: {step, file, checkpoint, val_loss?, score?, likeness?, ...}."""
    from . import checkpoint as ckpt
    from .runlog import log_path

    by_step = {r["step"]: r for r in validation_history(log_path(output))}
    out = []
    for path in ckpt.checkpoints(output):
        step = int(path.stem.split("_")[-1])
        out.append({**by_step.get(step, {}), "step": step, "checkpoint": str(path),
                    "file": str(path.with_suffix(".safetensors"))})
    return out


def rescored(history: list[dict], weights: dict[str, float]) -> tuple[list[float], int]:
    """Each validation's combined score under other weights, from the parts its log line holds, and the step the
    trainer's `Best` would then have kept (what another `--score-weights` would have chosen from the same run)."""
    from ...scoring.base import Scores
    from .best import Best

    best, scores = Best("score"), []
    for r in history:
        scores.append(Scores(*(r.get(k) for k in SCORE_PARTS)).combined(weights))
        best.update(r["step"], scores[-1])
    return scores, best.step


def score_curve(history: list[dict], best_step: int = 0) -> str:
    """A text table of the validations: step, score and parts (and the loss), the best marked."""
    cols = [k for k in RECORD_KEYS if any(k in r for r in history)]
    lines = ["  step  " + "".join(f"{k:>13}" for k in cols)]
    for r in history:
        cells = "".join(f"{r[k]:13.4f}" if k in r else f"{'-':>13}" for k in cols)
        lines.append(f"{r['step']:6d}  {cells}" + ("   <- best" if r["step"] == best_step else ""))
    return "\n".join(lines)
