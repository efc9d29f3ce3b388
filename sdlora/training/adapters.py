"""LoRA adapters through peft: pick the target layers, inject adapters, read and write their weights."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..errors import TrainingError


def target_modules(model: torch.nn.Module, patterns) -> list[str]:
    """Full names of the Linear/Conv2d modules whose name ends with one of the patterns."""
    rx = re.compile(r"(^|\.)(" + "|".join(patterns) + r")$")
    return [name for name, m in model.named_modules()
            if rx.search(name) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def inject(model: torch.nn.Module, patterns, rank: int, alpha: float, dropout: float = 0.0,
           what: str = "UNet") -> list[str]:
    """Add a trainable LoRA adapter (B = 0, so the model is unchanged) to the matched layers."""
    names = target_modules(model, patterns)
    if not names:
        raise TrainingError(f"LoRA targets {list(patterns)} matched no layer of the {what}; choose other targets")
    model.add_adapter(PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                                     init_lora_weights=True))
    return names


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (everything else stays frozen)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft state dict with module paths: '<path>.lora_A.weight' / '<path>.lora_B.weight'."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainingError(f"checkpoint has LoRA weights for unknown layers, e.g. {unexpected[0]}")


def zero_update_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Modules whose B matrix is still all zeros (their LoRA changes nothing)."""
    return [k[: -len(".lora_B.weight")] for k, v in state.items()
            if k.endswith(".lora_B.weight") and not torch.any(v != 0)]
