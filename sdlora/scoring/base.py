"""What every scorer takes and gives: `Shots` (validation images with their prompts, whether each carries the
trigger, and the base model's image at the same seed), `Scores` (the four parts), the combined score, and the
registry of scorers by name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from ..config import SCORE_PARTS


@dataclass
class Shots:
    """The images of one validation (or one compare row): image i was rendered from prompts[i]; concept[i] says
    whether that prompt carries the trigger (scored for likeness) or not (scored for preservation, against base[i],
    the base model's image at the same seed, when there is one)."""

    prompts: list[str]
    concept: list[bool]
    images: list[Image.Image]
    base: list[Image.Image | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.base:
            self.base = [None] * len(self.images)


@dataclass
class Scores:
    """The parts of a score, each in [0, 1] for the shapes scorer (cosine similarities for clip-dino); None where
    nothing measured it (no concept prompt: no likeness, no preservation prompt: no preservation)."""

    likeness: float | None = None
    adherence: float | None = None
    preservation: float | None = None
    copying: float | None = None

    def parts(self) -> dict[str, float]:
        return {k: v for k in SCORE_PARTS if (v := getattr(self, k)) is not None}

    def combined(self, weights: dict[str, float]) -> float:
        """(w_l L + w_a A + w_p P - w_c C) / (w_l + w_a + w_p) over the parts that were measured; NaN when none of
        the positive parts was."""
        parts = self.parts()
        total = sum(weights[k] for k in SCORE_PARTS[:3] if k in parts)
        if not total:
            return math.nan
        gain = sum(weights[k] * parts[k] for k in SCORE_PARTS[:3] if k in parts)
        return (gain - weights["copying"] * parts.get("copying", 0.0)) / total


class Scorer(Protocol):
    name: str

    def reference(self, images: list[Image.Image]) -> str:
        """Read the training images that show the concept (likeness and copying compare with them); returns a line
        saying what it read."""

    def score(self, shots: Shots) -> Scores: ...


def has_trigger(text: str, trigger: str) -> bool:
    """Whether `text` carries the trigger phrase as whole words (case-insensitive)."""
    return bool(trigger.strip()) and re.search(_trigger_rx(trigger), text, re.IGNORECASE) is not None


def without_trigger(text: str, trigger: str) -> str:
    """`text` with the trigger phrase taken out (what a CLIP text encoder should read: the trigger means nothing to
    it), spaces and commas tidied."""
    if not trigger.strip():
        return text
    out = re.sub(_trigger_rx(trigger), " ", text, flags=re.IGNORECASE)
    out = re.sub(r"\s*,(\s*,)+", ",", re.sub(r"\s+", " ", out)).strip(" ,")
    return out


def _trigger_rx(trigger: str) -> str:
    return r"(?<![\w<])" + r"\s+".join(re.escape(w) for w in trigger.split()) + r"(?![\w>])"
