"""What a run writes: the LoRA file (with bundled embeddings), the embedding file beside it, sample images and
resumable checkpoints."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ...callbacks import Callbacks
from ...errors import WriteError
from ...loras.files import DTYPES, write_lora
from ...loras.layout import diffusers_tensors, kohya_tensors, peft_modules
from ...loras.metadata import training_metadata
from ..run.state import TrainState
from . import checkpoint as ckpt
from .selection import step_metadata


def write_output(state: TrainState, states: dict, step: int, path: Path, extra_meta: dict | None = None) -> Path:
    """The LoRA file in the configured layout and, for pivotal tuning, the embedding file beside it (plain textual
    inversion: the embedding file is the output)."""
    cfg, c, concept = state.cfg, state.components, state.concept
    denoiser_config = state.models.denoiser.module.config
    dtype = DTYPES[cfg.output.dtype]
    extra = {"sdlora_processes": str(state.world), **(extra_meta or {})}
    if state.optim.ema is not None:
        extra["sdlora_ema"] = json.dumps({"decay": cfg.optim.ema_decay, "updates": state.optim.ema.optimization_step})
    extra.update(concept.metadata())
    if not states:  # plain textual inversion: the embedding file is the output
        return concept.save(path, dtype)
    concept.save(path.with_name(path.stem + "_emb.safetensors"), dtype)
    for f in c.frozen_text:  # SD3: whether T5 took part (--no-t5: zero T5 embeddings), and its length
        extra["sdlora_t5"] = json.dumps({"used": f.present, "max_length": f.length})
    meta = training_metadata(cfg, c.family, c.prediction_type, model_name=c.name, model_hash=c.model_hash(),
                             steps=step, resolution=state.resolution, targets=state.adapters.targets,
                             started=state.started, captions_by_folder=state.captions_by_folder, extra=extra,
                             denoiser_config=denoiser_config)
    mods, names = peft_modules(states, cfg.lora_alpha, c.family, denoiser_config, adapted_ranks(state, states))
    if cfg.output.format == "kohya":
        tensors = {**kohya_tensors(mods, dtype), **concept.bundle(dtype)}  # diffusers' loader rejects the bundle
    else:
        tensors, adapter_meta = diffusers_tensors(mods, names, dtype)
        meta.update({**adapter_meta, "sdlora_format": "diffusers"})
    return write_lora(path, tensors, meta)


def adapted_ranks(state: TrainState, states: dict) -> dict[str, dict[str, tuple[int, float]]]:
    """{part: {module path: (rank, alpha)}} of the adapted layers, as peft holds them (conv_rank changes some)."""
    from ..run.adapters import layer_ranks

    parts = state.parts()
    return {part: layer_ranks(parts[part]) for part in states}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image's settings: a [[sample.prompts]] table, or a plain prompt with the [sample] defaults."""

    text: str
    negative: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    lora_scale: float


def sample_prompts(cfg, resolution: int) -> list[SamplePrompt]:
    """Every sample's settings with the defaults filled in (prompt i's seed: sample.seed + i)."""
    out = []
    for i, p in enumerate(cfg.sample.prompts):
        t = {"text": p} if isinstance(p, str) else p
        out.append(SamplePrompt(t["text"], t.get("negative", ""), t.get("seed", cfg.sample.seed + i),
                                t.get("width") or resolution, t.get("height") or resolution,
                                t.get("steps") or cfg.sample.steps, float(t.get("guidance", cfg.sample.guidance)),
                                float(t.get("lora_scale", 1.0))))
    return out


