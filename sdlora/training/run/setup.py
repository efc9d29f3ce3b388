"""`setup`: from a config to a ready `TrainState`, top to bottom: model, resolution, class images, pivotal tokens,
data, device and precision, LoRA adapters, caches, optimizers, accelerate's wrapping, and phases."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ...callbacks import Callbacks
from ...config import Config
from ...errors import ConfigError, DataError, ModelError
from ...hardware import cpu_has_native_bf16
from ...loras.networks import NETWORKS
from ...models import Components
from ...quantize import quantize_nf4, require_bitsandbytes
from ..inputs.batches import Batches, Latents, Prefetcher, pins
from ..inputs.data import BatchPlan, TagRule, build_examples, missing_class_images, scan_folder
from ..periodic import image_validation
from ..periodic.output import sample_prompts
from ..periodic.validation import Validation, held_out_images, validation_examples
from ..steps import inpaint
from ..steps.slider import SliderBatches, SliderObjective, SliderPrompts
from ..steps.step import Models, TriggerSwap
from ..steps.text import TextEncoding
from .adapters import inject, lora_parameters, named_lora_parameters
from .blocks import kohya_namer, param_groups, plan_layers
from .optimizers import Optimizers, loraplus_groups, make_ema, make_optimizer, scheduler_warmup
from .parts import Part
from .pivotal import Concept, concept_for
from .state import Adapters, TrainState


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from ..periodic.runlog import tracker_kwargs

    # Several jobs run in one process (queue, UI): each gets a fresh precision setting; the process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    mp = mixed_precision(cfg)
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    # cpu=True lets accelerate run DDP over gloo when launched with several processes and no GPU
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), **tracker_kwargs(cfg))


def mixed_precision(cfg: Config, device: str | None = None) -> str:
    """The precision `auto` means on `device` ('cuda' or 'cpu'; default: CUDA when a GPU is here, else the CPU):
    bf16 (fp16 where the GPU lacks bf16; a GPU not here is taken as bf16-capable) on CUDA; on the CPU bf16 autocast
    where bf16 is native, else fp32."""
    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"
    return "bf16" if cpu_has_native_bf16() else "no"


def apply_speed(cfg: Config, c: Components, device: torch.device) -> None:
    """The [speed] switches that act on the denoiser (attention kernel, memory layout, TF32); compilation comes after
    the adapters are in place (`compile_denoiser`)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sp = cfg.speed
    if sp.attention == "xformers":
        try:
            c.denoiser.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as e:
            raise ConfigError(f"speed.attention xformers: {str(e).splitlines()[0]}; pip install 'sdlora[xformers]' "
                              "or use sdpa") from None
    elif hasattr(c.denoiser, "set_attn_processor"):
        kinds = {type(p).__name__ for p in c.denoiser.attn_processors.values()}
        if kinds <= {"AttnProcessor", "AttnProcessor2_0"}:  # plain attention: either kernel fits
            c.denoiser.set_attn_processor(AttnProcessor2_0() if sp.attention == "sdpa" else AttnProcessor())
        elif sp.attention == "math":  # SD3's joint attention has its own (SDPA) processors
            raise ConfigError(f"speed.attention math has no kernel for the {', '.join(sorted(kinds))} of "
                              f"{type(c.denoiser).__name__}; use sdpa")
    if sp.channels_last:
        c.denoiser.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = sp.tf32


def compile_denoiser(cfg: Config, c: Components) -> None:
    """torch.compile, in place: `regional` compiles each repeated transformer block once (fast to compile, reused by
    every block of the same shape), `full` the whole denoiser."""
    if cfg.speed.compile == "full":
        c.denoiser.compile()
    elif cfg.speed.compile == "regional":
        blocks = [m for m in c.denoiser.modules() if type(m).__name__ in REPEATED_BLOCKS]
        if not blocks:
            raise ConfigError(f"speed.compile regional found no transformer block in {type(c.denoiser).__name__}; "
                              "use full")
        for block in blocks:
            block.compile()


REPEATED_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock")


