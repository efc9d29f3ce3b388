"""Training: `training_step` (pure: batch in, loss out) and `train(config, callbacks, commands)`.

Step N's noise, timesteps, augmentation and batch derive from (seed, N, rank) alone, so a resumed run
reproduces an uninterrupted one exactly. Progress, samples and checkpoints are callbacks; stop / sample now /
save now are commands the loop polls. The CLI and the UI differ only in what they register.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import objective
from .callbacks import Callbacks, Commands
from .config import Config, validate
from .data import BatchPlan, build_examples, scan_folder
from .errors import ConfigError, DataError, ModelError, TrainingError
from .io import atomic_write_text
from .lora import TEXT_PATTERNS, UNET_PATTERNS, inject, lora_parameters, zero_update_modules
from .quantize import quantize_nf4, require_bitsandbytes
from .run import Run

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: str
    steps: int
    final_loss: float
    seconds: float
    stopped: bool = False
    samples: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    log: str = ""
    trigger: str = ""
    is_main: bool = True  # False on the other processes of a multi-process run

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


# ---------------------------------------------------------------- the step

def seeded(seed: int, step: int, rank: int, micro: int = 0) -> tuple[torch.Generator, np.random.Generator]:
    """Generators for one micro-batch, from (seed, step, rank, micro) alone."""
    key = [seed, step, rank, micro]
    g = torch.Generator("cpu").manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
    return g, np.random.default_rng(key)


def diffusion_loss(unet, latents, cond: dict, scheduler, gen, train_cfg, with_noisy: bool = False):
    """Per-sample loss of the UNet on noised latents; optionally also returns (noisy, timesteps)."""
    from .conditioning import unet_kwargs

    noise = objective.sample_noise(latents, gen, train_cfg.noise_offset)
    t = objective.sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, gen, latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, **unet_kwargs(cond), return_dict=False)[0]
    weights = objective.snr_weights(scheduler, t, train_cfg.min_snr_gamma) if train_cfg.min_snr_gamma else None
    loss = objective.per_sample_loss(pred, objective.target(scheduler, latents, noise, t), weights)
    return (loss, noisy, t) if with_noisy else loss


def training_step(run: "Run", step: int, micro: int) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch: instance loss, plus prior-preservation loss when configured."""
    cfg = run.cfg
    gen, rng = seeded(cfg.train.seed, step, run.rank, micro)
    k = (step * cfg.train.grad_accum + micro) * run.world + run.rank
    latents, cond = run.batch(run.plan(k), rng)
    loss, noisy, t = diffusion_loss(run.unet, latents, cond, run.noise_scheduler, gen, cfg.train, with_noisy=True)
    loss = loss.mean()
    stats = {"loss_instance": loss.detach()}
    if run.prior_plan is not None:
        p_lat, p_cond = run.batch(run.prior_plan(k), rng, prior=True)
        prior = diffusion_loss(run.unet, p_lat, p_cond, run.noise_scheduler, gen, cfg.train).mean()
    elif cfg.prior.class_prompt and cfg.prior.mode == "model":
        prior = run.model_prior_loss(noisy, t, cond)
    else:
        prior = None
    if prior is not None:
        stats["loss_prior"] = prior.detach()
        loss = loss + cfg.prior.weight * prior
    return loss, stats


# ---------------------------------------------------------------- setup

def _mixed_precision(cfg: Config) -> str:
    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several jobs run in one process (queue, UI): each gets a fresh precision setting; the process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    mp = _mixed_precision(cfg)
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    # cpu=True lets accelerate run DDP over gloo when launched with several processes and no GPU
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def resolve_resolution(cfg: Config, components) -> tuple[int, int]:
    """(resolution, bucket step) that fit the VAE and UNet down-sampling of this model."""
    vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    multiple = vae_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)
    res = cfg.augment.resolution or components.unet.config.sample_size * vae_factor
    if res % multiple:
        raise ConfigError(f"resolution {res} must be a multiple of {multiple} for this model")
    return res, max(multiple, math.ceil(res / 64 / multiple) * multiple)


