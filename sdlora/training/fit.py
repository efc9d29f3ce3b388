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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..errors import ModelError
from ..families import FAMILIES, Family, TextEncoderSlot, folder_family
from .data import IMAGE_EXTS
from .memtrace import MetaStep, Trace, checkpointing, mark_trainable, trace

GiB = 2**30
CUDA_CONTEXT = int(0.6 * GiB)   # CUDA context, cuBLAS/cuDNN workspaces (outside PyTorch's allocator counts)
CUDA_SLACK = 0.10               # the caching allocator reserves about this much beyond what is allocated
CPU_BASELINE = int(0.45 * GiB)  # a process with torch, diffusers, transformers and peft imported (measured: 0.41)
# bytes of optimizer state per LoRA parameter (Adam m and v; 8-bit: one byte each), as measured by
# `scripts/bench_train.py --optimizers` on rank-4 LoRA (Adafactor's factored moments depend on the shapes)
OPTIMIZER_STATE = {"adamw": 8, "adamw8bit": 2, "adamw-schedulefree": 8, "prodigy": 14, "adafactor": 1, "lion": 4}


@dataclass
class MetaModel:
    """A model's family and the diffusers/transformers configs of its parts, to build on the meta device."""

    family: Family
    configs: dict            # denoiser (unet / transformer), vae, text encoders, frozen encoders -> config dict
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

    def build(self):
        """(denoiser, vae, text encoders, frozen encoders) on the meta device, frozen."""
        import diffusers

        fam = self.family
        with torch.device("meta"), _quiet():
            denoiser = getattr(diffusers, fam.denoiser_class).from_config(self.denoiser_config)
            vae = diffusers.AutoencoderKL.from_config(self.configs["vae"])
            encoders = [_encoder(s, self.configs[s.attr]) for s in fam.text_encoders]
            frozen = [_encoder(s, self.configs[s.attr]) for s in self.frozen_slots]
        for m in (denoiser, vae, *encoders, *frozen):
            m.requires_grad_(False)
            m.eval()
        return denoiser, vae, encoders, frozen


def _encoder(slot: TextEncoderSlot, config: dict):
    import transformers

    cls = getattr(transformers, slot.model_class)
    return cls(cls.config_class.from_dict(config))


class _quiet:
    """Silence the libraries' construction warnings while building on meta."""

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

    if Path(source).is_file():
        from ..single_file import detect_checkpoint

        info = detect_checkpoint(source)
        family, configs = FAMILIES[info.family], info.configs
        if any(s.attr not in configs for s in (*family.text_encoders, *family.frozen_encoders)):
            configs = family.single_file.part_configs(configs, text_encoders)
        return MetaModel(family, configs, source)
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
    return MetaModel(family, configs, source)


def _encoder_config(slot: TextEncoderSlot, source: str) -> dict:
    import transformers

    return getattr(transformers, slot.model_class).config_class.from_pretrained(source, subfolder=slot.attr).to_dict()


def random_model(family: str, **sizes) -> MetaModel:
    """The full-size random-weight models of `random_pipelines` (the benchmark's), as configs; SD3: SD3.5 Medium with
    T5-XXL (`sizes`: sd3_blocks, t5_layers)."""
    from ..random_pipelines import full_size_configs

    with _quiet():
        return MetaModel(FAMILIES[family], full_size_configs(family, **sizes), f"random-{family}")


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

    @property
    def allocated(self) -> int:
        """What PyTorch allocates at the step's peak (CUDA: torch.cuda.max_memory_allocated)."""
        return sum(self.weights.values()) + self.trainable + self.cache + self.activations

    @property
    def total(self) -> int:
        """What the device must have free: allocated plus overhead (CUDA: the GPU's memory; CPU: the process RSS), or
        the peak before the steps where that is higher."""
        return max(self.allocated + self.overhead, self.load)


