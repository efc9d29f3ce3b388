"""The shapes world: a seeded procedural data set of one coloured shape on a plain background.

Every image is 64x64 RGB with one shape at a random position and size, captioned "a <colour> <shape>".
The base model is trained on ``BASE_SHAPES`` only; ``HELD_OUT_SHAPES`` (words of its vocabulary) and
``CONCEPT_SHAPES`` (not even words) are never shown to it, so a LoRA that teaches one of them is measurably
learning something new. Everything is a pure function of its
``random.Random`` or seed, so a seed always gives the same images.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (40, 44, 52)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 100, 235),
    "yellow": (240, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
}
BASE_SHAPES = ("circle", "square", "triangle")
HELD_OUT_SHAPES = ("star", "heart", "cross", "diamond")
CONCEPT_SHAPES = ("crescent", "arrow", "hourglass")  # added later for held-out recipe checks; not in the vocabulary
ALL_SHAPES = BASE_SHAPES + HELD_OUT_SHAPES + CONCEPT_SHAPES
COLOUR_JITTER = 12
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Sample:
    """One rendered image with its caption and labels."""

    image: Image.Image
    caption: str
    shape: str
    colour: str

    def __iter__(self):
        return iter((self.image, self.caption, self.shape, self.colour))


def caption(shape: str, colour: str) -> str:
    """The world's caption for a shape: "a red circle"."""
    return f"a {colour} {shape}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a shape of radius ``r`` centred at (cx, cy), as polygon vertices."""
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy += r * 0.2
        return [(cx + r * 1.1 * math.cos(a), cy + r * 1.1 * math.sin(a)) for a in
                (math.radians(-90), math.radians(30), math.radians(150))]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((cx + rad * math.cos(a), cy + 0.1 * r + rad * math.sin(a)))
        return pts
    if shape == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16, cy - y * r / 16 - 0.1 * r))
        return pts
    if shape == "cross":
        w, h = r * 0.32, r * 0.95
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w), (cx + h, cy + w),
                (cx + w, cy + w), (cx + w, cy + h), (cx - w, cy + h), (cx - w, cy + w), (cx - h, cy + w),
                (cx - h, cy - w), (cx - w, cy - w)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "hourglass":  # two triangles meeting at a narrow waist
        w, t = r * 0.8, r * 0.15
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + t, cy), (cx + w, cy + r), (cx - w, cy + r), (cx - t, cy)]
    if shape == "arrow":  # pointing right: a shaft and a head
        s, h, x = r * 0.36, r * 0.9, cx + r * 0.05
        return [(cx - r, cy - s), (x, cy - s), (x, cy - h), (cx + r, cy), (x, cy + h), (x, cy + s), (cx - r, cy + s)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def render(shape: str, colour: str, rng: random.Random) -> Image.Image:
    """Draw one ``shape`` in ``colour`` at a random position and size drawn from ``rng``."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    r = rng.uniform(11.0, 20.0)
    cx = rng.uniform(r + 3, SIZE - r - 3)
    cy = rng.uniform(r + 3, SIZE - r - 3)
    fill = tuple(max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    s = _SUPERSAMPLE
    big = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(big)
    if shape in ("circle", "crescent"):
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
        if shape == "crescent":  # a disc with an offset disc cut out, opening to the right
            ox, rr = cx + 0.5 * r, 0.8 * r
            draw.ellipse([(ox - rr) * s, (cy - rr) * s, (ox + rr) * s, (cy + rr) * s], fill=BACKGROUND)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, r)], fill=fill)
    return big.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def sample_world(n: int, seed: int, shapes=BASE_SHAPES, colours=tuple(COLOURS)) -> list[Sample]:
    """``n`` samples cycling evenly over every (shape, colour) pair in a seeded random order."""
    rng = random.Random(seed)
    pairs = [(s, c) for s in shapes for c in colours]
    out: list[Sample] = []
    while len(out) < n:
        rng.shuffle(pairs)
        for shape, colour in pairs[: n - len(out)]:
            out.append(Sample(render(shape, colour, rng), caption(shape, colour), shape, colour))
    return out


def write_folder(samples: list[Sample], out: str | Path, trigger: str | None = None) -> None:
    """Save samples as NNN_colour_shape.png with a .txt caption sidecar (``trigger`` instead of the shape name)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        stem = f"{i:03d}_{s.colour}_{s.shape}"
        s.image.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text((caption(trigger, s.colour) if trigger else s.caption) + "\n")


def base_prompts() -> list[tuple[str, str, str]]:
    """Every (prompt, shape, colour) of the base world, for evaluation."""
    return [(caption(s, c), s, c) for s in BASE_SHAPES for c in COLOURS]


def world_words() -> list[str]:
    """Every word the world's captions use, held-out shapes included (each is one tokenizer token)."""
    return ["a", *COLOURS, *BASE_SHAPES, *HELD_OUT_SHAPES]
