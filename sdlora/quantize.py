"""QLoRA: the frozen base's Linear layers in 4-bit NF4 through bitsandbytes, with the LoRA in 16/32-bit on top.

The layers are swapped for `bnb.nn.Linear4bit` after loading and quantized as they move to the training device, so
one code path serves CUDA and the CPU (bitsandbytes >= 0.47 runs 4-bit layers there), diffusers folders and single
files alike. peft wraps `Linear4bit` with its own LoRA layer, so the saved LoRA is the same file as over a full base.
"""

from __future__ import annotations

import importlib.metadata

import torch
from packaging.version import Version
from torch import nn

from .errors import ModelError

# the first releases whose CPU backend runs them (measured: 0.46 cannot quantize sizes that are not a multiple of
# 64, 0.49 has no CPU 8-bit AdamW)
CPU_SINCE = {"nf4": "0.47", "adamw8bit": "0.50"}


def require_bitsandbytes(feature: str, what: str) -> None:
    """Raise a one-line ModelError unless bitsandbytes can run `feature` ('nf4' or 'adamw8bit') here: CUDA, or the
    CPU from the release in CPU_SINCE. `what` names it for the user."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"{what} needs bitsandbytes: pip install 'sdlora[qlora]'") from None
    need = CPU_SINCE[feature]
    if not torch.cuda.is_available() and Version(version) < Version(need):
        raise ModelError(f"{what} on the CPU needs bitsandbytes >= {need} (this is {version}): "
                         f"pip install -U 'bitsandbytes>={need}'")


def quantize_nf4(model: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Replace every nn.Linear in `model` by a 4-bit NF4 layer stored on `device`.

    Convolutions, norms and embeddings keep their dtype, as in diffusers' and transformers' 4-bit loaders."""
    import bitsandbytes as bnb

    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no Linear layers to quantize")
    for name, old in linears:
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        # On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a layer's weight in place, for inference only, the
        # first time it runs in eval mode without gradients (a sample render, text caching): the repacked layer has
        # no backward, dequantize_4bit cannot read it, and the repack fails outright when in_features is below its
        # 64-value block. Keep the one layout that trains.
        new.support_avx512bf16_for_cpu = False
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        new.to(device)  # Params4bit quantizes on its first move
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
