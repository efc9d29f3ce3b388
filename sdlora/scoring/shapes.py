"""The shapes-world scorer: the judge (`sdlora/world/judge.py`) names the shape and colour of every image, so the
parts are exact counts.

likeness: the share of trigger-prompt images the judge calls the concept (the judge class named by the job, else the
class it sees most in the training images with the trigger); adherence: the share of images whose shape and colour
are what the prompt asks (the concept for the trigger); preservation: the share of prompts without the trigger drawn
right (a world caption: its shape and colour; any other prompt: what the judge sees in the base model's image at the
same seed); copying: the highest pixel correlation (Pearson, over the judge-size RGB pixels) of any trigger-prompt
image with any single training image, 1 for an exact copy.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..world.judge import load_judge
from .base import Scores, Shots


class ShapesScorer:
    name = "shapes"

    def __init__(self, trigger: str, concept: str = ""):
        self.judge = load_judge()
        self.trigger, self.concept = trigger, concept
        cfg = self.judge.config
        if concept and concept not in cfg.shapes:
            raise ConfigError(f"validation.concept {concept!r} is not a class the judge knows; pick one of "
                              f"{', '.join(cfg.shapes)}")
        self.size = cfg.size
        self.training = np.zeros((0, 3 * cfg.size * cfg.size), dtype=np.float32)

    def reference(self, images: list[Image.Image]) -> str:
        """The training images with the trigger: for copying, and (unless the job names it) the concept."""
        if images:
            self.training = _centred([self._fit(im) for im in images])
        if self.concept:
            return f"shapes scorer: concept '{self.concept}' (as the job names it)"
        if not images:
            raise DataError("the shapes scorer needs training images with the trigger to read the concept off, or "
                            "the concept itself: set validation.concept (--judge-concept), e.g. star")
        votes = Counter(s for s, _ in self.judge.classify([self._fit(im) for im in images]))
        self.concept, n = votes.most_common(1)[0]
        return (f"shapes scorer: the judge sees '{self.concept}' in {n} of {len(images)} training images with the "
                "trigger (set --judge-concept to name another)")

    def score(self, shots: Shots) -> Scores:
        got = self.judge.classify([self._fit(im) for im in shots.images])
        base_idx = [i for i, b in enumerate(shots.base) if b is not None]
        base_got = dict(zip(base_idx, self.judge.classify([self._fit(shots.base[i]) for i in base_idx])))
        concept = [i for i, c in enumerate(shots.concept) if c]
        preserve = [i for i, c in enumerate(shots.concept) if not c]
        likeness = _mean([got[i][0] == self.concept for i in concept])
        right = [self._right(shots.prompts[i], shots.concept[i], got[i]) for i in range(len(got))]
        adherence = _mean([r for r in right if r is not None])
        kept = []
        for i in preserve:
            r = right[i] if self._parses(shots.prompts[i]) else None
            kept.append(r if r is not None else base_got[i] == got[i] if i in base_got else None)
        preservation = _mean([k for k in kept if k is not None])
        copying = None
        if concept and len(self.training):
            made = _centred([self._fit(shots.images[i]) for i in concept])
            copying = float((made @ self.training.T).max())
        return Scores(likeness, adherence, preservation, copying)

    def _fit(self, im: Image.Image) -> Image.Image:
        im = im.convert("RGB")
        return im if im.size == (self.size, self.size) else im.resize((self.size, self.size), Image.Resampling.BICUBIC)

    def _words(self, prompt: str) -> list[str]:
        return re.findall(r"[a-z]+", prompt.lower())

    def _parses(self, prompt: str) -> bool:
        """A world caption: it names a shape and a colour the judge knows."""
        words, cfg = self._words(prompt), self.judge.config
        return any(w in cfg.shapes for w in words) and any(w in cfg.colours for w in words)

    def _right(self, prompt: str, concept: bool, got: tuple[str, str]) -> bool | None:
        """Whether the judge's (shape, colour) is what the prompt asks for; None when it asks for neither."""
        words, cfg = self._words(prompt), self.judge.config
        shape = self.concept if concept else next((w for w in words if w in cfg.shapes), None)
        colour = next((w for w in words if w in cfg.colours), None)
        if shape is None and colour is None:
            return None
        return (shape is None or got[0] == shape) and (colour is None or got[1] == colour)


def _centred(images: list[Image.Image]) -> np.ndarray:
    """Each image's pixels minus their mean, unit length: a dot product of two rows is their Pearson correlation."""
    x = np.stack([np.asarray(im, dtype=np.float32).ravel() for im in images])
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _mean(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None
