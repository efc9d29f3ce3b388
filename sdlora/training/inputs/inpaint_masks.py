"""Random inpainting masks: rectangles and brush strokes, the two kinds of synthetic mask the SD inpainting models and
the inpainting trainers (LaMa's generator, diffusers' inpainting examples, OneTrainer) draw. Every draw comes from the
micro-batch's generator, so step N's masks are a function of (seed, N) alone and a resumed run draws the same ones."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

RECTANGLE_SHARE = 0.5        # the other half are brush strokes
BOXES = (1, 3)               # rectangles per mask
BOX_SIDE = (0.15, 0.6)       # a rectangle's sides, as shares of the image's
STROKES = (1, 4)             # strokes per mask
VERTICES = (2, 6)            # segments per stroke
SEGMENT = (0.1, 0.4)         # a segment's length, as a share of the longer side
BRUSH = (0.05, 0.15)         # brush width, as a share of the shorter side


def random_mask(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A mask of width x height (mode L, 255 = repaint): one to three rectangles, or one to four brush strokes (each a
    polyline of random direction with round joints), half the time each."""
    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    if rng.random() < RECTANGLE_SHARE:
        for _ in range(int(rng.integers(BOXES[0], BOXES[1] + 1))):
            w = max(1, round(width * rng.uniform(*BOX_SIDE)))
            h = max(1, round(height * rng.uniform(*BOX_SIDE)))
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            draw.rectangle((left, top, left + w - 1, top + h - 1), fill=255)
        return im
    for _ in range(int(rng.integers(STROKES[0], STROKES[1] + 1))):
        brush = max(1, round(min(width, height) * rng.uniform(*BRUSH)))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        points = [(x, y)]
        for _ in range(int(rng.integers(VERTICES[0], VERTICES[1] + 1))):
            angle, length = rng.uniform(0, 2 * math.pi), max(width, height) * rng.uniform(*SEGMENT)
            x = min(max(x + length * math.cos(angle), 0), width - 1)
            y = min(max(y + length * math.sin(angle), 0), height - 1)
            points.append((x, y))
        draw.line(points, fill=255, width=brush)
        r = brush / 2
        for px, py in points:  # round ends and joints, as a brush leaves them
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return im


def centred_rectangle(width: int, height: int) -> Image.Image:
    """A mask repainting the middle half of each side (the default mask of sample images)."""
    im = Image.new("L", (width, height), 0)
    ImageDraw.Draw(im).rectangle((width // 4, height // 4, width - width // 4 - 1, height - height // 4 - 1),
                                 fill=255)
    return im
