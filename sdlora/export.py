"""Write a trained LoRA with the metadata A1111, ComfyUI and kohya's tools display."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .formats import DTYPES, to_diffusers, to_kohya, write_lora


def trigger_words(cfg) -> str:
    """The trigger phrase: as configured, else the instance prompt's words that the class prompt lacks."""
    if cfg.output.trigger:
        return cfg.output.trigger
    prompts = [d.prompt for d in cfg.data if d.prompt]
    if not prompts:
        return ""
    class_words = set(cfg.prior.class_prompt.lower().split())
    words = [w for w in prompts[0].split() if w.lower() not in class_words]
    return " ".join(words) if class_words else prompts[0]


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict:
    """kohya's ss_tag_frequency: per folder, how often each comma-separated tag occurs."""
    return {Path(folder).name: dict(Counter(t.strip() for c in caps for t in c.split(",") if t.strip()))
            for folder, caps in captions_by_folder.items()}


def lora_metadata(cfg, components, *, steps: int, resolution: int, targets: list[str], started: float,
                  captions_by_folder: dict, extra: dict | None = None) -> dict[str, str]:
    fam, pred = components.family, components.prediction_type
    name = cfg.output.name or Path(cfg.output.path).stem
    now = datetime.now(timezone.utc)
    trigger = trigger_words(cfg)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(cfg.lora_alpha),
        "ss_network_args": json.dumps({"targets": cfg.lora.targets}),
        "ss_base_model_version": fam.ss_base_model_version(pred),
        "ss_v2": str(fam.is_v2),
        "ss_output_name": name,
        "ss_sd_model_name": components.name,
        "ss_sd_model_hash": components.model_hash()[:10],
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(cfg.train.max_steps),
        "ss_learning_rate": str(cfg.optim.lr),
        "ss_unet_lr": str(cfg.optim.lr),
        "ss_text_encoder_lr": str(cfg.lora.text_encoder_lr or cfg.optim.lr) if cfg.lora.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not cfg.lora.train_text_encoder),
        "ss_seed": str(cfg.train.seed),
        "ss_batch_size_per_device": str(cfg.train.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.train.grad_accum),
        "ss_lr_scheduler": cfg.optim.lr_scheduler,
        "ss_min_snr_gamma": str(cfg.train.min_snr_gamma),
        "ss_noise_offset": str(cfg.train.noise_offset),
        "ss_prior_loss_weight": str(cfg.prior.weight),
        "ss_tag_frequency": json.dumps(tag_frequency(captions_by_folder)),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": fam.modelspec_architecture(pred, resolution),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": pred,
        "modelspec.trigger_phrase": trigger,
        "sdlora_version": __version__,
        "sdlora_family": fam.name,
        "sdlora_targets": json.dumps(targets),
        "sdlora_config": json.dumps(cfg.to_dict()),
    }
    meta.update(extra or {})
    return meta


def save_lora(path: str | Path, parts: dict, cfg, metadata: dict[str, str], fmt: str | None = None,
              extra_tensors: dict | None = None, unet_path=None) -> Path:
    """parts: peft state dicts keyed by kohya prefix ('lora_unet', 'lora_te'). Writes `fmt` (default: config's).

    `extra_tensors` (A1111's bundle_emb.* embeddings) go into kohya files only: diffusers' loader rejects them.
    """
    fmt = fmt or cfg.output.format
    dtype = DTYPES[cfg.output.dtype]
    if fmt == "kohya":
        tensors = {**to_kohya(parts, cfg.lora_alpha, dtype, unet_path), **(extra_tensors or {})}
        meta = dict(metadata)
    else:
        tensors, adapter_meta = to_diffusers(parts, cfg.lora_alpha, cfg.lora.rank, dtype)
        meta = {**metadata, **adapter_meta, "sdlora_format": "diffusers"}
    return write_lora(path, tensors, meta)