def check_bitsandbytes(cfg: Config) -> None:
    """QLoRA and 8-bit Adam need a bitsandbytes that runs here: say so before any model loads."""
    if cfg.model.quantize != "none":
        require_bitsandbytes(cfg.model.quantize, f"QLoRA (quantize = {cfg.model.quantize})")
    if cfg.optim.optimizer == "adamw8bit":
        try:
            require_bitsandbytes("adamw8bit", "optimizer adamw8bit")
        except ModelError as e:
            raise ConfigError(f"{e}; or use --optimizer adamw") from None


def resolve_resolution(cfg: Config, c: Components) -> tuple[int, int]:
    """(resolution, bucket step) that fit the VAE and denoiser down-sampling of this model."""
    multiple = c.size_multiple
    res = cfg.augment.resolution or c.denoiser.config.sample_size * c.vae_factor
    if res % multiple:
        raise ConfigError(f"resolution {res} must be a multiple of {multiple} for this model")
    return res, max(multiple, math.ceil(res / 64 / multiple) * multiple)


def setup(cfg: Config, acc, callbacks: Callbacks, components: Components | None = None) -> TrainState:
    """Load the model (unless `components` are given), data and LoRA; build caches, optimizer and schedule."""
    from ...models import load_components

    c = components or load_components(cfg.model_path, cfg.model.prediction_type, text_encoders=cfg.model.text_encoders,
                                      t5=cfg.model.t5, t5_length=cfg.model.t5_max_length,
                                      dtype=load_dtype(acc.device, acc.mixed_precision))
    check_family_options(cfg, c)
    resolution, bucket_step = resolve_resolution(cfg, c)
    odd = [p for p in sample_prompts(cfg, resolution) if p.width % c.size_multiple or p.height % c.size_multiple]
    if odd:
        raise ConfigError(f"sample size {odd[0].width}x{odd[0].height} is not a multiple of {c.size_multiple} for "
                          "this model")
    c.check_size(resolution, resolution, "resolution", "lower --resolution")
    for p in sample_prompts(cfg, resolution):
        c.check_size(p.width, p.height, "sample size", "give the sample a smaller width and height")
    if cfg.validation.scorer != "none" and cfg.validation.image_size:
        size = cfg.validation.image_size
        if size % c.size_multiple:
            raise ConfigError(f"validation.image_size {size} is not a multiple of {c.size_multiple} for this model")
        c.check_size(size, size, "validation.image_size", "lower --validation-size")
    if cfg.prior.class_prompt and cfg.prior.mode == "images":
        if acc.is_main_process:
            ensure_class_images(cfg, c, resolution, callbacks)
        acc.wait_for_everyone()
    concept = concept_for(cfg, c)
    dop = trigger_swap(cfg, concept)
    if cfg.is_slider:  # prompts alone: no images, no validation images
        batches, captions_by_folder, examples = SliderBatches(SliderPrompts.from_config(cfg.slider)), {}, []
    else:
        held_out = held_out_images(cfg)
        batches, captions_by_folder = load_data(cfg, c, resolution, bucket_step, concept, callbacks.on_message,
                                                held_out)
        examples = validation_examples(cfg, resolution, bucket_step, concept.prompt, held_out)
        if c.inpainting and not cfg.validation.data:  # held-out images: their folder's inpainting masks
            examples = inpaint.attach_masks(cfg, examples)
        captions = [e.caption for e in batches.examples]
        if dop is not None and dop(captions) == captions:
            raise ConfigError(f"prior.dop_class: no training caption holds the trigger {dop.seen!r} to replace by "
                              "the class word; give the word the captions use with --trigger")
        for e in [*batches.examples, *batches.prior_examples, *examples]:
            c.check_size(*e.bucket, f"the bucket of {Path(e.path).name} at resolution {resolution}:",
                         "lower --resolution (aspect-ratio buckets are longer than it on one side) or --no-bucketing")
    texts = batches.captions()
    texts = texts + (dop(texts) if dop else [])  # what the steps encode
    use_zero_terminal_snr(cfg, c)
    varying = captions_vary(cfg)
    cache_frozen_text(cfg, c, acc.device, acc.mixed_precision, varying, callbacks.on_message,
                      texts + [e.caption for e in examples])
    weight_dtype = place_models(cfg, c, acc.device, acc.mixed_precision)
    apply_speed(cfg, c, acc.device)
    adapters = add_adapters(cfg, c, concept)
    compile_denoiser(cfg, c)
    if not cfg.is_slider:
        attach_latents(cfg, c, batches, acc.device, weight_dtype, callbacks.on_message)
    optim, denoiser, encoders = make_optimizers(cfg, acc, c, adapters, concept)
    phases = concept.phases(optim, text_lora=adapters.text_lora)
    if cfg.train.cache_text and varying:
        callbacks.on_message("text caching is off: shuffled or dropped tags make a new caption every step")
    models = step_models(cfg, c, adapters, denoiser, encoders, acc.device)
    models.dop = dop
    state = TrainState(cfg, acc, c, models, batches, resolution, captions_by_folder, adapters, concept, phases, optim,
                       weight_dtype, time.time())
    if examples:
        state.validation = Validation(examples, cfg.validation.timesteps, cfg.train.seed)
    state.image_validation = image_validation.build(cfg, state, callbacks.on_message)
    if cfg.is_slider:
        state.objective = slider_objective(cfg, acc, c, resolution)
    state.enter_phase(0)
    batches.fill_cache()
    if models.text.cache_allowed and not any(phase.text_trainable for phase in phases):
        models.text.fill(sorted({*texts, "", cfg.prior.class_prompt}))
    return state


