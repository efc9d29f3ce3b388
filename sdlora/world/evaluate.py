"""Judge a concept LoRA on the shapes world: does it draw the concept, and does the base world survive?

``evaluate`` generates the same seeds with the LoRA enabled and disabled and lets the judge
(``sdlora.judge``) name shape and colour. ``evaluate_base`` measures the base model alone.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .. import paths
from ..errors import ConfigError
from ..io import check_folder
from ..loras.apply import load_lora_into
from ..sampling import render
from . import shapes
from .judge import Judge, load_judge

ROW_LABEL_WIDTH = 150


@dataclass
class BaseReport:
    """Judge accuracy of the base model (no LoRA) on the world's prompts."""

    model: str
    n: int
    shape_accuracy: float
    colour_accuracy: float
    accuracy: float
    per_prompt: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class EvalReport:
    """One concept-LoRA evaluation; ``save`` writes it as JSON.

    concept_fidelity: share of trigger-prompt images the judge calls ``concept`` (LoRA on).
    prompt_fidelity: share that are the concept *and* the prompted colour.
    base_accuracy_with_lora / _without_lora: shape-and-colour accuracy on the base world's prompts;
    preservation_drop = without - with (0 means the LoRA left the base world intact).
    """

    lora_path: str
    trigger: str
    concept: str
    model: str
    n: int
    n_base: int
    seed: int
    steps: int
    guidance_scale: float
    concept_fidelity: float
    prompt_fidelity: float
    concept_fidelity_without_lora: float
    base_accuracy_with_lora: float
    base_accuracy_without_lora: float
    preservation_drop: float
    trigger_predictions: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


def _versions() -> dict[str, str]:
    import diffusers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def load_pipeline(model=None):
    """A ``StableDiffusionPipeline`` from a folder (default: the shipped shapes model), or ``model`` itself."""
    from diffusers import StableDiffusionPipeline
    if model is not None and not isinstance(model, (str, Path)):
        return model
    pipe = StableDiffusionPipeline.from_pretrained(str(model or paths.default_model_path()),
                                                   torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance_scale: float = 5.0,
             batch: int = 32) -> list[Image.Image]:
    """One image per prompt at the model's native size; image i uses generator seed ``seed + i``."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return render(pipe, prompts, seed, steps, guidance_scale, size, size, batch=batch)


def trigger_prompts(trigger: str, n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, colour) pairs "a <colour> <trigger>", cycling the world's colours."""
    colours = list(shapes.COLOURS)
    return [(shapes.caption(trigger, colours[i % len(colours)]), colours[i % len(colours)]) for i in range(n)]


def world_prompts(n: int) -> list[tuple[str, str, str]]:
    """``n`` (prompt, shape, colour) triples cycling the base world's prompts."""
    base = shapes.base_prompts()
    return [base[i % len(base)] for i in range(n)]


def _hits(judge: Judge, images, labels) -> list[bool]:
    return [got == tuple(want) for got, want in zip(judge.classify(images), labels)]


def evaluate_base(model=None, n: int = 72, seed: int = 0, judge: Judge | None = None, steps: int = 25,
                  guidance_scale: float = 5.0) -> BaseReport:
    """Judge accuracy (shape, colour, both) of the model without LoRA on ``n`` world prompts."""
    t0 = time.time()
    pipe, judge = load_pipeline(model), judge or load_judge()
    triples = world_prompts(n)
    got = judge.classify(generate(pipe, [p for p, _, _ in triples], seed, steps, guidance_scale))
    per_prompt: dict[str, list[bool]] = {}
    for (p, s, c), g in zip(triples, got):
        per_prompt.setdefault(p, []).append(g == (s, c))
    return BaseReport(model=str(model or paths.default_model_path()), n=n,
                      shape_accuracy=sum(g[0] == t[1] for g, t in zip(got, triples)) / n,
                      colour_accuracy=sum(g[1] == t[2] for g, t in zip(got, triples)) / n,
                      accuracy=sum(g == (t[1], t[2]) for g, t in zip(got, triples)) / n,
                      per_prompt={p: sum(v) / len(v) for p, v in per_prompt.items()}, seconds=time.time() - t0)


