"""One handle per model part that training runs (the denoiser, each text encoder), and the rule for which of its two
forms to use."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Part:
    """A model part as training holds it: the model itself and what accelerate's `prepare` gave back for it.

    - `wrapped` runs the training step's own forward, the one whose loss is back-propagated (the prediction, the
      conditioning with adapters on, cached or not), and `accelerator.no_sync` takes it. Under several processes it
      is DDP's wrapper: its backward all-reduces the gradients and its forward broadcasts buffers to every process.
    - `module` is for everything else: the base model's output (adapters off), validation and samples (forwards that
      processes need not make alike, so they must not reach DDP's collectives), and all that reads or changes the
      model: its config and weights, adapters switched off or scaled, eval/train mode, LoRA state dicts, pipelines.

    With one process the two are the same object. `Components` holds the modules as loaded; after `setup`, training
    reaches a part through `TrainState.models` alone.
    """

    module: torch.nn.Module
    wrapped: torch.nn.Module

    @classmethod
    def unwrapped(cls, module: torch.nn.Module) -> Part:
        """A part that accelerate did not wrap: both forms are the module."""
        return cls(module, module)
