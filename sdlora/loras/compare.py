"""`sdlora compare`: LoRA files (any family and network type, a training run's checkpoints folder, or a glob)
rendered at several strengths on the same prompts and seeds, one labelled grid (a row per file and strength, a
column per prompt and seed, the base model's row first) and a score table, best first, as Markdown, CSV and JSON.

What is not given comes from the run that made the files (the config in its checkpoints, else the public config in
the file's metadata): the validation prompts, the trigger, the scorer, the training images the likeness is measured
against; then from the defaults of image validation."""

from __future__ import annotations

import csv
import glob
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import SCORE_PARTS, Config, from_dict
from ..errors import ConfigError, SdloraError
from ..io import atomic_write_text, check_writable


@dataclass
class CompareSettings:
    """What to render and how to score it; None = from the run that made the files, else image validation's
    defaults."""

    model: str | None = None
    strengths: list[float] = field(default_factory=lambda: [1.0])
    prompts: list[str] | None = None
    seeds: int | None = None
    steps: int | None = None
    guidance: float | None = None
    size: int | None = None
    scorer: str | None = None  # shapes, clip-dino or none
    trigger: str | None = None
    data: str | None = None  # training images (likeness, copying, the shapes scorer's concept)
    concept: str | None = None
    clip_model: str | None = None
    dino_model: str | None = None
    weights: str | None = None
    allow_pickle: bool = False
    text_encoders: str = ""


@dataclass
class Row:
    file: str
    strength: float
    score: float
    parts: dict[str, float]
    step: int | None = None  # the training step the file was written at (its ss_steps), when known

    def cells(self) -> dict:
        return {"file": Path(self.file).name, "step": self.step, "strength": self.strength, "score": self.score,
                **{k: self.parts.get(k) for k in SCORE_PARTS}}


@dataclass
class CompareReport:
    rows: list[Row]  # best first
    prompts: list[dict]  # {text, concept}
    scorer: str
    grid: str
    tables: dict[str, str]  # format -> path

    def markdown(self) -> str:
        head = ["rank", "file", "step", "strength", "score", *SCORE_PARTS]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, r in enumerate(self.rows, 1):
            c = r.cells()
            lines.append("| " + " | ".join([str(i), c["file"], "" if c["step"] is None else str(c["step"]),
                                             f"{r.strength:g}"] + [_num(c[k]) for k in head[4:]]) + " |")
        return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def expand_inputs(specs: list[str]) -> list[Path]:
    """LoRA files from files, globs and checkpoint folders (their step_*.safetensors, oldest first), each once, in
    the order given (a folder's or glob's NAME_emb.safetensors, a pivotal run's embedding file, left out); anything
    that names no file is a one-line error."""
    out: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(path.glob("step_*.safetensors")) or _loras(path.glob("*.safetensors"))
            if not found:
                raise SdloraError(f"{spec}: no .safetensors file in this folder")
        elif path.is_file():
            found = [path]
        else:
            found = _loras(Path(p) for p in glob.glob(str(path)) if p.endswith(".safetensors"))
            if not found:
                raise SdloraError(f"{spec}: no such file, folder or glob match")
        out += [p for p in found if p.resolve() not in {q.resolve() for q in out}]
    return out


def _loras(paths) -> list[Path]:
    return sorted(p for p in paths if not p.name.endswith("_emb.safetensors"))


def run_config(files: list[Path]) -> Config | None:
    """The config of the run that wrote these files: from its newest checkpoint (every path as trained), else the
    public config in the first file's metadata; None when neither is there."""
    from ..training.periodic.checkpoint import checkpoint_dir, checkpoints

    for f in files:
        folder = f.parent if f.parent.name.endswith("_checkpoints") else None
        stem = f.stem.removesuffix("_best").removesuffix("_raw")
        found = sorted(folder.glob("step_*.pt")) if folder else checkpoints(f.with_name(stem + ".safetensors"))
        if not found and folder is None:
            found = checkpoints(checkpoint_dir(f.with_name(stem + ".safetensors")))
        if found:
            import torch

            try:
                return from_dict(torch.load(found[-1], map_location="cpu", weights_only=True)["config"])
            except Exception:  # noqa: BLE001 - a torn or foreign checkpoint: fall back to the metadata
                pass
    for f in files:
        meta = _metadata(f)
        if "sdlora_config" in meta:
            try:
                return from_dict(json.loads(meta["sdlora_config"]))
            except (ConfigError, ValueError):
                return None
    return None


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise SdloraError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None


