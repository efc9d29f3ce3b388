"""The state of one training run, every field declared in one place. `setup.setup` builds it; the loop, the
checkpoints and the output read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...config import Config
from ...models import Components
from ..inputs.batches import Batches
from ..periodic.image_validation import ImageValidation
from ..periodic.validation import Validation
from ..steps.step import Models, training_step
from .optimizers import Optimizers
from .phases import Phase, Phases
from .pivotal import Concept


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
class TrainState:
    cfg: Config
    acc: object                   # accelerate.Accelerator
    components: Components        # the models as loaded (adapters added, never wrapped): setup's, and pipelines'
    models: Models                # what the step runs; after setup, the one way to the denoiser and text encoders
    batches: Batches
    resolution: int
    captions_by_folder: dict[str, list[str]]
    adapters: Adapters
    concept: Concept              # pivotal tuning's token, its phases and files (pivotal.py); NoConcept without
    phases: Phases
    optim: Optimizers
    weight_dtype: torch.dtype
    started: float
    start_step: int = 0
    phase: Phase | None = field(default=None)  # the phase of the last step taken
    validation: Validation | None = None       # held-out images and the best loss so far; None without
    image_validation: ImageValidation | None = None  # validation prompts, scorer and best score; None without
    # the step's loss, (batch, models, cfg, generator) -> (loss, stats): the diffusion step's, or a slider's
    objective: Callable = training_step

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
        """False for plain textual inversion (max_steps 0: pivotal tuning's first phase alone)."""
        return self.cfg.train.max_steps > 0

    def enter_phase(self, step: int) -> Phase:
        """The phase of `step`; on a change, cached text conditioning is dropped (the embedding may have moved)."""
        phase = self.phases.at(step)
        if phase is not self.phase:
            self.models.text.cache.clear()
            self.models.text.trainable = phase.text_trainable
            self.phase = phase
        return phase

    def lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """peft state dicts of the LoRA, keyed by model part (unet, text_encoder, ...); empty without a LoRA."""
        from .adapters import lora_state_dict

        if not self.has_lora:
            return {}
        fam, (denoiser, *encoders) = self.components.family, self.models.modules()
        states = {fam.denoiser_attr: lora_state_dict(denoiser)}
        for slot, encoder, lr in zip(fam.text_encoders, encoders, self.adapters.text_lrs):
            if lr:
                states[slot.attr] = lora_state_dict(encoder)
        return states

    def load_lora_states(self, states: dict) -> None:
        from .adapters import load_lora_state_dict

        parts = self.parts()
        for part, state in states.items():
            load_lora_state_dict(parts[part], state)

    def parts(self) -> dict[str, torch.nn.Module]:
        """{pipeline attribute (unet, text_encoder, ...): module} of the denoiser and the text encoders."""
        denoiser, *encoders = self.models.modules()
        return self.components.family.parts(denoiser, encoders)
