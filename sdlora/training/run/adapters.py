"""LoRA adapters through peft: pick the target layers, inject adapters, read and write their weights."""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ...errors import TrainingError
from ...loras.networks import NETWORKS, PEFT_PREFIXES, ZERO_START, conv_rank_alpha


def target_modules(model: torch.nn.Module, patterns, keep=None) -> list[str]:
    """Full names of the Linear/Conv2d modules whose name ends with one of the patterns (and that `keep(name)`
    accepts, when given)."""
    rx = re.compile(r"(^|\.)(" + "|".join(patterns) + r")$")
    return [name for name, m in model.named_modules()
            if rx.search(name) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (keep is None or keep(name))]


def inject(model: torch.nn.Module, patterns, rank: int, alpha: float, dropout: float = 0.0,
           what: str = "denoiser", network: str = "lora", args: dict | None = None, keep=None,
           layers=None) -> list[str]:
    """Add a trainable adapter that leaves the model unchanged at the start (the network's zero-start tensor: LoRA's
    and DoRA's B, LoHa's w2_b, LoKr's w2) to the matched layers, through the network's peft config (LoraConfig, DoRA on
    the output axis with use_dora; LoHaConfig; LoKrConfig), with peft's layers made to compute what LyCORIS's do
    where they differ; input-axis DoRA is peft's LoRA with sdlora's magnitude on top (`dora.py`). `layers(names)`,
    when given, says which matched layers get an adapter and each one's (rank, alpha) (per-block settings)."""
    names = target_modules(model, patterns, keep)
    if not names:
        raise TrainingError(f"LoRA targets {list(patterns)} matched no layer of the {what}; choose other targets")
    own = layers(names) if layers is not None else None
    if own is not None:
        names = [n for n in names if n in own]
        if not names:
            raise TrainingError(f"the per-block settings leave no {what} layer with LoRA (every rank or learning "
                                "rate is 0)")
    net, args = NETWORKS[network], args or {}
    with lycoris_factorization() if net.lycoris_split else nullcontext():
        model.add_adapter(adapter_config(model, names, rank, alpha, dropout, network, args, own))
    if net.input_magnitude(args):
        from .dora import add_input_dora

        add_input_dora(model)
    if net.full_factors_at_scale_one:
        full_factors_at_scale_one(model)
    if net.unscaled_rank_dropout:
        unscaled_rank_dropout(model)
    return names


def unscaled_rank_dropout(model: torch.nn.Module) -> None:
    """peft's LoHa divides the rows kept by rank_dropout by their share (inverted dropout); LyCORIS's LohaModule
    (rank_dropout_scale=False, its default and what kohya's networks use) and peft's own LoKr do not: make peft's
    LoHa layers drop rows as LyCORIS does (the same draws, no rescale)."""
    for m in model.modules():
        if "default" in getattr(m, "hada_w1_a", {}) and m.rank_dropout.get("default"):
            m.get_delta_weight = partial(_unscaled_rank_dropout, m, type(m).get_delta_weight)


def _unscaled_rank_dropout(layer, delta, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
    w = delta(layer, adapter_name)
    if apply_rank_dropout:
        keep = (torch.rand(w.size(0)) > layer.rank_dropout[adapter_name]).to(w.dtype)
        w = w * keep.view(-1, *[1] * (w.dim() - 1)).to(w.device)
    return w


@contextmanager
def lycoris_factorization():
    """peft's LoKr splits a dimension by `decompose_factor` as (factor, dim / factor) where LyCORIS's factorization()
    (lycoris/functional/general.py, which kohya's LyCORIS networks use) puts the smaller part first: 320 with factor
    32 is (32, 10) in peft, (10, 32) in LyCORIS. The first part sizes w1, the second w2, so one `factor` builds two
    different networks; while peft builds its layers here, its split is ordered as LyCORIS's (the same otherwise)."""
    from peft.tuners.lokr import layer

    peft_split = layer.factorization
    layer.factorization = lambda dimension, factor=-1: tuple(sorted(peft_split(dimension, factor)))
    try:
        yield
    finally:
        layer.factorization = peft_split


def full_factors_at_scale_one(model: torch.nn.Module) -> None:
    """A LoKr layer with both factors full (lokr_w1 and lokr_w2) has scale 1 in LyCORIS (its alpha is set to the rank,
    lycoris/modules/lokr.py) and in every loader, where peft scales by alpha / r: set peft's alpha and scale so."""
    for m in model.modules():
        if "default" in getattr(m, "lokr_w1", {}) and "default" in getattr(m, "lokr_w2", {}):
            m.alpha["default"], m.scaling["default"] = m.r["default"], 1.0


def adapter_config(model, names: list[str], rank: int, alpha: float, dropout: float, network: str, args: dict,
                   own: dict | None = None):
    """The peft config of one model's adapter; 3x3 (k x k) convs get conv_rank / conv_alpha (LyCORIS's conv_dim /
    conv_alpha) through rank_pattern / alpha_pattern, keyed by their exact module names (anchored: peft matches a
    pattern at the end of a name); `own` {name: (rank, alpha)} gives every layer its own instead."""
    import peft

    patterns = {}
    if own is not None:
        odd = {n: own[n] for n in names if tuple(own[n]) != (rank, alpha)}
        patterns = {"rank_pattern": {"^" + re.escape(n): r for n, (r, _) in odd.items()},
                    "alpha_pattern": {"^" + re.escape(n): a for n, (_, a) in odd.items()}}
    elif args.get("conv_rank") or args.get("conv_alpha"):
        convs = [n for n in names if getattr(model.get_submodule(n), "kernel_size", (1, 1)) != (1, 1)]
        conv_rank, conv_alpha = conv_rank_alpha(rank, alpha, args)
        patterns = {"rank_pattern": {re.escape(n): conv_rank for n in convs},
                    "alpha_pattern": {re.escape(n): conv_alpha for n in convs}}
    net = NETWORKS[network]
    return getattr(peft, net.peft_config)(r=rank, target_modules=names, **net.peft_options(alpha, dropout, args),
                                          **patterns)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters (everything else stays frozen)."""
    return list(named_lora_parameters(model).values())


def named_lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if any(x in n for x in PEFT_PREFIXES) and p.requires_grad}


def layer_ranks(model: torch.nn.Module) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} of every adapted layer (they differ from the config's with conv_rank)."""
    out = {}
    for path, m in model.named_modules():
        r = getattr(m, "r", None)
        if isinstance(r, dict) and "default" in r:
            alpha = getattr(m, "lora_alpha", None) or getattr(m, "alpha", {})
            out[path] = (r["default"], float(alpha["default"]))
    return out


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft state dict with module paths: '<path>.lora_A.weight' / '<path>.lora_B.weight'."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainingError(f"checkpoint has LoRA weights for unknown layers, e.g. {unexpected[0]}")


def started_at_zero(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of the tensors that start at zero, one per adapted module (each network's zero_start)."""
    return [k for k in state if k.endswith(ZERO_START)]


def zero_update_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Modules whose zero-started tensor (LoRA's B, LoHa's w2_b, LoKr's w2) is still all zeros: they change nothing."""
    return [next(k.removesuffix(s) for s in ZERO_START if k.endswith(s))
            for k in started_at_zero(state) if not torch.any(state[k] != 0)]
