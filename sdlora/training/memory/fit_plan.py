"""What the device offers, and the cheapest settings that make a training job fit it (`sdlora fit`, and the warning
before every training start); the estimate itself is `fit.estimate`."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...config import Config, validate
from ...errors import ConfigError
from .fit import CUDA_CONTEXT, Estimate, GiB, MetaModel, estimate, meta_model, text_trained


def parse_size(text: str) -> int:
    """'12GB', '12 GiB', '12g', '12288MB' -> bytes. GPU makers' 'GB' of memory are GiB (a 12 GB card has 12288 MiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([gGmM]?)(i?[bB])?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"memory size {text!r} is not like 12GB or 8192MB")
    return int(float(m.group(1)) * (2**20 if m.group(2).lower() == "m" else GiB))


def device_budget(device: str, vram: int | None = None) -> tuple[int, str]:
    """(bytes this job may use, where they are): `vram` when given; the GPU's free memory plus the context this
    process already holds; the CPU's MemAvailable plus this process's own resident memory."""
    if vram:
        return vram, "the given memory"
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free + CUDA_CONTEXT, f"{torch.cuda.get_device_name()} ({total / GiB:.1f} GiB, {free / GiB:.1f} free)"
    available = _mem_available()
    return available + _rss(), f"this machine ({available / GiB:.1f} GiB available)"