def make_latents(cfg: Config, c: Components, device: torch.device, dtype: torch.dtype,
                 inpainting: bool = False) -> Latents:
    """The VAE's latents: cached unless a random crop needs a fresh one every step; pixels prefetched into pinned
    memory for a CUDA device (cached latents live on the device: nothing to prepare ahead)."""
    cached = cfg.train.cache_latents and cfg.augment.crop == "center"
    prefetch = cfg.speed.prefetch and (not cached or inpainting)  # an inpainting base's masked images, always
    return Latents(c.vae, device, dtype, cached=cached, crop=cfg.augment.crop, pin=pins(device, prefetch))


def trigger_swap(cfg: Config, concept: Concept) -> TriggerSwap | None:
    """Differential output preservation's caption swap (prior.dop_class): the trigger as the captions hold it once
    the concept has rewritten them (pivotal tuning: its token), replaced by the class word."""
    if not cfg.prior.dop_class:
        return None
    return TriggerSwap(concept.prompt(image_validation.trigger_of(cfg, {})), cfg.prior.dop_class)


def step_models(cfg: Config, c: Components, adapters: Adapters, denoiser, encoders: list, device) -> Models:
    """What the step runs: each trained part as one handle (`Part`: the module and the form the step calls, wrapped
    by accelerate where it trains), the text encoding (cached while the text path is frozen and captions do not vary),
    the noise schedule."""
    text = TextEncoding(c.family.conditioning, c.tokenizers, [Part(e, w) for e, w in zip(c.text_encoders, encoders)],
                        c.frozen_text, [bool(lr) for lr in adapters.text_lrs], device,
                        cfg.train.cache_text and not captions_vary(cfg))
    return Models(Part(c.denoiser, denoiser), text, c.noise_scheduler, c.family.conditioning)


def attach_latents(cfg: Config, c: Components, batches: Batches, device, dtype, say) -> None:
    """The VAE's latents of the images (`make_latents`) and the prefetching thread."""
    inpainting = batches.inpainting is not None
    batches.latents = latents = make_latents(cfg, c, device, dtype, inpainting)
    prefetch = cfg.speed.prefetch and (not latents.cached or inpainting)
    batches.prefetcher = Prefetcher(batches.prepare) if prefetch else None
    if cfg.train.cache_latents and not latents.cached:
        say("latent caching is off: random crop needs a fresh crop every step")


def slider_objective(cfg: Config, acc, c: Components, resolution: int) -> SliderObjective:
    """The slider's step at this model's latent shape and the family's size conditioning (SDXL)."""
    side = resolution // c.vae_factor
    micro = c.family.conditioning.micro((resolution, resolution), (0, 0), (resolution, resolution))
    return SliderObjective(SliderPrompts.from_config(cfg.slider), (c.denoiser.config.in_channels, side, side),
                           cfg.slider.denoise_steps, micro, lambda loss: acc.backward(loss / cfg.train.grad_accum))


