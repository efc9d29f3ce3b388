"""The state of one training run: models, data, caches and conditioning. Built by `train.setup`."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import objective
from .config import Config
from .data import Example, fit_to_bucket, load_image
from .lora import load_lora_state_dict, lora_state_dict


class Run:
    """Everything a training run holds: models, data, caches, optimizer. Built by `setup`."""

    def __init__(self, cfg: Config, accelerator, components):
        self.cfg, self.acc, self.c = cfg, accelerator, components
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.noise_scheduler = components.noise_scheduler
        self.latent_cache: dict = {}
        self.text_cache: dict = {}
        self.base_text_cache: dict = {}
        self.tokenizers = [components.tokenizer] + ([components.extra["tokenizer_2"]]
                                                    if "tokenizer_2" in components.extra else [])
        self.started = time.time()

    # -- text --
    @property
    def text_encoder(self):
        return self.text_encoders[0]

    def encode_text(self, captions: list[str], base: bool = False) -> dict[str, torch.Tensor]:
        """Text conditioning of captions; cached per caption while nothing in the text path trains.
        `base`: with the text-encoder LoRA off (the base model's own conditioning)."""
        from .conditioning import encode

        encoders = [self.acc.unwrap_model(e) for e in self.text_encoders] if base else self.text_encoders

        def run_encode(caps):
            return encode(self.c.family.name, self.tokenizers, encoders, caps, self.device)

        if base or not self.text_trainable and self.cfg.train.cache_text:
            cache = self.base_text_cache if base else self.text_cache
            missing = [c for c in dict.fromkeys(captions) if c not in cache]
            if missing:
                with torch.no_grad(), _adapters_off([e for e, lr in zip(encoders, self.te_lrs) if lr] if base else []):
                    out = run_encode(missing)
                for i, c in enumerate(missing):
                    cache[c] = {k: v[i] for k, v in out.items()}
            return {k: torch.stack([cache[c][k] for c in captions]) for k in cache[captions[0]]}
        with torch.set_grad_enabled(self.text_trainable):
            return run_encode(captions)

    # -- images --
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.c.vae
        with torch.no_grad():
            lat = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).to(self.weight_dtype)

    def latent(self, ex: Example, flip: bool, rng) -> tuple[torch.Tensor, tuple[int, int]]:
        """Latent of an example at its bucket size, and the crop's (top, left)."""
        if not self.cache_latents:
            pixels, crop = fit_to_bucket(load_image(ex.path), ex.bucket, self.cfg.augment.crop, rng, flip)
            return self.encode_images(pixels[None])[0], crop
        key = (ex.path, ex.bucket, flip)
        if key not in self.latent_cache:
            pixels, crop = fit_to_bucket(load_image(ex.path), ex.bucket, "center", None, flip)
            self.latent_cache[key] = (self.encode_images(pixels[None])[0], crop)
        return self.latent_cache[key]

    def batch(self, indices: list[int], rng: np.random.Generator, prior: bool = False):
        """Latents and conditioning of a micro-batch, with this step's flips and caption dropout."""
        from .conditioning import time_ids

        examples = self.prior_examples if prior else self.examples
        aug = self.cfg.augment
        lats, caps, ids = [], [], []
        for i in indices:
            ex = examples[i]
            flip = bool(aug.random_flip and rng.random() < 0.5)
            drop = bool(aug.caption_dropout and rng.random() < aug.caption_dropout)
            lat, crop = self.latent(ex, flip, rng)
            lats.append(lat)
            caps.append("" if drop else ex.caption)
            ids.append(time_ids(ex.size[::-1], crop, ex.bucket[::-1]))
        cond = self.encode_text(caps)
        if "pooled" in cond:
            cond["time_ids"] = torch.stack(ids).to(self.device, cond["pooled"].dtype)
        return torch.stack(lats), cond

    def precompute(self) -> None:
        """Fill the latent and text caches up front, so the VAE and text encoder do no per-step work."""
        if self.cache_latents:
            flips = (False, True) if self.cfg.augment.random_flip else (False,)
            for ex in {(e.path, e.bucket): e for e in self.examples + self.prior_examples}.values():
                for flip in flips:
                    self.latent(ex, flip, None)
        if self.cfg.train.cache_text and not self.text_trainable and not self.new_tokens:
            caps = {e.caption for e in self.examples + self.prior_examples} | {"", self.cfg.prior.class_prompt}
            for chunk in _chunks(sorted(caps), 64):
                self.encode_text(chunk)

    def model_prior_loss(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Prior preservation without class images: match the base model (adapters off) on the class prompt."""
        from .conditioning import unet_kwargs

        n = noisy.shape[0]
        extra = {"time_ids": cond["time_ids"]} if "time_ids" in cond else {}
        unet = self.acc.unwrap_model(self.unet)
        with torch.no_grad(), _adapters_off([unet]):
            base_cond = {**self.encode_text([self.cfg.prior.class_prompt] * n, base=True), **extra}
            base = unet(noisy, t, **unet_kwargs(base_cond), return_dict=False)[0]
        class_cond = {**self.encode_text([self.cfg.prior.class_prompt] * n), **extra}
        pred = self.unet(noisy, t, **unet_kwargs(class_cond), return_dict=False)[0]
        return objective.per_sample_loss(pred, base).mean()

    def set_phase(self, step: int) -> int:
        """1 while only the new embedding trains (pivotal phase 1), else 2; text caching follows the phase."""
        phase = 1 if step < self.cfg.ti_steps else 2
        trainable = phase == 1 or any(self.te_lrs) or (
            self.new_tokens is not None and self.cfg.pivotal.continue_lr > 0)
        if phase != getattr(self, "phase", None):
            self.text_cache.clear()  # the embeddings may have changed since it was filled
        self.phase, self.text_trainable = phase, trainable
        return phase

    def prompt(self, text: str) -> str:
        """A caption or sample prompt with the pivotal trigger replaced by the new token(s)."""
        if self.new_tokens is None:
            return text
        from .embeddings import replace_trigger

        pv = self.cfg.pivotal
        return replace_trigger(text, pv.trigger, pv.token, pv.num_vectors)

    # -- state --
    def lora_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        if not self.has_lora:
            return {}
        parts = {"lora_unet": lora_state_dict(self.acc.unwrap_model(self.unet))}
        for prefix, te in self.lora_text_encoders():
            parts[prefix] = lora_state_dict(self.acc.unwrap_model(te))
        return parts

    def load_lora_parts(self, parts: dict) -> None:
        if "lora_unet" in parts:
            load_lora_state_dict(self.acc.unwrap_model(self.unet), parts["lora_unet"])
        for prefix, te in self.lora_text_encoders():
            load_lora_state_dict(self.acc.unwrap_model(te), parts[prefix])

    def lora_text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        """(kohya prefix, encoder) of the text encoders that carry a LoRA."""
        return [(p, te) for p, te, lr in zip(self.c.family.te_prefixes, self.text_encoders, self.te_lrs) if lr]


class _adapters_off:
    """Context: the given models run without their LoRA adapters."""

    def __init__(self, models):
        self.models = list(models)

    def __enter__(self):
        for m in self.models:
            m.disable_adapters()

    def __exit__(self, *exc):
        for m in self.models:
            m.enable_adapters()
        return False


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
