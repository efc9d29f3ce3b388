"""Compare tab: LoRA files from the library (a run's checkpoints included) rendered at several strengths on the same
prompts and seeds, the labelled grid, and the score table (best first; click a column to sort). Calls
`sdlora.loras.compare.compare`, as `sdlora compare` does."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from sdlora.errors import SdloraError

from .files import list_loras, relative
from .jobs import JobManager

COLUMNS = ["rank", "file", "step", "strength", "score", "likeness", "adherence", "preservation", "copying"]
SCORERS = ["from the run", "shapes", "clip-dino", "none"]


def compare_choices(manager: JobManager) -> list[tuple[str, str]]:
    """(name shown, path) of every LoRA in the output folder and of every checkpoint's LoRA file, newest first."""
    root = manager.output_dir
    steps = sorted(root.rglob("*_checkpoints/step_*.safetensors"), key=lambda p: (p.parent.stat().st_mtime, p.name),
                   reverse=True) if root.is_dir() else []
    return [(relative(p, root), str(p)) for p in [*list_loras(root), *steps]]


def table_rows(report) -> list[list]:
    return [[i, Path(r.file).name, r.step, r.strength, _round(r.score)] + [_round(r.parts.get(k)) for k in COLUMNS[5:]]
            for i, r in enumerate(report.rows, 1)]


def _round(v):
    return None if v is None or v != v else round(v, 4)


class CompareTab:
    def __init__(self, manager: JobManager):
        self.manager = manager

    def build(self) -> None:
        gr.Markdown("Which file to keep? Pick LoRA files (a run's checkpoints are listed too): each is drawn at "
                    "every strength on the same prompts and seeds, scored, and ranked best first.")
        with gr.Row():
            self.files = gr.Dropdown(choices=[], value=[], multiselect=True, label="LoRA files", scale=4,
                                     elem_id="compare-files")
            self.refresh = gr.Button("Refresh", size="sm", scale=1)
        with gr.Row():
            self.model = gr.Textbox(value=self.manager.model, label="Base model", scale=2, elem_id="compare-model",
                                    placeholder="empty: the run's, else the built-in shapes-world model")
            self.strengths = gr.Textbox(value="0.5, 1", label="Strengths", elem_id="compare-strengths")
            self.seeds = gr.Number(value=2, precision=0, label="Seeds per prompt", elem_id="compare-seeds")
            self.steps = gr.Number(value=0, precision=0, label="Steps (0: the run's)", elem_id="compare-steps")
            self.scorer = gr.Dropdown(SCORERS, value=SCORERS[0], label="Scorer", elem_id="compare-scorer")
        self.prompts = gr.Textbox(lines=3, label="Prompts, one per line (empty: the run's validation prompts)",
                                  elem_id="compare-prompts")
        self.go = gr.Button("Compare", variant="primary", elem_id="compare-go")
        self.status = gr.Markdown(elem_id="compare-status")
        self.table = gr.Dataframe(headers=COLUMNS, datatype=["number", "str", "number", "number", "number", "number",
                                                             "number", "number", "number"],
                                  interactive=False, label="Scores, best first (click a column to sort)",
                                  elem_id="compare-table")
        self.grid = gr.Image(label="Grid: a row per file and strength (the base model first), a column per prompt "
                             "and seed", type="filepath", elem_id="compare-grid")

    def wire(self, demo: gr.Blocks, tab: gr.Tab) -> None:
        tab.select(self.on_refresh, [self.files], [self.files])
        self.refresh.click(self.on_refresh, [self.files], [self.files])
        self.go.click(self.on_compare, [self.files, self.model, self.strengths, self.seeds, self.steps, self.scorer,
                                        self.prompts], [self.status, self.grid, self.table])

    def on_refresh(self, current):
        choices = compare_choices(self.manager)
        paths = {p for _, p in choices}
        return gr.update(choices=choices, value=[p for p in current or [] if p in paths])

    def on_compare(self, files, model, strengths, seeds, steps, scorer, prompts,
                   progress=gr.Progress()):  # noqa: B008 - how Gradio passes a progress bar
        from sdlora.loras.compare import CompareSettings, compare

        if not files:
            raise gr.Error("Pick at least one LoRA file.")
        try:
            paths = [str(self.manager.allowed.output(f)) for f in files]
            settings = CompareSettings(
                model=self.manager.allowed.model_path(model) or None, strengths=_floats(strengths),
                prompts=[x.strip() for x in (prompts or "").splitlines() if x.strip()] or None,
                seeds=int(seeds) if seeds else None, steps=int(steps) if steps else None,
                scorer=None if scorer == SCORERS[0] else scorer)
            out = self.manager.output_dir / "compare" / time.strftime("%Y%m%d-%H%M%S")
            report = compare(paths, out, settings, lambda done, total: progress(done / total, desc="rendering"))
        except SdloraError as e:
            return f"**Error:** {e}", None, []
        best = report.rows[0] if report.rows else None
        head = f"Best: `{Path(best.file).name}` at strength {best.strength:g} (score {best.score:.3f}). " \
            if best is not None and best.score == best.score else ""
        return (f"{head}Grid and tables in `{relative(out, self.manager.output_dir)}` ({report.scorer} scorer).",
                report.grid, table_rows(report))


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise SdloraError(f"strengths must be numbers like 0.5, 1; got {text!r}") from None
    if not values:
        raise SdloraError("give at least one strength, e.g. 1")
    return values
