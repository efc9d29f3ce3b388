"""What trains when: plain LoRA training is one phase; pivotal tuning first trains only the new token's embedding
(textual inversion), then the LoRA (with the embedding frozen or at its own rate)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    trains_lora: bool        # the LoRA's gradients are applied (else dropped)
    trains_embedding: bool   # the new token's embedding is updated
    embedding_optimizer: bool  # the step uses the embedding's own optimizer (phase 1), not the main one
    text_trainable: bool     # the text path changes during the phase: its conditioning cannot be cached


@dataclass(frozen=True)
class Phases:
    """The phases of one run; `at(step)` says which one a step belongs to."""

    ti_steps: int   # steps of textual inversion before the LoRA trains (0: none)
    first: Phase | None
    main: Phase

    def at(self, step: int) -> Phase:
        return self.first if self.first is not None and step < self.ti_steps else self.main


def plan_phases(cfg, has_lora: bool, text_lora: bool, has_concept: bool) -> Phases:
    """The phases of a run: `text_lora` when a text encoder carries a LoRA, `has_concept` with pivotal tuning."""
    continue_embedding = has_concept and cfg.pivotal.continue_lr > 0
    first = Phase("textual inversion", trains_lora=False, trains_embedding=True, embedding_optimizer=True,
                  text_trainable=True) if has_concept and cfg.ti_steps else None
    main = Phase("lora", trains_lora=has_lora, trains_embedding=continue_embedding, embedding_optimizer=False,
                 text_trainable=text_lora or continue_embedding)
    return Phases(cfg.ti_steps, first, main)
