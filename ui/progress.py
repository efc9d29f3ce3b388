"""What the page shows about a job: a status line with a progress bar, the loss curve, samples, the queue.

Plain functions of a `Job` (no Gradio), so they are tested without a browser.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from .jobs import DONE, FAILED, QUEUED, RUNNING, STOPPED, Job


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def status_html(job: Job | None, queued: int = 0) -> str:
    """One box: state, step / total, a bar, rate, ETA, the last loss, and the error if it failed."""
    if job is None:
        return '<div id="job-status" class="idle">No training yet. Add images, then press <b>Start training</b>.</div>'
    pct = 100 * job.step / job.total if job.total else 0
    loading = job.state == RUNNING and not job.begun
    head = {QUEUED: "Queued", RUNNING: "Training", DONE: "Finished", STOPPED: "Stopped (resumable)",
            FAILED: "Failed"}.get(job.state, job.state.capitalize())
    head = "Loading the model" if loading else head
    if job.state == RUNNING and job.begun and job.total and job.step >= job.total:
        head = "Finishing (saving the file and the last samples)"
    parts = [f"<b>{head}</b> · job #{job.id} <code>{html.escape(job.name)}</code>",
             "loading the base model and preparing the images…" if loading else
             f"step <b>{job.step} / {job.total}</b> ({pct:.0f}%)"]
    if job.rate:
        parts.append(f"{job.rate:.2f} steps/s")
    if job.state == RUNNING and not loading:
        parts.append(f"ETA {duration(job.eta)}")
    elif job.ended and job.started:
        parts.append(f"took {duration(job.ended - job.started)}")
    if job.losses:
        parts.append(f"loss {job.losses[-1][1]:.4f}")
    if job.val_losses:
        step, best = min(job.val_losses, key=lambda x: x[1])
        parts.append(f"validation {job.val_losses[-1][1]:.4f} (best {best:.4f} at step {step})")
    if job.scores and "score" in job.scores[-1][1]:
        parts.append(f"image score {job.scores[-1][1]['score']:.3f}"
                     + (f" (best file: step {job.best_step})" if job.best_step else ""))
    if queued:
        parts.append(f"{queued} more queued")
    body = " · ".join(parts)
    bar = f'<progress max="{job.total or 1}" value="{job.step}" style="width:100%"></progress>'
    extra = ""
    if job.state == FAILED:
        extra = f'<div class="job-error" style="color:#b91c1c"><b>Error:</b> {html.escape(job.error)}</div>'
    elif job.state == DONE and job.output:
        name = html.escape(Path(job.output).name)
        extra = f"<div>Saved <code>{name}</code> — see the Library and Preview tabs.</div>"
    state = f"{job.state} loading" if loading else job.state
    return f'<div id="job-status" class="{state}">{body}{bar}{extra}</div>'


def loss_frame(job: Job | None) -> pd.DataFrame:
    """The loss curves: training loss per step and, with validation, the validation loss (column `series`)."""
    rows = [(s, v, "training") for s, v in job.losses] + [(s, v, "validation") for s, v in job.val_losses] \
        if job else []
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": int, "loss": float,
                                                                          "series": str})


def sample_items(job: Job | None) -> list[tuple[str, str]]:
    """(image path, caption) of the job's samples, newest first."""
    if not job:
        return []
    return [(p, f"step {s}") for s, p in reversed(job.samples) if Path(p).is_file()]


def queue_rows(jobs: list[Job]) -> list[list]:
    return [[j.id, j.name, j.state, f"{j.step}/{j.total}", f"{j.losses[-1][1]:.4f}" if j.losses else "",
             j.error or (Path(j.output).name if j.output else "")] for j in reversed(jobs)]


def messages_text(job: Job | None) -> str:
    return "\n".join(job.messages[-20:]) if job else ""


SCORE_COLUMNS = ["step", "file", "score", "likeness", "adherence", "preservation", "copying", "val. loss", "picked"]


def validation_items(job: Job | None) -> list[tuple[str, str]]:
    """(sheet path, caption) of the job's validation images, newest first: one sheet per validation."""
    if not job:
        return []
    return [(p, f"validation at step {s}") for s, p in reversed(job.validation_images) if Path(p).is_file()]


def checkpoint_rows(job: Job | None) -> list[list]:
    """One row per validated step or checkpoint of the job: its LoRA file (a checkpoint's, or '–'), its scores and
    validation loss, and which step --select-by picked for NAME_best (the row of the best file itself last)."""
    if not job or (not job.scores and not job.val_losses):
        return []
    from sdlora.training.periodic.output import best_path
    from sdlora.training.periodic.selection import checkpoint_scores

    output = job.cfg.output.path
    rows = {r["step"]: dict(r) for r in checkpoint_scores(output)}
    for step, parts in job.scores:
        rows.setdefault(step, {"step": step}).update(parts)
    for step, loss in job.val_losses:
        rows.setdefault(step, {"step": step})["val_loss"] = loss
    by = job.cfg.select_by
    out = []
    for step in sorted(rows):
        r = rows[step]
        file = Path(r["file"]).name if r.get("file") and Path(r["file"]).is_file() else "–"
        if file == "–" and step == job.step and job.output and Path(job.output).is_file():
            file = Path(job.output).name  # the last step's validation is the final file's
        picked = f"best ({by})" if step == job.best_step and by else ""
        out.append([step, file] + [_num(r.get(k)) for k in ("score", "likeness", "adherence", "preservation",
                                                           "copying", "val_loss")] + [picked])
    best = best_path(output)
    if best.is_file() and job.best_step:
        same = next((r for r in out if r[0] == job.best_step), None)
        numbers = same[2:8] if same else [""] * 6
        out.append([job.best_step, best.name, *numbers, f"the best file ({by}): step {job.best_step}"])
    return out


def _num(v) -> str:
    return "" if v is None else f"{v:.4f}"