def ensure_class_images(cfg: Config, components, resolution: int, callbacks: Callbacks) -> None:
    """Generate the class images the prior folder lacks, with the base model (no LoRA)."""
    from .sample import render, save_png

    folder = Path(cfg.prior.class_data)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(scan_folder(folder)[0])
    missing = cfg.prior.num_class_images - have
    if missing <= 0:
        if have == 0:
            raise DataError(f"no class images in {folder}; set num_class_images to have them generated")
        return
    callbacks.on_message(f"generating {missing} class images for '{cfg.prior.class_prompt}' into {folder}")
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    seed = cfg.train.seed + 10_000 + have
    for start in range(0, missing, 4):
        n = min(4, missing - start)
        images = render(pipe, [cfg.prior.class_prompt] * n, seed + start, cfg.sample.steps, cfg.sample.guidance,
                        resolution, resolution)
        for i, im in enumerate(images):
            save_png(im, folder / f"class_{have + start + i:05d}.png", {"prompt": cfg.prior.class_prompt})


def setup(cfg: Config, accelerator, callbacks: Callbacks, components=None) -> Run:
    """Load the model (unless `components` are given), data and LoRA; build caches, optimizer and schedule."""
    from .models import load_components

    components = components or load_components(cfg.model_path, cfg.model.prediction_type)
    run = Run(cfg, accelerator, components)
    _setup_data(run, callbacks)
    run.new_tokens = _add_pivotal_tokens(run)
    run.plan = BatchPlan(run.examples, cfg.train.batch_size, cfg.train.seed)
    _setup_models(run)
    run.cache_latents = cfg.train.cache_latents and cfg.augment.crop == "center"
    if cfg.train.cache_latents and not run.cache_latents:
        callbacks.on_message("latent caching is off: random crop needs a fresh crop every step")
    run.set_phase(0)
    run.precompute()
    _setup_optimizers(run)
    return run


def _setup_data(run: Run, callbacks: Callbacks) -> None:
    """Examples (bucketed), captions for the metadata, and class images for prior preservation."""
    cfg, acc = run.cfg, run.acc
    res, step = resolve_resolution(cfg, run.c)
    run.resolution = res
    folders = [(d.path, d.prompt, d.use_captions, d.repeats) for d in cfg.data]
    run.examples = build_examples(folders, res, cfg.augment.bucketing, step)
    run.captions_by_folder = {d.path: [c for _, c in scan_folder(d.path, d.prompt, d.use_captions)[0]]
                              for d in cfg.data}
    run.prior_examples, run.prior_plan = [], None
    if cfg.prior.class_prompt and cfg.prior.mode == "images":
        if acc.is_main_process:
            ensure_class_images(cfg, run.c, res, callbacks)
        acc.wait_for_everyone()
        run.prior_examples = build_examples([(cfg.prior.class_data, cfg.prior.class_prompt, False, 1)], res,
                                            cfg.augment.bucketing, step, is_prior=True)
        run.prior_plan = BatchPlan(run.prior_examples, cfg.train.batch_size, cfg.train.seed + 1)


