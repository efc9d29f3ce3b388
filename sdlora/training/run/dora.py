"""DoRA with its magnitude on the input axis: the layout AUTOMATIC1111 v1.10 applies (`network.py`,
`apply_weight_decompose`: one magnitude per input column, dora_scale [1, in] / [1, in, 1, 1]) and ComfyUI applies
exactly (the input-axis branch of `weight_decompose`), and the only DoRA file that is exact in both.

peft's DoRA (`LoraConfig(use_dora=True)`) keeps its magnitude on the output axis (`lora_magnitude_vector` [out]) and
peft has no input-axis variant, so this is sdlora's own small addition on top of peft's plain LoRA layers. Because
W' = (W + s·BA) · diag(m / ‖W + s·BA‖_col), the adapted layer computes W'x = (W + s·BA)(x ⊙ m / ‖W + s·BA‖_col): the
peft layer runs unchanged on its input scaled per input channel, which a forward pre-hook does. As peft does for its
own DoRA (DoRA paper, section 4.3), the norm is detached: that changes the gradients only, never the values.
"""

from __future__ import annotations

import torch

from ...loras.modules import weight_norm
from ...loras.networks import INPUT_MAGNITUDE as MAGNITUDE


def add_input_dora(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer of `model` an input-axis magnitude, started at ‖W‖ per input column (B = 0, so the
    model is unchanged), and the pre-hook that applies it. Returns how many layers got one."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A and not hasattr(module, MAGNITUDE):
            start = weight_norm(_merged_weight(module), "input").flatten()
            setattr(module, MAGNITUDE, torch.nn.ParameterDict({"default": torch.nn.Parameter(start)}))
            module.register_forward_pre_hook(_scale_input)
            count += 1
    return count


def _merged_weight(module) -> torch.Tensor:
    """W + s·BA in fp32 (a 4-bit base dequantized first)."""
    from peft.utils.integrations import dequantize_module_weight

    base = dequantize_module_weight(module.get_base_layer()).float()
    return base + module.get_delta_weight("default").float().to(base.device)


def _scale_input(module, args):
    """x -> x ⊙ m / ‖W + s·BA‖_col (channel dim 1 for a conv, the last one for a Linear) while the adapter is on."""
    if module.disable_adapters or module.merged or "default" not in module.active_adapters:
        return None
    x = args[0]
    norm = weight_norm(_merged_weight(module), "input").flatten().detach()
    factor = (getattr(module, MAGNITUDE)["default"] / norm).to(x.dtype)
    if isinstance(module.get_base_layer(), torch.nn.Conv2d):
        factor = factor[:, None, None]
    return (x * factor, *args[1:])


def is_dora(module) -> bool:
    """A peft LoRA layer with a DoRA magnitude: peft's output-axis one (use_dora) or sdlora's input-axis one."""
    return hasattr(module, MAGNITUDE) or any(getattr(module, "use_dora", {}).values())


def at_strength(module, strength: float) -> list:
    """Make a DoRA layer compute what A1111 (finalize_updown: (W' - W) x strength) and ComfyUI (weight_decompose:
    W + strength (W' - W)) apply at a strength: base + strength (DoRA output - base), W' being the full DoRA weight.
    Scaling its LoRA instead would keep the magnitude fully applied. Returns the hook handles to remove."""
    seen = []

    def keep_input(mod, args):
        seen[:] = [args[0]]

    def mix(mod, args, output):
        base = mod.get_base_layer()(seen[0])
        return base + strength * (output - base)

    return [module.register_forward_pre_hook(keep_input, prepend=True), module.register_forward_hook(mix)]
