"""Pivotal tuning (`[pivotal]`): a new token learnt as an embedding, first alone (textual inversion, phase 1), then
beside the LoRA (frozen, or at its own rate: `continue_lr`).

One object owns all of it: the token rows (`embeddings.ConceptTokens`), the prompts that carry them, phase 1's
optimizer, which gradients each phase keeps, its share of a checkpoint, its files (`NAME_emb.safetensors`, and the
`bundle_emb.*` keys of kohya files) and its checks. A run without pivotal tuning holds `NoConcept`, which adds,
saves and checks nothing, so setup, the loop and the output call the two alike and never ask which they hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import ConfigError, TrainingError
from ...loras.files import write_embedding
from ...loras.layout import bundle_tensors
from .embeddings import ConceptTokens, add_concept
from .phases import Phase, Phases

if TYPE_CHECKING:
    from ...config import Config, PivotalConfig
    from ...models import Components
    from .optimizers import Optimizers


def concept_for(cfg: Config, c: Components) -> Concept:
    """Pivotal tuning's new token(s), added to every tokenizer and text encoder, when the job names one."""
    pv = cfg.pivotal
    if not pv.token:
        return NoConcept()
    tokens = add_concept(c.tokenizers, c.text_encoders, [s.embedding_key for s in c.family.text_encoders], pv.token,
                         pv.num_vectors, pv.init_word, cfg.train.seed)
    return Pivotal(tokens, pv)


class NoConcept:
    """A run without a new token: prompts as written, the LoRA's phase alone, nothing of its own to save or check."""

    token = ""

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return []

    def prompt(self, text: str) -> str:
        return text

    def check_captions(self, examples: list) -> None:
        pass

    def main_groups(self) -> list[dict]:
        return []

    def prepare(self, acc) -> None:
        pass

    def phases(self, optim: Optimizers, text_lora: bool) -> Phases:
        return Phases(0, None, Phase("lora", optim.params, optim.step, text_trainable=text_lora))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, saved: dict) -> None:
        pass

    def metadata(self) -> dict[str, str]:
        return {}

    def save(self, path: Path, dtype: torch.dtype) -> None:
        pass

    def bundle(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {}

    def check_trained(self, step: int) -> None:
        pass


class Pivotal:
    """The concept's token rows (in every text encoder) and how they train: phase 1 (`ti_steps` of textual
    inversion) steps them alone with their own AdamW at `ti_lr`, the LoRA's gradients dropped; phase 2 trains the
    LoRA with the main optimizer, the rows in it at `continue_lr`, or frozen (their gradients dropped) at 0."""

    def __init__(self, tokens: ConceptTokens, pv: PivotalConfig):
        self.tokens, self.pv = tokens, pv
        self.optimizer: torch.optim.Optimizer | None = None  # phase 1's, made by `prepare` (None without phase 1)
        self.initial: list[torch.Tensor] = []  # the vectors as training starts, for `check_trained`

    @property
    def token(self) -> str:
        return self.tokens.token

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.tokens.params

    def prompt(self, text: str) -> str:
        """A caption or sample prompt with the trigger word replaced by the token's expansion."""
        return self.tokens.prompt(text, self.pv.trigger)

    def check_captions(self, examples: list) -> None:
        """Training must see the token: some caption (its trigger replaced) has to carry it."""
        if not any(self.token in e.caption for e in examples):
            what = f"the trigger {self.pv.trigger!r}" if self.pv.trigger else f"the token {self.token!r}"
            raise ConfigError(f"no caption or instance prompt contains {what}; put it in the captions "
                              "or set pivotal.trigger")

    def main_groups(self) -> list[dict]:
        """The main optimizer's parameter group for the rows in phase 2 (none when they stay frozen)."""
        return [{"params": self.params, "lr": self.pv.continue_lr, "weight_decay": 0.0}] if self.continues else []

    @property
    def continues(self) -> bool:
        return self.pv.continue_lr > 0

    def prepare(self, acc) -> None:
        """Phase 1's optimizer (after the main one, through accelerate alike), and the vectors training starts
        from (as placed and cast for training)."""
        if self.pv.ti_steps:
            self.optimizer = acc.prepare(torch.optim.AdamW(self.params, lr=self.pv.ti_lr, weight_decay=0.0))
        self.initial = self.tokens.vectors()

    def phases(self, optim: Optimizers, text_lora: bool) -> Phases:
        """Textual inversion (when `ti_steps`), then the LoRA with the rows at `continue_lr` or frozen."""
        first = Phase("textual inversion", self.params, self.step, dropped=optim.lora_params,
                      text_trainable=True) if self.pv.ti_steps else None
        main = Phase("lora", optim.params, optim.step, dropped=[] if self.continues else self.params,
                     text_trainable=text_lora or self.continues)
        return Phases(self.pv.ti_steps, first, main)

    def step(self) -> None:
        """Phase 1's update of the rows."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Its share of a checkpoint: the vectors, and phase 1's optimizer."""
        out = {"embeddings": self.tokens.vectors()}
        if self.optimizer is not None:
            out["ti_optimizer"] = self.optimizer.state_dict()
        return out

    def load_state_dict(self, saved: dict) -> None:
        self.tokens.load(saved["embeddings"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(saved["ti_optimizer"])

    def metadata(self) -> dict[str, str]:
        """What the LoRA file's header says of the token: the trigger phrase clients show, and its vectors."""
        return {"modelspec.trigger_phrase": self.token,
                "sdlora_embeddings": json.dumps({self.token: self.pv.num_vectors})}

    def save(self, path: Path, dtype: torch.dtype) -> Path:
        """The embedding file ({'clip_l'} (+ 'clip_g'), diffusers' `load_textual_inversion` and ComfyUI read it)."""
        return write_embedding(path, self.token, self.tokens.tensors(dtype))

    def bundle(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The `bundle_emb.<token>.*` tensors of a kohya LoRA file (A1111 loads the embedding with the LoRA)."""
        return bundle_tensors(self.token, self.tokens.tensors(dtype))

    def check_trained(self, step: int) -> None:
        """Rows that never moved from their start would teach the token nothing: an error, not a file."""
        if all(torch.equal(a, b) for a, b in zip(self.tokens.vectors(), self.initial)):
            raise TrainingError(f"the new embedding of {self.token} never changed in {step} steps; "
                                "raise pivotal.ti_lr or train more steps")


Concept = Pivotal | NoConcept  # what a run holds: TrainState.concept
