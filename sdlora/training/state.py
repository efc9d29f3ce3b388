"""The state of one training run, every field declared in one place. `setup.setup` builds it; the loop, the
checkpoints and the output read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import Config
from ..models import Components
from .batches import Batches
from .embeddings import ConceptTokens
from .image_validation import ImageValidation
from .phases import Phase, Phases
from .step import Models
from .validation import Validation


@dataclass
class Adapters:
    """Where the LoRA sits: the adapted module paths, each text encoder's learning rate (0: no LoRA on it), and the
    denoiser layers' own learning rates where per-block settings give them."""

    targets: list[str]
    text_lrs: list[float]
    layer_lrs: dict[str, float] = field(default_factory=dict)

    @property
    def text_lora(self) -> bool:
        return any(self.text_lrs)


@dataclass
class Optimizers:
    """The main optimizer (LoRA, and the embedding in phase 2 when it keeps training) with its LR schedule, the
    new embedding's own optimizer for textual inversion (phase 1), and the EMA of the LoRA weights."""

    main: torch.optim.Optimizer
    lr_scheduler: object
    embedding: torch.optim.Optimizer | None
    params: list[torch.nn.Parameter]        # everything the main optimizer steps
    lora_params: list[torch.nn.Parameter]   # the LoRA's alone
    ema: object | None = None               # diffusers EMAModel of lora_params, when optim.ema_decay is set

    def evaluation(self):
        """Context: the weights that samples, validation and saved files use (EMA / schedule-free averaged)."""
        from .optimizers import evaluation_weights

        return evaluation_weights(self.main, self.ema, self.lora_params)


@dataclass
class TrainState:
    cfg: Config
    acc: object                   # accelerate.Accelerator
    components: Components        # the models as loaded, adapters added; never wrapped
    models: Models                # what the step runs (wrapped by accelerate where they train)
    batches: Batches
    resolution: int
    captions_by_folder: dict[str, list[str]]
    adapters: Adapters
    concept: ConceptTokens | None  # pivotal tuning's new token
    concept_init: list[torch.Tensor] | None
    phases: Phases
    optim: Optimizers
    weight_dtype: torch.dtype
    started: float
    start_step: int = 0
    phase: Phase | None = field(default=None)  # the phase of the last step taken
    validation: Validation | None = None       # held-out images and the best loss so far; None without
    image_validation: ImageValidation | None = None  # validation prompts, scorer and best score; None without
    # the step's loss, (batch, models, cfg, generator) -> (loss, stats), where it is not the diffusion step's
    # (`step.training_step`): a slider's
    objective: Callable | None = None

    @property
    def validates(self) -> bool:
        return self.validation is not None or self.image_validation is not None

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def has_lora(self) -> bool:
        return self.phases.main.trains_lora

    def enter_phase(self, step: int) -> Phase:
        """The phase of `step`; on a change, cached text conditioning is dropped (the embedding may have moved)."""
        phase = self.phases.at(step)
        if phase is not self.phase:
            self.models.text.cache.clear()
            self.models.text.trainable = phase.text_trainable
            self.phase = phase
        return phase

    def prompt(self, text: str) -> str:
        """A caption or sample prompt with the pivotal trigger replaced by the new token(s)."""
        return self.concept.prompt(text, self.cfg.pivotal.trigger) if self.concept is not None else text

    def lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """peft state dicts of the LoRA, keyed by model part (unet, text_encoder, ...); empty without a LoRA."""
        from .adapters import lora_state_dict

        if not self.has_lora:
            return {}
        c = self.components
        states = {c.family.denoiser_attr: lora_state_dict(c.denoiser)}
        for slot, encoder, lr in zip(c.family.text_encoders, c.text_encoders, self.adapters.text_lrs):
            if lr:
                states[slot.attr] = lora_state_dict(encoder)
        return states

    def load_lora_states(self, states: dict) -> None:
        from .adapters import load_lora_state_dict

        c = self.components
        parts = c.family.parts(c.denoiser, c.text_encoders)
        for part, state in states.items():
            load_lora_state_dict(parts[part], state)