@contextmanager
def lora_scaled(models, scale: float):
    """The LoRA of these models applied at `scale` inside the block, as clients apply a strength (W + scale dW): the
    layers' scaling multiplied, a DoRA layer's output mixed with its base's (`dora.at_strength`)."""
    from ..run.dora import at_strength, is_dora

    layers = [m for model in models for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    saved = [dict(m.scaling) for m in layers]
    hooks = []
    for m in layers:
        if scale != 1 and is_dora(m):
            hooks += at_strength(m, scale)
        else:
            m.scaling = {k: v * scale for k, v in m.scaling.items()}
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, s in zip(layers, saved):
            m.scaling = s


def write_samples(state: TrainState, step: int, callbacks: Callbacks) -> list[str]:
    """The sample prompts rendered with the LoRA as it is at `step` (same seeds every time), each with its own
    settings, saved with them in the PNG's text and listed in the run's log; an inpainting base repaints the sample
    image under the sample mask (`inpaint.sample_inputs`)."""
    from ...sampling import render, save_png
    from ..steps.inpaint import sample_inputs

    cfg, denoiser = state.cfg, state.models.denoiser.module
    out = Path(cfg.output.path)
    folder = out.with_name(out.stem + "_samples")
    denoiser.eval()
    pipe = state.components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    paths, records = [], []
    with state.optim.evaluation():  # the EMA's / schedule-free's averaged weights
        for i, sp in enumerate(sample_prompts(cfg, state.resolution)):
            inpaint = sample_inputs(cfg, state.batches.examples, sp.width, sp.height) if state.components.inpainting \
                else {}
            with state.acc.autocast(), lora_scaled(state.models.modules(), sp.lora_scale):
                image = render(pipe, [state.concept.prompt(sp.text)], sp.seed, sp.steps, sp.guidance, sp.width,
                               sp.height, sp.negative, embeds=state.models.text.for_pipeline(), **inpaint)[0]
            settings = {"prompt": sp.text, **{k: v for k, v in asdict(sp).items() if k != "text"}, "step": step}
            path = folder / f"step_{step:07d}_{i}.png"
            paths.append(str(save_png(image, path, {**settings, "parameters": _a1111_text(sp)})))
            records.append({"step": step, "sample": path.name, **settings})
    denoiser.train()
    with open(out.with_name(out.stem + "_log.jsonl"), "a") as log:
        log.write("".join(json.dumps(r) + "\n" for r in records))
    callbacks.on_sample(step, paths)
    return paths


def _a1111_text(sp: SamplePrompt) -> str:
    """AUTOMATIC1111's 'parameters' text, which image viewers and A1111's PNG Info read."""
    return (f"{sp.text}\nNegative prompt: {sp.negative}\nSteps: {sp.steps}, CFG scale: {sp.guidance:g}, "
            f"Seed: {sp.seed}, Size: {sp.width}x{sp.height}, LoRA scale: {sp.lora_scale:g}")


def write_checkpoint(state: TrainState, step: int, callbacks: Callbacks) -> str:
    """A resumable checkpoint (LoRA, embeddings, optimizers, schedule, EMA, best validation) and the LoRA file of
    this step (with EMA: the averaged weights; the checkpoint keeps the raw ones)."""
    path = ckpt.checkpoint_path(state.cfg.output.path, step)
    if state.acc.is_main_process:
        extra = state.concept.state_dict()
        if state.optim.ema is not None:
            extra["ema"] = state.optim.ema.state_dict()
        if state.validation is not None:
            extra["validation"] = state.validation.best.state_dict()
        if state.image_validation is not None:
            extra["image_validation"] = state.image_validation.state_dict()
        states = state.lora_states()
        last = ckpt.latest_checkpoint(state.cfg.output.path)
        try:
            ckpt.save_state(path, step, states, state.optim.main, state.optim.lr_scheduler, state.cfg.to_dict(),
                            state.acc.scaler, extra)
            with state.optim.evaluation():
                write_output(state, state.lora_states(), step, path.with_suffix(".safetensors"),
                             step_metadata(state, step))
        except WriteError as e:
            raise WriteError(f"{e}; " + (f"the last good checkpoint is {last}" if last else "no checkpoint yet")) \
                from None
        callbacks.on_checkpoint(step, str(path))
    state.acc.wait_for_everyone()
    return str(path)


def best_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_best.safetensors")


def write_best(state: TrainState, step: int, meta: dict[str, str]) -> Path:
    """NAME_best.safetensors from the weights as they are now (call inside `state.optim.evaluation()`), with `meta`
    (its step, what chose it, the validation's loss and scores) in its metadata; written atomically, replacing the
    previous best."""
    return write_output(state, state.lora_states(), step, best_path(state.cfg.output.path), meta)