def check_family_options(cfg: Config, c: Components) -> None:
    """Options the loaded model's family or objective cannot serve, as one-line errors: the SNR-based weights and
    zero terminal SNR on flow matching (SD3), flow matching's loss weights and preconditioning on DDPM, networks
    other than LoRA where the family's files fuse layers and pivotal tuning where it has none (SD3), lora.blocks where
    the denoiser has no numbered blocks."""
    tr, fam, flow = cfg.train, c.family, c.prediction_type == "flow"
    if flow:
        for on, what in ((tr.min_snr_gamma, "train.min_snr_gamma (min-SNR)"),
                         (tr.debiased_estimation, "train.debiased_estimation"),
                         (tr.zero_terminal_snr, "train.zero_terminal_snr")):
            if on:
                raise ConfigError(f"{what} is for noise (epsilon/v) prediction; {fam.title} trains by flow matching: "
                                  "use train.flow_weighting or timestep_sampling instead")
    elif tr.flow_weighting != "none":
        raise ConfigError(f"train.flow_weighting applies to flow matching (SD3); {c.name} predicts "
                          f"{c.prediction_type}: use min_snr_gamma or debiased_estimation")
    elif not tr.precondition_outputs:
        raise ConfigError(f"train.precondition_outputs applies to flow matching (SD3); {c.name} predicts "
                          f"{c.prediction_type}: leave it on")
    if fam.fused_file_layers and not NETWORKS[cfg.lora.network].fuses:
        fusing = " or ".join(n.title for n in NETWORKS.values() if n.fuses)
        raise ConfigError(f"lora.network {cfg.lora.network}: {fam.title} trains {fusing} ({fam.fused_file_layers})")
    if fam.no_pivotal and cfg.pivotal.token:
        raise ConfigError(f"pivotal tuning is not supported for {fam.title} ({fam.no_pivotal}); train a LoRA with a "
                          "trigger word")
    if cfg.lora.blocks.strip() and not fam.block_prefix:
        raise ConfigError(f"lora.blocks selects transformer blocks (SD3); {fam.title} has none: leave it empty")
    if c.frozen_text and not cfg.model.t5 and any(f.present for f in c.frozen_text):
        raise ConfigError("model.t5 is off but the model came with a T5: load it with --no-t5")
    check_inpainting(cfg, c)


def check_inpainting(cfg: Config, c: Components) -> None:
    """The inpainting settings need an inpainting base; a slider (prompts alone, no image to repaint) one without."""
    if cfg.inpaint_settings and not c.inpainting:
        raise ConfigError(f"{cfg.inpaint_settings[0]} is for inpainting bases (a {c.family.denoiser_attr} that also "
                          f"takes the mask and the masked image), and {c.name} is a text-to-image model: leave it at "
                          "its default, or train on an inpainting model")
    if cfg.is_slider and c.inpainting:
        raise ConfigError(f"{c.name} is an inpainting model; sliders and erasers train on text-to-image models: use "
                          "the text-to-image model it was made from")


def cache_frozen_text(cfg: Config, c: Components, device: torch.device, precision: str, varying: bool, say,
                      captions: list[str]) -> None:
    """SD3's T5 (the family's frozen text part) encodes every caption, the empty one, the class prompt and the sample
    prompts now, on the device, and is then released, so it never shares memory with the transformer; with
    captions that change every step (shuffled or dropped tags) it stays, keeps those texts, and encodes the varied
    captions as they come without keeping them."""
    held = [f for f in c.frozen_text if f.model is not None]
    if not held:
        return
    dtype = frozen_text_dtype(device.type, precision)
    for f in held:
        f.model.to(device, dtype=dtype)
    texts = {*captions, "", cfg.prior.class_prompt}
    for sp in sample_prompts(cfg, 0):
        texts |= {sp.text, sp.negative}
    for f in held:
        ordered = sorted(texts)
        for start in range(0, len(ordered), FROZEN_TEXT_CHUNK):
            f(ordered[start:start + FROZEN_TEXT_CHUNK], device)
        if varying:
            f.closed = True
        else:
            f.release()
    if varying:
        say("T5 stays in memory: shuffled or dropped tags make a new caption every step")
        return
    if device.type == "cuda":
        torch.cuda.empty_cache()
    say(f"T5 encoded {len(texts)} captions and prompts and was released from memory")


