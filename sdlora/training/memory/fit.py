"""Will a training job fit in memory? An estimate of its peak from the model's architecture (`fit_plan` finds the
cheapest changes that make it fit).

peak = weights (each part in its dtype: the denoiser and text encoders in the training precision on CUDA, fp32 on the
CPU, NF4 Linear layers at 4 bits plus their quantization state; the VAE fp32; every part stays on the device)
     + trainable state (LoRA weights, gradients and optimizer state, fp32)
     + cached latents and text embeddings
     + the step's activations at their peak (measured on the meta device, `memtrace`)
     + overhead (CUDA: the context and the caching allocator's slack; CPU: the process's own libraries).

SD3's T5 (the family's frozen encoder) encodes every caption once before the steps and is released: it counts in the
peak before the steps (`Estimate.load`), not in the step's. With captions that change every step (shuffled or dropped
tags) it stays and encodes each batch: its weights count in the step's peak. `--no-t5` leaves it out.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...config import Config
from ...errors import ModelError
from ...families import FAMILIES, Family, TextEncoderSlot, folder_family
from ...models import Components
from ..inputs.data import IMAGE_EXTS
from .memtrace import MetaStep, OnMeta, Trace, checkpointing, trace

GiB = 2**30
CUDA_CONTEXT = int(0.6 * GiB)   # CUDA context, cuBLAS/cuDNN workspaces (outside PyTorch's allocator counts)
CUDA_SLACK = 0.10               # the caching allocator reserves about this much beyond what is allocated
CPU_BASELINE = int(0.45 * GiB)  # a process with torch, diffusers, transformers and peft imported (measured: 0.41)
# bytes of optimizer state per LoRA parameter (Adam m and v; 8-bit: one byte each), as measured by
# `scripts/bench_train.py --optimizers` on rank-4 LoRA (Adafactor's factored moments depend on the shapes)
OPTIMIZER_STATE = {"adamw": 8, "adamw8bit": 2, "adamw-schedulefree": 8, "prodigy": 14, "adafactor": 1, "lion": 4}


@dataclass
class MetaModel:
    """A model's family and the configs of its parts (diffusers/transformers models, the scheduler), to build on the
    meta device."""

    family: Family
    configs: dict            # denoiser (unet / transformer), vae, text encoders, frozen encoders, scheduler -> config
    source: str

    @property
    def key(self) -> str:
        import json

        return json.dumps(self.configs, sort_keys=True, default=str)

    @property
    def denoiser_config(self) -> dict:
        return self.configs[self.family.denoiser_attr]

    @property
    def frozen_slots(self) -> list[TextEncoderSlot]:
        """The family's frozen encoders this model has (SD3's T5, where it has one)."""
        return [s for s in self.family.frozen_encoders if s.attr in self.configs]

    def components(self, cfg: Config) -> Components:
        """The parts as `models.load_components` gives them, on the meta device (as loaded: fp32, frozen; T5 as
        `cfg.model.t5` loads it), with tokenizers that give every caption its full length of token ids."""
        import diffusers

        from ...models import freeze, frozen_text, training_scheduler

        fam, sched = self.family, dict(self.configs["scheduler"])
        with torch.device("meta"), _quiet():
            denoiser = getattr(diffusers, fam.denoiser_class).from_config(self.denoiser_config)
            vae = diffusers.AutoencoderKL.from_config(self.configs["vae"])
            encoders = [_encoder(s, self.configs[s.attr]) for s in fam.text_encoders]
            t5 = {s.attr: _encoder(s, self.configs[s.attr]) for s in self.frozen_slots if cfg.model.t5}
        frozen = [frozen_text(fam, t5.get(s.attr), _Tokenizer(0), denoiser.config, cfg.model.t5_max_length)
                  for s in fam.frozen_encoders]
        sample = getattr(diffusers, sched.pop("_class_name")).from_config(sched)
        return freeze(Components(fam, self.source, denoiser, vae,
                                 [_Tokenizer(e.config.max_position_embeddings) for e in encoders], encoders,
                                 *training_scheduler(sample, cfg.model.prediction_type, fam), frozen))


def _encoder(slot: TextEncoderSlot, config: dict):
    import transformers

    cls = getattr(transformers, slot.model_class)
    return cls(cls.config_class.from_dict(config))


class _Tokenizer:
    """Stands in for a tokenizer on meta: every caption is `max_length` token ids (zeros)."""

    def __init__(self, model_max_length: int):
        self.model_max_length = model_max_length

    def __call__(self, captions, max_length=None, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.zeros(len(captions), max_length or self.model_max_length,
                                                     dtype=torch.long))


class _quiet:
    """Silence the libraries' warnings while building and setting up on meta (training itself gives them)."""

    def __enter__(self):
        import logging

        self.loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def meta_model(source: str, text_encoders: str = "") -> MetaModel:
    """The configs of a diffusers folder, a hub id in the local cache, or a single-file checkpoint (from its header;
    the parts an SD3 file lacks from `text_encoders` or the shipped configs, as loading takes them); no weights are
    read. A frozen encoder (SD3's T5) is there where the model has one."""
    import diffusers

    from ...models import _load_scheduler

    if Path(source).is_file():
        from ...single_file import detect_checkpoint

        info = detect_checkpoint(source)
        family, configs = FAMILIES[info.family], info.configs
        if any(s.attr not in configs for s in (*family.text_encoders, *family.frozen_encoders)):
            configs = family.single_file.part_configs(configs, text_encoders)
        return MetaModel(family, {**configs, "scheduler": _shipped_scheduler(family, info.prediction_type)}, source)
    family = folder_family(source)
    try:
        configs = {family.denoiser_attr: dict(getattr(diffusers, family.denoiser_class).load_config(
                       source, subfolder=family.denoiser_attr)),
                   "vae": dict(diffusers.AutoencoderKL.load_config(source, subfolder="vae"))}
        for slot in family.text_encoders:
            configs[slot.attr] = _encoder_config(slot, source)
    except (OSError, ValueError) as e:
        raise ModelError(f"{source}: cannot read its configs: {str(e).splitlines()[0]}") from None
    for slot in family.frozen_encoders:
        with contextlib.suppress(OSError, ValueError):  # a model without T5 (it trains with --no-t5)
            configs[slot.attr] = _encoder_config(slot, source)
    sched = _load_scheduler(source)
    return MetaModel(family, {**configs, "scheduler": {**sched.config, "_class_name": type(sched).__name__}}, source)


