"""Optimizers through their maintained packages, LoRA+ parameter groups, the EMA of the LoRA weights, and the
weights that samples, validation and saved files see (EMA or schedule-free's averaged point, swapped in and out
bit-exactly so training continues as if nothing happened)."""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

import torch

from ...errors import ConfigError

# optimizer -> (module to import, pip extra that brings it)
PACKAGES = {"prodigy": ("prodigyopt", "optimizers"), "adamw-schedulefree": ("schedulefree", "optimizers"),
            "lion": ("lion_pytorch", "optimizers"), "adafactor": ("transformers", None)}
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


@dataclass
class Optimizers:
    """The main optimizer (LoRA, and pivotal tuning's embedding in phase 2 when it keeps training) with its LR
    schedule, and the EMA of the LoRA weights. (Pivotal tuning's phase 1 has its own: `Pivotal.optimizer`.)"""

    main: torch.optim.Optimizer
    lr_scheduler: object
    params: list[torch.nn.Parameter]        # everything the main optimizer steps
    lora_params: list[torch.nn.Parameter]   # the LoRA's alone
    ema: object | None = None               # diffusers EMAModel of lora_params, when optim.ema_decay is set

    def step(self) -> None:
        """Apply the gradients: the optimizer's step, the schedule's, and the EMA's."""
        self.main.step()
        self.lr_scheduler.step()
        self.main.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.lora_params)

    def evaluation(self):
        """Context: the weights that samples, validation and saved files use (EMA / schedule-free averaged)."""
        return evaluation_weights(self.main, self.ema, self.lora_params)


def require(module: str, extra: str | None, what: str) -> None:
    """A one-line error naming the pip extra when an optional package is missing (checked before models load)."""
    try:
        importlib.import_module(module)
    except ImportError:
        hint = f"pip install 'sdlora[{extra}]'" if extra else f"pip install {module}"
        raise ConfigError(f"{what} needs the {module} package: {hint}") from None


def check_packages(cfg) -> None:
    if cfg.optim.optimizer in PACKAGES:
        require(*PACKAGES[cfg.optim.optimizer], f"optimizer {cfg.optim.optimizer}")
    if cfg.output.log_with in TRACKER_PACKAGES:
        require(*TRACKER_PACKAGES[cfg.output.log_with], f"log_with {cfg.output.log_with}")


def loraplus_groups(groups: list[dict], models: list[torch.nn.Module], ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): each group split in two, the B (lora_B, up) matrices at lr x ratio."""
    if not ratio:
        return groups
    b_ids = {id(p) for m in models for n, p in m.named_parameters() if "lora_B" in n}
    out = []
    for g in groups:
        a = [p for p in g["params"] if id(p) not in b_ids]
        b = [p for p in g["params"] if id(p) in b_ids]
        if not b:
            out.append(g)
            continue
        out += [{**g, "params": a}] if a else []
        out.append({**g, "params": b, "lr": g["lr"] * ratio})
    if not any(id(p) in b_ids for g in groups for p in g["params"]):
        raise ConfigError("optim.loraplus_ratio needs LoRA B matrices (lora_B) and this adapter has none; "
                          "set it to 0")
    return out


def make_optimizer(cfg, groups: list[dict], device) -> torch.optim.Optimizer:
    """The configured optimizer over these parameter groups (each with its own lr)."""
    name, lr, wd = cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay
    if name == "adamw8bit":
        import bitsandbytes as bnb  # present: train() checked before loading

        return bnb.optim.AdamW8bit(groups, weight_decay=wd)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, weight_decay=wd)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # the configured lr and schedule rule: no relative step (which ignores lr), no parameter scaling
        return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=wd)
    if name == "adamw-schedulefree":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(groups, lr=lr, warmup_steps=cfg.optim.warmup_steps, weight_decay=wd)
        opt.train()
        return opt
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(groups, fused=device.type == "cuda" and cfg.speed.fused_optimizer, weight_decay=wd)


def scheduler_warmup(cfg) -> int:
    """Warm-up steps of the LR schedule: none with schedule-free, which warms up inside the optimizer."""
    return 0 if cfg.optim.optimizer == "adamw-schedulefree" else cfg.optim.warmup_steps


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's tensors (its state per parameter, as a checkpoint stores it)."""
    def size(v) -> int:
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return sum(size(x) for x in v) if isinstance(v, (list, tuple)) else 0

    return size(optimizer.state_dict()["state"])


def make_ema(cfg, params: list[torch.nn.Parameter]):
    """diffusers' EMAModel over the LoRA parameters: its decay ramps as (1+n)/(10+n) (or, with ema_warmup, as
    1-(1+n)^(-2/3)) up to ema_decay; None when EMA is off."""
    if not cfg.optim.ema_decay or not params:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.optim.ema_decay, use_ema_warmup=cfg.optim.ema_warmup, power=2 / 3,
                    foreach=True)


@contextlib.contextmanager
def evaluation_weights(optimizer, ema, params: list[torch.nn.Parameter]):
    """Inside: the parameters hold the weights to evaluate and save (the EMA, or schedule-free's x); after: exactly
    the training weights again (restored from a copy, so no rounding creeps into the run)."""
    schedule_free = hasattr(optimizer, "eval") and "train_mode" in optimizer.param_groups[0]
    if ema is None and not schedule_free:
        yield
        return
    saved = [p.detach().clone() for p in params]
    if schedule_free:
        optimizer.eval()
    if ema is not None:
        ema.copy_to(params)
    try:
        yield
    finally:
        if schedule_free:
            optimizer.train()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