def _setup_models(run: Run) -> None:
    """Device and dtype of the frozen models, then LoRA on the UNet (and text encoders) through peft."""
    from diffusers.training_utils import cast_training_params

    cfg, acc, c = run.cfg, run.acc, run.c
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32) \
        if acc.device.type == "cuda" else torch.float32
    unet, encoders = c.unet, c.text_encoders
    for module in (unet, *encoders):  # the VAE stays fp32: fp16 VAEs overflow to NaN
        if run.weight_dtype != torch.float32:
            module.to(dtype=run.weight_dtype)
        if cfg.model.quantize == "nf4":
            quantize_nf4(module, acc.device, run.weight_dtype)
    for module in (unet, *encoders, c.vae):
        module.to(acc.device)
    torch.manual_seed(cfg.train.seed)  # LoRA A matrices start the same for the same seed
    run.has_lora = cfg.train.max_steps > 0  # pivotal with no LoRA steps is plain textual inversion
    run.targets = inject(unet, UNET_PATTERNS[cfg.lora.targets], cfg.lora.rank, cfg.lora_alpha,
                         cfg.lora.dropout) if run.has_lora else []
    run.te_lrs = _text_encoder_lrs(cfg, len(encoders)) if run.has_lora else [0.0] * len(encoders)
    for i, (te, lr) in enumerate(zip(encoders, run.te_lrs)):
        if lr:
            run.targets += inject(te, TEXT_PATTERNS, cfg.lora.rank, cfg.lora_alpha, cfg.lora.dropout,
                                  f"text encoder {i + 1}")
    for param in run.new_tokens.params if run.new_tokens else []:  # peft froze every non-LoRA parameter
        param.requires_grad_(True)
    cast_training_params([unet, *encoders], dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te, lr in zip(encoders, run.te_lrs):
            if lr:
                te.gradient_checkpointing_enable()
    run.text_encoders = list(encoders)


def _setup_optimizers(run: Run) -> None:
    """AdamW over the LoRA (and phase-2 embedding) groups with its LR schedule, a phase-1 optimizer for the new
    embedding, and accelerate's wrapping of whatever trains."""
    from diffusers.optimization import get_scheduler

    cfg, acc, encoders = run.cfg, run.acc, run.text_encoders
    groups = [{"params": lora_parameters(run.c.unet), "lr": cfg.optim.lr}] if run.has_lora else []
    groups += [{"params": lora_parameters(te), "lr": lr} for te, lr in zip(encoders, run.te_lrs) if lr]
    emb = run.new_tokens.params if run.new_tokens else []
    if emb and cfg.pivotal.continue_lr > 0:
        groups.append({"params": emb, "lr": cfg.pivotal.continue_lr, "weight_decay": 0.0})
    optimizer = _optimizer(cfg, groups or [{"params": emb, "lr": 0.0}], acc.device)
    run.lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                     num_training_steps=max(cfg.train.max_steps, 1))
    ti_optimizer = torch.optim.AdamW(emb, lr=cfg.pivotal.ti_lr, weight_decay=0.0) if cfg.ti_steps else None
    trained = [i for i, lr in enumerate(run.te_lrs) if lr or emb]  # wrapped for DDP
    models = [run.c.unet] + [encoders[i] for i in trained]
    prepared = acc.prepare(*models, optimizer, *([ti_optimizer] if ti_optimizer else []))
    run.unet, run.optimizer = prepared[0], prepared[len(models)]
    for j, i in enumerate(trained):
        run.text_encoders[i] = prepared[1 + j]
    run.ti_optimizer = prepared[-1] if ti_optimizer else None
    run.params = [p for g in groups for p in g["params"]]
    run.lora_params = [p for p in run.params if not any(p is e for e in emb)]


def _text_encoder_lrs(cfg: Config, n: int) -> list[float]:
    """Learning rate of each text encoder's LoRA (0 = no LoRA on it)."""
    if not cfg.lora.train_text_encoder:
        return [0.0] * n
    lrs = [cfg.lora.text_encoder_lr or cfg.optim.lr]
    if n > 1:
        lrs.append((cfg.lora.text_encoder_2_lr or lrs[0]) if cfg.lora.train_text_encoder_2 else 0.0)
    return lrs


def _add_pivotal_tokens(run: Run):
    """Pivotal tuning: add the new token(s) and put them in place of the trigger in every caption."""
    import dataclasses

    from .embeddings import add_concept

    pv = run.cfg.pivotal
    if not pv.token:
        return None
    new = add_concept(run.tokenizers, run.c.text_encoders, pv.token, pv.num_vectors, pv.init_word,
                      run.cfg.train.seed)
    run.new_tokens, run.new_tokens_init = new, new.vectors()
    run.examples = [dataclasses.replace(e, caption=run.prompt(e.caption)) for e in run.examples]
    if not any(pv.token in e.caption for e in run.examples):
        what = f"the trigger {pv.trigger!r}" if pv.trigger else f"the token {pv.token!r}"
        raise ConfigError(f"no caption or instance prompt contains {what}; put it in the captions "
                          "or set pivotal.trigger")
    return new


