"""What a run writes: the LoRA file (with bundled embeddings), the embedding file beside it, sample images and
resumable checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from ..callbacks import Callbacks
from ..loras.files import DTYPES, write_embedding, write_lora
from ..loras.layout import bundle_tensors, diffusers_tensors, kohya_tensors, peft_modules
from ..loras.metadata import training_metadata
from . import checkpoint as ckpt
from .state import TrainState


def write_output(state: TrainState, states: dict, step: int, path: Path, extra_meta: dict | None = None) -> Path:
    """The LoRA file in the configured layout and, for pivotal tuning, the embedding file beside it (plain textual
    inversion: the embedding file is the output)."""
    cfg, c, concept = state.cfg, state.components, state.concept
    dtype = DTYPES[cfg.output.dtype]
    extra = {"sdlora_processes": str(state.world), **(extra_meta or {})}
    if state.optim.ema is not None:
        extra["sdlora_ema"] = json.dumps({"decay": cfg.optim.ema_decay, "updates": state.optim.ema.optimization_step})
    if concept is not None:
        extra.update({"modelspec.trigger_phrase": concept.token,
                      "sdlora_embeddings": json.dumps({concept.token: cfg.pivotal.num_vectors})})
        if not states:
            return write_embedding(path, concept.token, concept.tensors(dtype))
        write_embedding(path.with_name(path.stem + "_emb.safetensors"), concept.token, concept.tensors(dtype))
    meta = training_metadata(cfg, c.family, c.prediction_type, model_name=c.name, model_hash=c.model_hash(),
                             steps=step, resolution=state.resolution, targets=state.adapters.targets,
                             started=state.started, captions_by_folder=state.captions_by_folder, extra=extra)
    mods, names = peft_modules(states, cfg.lora_alpha, c.family, c.denoiser.config)
    if cfg.output.format == "kohya":
        tensors = kohya_tensors(mods, dtype)
        if concept is not None:  # diffusers' loader rejects bundled keys: kohya files only
            tensors.update(bundle_tensors(concept.token, concept.tensors(dtype)))
    else:
        tensors, adapter_meta = diffusers_tensors(mods, names, dtype)
        meta.update({**adapter_meta, "sdlora_format": "diffusers"})
    return write_lora(path, tensors, meta)


def write_samples(state: TrainState, step: int, callbacks: Callbacks) -> list[str]:
    """The sample prompts rendered with the LoRA as it is at `step` (same seeds every time)."""
    from ..sampling import render, save_png

    cfg, c = state.cfg, state.components
    c.denoiser.eval()
    pipe = c.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with state.acc.autocast(), state.optim.evaluation():
        images = render(pipe, [state.prompt(p) for p in cfg.sample.prompts], cfg.sample.seed, cfg.sample.steps,
                        cfg.sample.guidance, state.resolution, state.resolution)
    out = Path(cfg.output.path)
    folder = out.with_name(out.stem + "_samples")
    paths = [str(save_png(im, folder / f"step_{step:07d}_{i}.png",
                          {"prompt": p, "step": step, "seed": cfg.sample.seed + i}))
             for i, (im, p) in enumerate(zip(images, cfg.sample.prompts))]
    c.denoiser.train()
    callbacks.on_sample(step, paths)
    return paths


def write_checkpoint(state: TrainState, step: int, callbacks: Callbacks) -> str:
    """A resumable checkpoint (LoRA, embeddings, optimizers, schedule, EMA, best validation) and the LoRA file of
    this step (with EMA: the averaged weights; the checkpoint keeps the raw ones)."""
    path = ckpt.checkpoint_path(state.cfg.output.path, step)
    if state.acc.is_main_process:
        extra = {}
        if state.concept is not None:
            extra["embeddings"] = state.concept.vectors()
            if state.optim.embedding is not None:
                extra["ti_optimizer"] = state.optim.embedding.state_dict()
        if state.optim.ema is not None:
            extra["ema"] = state.optim.ema.state_dict()
        if state.validation is not None:
            extra["validation"] = state.validation.best.state_dict()
        states = state.lora_states()
        ckpt.save_state(path, step, states, state.optim.main, state.optim.lr_scheduler, state.cfg.to_dict(),
                        state.acc.scaler, extra)
        with state.optim.evaluation():
            write_output(state, state.lora_states(), step, path.with_suffix(".safetensors"))
        callbacks.on_checkpoint(step, str(path))
    state.acc.wait_for_everyone()
    return str(path)


def best_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_best.safetensors")


def write_best(state: TrainState, step: int, loss: float) -> Path:
    """NAME_best.safetensors from the weights as they are now (call inside `state.optim.evaluation()`), with the
    step and validation loss in its metadata; written atomically, replacing the previous best."""
    return write_output(state, state.lora_states(), step, best_path(state.cfg.output.path),
                        {"sdlora_best_step": str(step), "sdlora_best_val_loss": repr(loss)})
