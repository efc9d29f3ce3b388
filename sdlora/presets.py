"""Presets: documented job files of training values for a model family and a goal (`sample_data/presets/*.toml`),
taken by `sdlora train --preset NAME` and by the web UI's preset menu.

A preset is a job file without data or output, plus a `[preset]` table saying what it is for (title, family, goal,
description). `based_on = "FILE"` starts it from another job file's values (its data, prior folder, output and
prompts left out): the shapes-world preset is the demo job's recipe that way, so the two cannot drift apart.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .config import Config, from_dict, merge_values
from .errors import ConfigError
from .paths import sample_data

GOALS = ("character", "object", "style", "quick-test")
GOAL_TITLES = {"character": "person or character", "object": "object", "style": "style", "quick-test": "quick test",
               "concept": "new concept"}
SHAPES = "shapes"  # the presets of the built-in shapes-world model; a family's are named in its row (presets)
_LEFT_OUT = ("data", "prior", "output")  # what `based_on` does not take from the job file: its images and folders


@dataclass(frozen=True)
class Preset:
    name: str         # the file's stem: sdxl-character
    title: str
    family: str       # shapes, sd1, sdxl or sd3
    goal: str
    about: str
    path: Path


def presets_dir() -> Path:
    return sample_data() / "presets"


def list_presets() -> list[Preset]:
    """Every shipped preset, by family then goal."""
    from .families import FAMILIES

    found = [_read_meta(p) for p in sorted(presets_dir().glob("*.toml"))]
    order = [SHAPES, *dict.fromkeys(f.presets for f in reversed(FAMILIES.values()))]  # SD 1.5 first, SD3 last
    return sorted(found, key=lambda p: (order.index(p.family) if p.family in order else len(order),
                                        GOALS.index(p.goal) if p.goal in GOALS else -1, p.name))


def _read_meta(path: Path) -> Preset:
    meta = _toml(path).get("preset", {})
    return Preset(path.stem, meta.get("title", path.stem), meta.get("family", ""), meta.get("goal", ""),
                  meta.get("description", ""), path)


def _toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def find_preset(name: str) -> Path:
    """The file of a preset named like `sdxl-character`, or a path to a preset file."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        names = ", ".join(p.name for p in list_presets())
        raise ConfigError(f"unknown preset {name!r}; choose one of {names}")
    return path


def preset_values(name: str) -> dict:
    """The job-file values of a preset (what `based_on` names first, its own values over them), without [preset]."""
    path = find_preset(name)
    values = _toml(path)
    base = values.pop("preset", {}).get("based_on")
    if not base:
        return values
    start = {k: v for k, v in _toml(path.parent / base).items() if k not in _LEFT_OUT}
    for section in ("sample", "validation"):  # the demo's prompts name its own concept
        start.get(section, {}).pop("prompts", None)
    return merge_values(start, values)


def load_preset(name: str) -> Config:
    """A Config of the defaults with the preset's values."""
    return from_dict(preset_values(name))


def family_key(model: str) -> str:
    """Which presets fit a base model: shapes (the built-in model), or its family read from its configs; for a hub id
    that is not on this machine, a guess from its name (SDXL and SD3 names say so)."""
    from .families import FALLBACK, FAMILIES
    from .options import model_facts
    from .paths import default_model_path

    if not model or Path(model).resolve() == default_model_path().resolve():
        return SHAPES
    facts = model_facts(model)
    if facts is not None:
        return facts.family.presets
    low = model.lower()
    return next((f for f in FAMILIES.values() if any(w in low for w in f.hub_words)), FALLBACK).presets


def presets_for(family: str) -> list[Preset]:
    return [p for p in list_presets() if p.family == family]


def preset_for(model: str, goal: str = "") -> Preset | None:
    """The preset of a base model's family for a goal (or the family's first, person/character)."""
    fitting = presets_for(family_key(model))
    return next((p for p in fitting if p.goal == goal), fitting[0] if fitting else None)
