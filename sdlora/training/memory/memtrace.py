"""A training step's memory, measured on the meta device (no weights, no data): the real setup pieces and the real
step run on models built on `meta`, with every tensor they put on the job's device kept there (`OnMeta`).

Two counts are taken over one forward and backward: the bytes autograd saves for backward
(`torch.autograd.graph.saved_tensors_hooks`, each storage once) and the peak of all live tensors (a dispatch mode that
follows every storage to its release), which adds the backward's transients and the recomputation of gradient
checkpointing. Attention is measured as a flash / memory-efficient kernel stores it (q, k, v, out and log-sum-exp): on
meta, PyTorch's SDPA falls back to its math path and would count the attention-probability matrices. Mixed precision
is emulated as CUDA's (or the CPU's) autocast casts each op's inputs, so bf16 runs save what they save on the device.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class FlashAttention(torch.autograd.Function):
    """Meta stand-in for a flash / memory-efficient SDPA kernel: saves q, k, v, the output (laid out as the kernels
    write it, (B, L, H, D), so the attention's output projection reads a view of it) and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class CPULayerNorm(torch.autograd.Function):
    """Meta stand-in for the CPU's layer norm of a bf16/fp16 input without fp32 weights: it saves its mean and rstd in
    the input's dtype, where the meta kernel makes them fp32 (as CUDA's does)."""

    @staticmethod
    def forward(ctx, x, dims: int):
        shape = (*x.shape[: x.dim() - dims], *(1,) * dims)
        ctx.save_for_backward(x, x.new_empty(shape), x.new_empty(shape))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(ctx.saved_tensors[0]), None


def _cpu_layer_norm(args, kwargs):
    """CPULayerNorm for F.layer_norm's arguments where the CPU kernel keeps its statistics low, else None."""
    x, shape = args[0], args[1] if len(args) > 1 else kwargs["normalized_shape"]
    affine = [args[i] if len(args) > i else kwargs.get(name) for i, name in ((2, "weight"), (3, "bias"))]
    if x.dtype in (torch.bfloat16, torch.float16) and all(p is None or p.dtype == x.dtype for p in affine):
        return CPULayerNorm.apply(x, len(shape))
    return None


_LOW = (F.linear, F.conv1d, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, torch.mm,
        F.scaled_dot_product_attention)
_FP32 = {"cuda": (F.group_norm, F.layer_norm, F.softmax, F.log_softmax, F.mse_loss),
         "cpu": (F.mse_loss,)}


class OnMeta(TorchFunctionMode):
    """Code written for a device runs on meta: a tensor moved to any device (`.to`, `.cpu()`, `.cuda()`) or made
    on one (a factory's `device=`) is put on the meta device instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.call(*_on_meta(func, args, kwargs or {}))

    def call(self, func, args, kwargs):
        return func(*args, **kwargs)


def _on_meta(func, args, kwargs):
    """(func, args, kwargs) with the device they name made meta."""
    if func in (torch.Tensor.cpu, torch.Tensor.cuda):
        return torch.Tensor.to, (args[0], "meta"), {}
    if func is torch.Tensor.to:
        copy = kwargs.get("copy", False)
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(
            *args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
        if device is not None:
            return func, (args[0],), {"device": "meta", "dtype": dtype, "non_blocking": non_blocking, "copy": copy,
                                      "memory_format": memory_format or torch.preserve_format}
    elif kwargs.get("device") is not None:
        kwargs = {**kwargs, "device": "meta"}
    return func, args, kwargs


class MetaStep(OnMeta):
    """`OnMeta`, with flash attention instead of SDPA's math fallback, and autocast's casts: `low` (bf16/fp16, None =
    no autocast) for matrix products and convolutions, fp32 for the ops `device`'s autocast runs in fp32; under CPU
    autocast, layer norms save what the CPU kernel saves."""

    def __init__(self, low: torch.dtype | None = None, device: str = "cuda"):
        super().__init__()
        self.low, self.device, self.fp32 = low, device, _FP32[device] if low is not None else ()

    def call(self, func, args, kwargs):
        if self.low is not None and func in _LOW:
            args, kwargs = _cast(args, self.low), _cast(kwargs, self.low)
        elif func in self.fp32:
            args, kwargs = _cast(args, torch.float32), _cast(kwargs, torch.float32)
        if func is F.scaled_dot_product_attention:
            return FlashAttention.apply(*args[:3])
        if func is F.layer_norm and self.device == "cpu" and self.low is not None:
            out = _cpu_layer_norm(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _cast(tree, dtype):
    def one(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype else x

    if isinstance(tree, dict):
        return {k: one(v) for k, v in tree.items()}
    return tuple(one(x) for x in tree)


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage an op creates, from creation to release (each storage once), and their peak.
    Storages in `ignore` (the weights) are not counted."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.live, self.now, self.peak = ignore, {}, 0, 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key not in self.live and key not in self.ignore:
                    self.live[key] = s.nbytes()
                    self.now += self.live[key]
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(s, self._free, key)
        return out


@dataclass
class Trace:
    saved: int   # bytes autograd holds for backward at the end of the forward
    peak: int    # peak of live activation bytes over forward and backward


def storages(*modules: torch.nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers())}


def checkpointing(model: torch.nn.Module, mode_factory) -> None:
    """Where `model` checkpoints (as setup made it), diffusers' / transformers' non-reentrant gradient checkpointing
    with the recomputation run under the same emulation as the forward (else the recomputed tensors' dtypes differ from
    the saved ones)."""
    from torch.utils.checkpoint import checkpoint

    on = getattr(model, "is_activation_checkpointing", None)  # transformers (5: the new name), else diffusers
    if not (model.is_gradient_checkpointing if on is None else on):
        return
    ckpt = functools.partial(checkpoint, use_reentrant=False,
                             context_fn=lambda: (contextlib.nullcontext(), mode_factory()))
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt)
    else:  # transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(), mode_factory())})


def trace(step, modules: list[torch.nn.Module], mode_factory, backward: bool = True) -> Trace:
    """Run `step()` (a meta forward returning a scalar loss, or None under no_grad) and its backward; count saved and
    peak live bytes. The weights of `modules` are not counted (those made in `step`, as a dtype cast makes them, are
    taken off the peak), nor the gradients of their trainable parameters (dropped as they are formed: a run holds
    them with its optimizer state)."""
    ignore = storages(*modules)
    saved: dict[int, weakref.ref] = {}  # a graph dropped in the forward (DoRA's detached weight norm) frees its own

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in ignore:
            saved[s._cdata] = weakref.ref(s)
        return t.detach()  # the tensor itself would tie an op's saved output to its graph in a reference cycle:
        # a dropped graph would then live on until garbage collection

    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for m in modules for p in m.parameters() if p.requires_grad]
    live = LiveBytes(ignore)
    try:
        with live:
            with mode_factory(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = step()
            held = sum(s.nbytes() for s in (ref() for ref in saved.values()) if s is not None)
            if backward and loss is not None and loss.requires_grad:
                loss.backward()
            del loss
    finally:
        for h in hooks:
            h.remove()
    made = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for m in modules for t in (*m.parameters(), *m.buffers())}
    return Trace(held, live.peak - sum(n for key, n in made.items() if key not in ignore))