def _shipped_scheduler(family: Family, prediction_type: str = "") -> dict:
    """The family's scheduler config as sdlora ships it (a single file's), with the model's prediction type."""
    from ...families.checkpoint import asset

    sched = asset(family.name, "scheduler")
    return {**sched, "prediction_type": prediction_type} if "prediction_type" in sched and prediction_type else sched


def _encoder_config(slot: TextEncoderSlot, source: str) -> dict:
    import transformers

    return getattr(transformers, slot.model_class).config_class.from_pretrained(source, subfolder=slot.attr).to_dict()


def random_model(family: str, **sizes) -> MetaModel:
    """The full-size random-weight models of `random_pipelines` (the benchmark's), as configs; SD3: SD3.5 Medium with
    T5-XXL (`sizes`: sd3_blocks, t5_layers)."""
    from ...random_pipelines import full_size_configs

    with _quiet():
        configs = full_size_configs(family, **sizes)
    return MetaModel(FAMILIES[family], {**configs, "scheduler": _shipped_scheduler(FAMILIES[family])},
                     f"random-{family}")


@dataclass
class Estimate:
    device: str                       # cuda | cpu
    precision: str                    # no | bf16 | fp16
    weights: dict[str, int]           # part -> bytes (held through the steps)
    lora_params: int
    trainable: int                    # LoRA weights + gradients + optimizer state
    cache: int                        # cached latents and text embeddings
    saved: int                        # activations autograd holds at the end of the forward
    activations: int                  # peak of the step's live activations (incl. a VAE encode when uncached)
    overhead: int
    notes: list[str] = field(default_factory=list)
    # the peak before the steps: CPU loading (every part in full precision, an NF4 base before it is quantized);
    # SD3's T5 encoding every caption before it is released (CUDA: alone on the device, with the context)
    load: int = 0
    resolution: int = 0               # the job's resolution (its own, else the model's)

    @property
    def allocated(self) -> int:
        """What PyTorch allocates at the step's peak (CUDA: torch.cuda.max_memory_allocated)."""
        return sum(self.weights.values()) + self.trainable + self.cache + self.activations

    @property
    def total(self) -> int:
        """What the device must have free: allocated plus overhead (CUDA: the GPU's memory; CPU: the process RSS), or
        the peak before the steps where that is higher."""
        return max(self.allocated + self.overhead, self.load)