FROZEN_TEXT_CHUNK = 16  # captions T5 encodes at a time while caching


def frozen_text_dtype(device: str, precision: str) -> torch.dtype:
    """SD3's T5 on the device: bf16 when training in bf16 on CUDA, else fp32 (fp16 overflows T5)."""
    return torch.bfloat16 if device == "cuda" and precision == "bf16" else torch.float32


def ensure_class_images(cfg: Config, c: Components, resolution: int, callbacks: Callbacks) -> None:
    """Generate the class images the prior folder lacks, with the base model (no LoRA)."""
    from ...sampling import render, save_png

    if problem := missing_class_images(cfg.prior):
        raise DataError(problem)
    folder = Path(cfg.prior.class_data)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(scan_folder(folder)[0])
    missing = cfg.prior.num_class_images - have
    if missing <= 0:
        return
    callbacks.on_message(f"generating {missing} class images for '{cfg.prior.class_prompt}' into {folder}")
    pipe = c.pipeline()
    pipe.set_progress_bar_config(disable=True)
    seed = cfg.train.seed + 10_000 + have
    for start in range(0, missing, 4):
        n = min(4, missing - start)
        images = render(pipe, [cfg.prior.class_prompt] * n, seed + start, cfg.sample.steps, cfg.sample.guidance,
                        resolution, resolution)
        for i, im in enumerate(images):
            save_png(im, folder / f"class_{have + start + i:05d}.png", {"prompt": cfg.prior.class_prompt})


def load_data(cfg: Config, c: Components, resolution: int, bucket_step: int, concept: Concept,
              say=None, held_out: frozenset | set = frozenset()) -> tuple[Batches, dict]:
    """The examples (bucketed; captions through `concept.prompt`, pivotal tuning's trigger replaced and checked; the
    `held_out` validation images left out), the class images' examples, their batch plans, and the captions of each
    folder (for the file's tag frequencies). Latents are attached by `setup`."""
    import dataclasses

    folders = [(d.path, d.prompt, d.use_captions, d.repeats) for d in cfg.data]
    masks = [(d.masks, d.alpha_mask) for d in cfg.data]
    raw = [e for e in build_examples(folders, resolution, cfg.augment.bucketing, bucket_step, say=say, masks=masks)
           if e.path not in held_out]
    raw = inpaint.attach_masks(cfg, raw) if c.inpainting else raw
    examples = [dataclasses.replace(e, caption=concept.prompt(e.caption)) for e in raw]
    concept.check_captions(examples)
    captions = {d.path: list({e.path: e.caption for e in raw if e.source == i}.values())
                for i, d in enumerate(cfg.data)}
    prior_examples, prior_plan = [], None
    if cfg.prior.has_images:  # class images take the class prompt; the model prior's images keep their captions
        folder = (cfg.prior.class_data, cfg.prior.class_prompt, cfg.prior.mode == "model", 1)
        prior_examples = build_examples([folder], resolution, cfg.augment.bucketing, bucket_step, is_prior=True,
                                        say=say)
        prior_plan = BatchPlan(prior_examples, cfg.train.batch_size, cfg.train.seed + 1)
    batches = Batches(examples, BatchPlan(examples, cfg.train.batch_size, cfg.train.seed), prior_examples,
                      prior_plan, latents=None, conditioning=c.family.conditioning,
                      random_flip=cfg.augment.random_flip, caption_dropout=cfg.augment.caption_dropout,
                      tag_rules=tag_rules(cfg), unmasked_weights=[d.unmasked_weight for d in cfg.data],
                      inpainting=inpaint.masks_for(cfg) if c.inpainting else None)
    if c.inpainting and say is not None:
        drawn = "their masks from data.inpaint_masks" if any(d.inpaint_masks for d in cfg.data) else \
            "random rectangles and brush strokes as masks"
        say(f"inpainting base: images train with {drawn}, {cfg.inpaint.full_mask:.0%} of them masked whole")
    return batches, captions


