"""The per-block and per-layer settings of a [lora] table in sd-scripts' spellings, parsed and checked (the
config's side; `sdlora.training.run.blocks` turns them into a (rank, alpha, lr) per adapted layer of a model)."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

BLOCK_LISTS = {"block_dims": int, "block_alphas": float, "conv_block_dims": int, "conv_block_alphas": float}
LR_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
PATTERNS = {"network_reg_dims": int, "network_reg_alphas": float, "network_reg_lrs": float}
BLOCK_KEYS = (*BLOCK_LISTS, *LR_WEIGHTS, "block_lr_zero_threshold")
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")



def _number(name: str, text: str, kind):
    try:
        value = kind(text.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise ConfigError(f"lora.{name}: {text.strip()!r} is not a {'whole ' if kind is int else ''}number >= 0")
    return value


def parse_list(name: str, text: str) -> list:
    """'2,4,8' -> [2, 4, 8] (ints for the dims, floats for the alphas)."""
    return [_number(name, item, BLOCK_LISTS[name]) for item in text.split(",")]


def lr_preset(name: str, text: str, n: int) -> list[float]:
    """sd-scripts' named down/up weights over n blocks (`get_block_lr_weight`): cosine, sine, linear, reverse_linear,
    zeros, each optionally '+base' (added to every value)."""
    preset, _, base = text.strip().partition("+")
    base = _number(name, base, float) if base else 0.0
    steps = [i / (n - 1) for i in range(n)]
    values = {"cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
              "sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps,
              "reverse_linear": list(reversed(steps)), "zeros": [0.0] * n}.get(preset)
    if values is None:
        raise ConfigError(f"lora.{name}: {text!r} is neither a comma-separated list nor one of {', '.join(LR_PRESETS)} "
                          "(optionally +BASE)")
    return [v + base for v in values]


def parse_lr_weight(name: str, text: str, n: int) -> list[float]:
    """One of down/mid/up_lr_weight as sd-scripts reads it, over n blocks: a list (an empty item is 0; a shorter list
    is filled with 1.0, as sd-scripts does), or (down and up) a preset name."""
    items = text.split(",")
    if len(items) == 1 and name != "mid_lr_weight" and not re.fullmatch(r"\s*[0-9.eE+-]*\s*", text):
        return lr_preset(name, text, n)
    if len(items) == 1 and name != "mid_lr_weight":  # sd-scripts reads a bare number as an unknown preset
        raise ConfigError(f"lora.{name} takes comma-separated values (one per block) or a preset "
                          f"({', '.join(LR_PRESETS)}, optionally +BASE); got {text!r}")
    values = [_number(name, item, float) if item.strip() else 0.0 for item in items]
    if len(values) > n:
        raise ConfigError(f"lora.{name} has {len(values)} values; this model has {n} blocks there")
    return values + [1.0] * (n - len(values))


def parse_patterns(name: str, text: str) -> list[tuple[re.Pattern, float]]:
    """'attn2=8,ff=4' -> [(re('attn2'), 8), (re('ff'), 4)]; each item splits at its last '='."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern.strip():
            raise ConfigError(f"lora.{name}: {item!r} is not REGEX=VALUE (e.g. attn2=8)")
        try:
            rx = re.compile(pattern.strip())
        except re.error as e:
            raise ConfigError(f"lora.{name}: {pattern.strip()!r} is not a regular expression ({e})") from None
        out.append((rx, _number(name, value, PATTERNS[name])))
    return out


def check_syntax(lo) -> None:
    """Every per-block and per-layer setting of a [lora] table parses (lengths are checked against the model)."""
    for name in BLOCK_LISTS:
        if getattr(lo, name).strip():
            parse_list(name, getattr(lo, name))
    for name in LR_WEIGHTS:
        if getattr(lo, name).strip():
            parse_lr_weight(name, getattr(lo, name), 12 if name != "mid_lr_weight" else 3)
    for name in PATTERNS:
        parse_patterns(name, getattr(lo, name))
    if (lo.block_alphas.strip() and not lo.block_dims.strip()) or \
            (lo.conv_block_alphas.strip() and not lo.conv_block_dims.strip()):
        raise ConfigError("lora.block_alphas / conv_block_alphas need block_dims / conv_block_dims beside them")
    if lo.block_lr_zero_threshold and not any(getattr(lo, n).strip() for n in LR_WEIGHTS):
        raise ConfigError("lora.block_lr_zero_threshold applies to down/mid/up_lr_weight; set one or leave it at 0")


def uses_blocks(lo) -> bool:
    return any(getattr(lo, n).strip() for n in (*BLOCK_LISTS, *LR_WEIGHTS))


def uses_patterns(lo) -> bool:
    return any(getattr(lo, n).strip() for n in PATTERNS)