def estimate(cfg: Config, device: str = "cuda", model: MetaModel | None = None,
             n_images: int | None = None) -> Estimate:
    """Peak memory of training `cfg` on `device` ('cuda' or 'cpu'). `model` defaults to the job's model (read from
    its configs), `n_images` to the images in its data folders."""
    from ..run.setup import mixed_precision

    model = model or meta_model(cfg.model_path, cfg.model.text_encoders)
    job, notes = cfg, []
    if cfg.is_slider:  # its denoising passes keep no graph; the pass that trains runs the target with its anchors
        notes.append("slider: the step that trains is estimated as an image step" +
                     (" of twice the batch (target and anchors)" if cfg.slider.anchors else ""))
        job = copy.deepcopy(cfg)
        job.train.batch_size *= 2 if cfg.slider.anchors else 1
    run, precision = traced_run(model, job, device), mixed_precision(cfg, device)
    trainable = sum(n * (4 + 4 + _optimizer_bytes(cfg.optim.optimizer, n)) for n in run.lora)  # fp32 weight, grad
    activations = run.step.peak
    if run.vae is not None:
        activations = max(activations, run.vae.peak)
        notes.append("inpainting: the VAE encodes the masked image every step" if run.inpainting else
                     "latents not cached: the VAE encodes every step")
    images = _count_images(cfg) if n_images is None else n_images
    cache = images * (2 if cfg.augment.random_flip else 1) * run.latent + (images + 2) * run.caption
    if run.kept:
        notes.append("T5 stays in memory: shuffled or dropped tags make a new caption every step")
    elif run.encode is not None:
        notes.append(f"T5 ({run.frozen / GiB:.2f} GiB) encodes every caption before the steps and is then released")
    if device == "cpu":  # T5's own per-caption cache (host memory)
        cache += (images + 2) * run.frozen_caption
    if cfg.model.t5 and model.family.frozen_encoders and not model.frozen_slots:
        notes.append("the model has no T5: it trains with --no-t5")
    encode = run.encode.peak if run.encode is not None and not run.kept else 0
    if device == "cuda":  # T5 encodes alone on the device (the other parts move there after it is released)
        overhead = CUDA_CONTEXT + int(CUDA_SLACK * activations)
        load = CUDA_CONTEXT + run.frozen + encode + int(CUDA_SLACK * encode) if encode else 0
    else:  # every part is loaded in fp32 before T5 encodes and NF4 quantizes
        overhead = CPU_BASELINE
        load = run.loaded + overhead + encode
        if cfg.model.quantize == "nf4":
            notes.append(f"loading holds the full-precision base before it is quantized: {load / GiB:.2f} GiB")
    return Estimate(device, precision, run.weights, sum(run.lora), int(trainable), int(cache), run.step.saved,
                    int(activations), overhead, notes, load, run.resolution)


def _optimizer_bytes(name: str, numel: int) -> int:
    """Optimizer state per parameter of one tensor: bitsandbytes keeps tensors under 4096 values in 32-bit."""
    if name == "adamw8bit" and numel < 4096:
        return 8
    return OPTIMIZER_STATE.get(name, 8)


