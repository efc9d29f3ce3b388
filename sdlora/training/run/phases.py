"""What trains when: plain LoRA training is one phase; pivotal tuning (`pivotal.py`) first trains only the new
token's embedding (textual inversion), then the LoRA (with the embedding frozen or at its own rate)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Phase:
    """A stretch of a run and what its steps update: gradients that reached `dropped` (parameters trained in another
    phase, or not at all) are discarded, then `params` are clipped and `step` applies their optimizer (with its LR
    schedule and EMA where it has them). `text_trainable`: the text path changes, so its conditioning is not cached."""

    name: str
    params: list[torch.nn.Parameter]
    step: Callable[[], None]
    dropped: list[torch.nn.Parameter] = field(default_factory=list)
    text_trainable: bool = False


@dataclass(frozen=True)
class Phases:
    """The phases of one run; `at(step)` says which one a step belongs to."""

    ti_steps: int   # steps of the first phase (textual inversion) before the LoRA trains (0: none)
    first: Phase | None
    main: Phase

    def at(self, step: int) -> Phase:
        return self.first if self.first is not None and step < self.ti_steps else self.main

    def __iter__(self):
        return iter([p for p in (self.first, self.main) if p is not None])