def tag_rules(cfg: Config) -> list[TagRule]:
    """How each data folder's captions vary from step to step (tag shuffling and dropout)."""
    return [TagRule(d.shuffle_tags, d.keep_tags, d.tag_dropout, d.tag_separator) for d in cfg.data]


def captions_vary(cfg: Config) -> bool:
    """Whether some captions change every step (shuffled or dropped tags): then no text is cached, and SD3's T5
    stays in memory to encode them as they come."""
    return any(r.active for r in tag_rules(cfg))


def use_zero_terminal_snr(cfg: Config, c: Components) -> None:
    """Zero terminal SNR (Lin et al. 2023): the training schedule's betas rescaled (diffusers'
    rescale_betas_zero_snr) so the last timestep is pure noise; the sampler too, where it can, with trailing
    timesteps. Needs v-prediction."""
    import inspect

    from diffusers import DDPMScheduler

    if not cfg.train.zero_terminal_snr:
        return
    if c.prediction_type != "v_prediction":
        raise ConfigError(f"train.zero_terminal_snr needs a v-prediction model and {c.name} predicts "
                          f"{c.prediction_type}; set model.prediction_type v_prediction to train it as one")
    c.noise_scheduler = DDPMScheduler.from_config(c.noise_scheduler.config, rescale_betas_zero_snr=True)
    sampler = type(c.sample_scheduler)
    if "rescale_betas_zero_snr" in inspect.signature(sampler.__init__).parameters:
        c.sample_scheduler = sampler.from_config(c.sample_scheduler.config, rescale_betas_zero_snr=True,
                                                 timestep_spacing="trailing")


def weight_dtype(device: str, precision: str) -> torch.dtype:
    """The frozen denoiser's and text encoders' dtype: the training precision's on CUDA, fp32 on the CPU."""
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return low if device == "cuda" and low else torch.float32


def load_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype weights are loaded in: `weight_dtype` (what place_models casts them to anyway), None (as stored,
    then fp32) where that is fp32."""
    dtype = weight_dtype(device.type, precision)
    return None if dtype == torch.float32 else dtype


def place_models(cfg: Config, c: Components, device: torch.device, precision: str) -> torch.dtype:
    """Frozen denoiser and text encoders in the training precision (NF4 with QLoRA), everything on the device.
    The VAE stays fp32: fp16 VAEs overflow to NaN. Returns the weights' dtype."""
    dtype = weight_dtype(device.type, precision)
    for module in (c.denoiser, *c.text_encoders):
        if dtype != torch.float32:
            module.to(dtype=dtype)
        if cfg.model.quantize == "nf4":
            quantize_nf4(module, device, dtype)
    for module in (c.denoiser, *c.text_encoders, c.vae):
        module.to(device)
    return dtype


def text_encoder_lrs(cfg: Config, n: int) -> list[float]:
    """Learning rate of each text encoder's LoRA (0 = no LoRA on it)."""
    if not cfg.lora.train_text_encoder or cfg.train.max_steps == 0:
        return [0.0] * n
    lrs = [cfg.lora.text_encoder_lr or cfg.optim.lr]
    if n > 1:
        lrs.append((cfg.lora.text_encoder_2_lr or lrs[0]) if cfg.lora.train_text_encoder_2 else 0.0)
    return lrs