def _count_images(cfg: Config) -> int:
    def count(folder: str) -> int:
        p = Path(folder)
        return sum(1 for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS) if folder and p.is_dir() else 0

    n = sum(count(folder.path) for folder in cfg.data)
    if cfg.prior.class_prompt and cfg.prior.mode == "images":
        n += cfg.prior.num_class_images
    elif cfg.prior.has_images:
        n += count(cfg.prior.class_data)
    return n


def text_trained(cfg: Config, n: int) -> tuple[bool, ...]:
    from ..run.setup import text_encoder_lrs

    return tuple(bool(lr) for lr in text_encoder_lrs(cfg, n))


@dataclass
class Run:
    """What the real setup and training step hold, traced on meta components."""

    resolution: int = 0
    loaded: int = 0                                # bytes of every part as loaded (fp32), before T5 is released
    weights: dict = field(default_factory=dict)    # part -> bytes held through the steps (T5 where it stays)
    frozen: int = 0                                # bytes of the frozen encoders (T5) as they encode
    kept: bool = False                             # T5 stays through the steps (captions that vary)
    lora: list = field(default_factory=list)       # values of each trainable tensor
    latent: int = 0                                # bytes of one cached latent (0: not cached)
    caption: int = 0                               # bytes of one caption in the text cache (0: not cached)
    frozen_caption: int = 0                        # bytes of one caption in T5's own cache
    encode: Trace | None = None                    # T5 encoding a chunk of captions before the steps
    vae: Trace | None = None                       # the VAE encoding an image every step (latents not cached)
    inpainting: bool = False                       # an inpainting base (its VAE encodes the masked image)
    step: Trace | None = None                      # one training step, forward and backward


_CACHE: dict[tuple, Run] = {}


def traced_run(model: MetaModel, cfg: Config, device: str) -> Run:
    """`_trace_run`, memoized within the process (proposals re-estimate the same job many times; the optimizer and
    gradient accumulation change nothing it measures)."""
    import dataclasses
    import json

    fields = dataclasses.asdict(cfg)
    del fields["optim"], fields["train"]["grad_accum"]
    key = (model.key, device, json.dumps(fields, sort_keys=True, default=str))
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = _trace_run(model, cfg, device)
    return _CACHE[key]