def contact_sheet(rows: list[tuple[str, list[Image.Image], list[bool]]], cell: int = 64) -> Image.Image:
    """Labelled rows of images; a green frame marks images the judge accepted, red the others."""
    width = ROW_LABEL_WIDTH + cell * max(len(r[1]) for r in rows)
    sheet = Image.new("RGB", (width, cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for y, (label, images, ok) in enumerate(rows):
        draw.text((4, y * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for x, (im, good) in enumerate(zip(images, ok)):
            box = (ROW_LABEL_WIDTH + x * cell, y * cell)
            sheet.paste(im.resize((cell, cell)), box)
            draw.rectangle([box[0], box[1], box[0] + cell - 1, box[1] + cell - 1],
                           outline=(0, 170, 0) if good else (220, 0, 0), width=2)
    return sheet


def check_eval_settings(trigger: str, n: int, steps: int) -> None:
    """One line for settings an evaluation cannot run with (before any model loads)."""
    if not trigger.strip():
        raise ConfigError("--trigger is empty: give the word(s) the LoRA was trained on, e.g. 'sks'")
    for flag, value in (("--n", n), ("--steps", steps)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, not {value}")


def evaluate(lora_path: str | Path, trigger: str, concept: str, model=None, n: int = 16,
             output_dir: str | Path = "eval", seed: int = 0, n_base: int = 36, steps: int = 25,
             guidance_scale: float = 5.0, judge: Judge | None = None) -> EvalReport:
    """Generate trigger and world prompts with the LoRA on and off; write report.json and contact_sheet.png."""
    t0 = time.time()
    check_eval_settings(trigger, n, steps)
    out = check_folder(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe, judge = load_pipeline(model), judge or load_judge()
    if concept not in judge.config.shapes:
        raise ConfigError(f"concept {concept!r} is not a shape the judge knows; pick one of "
                          f"{', '.join(judge.config.shapes)}")
    active = load_lora_into(pipe, lora_path, adapter_name="lora")  # also a pivotal-tuned file's bundled embedding
    trig = trigger_prompts(trigger, n)
    world = world_prompts(n_base)
    runs = {}
    try:
        for on in (True, False):
            active.enable(on)
            runs[on] = (generate(pipe, [p for p, _ in trig], seed, steps, guidance_scale),
                        generate(pipe, [p for p, _, _ in world], seed + 10_000, steps, guidance_scale))
    finally:
        active.enable(True)
        if model is not None and not isinstance(model, (str, Path)):
            active.remove()
    trig_pred = judge.classify(runs[True][0])
    trig_pred_off = judge.classify(runs[False][0])
    base_hits = {on: _hits(judge, runs[on][1], [(s, c) for _, s, c in world]) for on in (True, False)}
    with_lora, without = sum(base_hits[True]) / n_base, sum(base_hits[False]) / n_base
    report = EvalReport(
        lora_path=str(lora_path), trigger=trigger, concept=concept, model=str(model if isinstance(model, (str, Path))
                                                                               else paths.default_model_path()),
        n=n, n_base=n_base, seed=seed, steps=steps, guidance_scale=guidance_scale,
        concept_fidelity=sum(s == concept for s, _ in trig_pred) / n,
        prompt_fidelity=sum(p == (concept, c) for p, (_, c) in zip(trig_pred, trig)) / n,
        concept_fidelity_without_lora=sum(s == concept for s, _ in trig_pred_off) / n,
        base_accuracy_with_lora=with_lora, base_accuracy_without_lora=without, preservation_drop=without - with_lora,
        trigger_predictions=[list(p) for p in trig_pred], seconds=time.time() - t0, versions=_versions())
    report.save(out / "report.json")
    ok_trig = [p == (concept, c) for p, (_, c) in zip(trig_pred, trig)]
    ok_trig_off = [p == (concept, c) for p, (_, c) in zip(trig_pred_off, trig)]
    contact_sheet([(f"'{trigger}' + LoRA", runs[True][0], ok_trig),
                   (f"'{trigger}' no LoRA", runs[False][0], ok_trig_off),
                   ("world + LoRA", runs[True][1][:n], base_hits[True][:n]),
                   ("world no LoRA", runs[False][1][:n], base_hits[False][:n])]).save(out / "contact_sheet.png")
    return report