def _check_bitsandbytes(cfg: Config) -> None:
    """QLoRA and 8-bit Adam need a bitsandbytes that runs here: say so before any model loads."""
    if cfg.model.quantize != "none":
        require_bitsandbytes(cfg.model.quantize, f"QLoRA (quantize = {cfg.model.quantize})")
    if cfg.optim.optimizer == "adamw8bit":
        try:
            require_bitsandbytes("adamw8bit", "optimizer adamw8bit")
        except ModelError as e:
            raise ConfigError(f"{e}; or use --optimizer adamw") from None


def _optimizer(cfg: Config, groups: list[dict], device) -> torch.optim.Optimizer:
    kw = dict(weight_decay=cfg.optim.weight_decay)
    if cfg.optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # present: train() checked before loading

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


# ---------------------------------------------------------------- the loop

def train(cfg: Config, callbacks: Callbacks | None = None, commands: Commands | None = None,
          resume: bool = False) -> TrainResult:
    """Train one LoRA as configured; returns where it went and how it went. Raises SdloraError on bad input."""
    validate(cfg)
    _check_bitsandbytes(cfg)
    callbacks, commands = callbacks or Callbacks(), commands or Commands()
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    run = setup(cfg, acc, callbacks if main else Callbacks())
    out = Path(cfg.output.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    run.start_step = step = _resume(run, out, callbacks) if resume else 0
    result = TrainResult(output=str(out), steps=step, final_loss=float("nan"), seconds=0.0,
                         log=str(out.with_name(out.stem + "_log.jsonl")), is_main=main)
    if main:
        _trim_log(Path(result.log), step)
        callbacks.on_start(run)
        if step == 0 and cfg.sample.prompts:
            result.samples += _samples(run, 0, callbacks)
    t0 = time.time()
    with open(result.log, "a") if main else contextlib.nullcontext() as log_file:
        while step < cfg.total_steps and not result.stopped:
            loss, stats = _optimizer_step(run, step)
            step += 1
            stats.update(loss=loss, lr=run.lr_scheduler.get_last_lr()[0], step=step)
            result.final_loss = loss
            if main:
                log_file.write(json.dumps({k: round(float(v), 8) for k, v in stats.items()}) + "\n")
                log_file.flush()
                callbacks.on_step(step, stats)
            _periodic(run, step, result, commands, callbacks)
    result.steps, result.seconds = step, time.time() - t0
    _check_in_sync(run)
    if result.stopped:  # the checkpoint holds everything; the final file is written when the run completes
        result.output = str(Path(result.checkpoints[-1]).with_suffix(".safetensors"))
    else:
        parts = run.lora_parts()
        _check_update(run, parts, step)
        if main:
            if cfg.sample.prompts:
                result.samples += _samples(run, step, callbacks)
            _write_output(run, parts, step, out)
    if main:
        from .export import trigger_words

        result.trigger = run.new_tokens.token if run.new_tokens else trigger_words(cfg)
        callbacks.on_end(result)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _resume(run: Run, out: Path, callbacks: Callbacks) -> int:
    """Load the newest checkpoint of this output (LoRA, embeddings, optimizers, schedule); its step, or 0."""
    path = ckpt.latest_checkpoint(out)
    if path is None:
        callbacks.on_message(f"no checkpoint in {ckpt.checkpoint_dir(out)}; starting from step 0")
        return 0
    state = ckpt.load_state(path, run.cfg.to_dict())
    run.load_lora_parts(state["lora"])
    if run.new_tokens is not None:
        run.new_tokens.load(state["embeddings"])
        if run.ti_optimizer is not None:
            run.ti_optimizer.load_state_dict(state["ti_optimizer"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler") and run.acc.scaler is not None:
        run.acc.scaler.load_state_dict(state["scaler"])
    callbacks.on_message(f"resumed from {path} at step {state['step']}")
    return state["step"]


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written before an interruption, and about to be trained again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(x + "\n" for x in kept))


def _periodic(run: Run, step: int, result: TrainResult, commands: Commands, callbacks: Callbacks) -> None:
    """Samples and checkpoints when due or asked for; a stop request ends the run after a checkpoint."""
    cfg = run.cfg
    done = step == cfg.total_steps
    stop, save_now, sample_now = _synced(run, commands.stop, commands.save_now, commands.sample_now)
    if cfg.sample.prompts and run.acc.is_main_process and (
            (cfg.sample.every and step % cfg.sample.every == 0 and not done) or sample_now):
        result.samples += _samples(run, step, callbacks)
    if (cfg.output.save_every and step % cfg.output.save_every == 0 and not done) or save_now or stop:
        result.checkpoints.append(_checkpoint(run, step, callbacks))
    commands.sample_now = commands.save_now = False
    result.stopped = stop


def _synced(run: Run, *flags: bool) -> list[bool]:
    """Command flags as the main process sees them, on every process (so all stop or save together)."""
    if run.world == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=run.device)
    return [bool(v) for v in run.acc.reduce(t, "max").tolist()]


def _optimizer_step(run: Run, step: int) -> tuple[float, dict]:
    """Forward/backward over grad_accum micro-batches, clip, step. Raises on a non-finite loss."""
    cfg, acc = run.cfg, run.acc
    torch.manual_seed(cfg.train.seed * 1_000_003 + step)  # LoRA dropout: per-step too
    run.unet.train()
    phase = run.set_phase(step)
    total, stats = 0.0, {}
    for micro in range(cfg.train.grad_accum):
        sync = micro == cfg.train.grad_accum - 1
        with acc.no_sync(run.unet) if not sync and acc.num_processes > 1 else contextlib.nullcontext(), acc.autocast():
            loss, stats = training_step(run, step, micro)
        if not torch.isfinite(loss):
            last = ckpt.latest_checkpoint(cfg.output.path)
            raise TrainingError(
                f"loss became {loss.item()} at step {step + 1}: lower the learning rate (now {cfg.optim.lr})"
                + (" or use --mixed-precision bf16/no" if acc.mixed_precision == "fp16" else "")
                + (f"; last good checkpoint: {last}" if last else ""))
        acc.backward(loss / cfg.train.grad_accum)
        total += loss.item() / cfg.train.grad_accum
    if phase == 1:  # textual inversion: only the new embedding steps (the LoRA is still the identity)
        for p in run.lora_params:
            p.grad = None
        _clip(run, run.new_tokens.params)
        run.ti_optimizer.step()
        run.ti_optimizer.zero_grad(set_to_none=True)
    else:
        if run.new_tokens is not None and cfg.pivotal.continue_lr == 0:
            for param in run.new_tokens.params:  # frozen embedding in phase 2
                param.grad = None
        _clip(run, run.params)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    if acc.num_processes > 1:  # log the loss of the whole batch, not of this rank's share
        stats["loss"] = torch.tensor(total, device=acc.device)
        stats = {k: acc.reduce(v.detach().reshape(1).float(), "mean") for k, v in stats.items()}
        total = stats.pop("loss").item()
    return total, {k: v.item() for k, v in stats.items()}


def _clip(run: Run, params) -> None:
    if run.cfg.optim.max_grad_norm:
        run.acc.clip_grad_norm_(list(params), run.cfg.optim.max_grad_norm)


def _check_in_sync(run: Run) -> None:
    """Under several processes, every rank must hold the same LoRA weights (DDP kept them in sync)."""
    if run.world == 1:
        return
    params = run.lora_params + (run.new_tokens.params if run.new_tokens else [])
    sums = torch.stack([p.detach().double().sum() for p in params]).to(run.device)
    gathered = run.acc.gather(sums[None]).cpu()
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=0, atol=1e-9):
        raise TrainingError("LoRA weights differ between processes; gradients were not synchronised")