def _trace_run(model: MetaModel, cfg: Config, device: str) -> Run:
    """Setup's own pieces, in its order, on the meta model as they run on `device` (the tensors stay on meta): T5
    encoding the captions (then released, or kept for captions that vary), the weights placed (training precision,
    NF4), the attention kernel, the adapters (network, ranks, DoRA, text encoders), the latents and the text encoding;
    then the VAE encoding an image and one `training_step` with its backward."""
    from types import SimpleNamespace

    from ..run import setup as s
    from ..run.adapters import lora_parameters
    from ..run.pivotal import NoConcept

    precision, dev, run = s.mixed_precision(cfg, device), torch.device(device), Run()
    if cfg.speed.attention == "xformers":  # the same memory-efficient kernel as SDPA's, without needing xformers
        cfg = copy.deepcopy(cfg)
        cfg.speed.attention = "sdpa"
    c = model.components(cfg)
    with torch.random.fork_rng(devices=[]), _quiet(), _bitsandbytes_maps(cfg.model.quantize == "nf4"), OnMeta():
        s.check_family_options(cfg, c)
        run.resolution = s.resolve_resolution(cfg, c)[0]
        t5 = [f.model for f in c.frozen_text if f.model is not None]
        run.loaded = weight_bytes(*_parts(c).values(), *t5)
        varying = s.captions_vary(cfg)
        captions = [f"caption {i}" for i in range(max(cfg.train.batch_size, s.FROZEN_TEXT_CHUNK))]
        if t5:
            run.encode = trace(lambda: s.cache_frozen_text(cfg, c, dev, precision, varying, lambda _: None, captions),
                               t5, lambda: MetaStep(None, device), backward=False)
            run.frozen = weight_bytes(*t5)  # in the dtype it encodes in
        kept = {slot.attr: f.model for slot, f in zip(c.family.frozen_encoders, c.frozen_text) if f.model is not None}
        dtype = s.place_models(cfg, c, dev, precision)
        s.apply_speed(cfg, c, dev)
        run.weights, run.kept = {part: weight_bytes(m) for part, m in {**_parts(c), **kept}.items()}, bool(kept)
        adapters = s.add_adapters(cfg, c, NoConcept())  # pivotal tuning's embeddings are not counted
        models = s.step_models(cfg, c, adapters, c.denoiser, c.text_encoders, dev)
        models.dop = s.trigger_swap(cfg, NoConcept())
        no_optimizer = SimpleNamespace(params=[], step=None)
        models.text.trainable = NoConcept().phases(no_optimizer, adapters.text_lora).main.text_trainable
        inpainting = c.family.inpainting(c.denoiser.config)
        latents = s.make_latents(cfg, c, dev, dtype, inpainting)
    modules = [*_parts(c).values(), *t5]
    run.lora = [p.numel() for m in modules for p in lora_parameters(m)]
    run.vae, latent = _trace_encode(latents, run.resolution, modules, device)
    step_captions = [("varied " if varying else "") + t for t in captions[:cfg.train.batch_size]]
    run.step = _trace_step(cfg, c, modules, models, latent, step_captions, run.resolution, precision, device,
                           inpainting)
    if latents.cached:  # an inpainting base's VAE still encodes the masked image every step
        run.latent, run.vae = _nbytes(latent), run.vae if inpainting else None
    run.inpainting = inpainting
    run.caption = next((_nbytes(*v.values()) for v in models.text.cache.values()), 0)
    run.frozen_caption = next((_nbytes(v) for f in c.frozen_text for v in f.cache.values()), 0)
    return run


def _trace_encode(latents, res: int, modules: list, device: str) -> tuple[Trace, torch.Tensor]:
    """The VAE encoding an image of `res` px as `Latents` encodes each one (fp32, no gradient, no autocast), and the
    latent it makes."""
    from ..inputs.batches import Fitted

    out = []
    pixels = Fitted(torch.empty(1, 3, res, res, device="meta"), (0, 0), None)
    made = trace(lambda: out.append(latents.encode(pixels)[0]), modules, lambda: MetaStep(None, device),
                 backward=False)
    return made, out[0]


@contextlib.contextmanager
def _bitsandbytes_maps(quantizes: bool):
    """bitsandbytes keeps its quantization code book in a module-level dict made on the device of its first use: made
    on meta here, it is taken back, so a real quantization after the estimate makes its own."""
    if not quantizes:
        yield
        return
    from bitsandbytes.functional import name2qmap

    before = dict(name2qmap)
    try:
        yield
    finally:
        name2qmap.clear()
        name2qmap.update(before)


def _trace_step(cfg: Config, c: Components, modules: list, models, latent, captions: list[str], res: int,
                precision: str, device: str, inpainting: bool = False) -> Trace:
    """One `training_step` on a batch of `captions` (with its class-image batch where prior preservation has one), as
    the loop runs it: the denoiser in training mode, under autocast; the text cache filled first, as setup fills it."""
    from ..inputs.batches import Batch
    from ..steps.step import seeded, training_step

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def mode():
        return MetaStep(low, device)

    for m in (c.denoiser, *c.text_encoders):
        checkpointing(m, mode)
    c.denoiser.train()
    with OnMeta(), torch.no_grad():
        models.text(captions + ([cfg.prior.class_prompt] if cfg.prior.class_prompt else []))
    micro = c.family.conditioning.micro((res, res), (0, 0), (res, res))

    def batch(texts):
        n = len(texts)
        # an inpainting base's image conditioning: the mask and the masked image's latents ([1 + C, h, w])
        inpaint = torch.empty(n, 1 + latent.shape[0], *latent.shape[1:], device="meta", dtype=latent.dtype) \
            if inpainting else None
        return Batch(torch.stack([latent] * n), texts, None if micro is None else torch.stack([micro] * n),
                     inpaint=inpaint)

    def step():
        b = batch(captions)
        if cfg.prior.has_images:
            b.prior = batch([cfg.prior.class_prompt] * len(captions))
        return training_step(b, models, cfg, seeded(cfg.train.seed, 0, 0)[0])[0]

    return trace(step, modules, mode)


