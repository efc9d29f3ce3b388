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


def write_output(state: TrainState, states: dict, step: int, path: Path) -> Path:
    """The LoRA file in the configured layout and, for pivotal tuning, the embedding file beside it (plain textual
    inversion: the embedding file is the output)."""
    cfg, c, concept = state.cfg, state.components, state.concept
    dtype = DTYPES[cfg.output.dtype]
    extra = {"sdlora_processes": str(state.world)}
    if concept is not None:
        extra.update({"modelspec.trigger_phrase": concept.token,
                      "sdlora_embeddings": json.dumps({concept.token: cfg.pivotal.num_vectors})})
        if not states:
            return write_embedding(path, concept.token, concept.tensors(dtype))
        write_embedding(path.with_name(path.stem + "_emb.safetensors"), concept.token, concept.tensors(dtype))
    meta = training_metadata(cfg, c.family, c.prediction_type, model_name=c.name, model_hash=c.model_hash(),
                             steps=step, resolution=state.resolution, targets=state.adapters.targets,
                             started=state.started, captions_by_folder=state.captions_by_folder, extra=extra)
    mods, names = peft_modules(states, cfg.lora_alpha, c.family, c.denoiser.config, adapted_ranks(state, states))
    if cfg.output.format == "kohya":
        tensors = kohya_tensors(mods, dtype)
        if concept is not None:  # diffusers' loader rejects bundled keys: kohya files only
            tensors.update(bundle_tensors(concept.token, concept.tensors(dtype)))
    else:
        tensors, adapter_meta = diffusers_tensors(mods, names, dtype)
        meta.update({**adapter_meta, "sdlora_format": "diffusers"})
    return write_lora(path, tensors, meta)


def adapted_ranks(state: TrainState, states: dict) -> dict[str, dict[str, tuple[int, float]]]:
    """{part: {module path: (rank, alpha)}} of the adapted layers, as peft holds them (conv_rank changes some)."""
    from .adapters import layer_ranks

    c = state.components
    parts = dict(zip([s.attr for s in c.family.text_encoders], c.text_encoders), **{c.family.denoiser_attr: c.denoiser})
    return {part: layer_ranks(parts[part]) for part in states}


def write_samples(state: TrainState, step: int, callbacks: Callbacks) -> list[str]:
    """The sample prompts rendered with the LoRA as it is at `step` (same seeds every time)."""
    from ..sampling import render, save_png

    cfg, c = state.cfg, state.components
    c.denoiser.eval()
    pipe = c.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with state.acc.autocast():
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
    """A resumable checkpoint (LoRA, embeddings, optimizers, schedule) and the LoRA file of this step."""
    path = ckpt.checkpoint_path(state.cfg.output.path, step)
    if state.acc.is_main_process:
        extra = {}
        if state.concept is not None:
            extra["embeddings"] = state.concept.vectors()
            if state.optim.embedding is not None:
                extra["ti_optimizer"] = state.optim.embedding.state_dict()
        states = state.lora_states()
        ckpt.save_state(path, step, states, state.optim.main, state.optim.lr_scheduler, state.cfg.to_dict(),
                        state.acc.scaler, extra)
        write_output(state, states, step, path.with_suffix(".safetensors"))
        callbacks.on_checkpoint(step, str(path))
    state.acc.wait_for_everyone()
    return str(path)