def _dtypes(precision: str, device: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights' dtype, autocast's low dtype or None), as `setup.place_models` and accelerate make them."""
    from .setup import weight_dtype

    return weight_dtype(device, precision), {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def resolution_of(cfg: Config, model: MetaModel) -> int:
    """The job's resolution: its own, else the model's (`setup.resolve_resolution`: the denoiser's sample size)."""
    return cfg.augment.resolution or model.denoiser_config["sample_size"] * _vae_factor(model)


def _frozen(model: MetaModel, cfg: Config) -> tuple[list[str], bool]:
    """(the frozen encoders that load: SD3's T5 where the model has one, unless --no-t5; whether they stay through
    the steps: captions that change every step, as `setup` decides it)."""
    from .setup import captions_vary

    parts = [s.attr for s in model.frozen_slots] if cfg.model.t5 else []
    return parts, bool(parts) and captions_vary(cfg)


def estimate(cfg: Config, device: str = "cuda", model: MetaModel | None = None,
             n_images: int | None = None) -> Estimate:
    """Peak memory of training `cfg` on `device` ('cuda' or 'cpu'). `model` defaults to the job's model (read from
    its configs), `n_images` to the images in its data folders."""
    from .setup import captions_vary, frozen_text_dtype

    model = model or meta_model(cfg.model_path, cfg.model.text_encoders)
    from .setup import mixed_precision

    fam, precision = model.family, mixed_precision(cfg, device)
    wdtype, _ = _dtypes(precision, device)
    res = resolution_of(cfg, model)
    counts = _counts(model)
    held = [fam.denoiser_attr, "vae", *(s.attr for s in fam.text_encoders)]
    weights = {part: _part_bytes(counts[part], wdtype if part != "vae" else torch.float32,
                                 cfg.model.quantize if part != "vae" else "none") for part in held}
    frozen, kept = _frozen(model, cfg)
    fdtype = frozen_text_dtype(device, precision)
    frozen_bytes = {part: _part_bytes(counts[part], fdtype, "none") for part in frozen}  # T5 is never quantized
    lora = _lora_params(model, cfg)
    per_param = 4 + 4  # fp32 weight and gradient (diffusers' cast_training_params)
    trainable = sum(n * (per_param + _optimizer_bytes(cfg.optim.optimizer, n)) for n in lora)
    step = _step_trace(model, cfg, res, precision, device)
    activations, notes = step.peak, []
    if cfg.model.quantize == "nf4":  # one Linear weight at a time is dequantized to the compute dtype
        activations += max(counts[p]["largest_linear"] for p in held if p != "vae") * wdtype.itemsize
    cached = cfg.train.cache_latents and cfg.augment.crop == "center"
    if not cached:
        activations = max(activations, _vae_trace(model, res).peak)
        notes.append("latents not cached: the VAE encodes every step")
    images = _count_images(cfg) if n_images is None else n_images
    latent = model.denoiser_config["in_channels"] * (res // _vae_factor(model)) ** 2 * wdtype.itemsize
    text_cached = cfg.train.cache_text and not captions_vary(cfg) and \
        not any(text_trained(cfg, len(fam.text_encoders)))
    caption = fam.conditioning.caption_numel(model.configs, cfg.model.t5_max_length) * wdtype.itemsize
    cache = (images * (2 if cfg.augment.random_flip else 1) * latent if cached else 0) \
        + ((images + 2) * caption if text_cached else 0)
    encode = 0  # the frozen encoders encoding every caption before the steps, then released
    if kept:
        weights.update(frozen_bytes)
        notes.append("T5 stays in memory: shuffled or dropped tags make a new caption every step")
    elif frozen:
        encode = _frozen_trace(model, cfg, precision, device).peak
        notes.append(f"T5 ({sum(frozen_bytes.values()) / GiB:.2f} GiB) encodes every caption before the steps and "
                     "is then released")
    if frozen and device == "cpu":  # T5's own per-caption cache (host memory)
        spec = _frozen_text_spec(model, cfg)
        cache += (images + 2) * spec.length * spec.width * fdtype.itemsize
    if cfg.model.t5 and fam.frozen_encoders and not model.frozen_slots:
        notes.append("the model has no T5: it trains with --no-t5")
    if device == "cuda":  # T5 encodes alone on the device (the other parts move there after it is released)
        overhead = CUDA_CONTEXT + int(CUDA_SLACK * activations)
        load = CUDA_CONTEXT + sum(frozen_bytes.values()) + encode + int(CUDA_SLACK * encode) if encode else 0
    else:  # every part is loaded in fp32 before T5 encodes and NF4 quantizes
        overhead = CPU_BASELINE
        load = sum(_part_bytes(counts[p], torch.float32, "none") for p in (*held, *frozen)) + overhead + encode
        if cfg.model.quantize == "nf4":
            notes.append(f"loading holds the full-precision base before it is quantized: {load / GiB:.2f} GiB")
    return Estimate(device, precision, weights, sum(lora), int(trainable), int(cache), step.saved, int(activations),
                    overhead, notes, load)


def _frozen_text_spec(model: MetaModel, cfg: Config):
    """The conditioning's frozen part as training makes it (SD3: a T5Text's length and width), without a model."""
    from ..models import frozen_text

    return frozen_text(model.family, None, None, model.denoiser_config, cfg.model.t5_max_length)


def _vae_factor(model: MetaModel) -> int:
    return 2 ** (len(model.configs["vae"]["block_out_channels"]) - 1)


def _optimizer_bytes(name: str, numel: int) -> int:
    """Optimizer state per parameter of one tensor: bitsandbytes keeps tensors under 4096 values in 32-bit."""
    if name == "adamw8bit" and numel < 4096:
        return 8
    return OPTIMIZER_STATE.get(name, 8)


def _count_images(cfg: Config) -> int:
    n = 0
    for folder in cfg.data:
        p = Path(folder.path)
        if p.is_dir():
            n += sum(1 for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    if cfg.prior.class_prompt and cfg.prior.mode == "images":
        n += cfg.prior.num_class_images
    return n


def nf4_bytes(numel: int) -> int:
    """bitsandbytes NF4 storage of one weight (blocks of 64, nested absmax): 4 bits a value, an 8-bit absmax per
    block, an fp32 absmax per 256 blocks, and the two code books."""
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 64 + 1024 + 4


_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, make):
    """Memoize the meta measurements within the process (proposals re-estimate the same job many times)."""
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


def _built(model: MetaModel):
    """`model.build()`, once per model, for the measurements that only read the modules (the step's trace changes
    its own copy)."""
    return _cached(("built", model.key), model.build)


def _counts(model: MetaModel) -> dict:
    """Per part: floating-point parameter count, each nn.Linear weight's size, and the largest one."""
    def make():
        denoiser, vae, encoders, frozen = _built(model)
        parts = model.family.parts(denoiser, encoders, vae, frozen)
        out = {}
        for name, m in parts.items():
            linear = [mod.weight.numel() for mod in m.modules() if type(mod) is torch.nn.Linear]
            total = sum(t.numel() for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())
            out[name] = {"params": total, "linear": linear, "largest_linear": max(linear, default=0)}
        return out

    return _cached(("counts", model.key), make)


def _part_bytes(count: dict, dtype: torch.dtype, quantize: str) -> int:
    if quantize != "nf4":
        return count["params"] * dtype.itemsize
    return (count["params"] - sum(count["linear"])) * dtype.itemsize + sum(nf4_bytes(n) for n in count["linear"])


def text_trained(cfg: Config, n: int) -> tuple[bool, ...]:
    from .setup import text_encoder_lrs

    return tuple(bool(lr) for lr in text_encoder_lrs(cfg, n))


def _denoiser_targets(model: MetaModel, cfg: Config, denoiser) -> list[str]:
    """The denoiser layers that get a LoRA, as `setup.add_adapters` picks them (the preset, less the family's unused
    layers, and lora.blocks)."""
    from types import SimpleNamespace

    from .adapters import target_modules
    from .setup import layer_filter

    keep = layer_filter(cfg, SimpleNamespace(family=model.family, denoiser=denoiser, name=model.source))
    return target_modules(denoiser, model.family.target_patterns(cfg.lora.targets), keep)


def _lora_params(model: MetaModel, cfg: Config) -> list[int]:
    """Parameters of each LoRA tensor (A and B per target layer): r x in and r x out for a Linear, r x in x k x k and
    r x out for a convolution; r per layer where per-block settings give one (a layer at rank 0 has none)."""
    from ..config import PER_LAYER_KEYS
    from .adapters import target_modules
    from .blocks import kohya_namer, plan_layers

    text = text_trained(cfg, len(model.family.text_encoders))

    def make():
        denoiser, _, encoders, _ = _built(model)
        fam = model.family
        names = _denoiser_targets(model, cfg, denoiser) if cfg.train.max_steps > 0 else []
        layers = plan_layers(cfg, fam, denoiser, names, kohya_namer(fam, denoiser.config)) if names else None
        ranks = {n: layer.rank for n, layer in (layers or {}).items()}
        plan = [(denoiser, [n for n in names if layers is None or n in layers])] if names else []
        plan += [(e, target_modules(e, fam.text_targets)) for e, t in zip(encoders, text) if t]
        sizes = []
        for module, names in plan:
            for name in names:
                layer = module.get_submodule(name)
                r = ranks.get(name, cfg.lora.rank) if module is denoiser else cfg.lora.rank
                if isinstance(layer, torch.nn.Conv2d):
                    k = layer.kernel_size[0] * layer.kernel_size[1]
                    sizes += [r * layer.in_channels * k, r * layer.out_channels]
                else:
                    sizes += [r * layer.in_features, r * layer.out_features]
        return sizes

    return _cached(("lora", model.key, cfg.lora.targets, cfg.lora.blocks, cfg.lora.rank, text,
                    cfg.train.max_steps > 0, *(getattr(cfg.lora, k) for k in PER_LAYER_KEYS)), make)


class _Tokenizer:
    """Stands in for a CLIP tokenizer: every caption is 77 token ids on the meta device."""

    model_max_length = 77

    def __call__(self, captions, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.zeros(len(captions), 77, dtype=torch.long, device="meta"))


class _FrozenText:
    """Stands in for the conditioning's frozen part (SD3's T5Text) on meta: the model encodes each batch when it stays
    (no gradients, as T5Text), else the cached embeddings come in ([B, length, width]; zeros without T5)."""

    def __init__(self, model, length: int, width: int, dtype: torch.dtype):
        self.model, self.length, self.width, self.dtype = model, length, width, dtype

    def __call__(self, captions, device):
        if self.model is None:
            return torch.empty(len(captions), self.length, self.width, device="meta", dtype=self.dtype)
        with torch.no_grad():
            return self.model(torch.zeros(len(captions), self.length, dtype=torch.long, device="meta"))[0]


def _step_trace(model: MetaModel, cfg: Config, res: int, precision: str, device: str) -> Trace:
    """Activations of one training step (text encoding when it trains, the denoiser's forward, the loss, backward)."""
    text = text_trained(cfg, len(model.family.text_encoders))
    frozen, kept = _frozen(model, cfg)
    key = ("step", model.key, res, cfg.train.batch_size, precision, device, cfg.train.gradient_checkpointing,
           cfg.speed.attention, cfg.lora.targets, cfg.lora.blocks, text, cfg.train.max_steps > 0, tuple(frozen), kept,
           cfg.model.t5_max_length)
    return _cached(key, lambda: _measure_step(model, cfg, res, precision, device, text))


def _attention(denoiser, attention: str) -> None:
    """The attention kernel `setup.apply_speed` gives plain attention (SD3's joint attention keeps its SDPA)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if {type(p).__name__ for p in denoiser.attn_processors.values()} <= {"AttnProcessor", "AttnProcessor2_0"}:
        denoiser.set_attn_processor(AttnProcessor() if attention == "math" else AttnProcessor2_0())


def _measure_step(model: MetaModel, cfg: Config, res: int, precision: str, device: str, text: tuple) -> Trace:
    from .adapters import target_modules
    from .setup import frozen_text_dtype

    wdtype, low = _dtypes(precision, device)
    fam, batch = model.family, cfg.train.batch_size
    frozen_parts, kept = _frozen(model, cfg)
    with torch.random.fork_rng(devices=[]):
        denoiser, _, encoders, frozen = model.build()
        for m in (denoiser, *encoders):
            torch.nn.Module.to(m, wdtype)
        for m in frozen:
            torch.nn.Module.to(m, frozen_text_dtype(device, precision))
        _attention(denoiser, cfg.speed.attention)

        def mode():
            return MetaStep(low, device)

        if cfg.train.max_steps > 0:
            mark_trainable(denoiser, _denoiser_targets(model, cfg, denoiser))
        for enc, trained in zip(encoders, text):
            if trained:
                mark_trainable(enc, target_modules(enc, fam.text_targets))
                if cfg.train.gradient_checkpointing:
                    checkpointing(enc, mode)
        if cfg.train.gradient_checkpointing:
            checkpointing(denoiser, mode)
        lat = res // _vae_factor(model)
        spec = _frozen_text_spec(model, cfg) if fam.frozen_encoders else None
        running = dict(zip(model.frozen_slots, frozen)) if kept else {}
        stand_ins = [_FrozenText(running.get(s), spec.length, spec.width, frozen_text_dtype(device, precision)
                                 if frozen_parts else torch.float32) for s in fam.frozen_encoders]

        def step():
            with torch.set_grad_enabled(any(text)):
                cond = fam.conditioning.encode([_Tokenizer()] * len(encoders), [*encoders, *stand_ins],
                                               [""] * batch, "meta")
            one = fam.conditioning.micro((res, res), (0, 0), (res, res))  # SDXL's size/crop values, else None
            micro = None if one is None else one.expand(batch, -1).to("meta")
            noisy = torch.empty(batch, model.denoiser_config["in_channels"], lat, lat, device="meta", dtype=wdtype)
            t = torch.zeros(batch, dtype=torch.long, device="meta")
            pred = fam.conditioning.predict(denoiser, noisy, t, cond, micro)
            return torch.nn.functional.mse_loss(pred.float(), noisy.float(), reduction="none").mean()

        return trace(step, [denoiser, *encoders, *frozen], mode)


def _vae_trace(model: MetaModel, res: int) -> Trace:
    """The VAE encoding one image (fp32, no gradient), as uncached latents are made every step."""
    def make():
        _, vae, _, _ = _built(model)

        def step():
            with torch.no_grad():
                vae.encode(torch.empty(1, 3, res, res, device="meta")).latent_dist.mode()

        return trace(step, [vae], lambda: MetaStep(None, "cpu"), backward=False)

    return _cached(("vae", model.key, res), make)


def _frozen_trace(model: MetaModel, cfg: Config, precision: str, device: str) -> Trace:
    """The frozen encoders (SD3's T5) encoding a chunk of captions before the steps: no gradients, no autocast, in
    their own dtype (`setup.cache_frozen_text`)."""
    from .setup import FROZEN_TEXT_CHUNK, frozen_text_dtype

    length = cfg.model.t5_max_length

    def make():
        *_, frozen = model.build()
        for m in frozen:
            torch.nn.Module.to(m, frozen_text_dtype(device, precision))

        def step():
            ids = torch.zeros(FROZEN_TEXT_CHUNK, length, dtype=torch.long, device="meta")
            with torch.no_grad():
                for m in frozen:
                    m(ids)[0]

        return trace(step, frozen, lambda: MetaStep(None, device), backward=False)

    return _cached(("frozen", model.key, precision, device, length), make)


def config_of_row(row: dict) -> Config:
    """The job a benchmark row (scripts/bench_train.py) measured, as a Config."""
    cfg = Config()
    cfg.augment.resolution, cfg.train.batch_size = row["resolution"], row["batch"]
    cfg.train.mixed_precision, cfg.model.quantize = row["precision"], row["quantize"]
    cfg.train.cache_latents = cfg.train.cache_text = row["cached"]
    cfg.lora.targets, cfg.lora.rank, cfg.optim.optimizer = row["targets"], row["rank"], row["optimizer"]
    cfg.train.gradient_checkpointing, cfg.speed.attention = row["gradient_checkpointing"], row["attention"]
    if row.get("t5") == "kept":  # the benchmark keeps SD3's T5 by shuffling tags
        from ..config import DataFolder

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