def _step_trace(model: MetaModel, cfg: Config, res: int, precision: str, device: str) -> Trace:
    """The trace of one training step of `cfg` at resolution `res` in `precision`."""
    cfg = copy.deepcopy(cfg)
    cfg.augment.resolution, cfg.train.mixed_precision = res, precision
    return traced_run(model, cfg, device).step


def _parts(c: Components) -> dict:
    """The parts held through the steps, by pipeline attribute: denoiser, VAE, text encoders."""
    return c.family.parts(c.denoiser, c.text_encoders, c.vae)


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' weights as they sit: floating-point parameters and buffers, and 4-bit weights with their
    quantization state."""
    total = 0
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            state = getattr(t, "quant_state", None)
            if t.is_floating_point() or state is not None:
                total += _nbytes(t) + _state_bytes(state)
    return total


def _state_bytes(state) -> int:
    """A bitsandbytes QuantState's tensors (absmax, code, offset), nested state included."""
    if state is None:
        return 0
    return _nbytes(*(v for v in vars(state).values() if isinstance(v, torch.Tensor))) + \
        _state_bytes(getattr(state, "state2", None))


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def config_of_row(row: dict) -> Config:
    """The job a benchmark row (scripts/bench_train.py) measured, as a Config."""
    cfg = Config()
    cfg.augment.resolution, cfg.train.batch_size = row["resolution"], row["batch"]
    cfg.train.mixed_precision, cfg.model.quantize = row["precision"], row["quantize"]
    cfg.train.cache_latents = cfg.train.cache_text = row["cached"]
    cfg.lora.targets, cfg.lora.rank, cfg.optim.optimizer = row["targets"], row["rank"], row["optimizer"]
    cfg.train.gradient_checkpointing, cfg.speed.attention = row["gradient_checkpointing"], row["attention"]
    if row.get("t5") == "kept":  # the benchmark keeps SD3's T5 by shuffling tags
        from ...config import DataFolder

        cfg.data = [DataFolder(path="benchmark-images", prompt="a photo, of, sks", shuffle_tags=True)]
    for key, value in row.get("overrides", {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def check_row(row: dict) -> dict:
    """A benchmark row's measured peak against the estimate: CPU rows the process RSS against the total, CUDA rows
    the allocated peak against `allocated` (and reserved against allocated plus the allocator's slack)."""
    sizes = {k: row[k] for k in ("sd3_blocks", "t5_layers") if k in row}
    est = estimate(config_of_row(row), row["device"], random_model(row["family"], **sizes), row["images"])
    if row["device"] == "cuda":
        measured, estimated = row["peak_allocated_gb"] * GiB, est.allocated
        reserved = (row["peak_reserved_gb"] * GiB, est.total - CUDA_CONTEXT)
    else:  # the step's RSS; with NF4 it may still hold freed full-precision weights, up to the loading peak
        measured, estimated, reserved = row["peak_rss_gb"] * GiB, est.allocated + est.overhead, None
    out = {"measured_gb": measured / GiB, "estimate_gb": estimated / GiB, "error": estimated / measured - 1,
           "load_gb": est.load / GiB}
    if reserved:
        out.update(reserved_gb=reserved[0] / GiB, estimate_reserved_gb=reserved[1] / GiB,
                   reserved_error=reserved[1] / reserved[0] - 1)
    return out