def settle(files: list[Path], s: CompareSettings) -> tuple[Config, dict]:
    """The config the files were trained with (or a default one) with the given settings written over it, and the
    training captions by folder (for the default prompts)."""
    from ..training.inputs.data import scan_folder

    cfg = run_config(files) or Config()
    va = cfg.validation
    given = {"scorer": s.scorer, "seeds": s.seeds, "image_steps": s.steps, "image_size": s.size,
             "concept": s.concept, "clip_model": s.clip_model, "dino_model": s.dino_model, "score_weights": s.weights}
    for key, value in given.items():
        if value is not None:
            setattr(va, key, value)
    if s.guidance is not None:
        cfg.sample.guidance = s.guidance
    if s.model is not None:
        cfg.model.path = s.model
    if s.prompts:
        va.prompts = list(s.prompts)
    if va.scorer == "none" and s.scorer is None:  # the run validated no images: the scorer its model suggests
        from ..paths import default_model_path

        va.scorer = "shapes" if not cfg.model.path or Path(cfg.model.path) == default_model_path() else "clip-dino"
    if s.data is not None:
        from ..config import DataFolder

        cfg.data = [DataFolder(path=s.data)]
    captions = {d.path: [c for _, c, _ in scan_folder(d.path, d.prompt, d.use_captions)[0]]
                for d in cfg.data if d.path and Path(d.path).is_dir()}
    cfg.score_weights  # noqa: B018 - a bad weight is a one-line error now
    return cfg, captions


def compare(inputs: list[str], output_dir: str | Path, settings: CompareSettings | None = None,
            progress=None) -> CompareReport:
    """Render every file at every strength on the validation prompts and seeds, score each (file, strength), and
    write grid.png and scores.md / .csv / .json into `output_dir`; `progress(done, total)` after each row."""
    from ..training.periodic.image_validation import trigger_of, validation_prompts

    s = settings or CompareSettings()
    _check(s)
    files = expand_inputs(inputs)
    out = Path(output_dir)
    check_writable(out / "grid.png")
    cfg, captions = settle(files, s)
    trigger = s.trigger if s.trigger is not None else trigger_of(cfg, captions)
    if not cfg.validation.prompts and not captions and not cfg.prior.class_prompt:
        raise SdloraError("no prompts to draw: give --prompt TEXT or --prompts FILE (the run's validation prompts "
                          "and training captions are not here)")
    prompts = validation_prompts(cfg, captions, trigger)
    renderer = Renderer(cfg, s)
    scorer = _scorer(cfg, trigger, captions, renderer.device)
    shots = [(p, cfg.sample.seed + i * cfg.validation.seeds + k) for i, p in enumerate(prompts)
             for k in range(cfg.validation.seeds)]
    total = 1 + len(files) * len(s.strengths)
    base = renderer.render(shots, None)
    if progress:
        progress(1, total)
    rows, images = [], []
    for f in files:
        step = _metadata(f).get("ss_steps")
        active = renderer.load(f)
        try:
            for strength in s.strengths:
                active.set_scales([strength])
                made = renderer.render(shots, active, trigger)
                rows.append(Row(str(f), strength, *_score(scorer, cfg, shots, made, base),
                                step=int(step) if step and step.isdigit() else None))
                images.append(made)
                if progress:
                    progress(1 + len(rows), total)
        finally:
            active.remove()
    report = _write(out, rows, images, base, shots, cfg, prompts)
    return report


def _check(s: CompareSettings) -> None:
    rules = [(bool(s.strengths) and all(math.isfinite(x) for x in s.strengths), "--strengths must be finite "
              f"numbers like 0.6,0.8,1, got {s.strengths}"),
             (s.seeds is None or s.seeds >= 1, f"--seeds must be at least 1, got {s.seeds}"),
             (s.steps is None or s.steps >= 1, f"--steps must be at least 1, got {s.steps}"),
             (s.size is None or (s.size >= 8 and s.size % 8 == 0), f"--size must be a multiple of 8, got {s.size}"),
             (s.guidance is None or (math.isfinite(s.guidance) and s.guidance >= 0), "--guidance must be >= 0"),
             (s.scorer in (None, "none", "shapes", "clip-dino"), f"--scorer must be shapes, clip-dino or none, got "
              f"{s.scorer!r}")]
    for ok, message in rules:
        if not ok:
            raise SdloraError(message)


