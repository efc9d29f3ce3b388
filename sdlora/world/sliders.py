"""Judge sliders and erasers on the shapes world: an eraser's concept should vanish from its prompts while the other
shapes stay as the base model draws them; a colour slider should move the judged colour toward its positive side at
+1, its negative side at -1, and leave the base model's images unchanged at 0.

Every measurement generates the same seeds with the LoRA at each strength and with it switched off, and lets the
shipped judge (`judge.py`) name shape and colour."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_write_text
from ..loras.apply import load_lora_into
from ..sampling import save_png
from . import shapes
from .evaluate import contact_sheet, generate, load_pipeline
from .judge import Judge, load_judge


@dataclass
class EraserReport:
    """concept_rate: share of the concept's prompts ('a <colour> <concept>') judged to be the concept; accuracy:
    share of each other shape's prompts judged right in shape and colour; kept = with / without the eraser."""

    lora_path: str
    concept: str
    strength: float
    n: int  # images per prompt
    concept_rate: float
    concept_rate_base: float
    accuracy: dict[str, float]
    accuracy_base: dict[str, float]
    kept: dict[str, float]
    kept_all: float
    shapes_drawn: dict[str, int] = field(default_factory=dict)  # what the concept's prompts gave with the eraser
    concept_rate_by_colour: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))


@dataclass
class SliderReport:
    """colours[strength]: the judged colours' shares of `prompt`'s images at that strength; `base` without the
    LoRA; max_pixel_change_at_0: the largest pixel difference between strength 0 and no LoRA (0-255)."""

    lora_path: str
    prompt: str
    positive: str
    negative: str
    n: int
    colours: dict[str, dict[str, float]]
    base: dict[str, float]
    max_pixel_change_at_0: int
    shape_kept: dict[str, float] = field(default_factory=dict)  # share still judged the prompt's shape

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))


def _shares(labels: list[str]) -> dict[str, float]:
    counts = Counter(labels)
    return {k: counts[k] / len(labels) for k in sorted(counts)}


def evaluate_eraser(lora_path: str | Path, concept: str = "circle", others: tuple[str, ...] = ("square", "triangle"),
                    n: int = 8, model=None, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                    strength: float = 1.0, judge: Judge | None = None, output_dir: str | Path | None = None
                    ) -> EraserReport:
    """The eraser at `strength` and switched off, on every colour of `concept` and of each of `others`, `n` seeds
    each."""
    pipe, judge = load_pipeline(model), judge or load_judge()
    active = load_lora_into(pipe, lora_path, scale=strength)
    colours = list(shapes.COLOURS)
    prompts = {s: [(shapes.caption(s, c), c) for c in colours for _ in range(n)] for s in (concept, *others)}
    got, images = {}, {}
    try:
        for on in (True, False):
            active.enable(on)
            for s, items in prompts.items():
                images[on, s] = generate(pipe, [p for p, _ in items], seed, steps, guidance)
                got[on, s] = judge.classify(images[on, s])
    finally:
        active.remove()

    def rate(on):
        return sum(shape == concept for shape, _ in got[on, concept]) / len(got[on, concept])

    def acc(on, s):
        return sum(g == (s, c) for g, (_, c) in zip(got[on, s], prompts[s])) / len(prompts[s])

    with_, without = {s: acc(True, s) for s in others}, {s: acc(False, s) for s in others}
    pooled = sum(with_.values()) / max(sum(without.values()), 1e-9)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # green: what the eraser wants (no concept with it on; the prompt's shape otherwise), red: not
        rows = [(f"{s} {'eraser' if on else 'base'}", images[on, s][::n][:6],
                 [(g[0] != s) if on and s == concept else g[0] == s for g in got[on, s][::n][:6]])
                for s in (concept, *others) for on in (True, False)]
        save_png(contact_sheet(rows), Path(output_dir) / "eraser.png")
    by_colour = {c: sum(g[0] == concept for g, (_, pc) in zip(got[True, concept], prompts[concept]) if pc == c) / n
                 for c in colours}
    return EraserReport(str(lora_path), concept, strength, n, rate(True), rate(False), with_, without,
                        {s: with_[s] / without[s] if without[s] else 0.0 for s in others}, pooled,
                        dict(Counter(shape for shape, _ in got[True, concept])), by_colour)


def evaluate_colour_slider(lora_path: str | Path, prompt: str = "a circle", positive: str = "red",
                           negative: str = "blue", strengths: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0),
                           n: int = 24, model=None, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                           judge: Judge | None = None, output_dir: str | Path | None = None) -> SliderReport:
    """`prompt`'s judged colours at each strength and without the LoRA, `n` seeds each."""
    pipe, judge = load_pipeline(model), judge or load_judge()
    active = load_lora_into(pipe, lora_path)
    shape = prompt.split()[-1]
    colours, kept, images = {}, {}, {}
    try:
        active.enable(False)
        base_images = generate(pipe, [prompt] * n, seed, steps, guidance)
        active.enable(True)
        for s in strengths:
            active.set_scales([s])
            images[s] = generate(pipe, [prompt] * n, seed, steps, guidance)
            judged = judge.classify(images[s])
            colours[f"{s:g}"] = _shares([c for _, c in judged])
            kept[f"{s:g}"] = sum(g == shape for g, _ in judged) / n
    finally:
        active.remove()
    base = judge.classify(base_images)
    zero = images.get(0.0)
    change = 0 if zero is None else max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
                                        for a, b in zip(zero, base_images))
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        rows = [(f"x{s:g}", images[s][:8], [True] * 8) for s in strengths] + [("no LoRA", base_images[:8], [True] * 8)]
        save_png(contact_sheet(rows), Path(output_dir) / "slider.png")
    return SliderReport(str(lora_path), prompt, positive, negative, n, colours, _shares([c for _, c in base]), change,
                        kept)