def _check_update(run: Run, parts: dict, step: int) -> None:
    """A LoRA (or embedding) that never moved from its start would change nothing: an error, not a file."""
    if run.new_tokens is not None and all(torch.equal(a, b) for a, b in zip(run.new_tokens.vectors(),
                                                                          run.new_tokens_init)):
        raise TrainingError(f"the new embedding of {run.cfg.pivotal.token} never changed in {step} steps; "
                            "raise pivotal.ti_lr or train more steps")
    if not parts:
        return
    zero = [m for state in parts.values() for m in zero_update_modules(state)]
    total = sum(1 for state in parts.values() for k in state if k.endswith(".lora_B.weight"))
    if zero and len(zero) == total:
        raise TrainingError(f"the LoRA is still zero after {step} steps, so it would change nothing; "
                            "raise the learning rate or train more steps")
    if zero:
        log.warning("%d of %d LoRA layers never changed (e.g. %s)", len(zero), total, zero[0])


def _samples(run: Run, step: int, callbacks: Callbacks) -> list[str]:
    from .sample import render, save_png

    cfg, out = run.cfg, Path(run.cfg.output.path)
    unet = run.acc.unwrap_model(run.unet)
    unet.eval()
    pipe = run.c.pipeline(unet=unet, text_encoders=[run.acc.unwrap_model(te) for te in run.text_encoders])
    pipe.set_progress_bar_config(disable=True)
    with run.acc.autocast():
        images = render(pipe, [run.prompt(p) for p in cfg.sample.prompts], cfg.sample.seed, cfg.sample.steps, cfg.sample.guidance,
                        run.resolution, run.resolution)
    folder = out.with_name(out.stem + "_samples")
    paths = [str(save_png(im, folder / f"step_{step:07d}_{i}.png",
                          {"prompt": p, "step": step, "seed": cfg.sample.seed + i}))
             for i, (im, p) in enumerate(zip(images, cfg.sample.prompts))]
    unet.train()
    callbacks.on_sample(step, paths)
    return paths