def _scorer(cfg: Config, trigger: str, captions: dict, device: str):
    """The scorer with the training images that carry the trigger as its reference; None for scorer none."""
    from ..scoring.base import has_trigger
    from ..scoring.make import make_scorer
    from ..training.inputs.data import load_image, scan_folder

    va = cfg.validation
    if va.scorer == "none":
        return None
    scorer = make_scorer(va.scorer, trigger, va.concept, va.clip_model, va.dino_model, device)
    paths = [p for d in cfg.data if d.path in captions
             for p, c, _ in scan_folder(d.path, d.prompt, d.use_captions)[0] if not trigger or has_trigger(c, trigger)]
    scorer.reference([load_image(p) for p in paths[:64]])
    return scorer


def _score(scorer, cfg: Config, shots: list, made: list, base: list) -> tuple[float, dict]:
    if scorer is None:
        return math.nan, {}
    from ..scoring.base import Shots

    scores = scorer.score(Shots([p.text for p, _ in shots], [p.concept for p, _ in shots], made,
                                [None if p.concept else b for (p, _), b in zip(shots, base)]))
    return scores.combined(cfg.score_weights), scores.parts()


class Renderer:
    """The base model's pipeline, LoRA files put on and taken off it, and the shots rendered the same way each
    time (prompt i's seeds sample.seed + i*seeds + k)."""

    def __init__(self, cfg: Config, s: CompareSettings):
        import torch

        from ..models import load_model

        self.c = load_model(cfg.model.path or None, s.allow_pickle, s.text_encoders)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = self.c.pipeline().to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        native = self.c.denoiser.config.sample_size * self.c.vae_factor
        self.size = cfg.validation.image_size or cfg.augment.resolution or native
        if self.size % self.c.size_multiple:
            raise SdloraError(f"size {self.size} must be a multiple of {self.c.size_multiple} for this model")
        self.steps, self.guidance = cfg.validation.image_steps, cfg.sample.guidance

    def load(self, path: Path):
        from .apply import load_lora_into

        return load_lora_into(self.pipe, path, adapter_name="compare")

    def render(self, shots: list, active, trigger: str = "") -> list:
        from ..sampling import render
        from ..training.run.embeddings import replace_trigger

        texts = [p.text for p, _ in shots]
        for token in (active.embeddings if active is not None else {}):
            texts = [replace_trigger(t, trigger if trigger and trigger != token else "", token, 1) for t in texts]
        out = []
        for i, (p, seed) in enumerate(shots):  # one call per run of consecutive seeds
            if i and shots[i - 1][1] == seed - 1 and shots[i - 1][0].negative == p.negative:
                continue
            j = i + 1
            while j < len(shots) and shots[j][1] == seed + (j - i) and shots[j][0].negative == p.negative:
                j += 1
            out += render(self.pipe, texts[i:j], seed, self.steps, self.guidance, self.size, self.size,
                          p.negative, batch=16)
        return out


def _write(out: Path, rows: list[Row], images: list, base: list, shots: list, cfg: Config,
           prompts: list) -> CompareReport:
    """grid.png (base row first, then every file and strength in the order given) and the tables, best first."""
    from ..sampling import save_png
    from ..scoring.grid import labelled_grid

    cols = [f"{p.text}\nseed {seed}" for p, seed in shots]
    labels = ["base model (no LoRA)"] + [f"{Path(r.file).name}\nx{r.strength:g}" + ("" if math.isnan(r.score) else
                                                                                   f"  score {r.score:.3f}")
                                         for r in rows]
    grid = save_png(labelled_grid([base, *images], labels, cols, width=max(96, base[0].width)), out / "grid.png")
    ranked = sorted(rows, key=lambda r: -r.score if not math.isnan(r.score) else math.inf)
    info = [{"text": p.text, "concept": p.concept} for p in prompts]
    report = CompareReport(ranked, info, cfg.validation.scorer, str(grid), {})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["rank", *ranked[0].cells()] if ranked else ["rank"])
    writer.writeheader()
    for i, r in enumerate(ranked, 1):
        writer.writerow({"rank": i, **{k: "" if v is None else v for k, v in r.cells().items()}})
    settings = {"scorer": cfg.validation.scorer, "weights": cfg.score_weights, "seeds": cfg.validation.seeds,
                "steps": cfg.validation.image_steps, "guidance": cfg.sample.guidance, "prompts": info}
    texts = {"md": report.markdown(), "csv": buf.getvalue(),
             "json": json.dumps({**settings, "rows": [{"rank": i, **asdict(r)} for i, r in enumerate(ranked, 1)]},
                                indent=2)}
    for ext, text in texts.items():
        atomic_write_text(out / f"scores.{ext}", text)
        report.tables[ext] = str(out / f"scores.{ext}")
    return report