def add_adapters(cfg: Config, c: Components, concept: Concept) -> Adapters:
    """LoRA (B = 0: the model is unchanged) on the denoiser's target layers and on the text encoders that train;
    pivotal tuning's new embedding rows stay trainable. With max_steps 0 (plain textual inversion) no LoRA."""
    from diffusers.training_utils import cast_training_params

    torch.manual_seed(cfg.train.seed)  # LoRA A matrices start the same for the same seed
    lo, fam = cfg.lora, c.family
    kind = dict(network=lo.network, args=cfg.network_args)
    layer_lrs: dict[str, float] = {}

    def per_layer(names: list[str]):  # per-block / per-layer rank, alpha and lr (None: the global ones)
        plan = plan_layers(cfg, fam, c.denoiser, names, kohya_namer(fam, c.denoiser.config))
        layer_lrs.update({n: layer.lr for n, layer in (plan or {}).items()})
        return None if plan is None else {n: (layer.rank, layer.alpha) for n, layer in plan.items()}

    targets = inject(c.denoiser, fam.target_patterns(lo.targets), lo.rank, cfg.lora_alpha, lo.dropout,
                     keep=layer_filter(cfg, c), layers=per_layer, **kind) if cfg.train.max_steps > 0 else []
    lrs = text_encoder_lrs(cfg, len(c.text_encoders))
    for i, (encoder, lr) in enumerate(zip(c.text_encoders, lrs)):
        if lr:
            targets += inject(encoder, fam.text_targets, lo.rank, cfg.lora_alpha, lo.dropout, f"text encoder {i + 1}",
                              **kind)
    for param in concept.params:  # peft froze every non-LoRA parameter
        param.requires_grad_(True)
    cast_training_params([c.denoiser, *c.text_encoders], dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
        for encoder, lr in zip(c.text_encoders, lrs):
            if lr:
                encoder.gradient_checkpointing_enable()
    return Adapters(targets, lrs, layer_lrs)


def layer_filter(cfg: Config, c: Components):
    """Which matched denoiser layers get LoRA: not the ones whose output the model discards (the family's
    unused_layers: SD3's last context query), and with lora.blocks only the chosen blocks' (layers outside every
    block stay); None when every matched layer does."""
    from ...config import block_indices

    fam = c.family
    unused = fam.unused_layers(c.denoiser.config) if fam.unused_layers else set()
    wanted = set(block_indices(cfg.lora.blocks)) if cfg.lora.blocks.strip() else None
    if wanted:
        depth = c.denoiser.config.num_layers
        if max(wanted) >= depth:
            raise ConfigError(f"lora.blocks: block {max(wanted)} does not exist; {c.name} has blocks 0-{depth - 1}")
    prefix = fam.block_prefix + "."
    if not unused and wanted is None:
        return None

    def keep(name: str) -> bool:
        if name in unused:
            return False
        return wanted is None or not name.startswith(prefix) or int(name[len(prefix):].split(".")[0]) in wanted
    return keep


def make_optimizers(cfg: Config, acc, c: Components, adapters: Adapters, concept: Concept):
    """The optimizers with the LR schedule (the concept's own too), and accelerate's wrapping of the models that
    train: (Optimizers, denoiser as the step runs it, text encoders as the step runs them)."""
    from diffusers.optimization import get_scheduler

    has_lora = cfg.train.max_steps > 0
    groups = param_groups(named_lora_parameters(c.denoiser), adapters.layer_lrs, cfg.optim.lr) if has_lora else []
    groups += [{"params": lora_parameters(e), "lr": lr} for e, lr in zip(c.text_encoders, adapters.text_lrs) if lr]
    lora_params = [p for g in groups for p in g["params"]]
    groups += concept.main_groups()
    if has_lora:
        groups = loraplus_groups(groups, [c.denoiser, *c.text_encoders], cfg.optim.loraplus_ratio)
    # plain textual inversion: the schedule needs an optimizer, which never steps
    main = make_optimizer(cfg, groups or [{"params": concept.params, "lr": 0.0}], acc.device)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, main, num_warmup_steps=scheduler_warmup(cfg),
                                 num_training_steps=max(cfg.train.max_steps, 1))
    denoiser = acc.prepare(c.denoiser)
    encoders = [acc.prepare(e) if trains(e) else e for e in c.text_encoders]
    main = acc.prepare(main)
    concept.prepare(acc)
    optim = Optimizers(main, lr_scheduler, [p for g in groups for p in g["params"]], lora_params,
                       make_ema(cfg, lora_params))
    return optim, denoiser, encoders


def trains(module: torch.nn.Module) -> bool:
    """Whether anything in the module trains (a LoRA, pivotal tuning's new rows): then accelerate wraps it."""
    return any(p.requires_grad for p in module.parameters())