def _checkpoint(run: Run, step: int, callbacks: Callbacks) -> str:
    path = ckpt.checkpoint_path(run.cfg.output.path, step)
    if run.acc.is_main_process:
        extra = {}
        if run.new_tokens is not None:
            extra["embeddings"] = run.new_tokens.vectors()
            if run.ti_optimizer is not None:
                extra["ti_optimizer"] = run.ti_optimizer.state_dict()
        ckpt.save_state(path, step, run.lora_parts(), run.optimizer, run.lr_scheduler, run.cfg.to_dict(),
                        run.acc.scaler, extra)
        _write_output(run, run.lora_parts(), step, path.with_suffix(".safetensors"))
        callbacks.on_checkpoint(step, str(path))
    run.acc.wait_for_everyone()
    return str(path)


def _write_output(run: Run, parts: dict, step: int, path: Path) -> Path:
    """The LoRA file (with bundled embeddings) and, for pivotal tuning, the embedding file beside it."""
    from .embeddings import embedding_file
    from .export import lora_metadata, save_lora
    from .formats import DTYPES, sgm_namer

    extra = {"sdlora_processes": str(run.world)}
    concept, dtype = run.new_tokens, DTYPES[run.cfg.output.dtype]
    if concept is not None:
        extra.update({"modelspec.trigger_phrase": concept.token,
                      "sdlora_embeddings": json.dumps({concept.token: run.cfg.pivotal.num_vectors})})
        if not parts:  # plain textual inversion: the embedding is the output
            return embedding_file(path, concept, dtype)
        embedding_file(path.with_name(path.stem + "_emb.safetensors"), concept, dtype)
    meta = lora_metadata(run.cfg, run.c, steps=step, resolution=run.resolution, targets=run.targets,
                         started=run.started, captions_by_folder=run.captions_by_folder, extra=extra)
    namer = sgm_namer(run.c.unet.config) if run.c.family.name == "sdxl" else None
    return save_lora(path, parts, run.cfg, meta, extra_tensors=concept.bundle(dtype) if concept else {},
                     unet_path=namer)