def _mem_available() -> int:
    """MemAvailable (Linux); elsewhere the free pages POSIX reports."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise ConfigError("cannot tell how much memory this machine has free; give --vram SIZE") from None


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _changes(cfg: Config, model: MetaModel):
    """The changes that lower the peak, cheapest first: (what, change the config in place; False when it cannot).
    The free ones come first; then those that change what the model is trained as (an NF4 base, no T5: the LoRA
    then matches a model without T5's embeddings), and a lower resolution last."""
    def cache(c):
        can = (not c.train.cache_latents and c.augment.crop == "center") or \
              (not c.train.cache_text and not any(text_trained(c, 2)))
        c.train.cache_latents = c.train.cache_latents or c.augment.crop == "center"
        c.train.cache_text = c.train.cache_text or not any(text_trained(c, 2))
        return can

    def setter(section, name, value):
        def apply(c):
            old = getattr(getattr(c, section), name)
            setattr(getattr(c, section), name, value)
            return old != value
        return apply

    def halve_batch(c):
        if c.train.batch_size < 2:
            return False
        c.train.batch_size, c.train.grad_accum = c.train.batch_size // 2, c.train.grad_accum * 2
        return True

    def lower_resolution(c):
        res = c.augment.resolution or 0
        new = (res * 3 // 4) // 64 * 64
        if new < 256:
            return False
        c.augment.resolution = new
        return True

    yield "caching", cache
    yield "SDPA attention", setter("speed", "attention", "sdpa")
    yield "8-bit AdamW", setter("optim", "optimizer", "adamw8bit")
    yield "gradient checkpointing", setter("train", "gradient_checkpointing", True)
    for _ in range(8):
        yield _HALVE, halve_batch
    yield "an NF4 base", setter("model", "quantize", "nf4")
    if model.frozen_slots:
        yield "no T5", setter("model", "t5", False)
    for _ in range(3):
        yield "a lower resolution", lower_resolution


def fit_plan(cfg: Config, device: str, budget: int, model: MetaModel | None = None,
             n_images: int | None = None) -> tuple[Config, Estimate] | None:
    """The cheapest settings that fit `budget`: the changes of `_changes` added in order until the estimate fits,
    then each added change that is not needed taken back. None when even all of them do not fit."""
    model = model or meta_model(cfg.model_path, cfg.model.text_encoders)
    trial = copy.deepcopy(cfg)
    est = estimate(trial, device, model, n_images)
    trial.augment.resolution, applied = est.resolution, []
    for what, change in _changes(trial, model):
        if est.total <= budget:
            break
        before = copy.deepcopy(trial)
        if change(trial):
            applied.append((what, before))
            est = estimate(trial, device, model, n_images)
    if est.total > budget:
        return None
    for what, before in list(applied[:-1]):  # drop a cheap change the later ones made unnecessary
        undone = _undo(trial, cfg, what, before)
        if undone is not None:
            e = estimate(undone, device, model, n_images)
            if e.total <= budget:
                trial, est = undone, e
    return trial, est


_FIELDS = {"caching": [("train", "cache_latents"), ("train", "cache_text")],
           "SDPA attention": [("speed", "attention")], "8-bit AdamW": [("optim", "optimizer")],
           "gradient checkpointing": [("train", "gradient_checkpointing")], "an NF4 base": [("model", "quantize")],
           "no T5": [("model", "t5")]}


_HALVE = "a smaller batch with gradient accumulation"


def _undo(trial: Config, original: Config, what: str, before: Config) -> Config | None:
    """`trial` with the change `what` taken back (its setting in `original`); a batch halving goes back to the batch
    `before` it, one halving at a time (in the order applied, the largest batch is tried first). None: it cannot."""
    if what == _HALVE and before.train.batch_size > trial.train.batch_size:
        out = copy.deepcopy(trial)
        out.train.batch_size, out.train.grad_accum = before.train.batch_size, before.train.grad_accum
        return out
    if what not in _FIELDS:
        return None
    out = copy.deepcopy(trial)
    for section, name in _FIELDS[what]:
        setattr(getattr(out, section), name, getattr(getattr(original, section), name))
    return out


def changed_flags(before: Config, after: Config) -> list[str]:
    """The command-line flags that turn `before` into `after`."""
    from dataclasses import fields

    from ...config import SECTIONS, flag_name

    flags = []
    for section in SECTIONS:
        for f in fields(getattr(before, section)):
            a, b = getattr(getattr(before, section), f.name), getattr(getattr(after, section), f.name)
            if a != b:
                name = flag_name(f)
                flags.append((f"--{name}" if b else f"--no-{name}") if isinstance(b, bool) else f"--{name} {b}")
    return flags


@dataclass
class FitCheck:
    """Will a job fit: its estimate, what the device offers, and (when it does not fit) the cheapest settings that
    do: `plan` (None when nothing sdlora can change makes it fit) with its estimate and the flags that make it."""

    estimate: Estimate
    budget: int
    where: str
    model: MetaModel
    plan: Config | None = None
    plan_estimate: Estimate | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget


def check_fit(cfg: Config, device: str | None = None, vram: int | None = None) -> FitCheck:
    """The fit check of `sdlora fit` and the web UI: the job's estimated peak against `vram` bytes of a CUDA GPU (or
    this machine's `device`: CUDA when there is a GPU, else the CPU) and, when it does not fit, the cheapest plan."""
    validate(cfg, check_paths=False)  # a setting out of its bounds (batch size 0) is its one-line error, not a trace's
    device = "cuda" if vram else device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not vram and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU here; give the memory of the GPU to plan for (--vram SIZE)")
    budget, where = device_budget(device, vram)
    model = meta_model(cfg.model_path, cfg.model.text_encoders)
    result = FitCheck(estimate(cfg, device, model), budget, where, model)
    if not result.fits:
        plan = fit_plan(cfg, device, budget, model)
        if plan is not None:
            result.plan, result.plan_estimate = plan
            result.flags = changed_flags(cfg, plan[0])
    return result


def warn_if_too_big(cfg: Config, device: torch.device, say) -> Estimate | None:
    """Before training: one line through `say` when the job's estimated peak exceeds what the device has. Advisory:
    a model whose configs cannot be read is not an error here (loading it will say what is wrong)."""
    import logging

    try:
        est = estimate(cfg, device.type)
        budget, where = device_budget(device.type)
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a run
        logging.getLogger(__name__).info("memory estimate skipped: %s", e)
        return None
    if est.total > budget:
        say(f"warning: this job needs about {est.total / GiB:.1f} GiB at its peak and {where} has "
            f"{budget / GiB:.1f} GiB for it; `sdlora fit` with the same job and flags proposes settings that fit")
    return est
