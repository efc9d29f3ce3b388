"""Scorers by name: the one place that knows which scorers exist."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Scorer


def make_scorer(name: str, trigger: str, concept: str = "", clip_model: str = "", dino_model: str = "",
                device: str = "cpu") -> Scorer:
    """The scorer called `name` (shapes, clip-dino). A model that is not here is a one-line error saying how to get
    it."""
    if name == "shapes":
        from .shapes import ShapesScorer

        return ShapesScorer(trigger, concept)
    if name == "clip-dino":
        from .clip_dino import ClipDinoScorer

        return ClipDinoScorer(trigger, clip_model, dino_model, device)
    raise ConfigError(f"unknown scorer {name!r}; choose shapes or clip-dino")
