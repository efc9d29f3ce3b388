"""The training data as batches: images bucketed into examples, a batch plan per source, and latents (encoded once
and cached, unless a random crop needs a fresh one every step)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import BatchPlan, Example, TagRule, fit_to_bucket, load_image, load_mask, vary_tags


@dataclass
class Batch:
    """One micro-batch: latents, captions, the family's per-image micro-conditioning (SDXL size/crop; else None),
    the loss mask on the latent grid ([B, 1, h, w]; None where no image has one), and the prior-preservation (class
    image) batch that goes with it."""

    latents: torch.Tensor
    captions: list[str]
    micro: torch.Tensor | None = None
    prior: Batch | None = None
    mask: torch.Tensor | None = None


@dataclass
class Latents:
    """Image -> latent through the frozen VAE, cached per (image, bucket, flip) when `cached`."""

    vae: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    cached: bool
    crop: str
    cache: dict = field(default_factory=dict)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        with torch.no_grad():
            lat = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).to(self.dtype)

    def __call__(self, ex: Example, flip: bool, rng) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """Latent of an example at its bucket size, the crop's (top, left), and its mask on the latent grid (None
        when it has no mask): the mask goes through the same resize, crop and flip, then the VAE's down-sampling."""
        if not self.cached:
            return self._encode(ex, flip, self.crop, rng)
        key = (ex.path, ex.bucket, flip)
        if key not in self.cache:
            self.cache[key] = self._encode(ex, flip, "center", None)
        return self.cache[key]

    def _encode(self, ex: Example, flip: bool, crop: str, rng):
        mask_image = load_mask(ex)
        fitted = fit_to_bucket(load_image(ex.path), ex.bucket, crop, rng, flip, mask_image)
        latent = self.encode(fitted[0][None])[0]
        if mask_image is None:
            return latent, fitted[1], None
        grid = F.interpolate(fitted[2][None], size=latent.shape[-2:], mode="area")[0]
        return latent, fitted[1], grid.to(latent.device)


@dataclass
class Batches:
    """Micro-batch k of the run, from (k, this micro-batch's rng) alone: which examples (the plans), flips and
    caption dropout (the rng), latents (cached or encoded)."""

    examples: list[Example]
    plan: BatchPlan
    prior_examples: list[Example]
    prior_plan: BatchPlan | None
    latents: Latents
    conditioning: object          # the family's Conditioning (its micro-conditioning)
    random_flip: bool
    caption_dropout: float
    tag_rules: list[TagRule] = field(default_factory=list)  # per data folder (Example.source)
    unmasked_weights: list[float] = field(default_factory=list)  # per data folder: loss weight outside a mask

    def fetch(self, k: int, rng: np.random.Generator) -> Batch:
        batch = self._batch(self.examples, self.plan(k), rng)
        if self.prior_plan is not None:
            batch.prior = self._batch(self.prior_examples, self.prior_plan(k), rng)
        return batch

    def _batch(self, examples: list[Example], indices: list[int], rng) -> Batch:
        lats, caps, micro, masks = [], [], [], []
        for i in indices:
            ex = examples[i]
            flip = bool(self.random_flip and rng.random() < 0.5)
            drop = bool(self.caption_dropout and rng.random() < self.caption_dropout)
            lat, crop, mask = self.latents(ex, flip, rng)
            lats.append(lat)
            if mask is not None and not ex.is_prior:  # lifted outside the mask by the folder's unmasked weight
                w = self.unmasked_weights[ex.source]
                mask = w + (1 - w) * mask
            masks.append(None if ex.is_prior else mask)
            rule = None if ex.is_prior or ex.source >= len(self.tag_rules) else self.tag_rules[ex.source]
            caption = vary_tags(ex.caption, rule, rng) if rule is not None and rule.active else ex.caption
            caps.append("" if drop else caption)
            micro.append(self.conditioning.micro(ex.size[::-1], crop, ex.bucket[::-1]))
        return Batch(torch.stack(lats), caps, None if micro[0] is None else torch.stack(micro),
                     mask=self._mask(masks, lats))

    @staticmethod
    def _mask(masks: list, lats: list) -> torch.Tensor | None:
        """The batch's loss weights on the latent grid: ones for images without a mask; None when none has one."""
        if all(m is None for m in masks):
            return None
        return torch.stack([torch.ones_like(lat[:1], dtype=torch.float32) if m is None else m
                            for m, lat in zip(masks, lats)])

    def fill_cache(self) -> None:
        """Encode every image once (both flips when flipping), so the VAE does no per-step work."""
        if not self.latents.cached:
            return
        flips = (False, True) if self.random_flip else (False,)
        for ex in {(e.path, e.bucket): e for e in self.examples + self.prior_examples}.values():
            for flip in flips:
                self.latents(ex, flip, None)

    def captions(self) -> list[str]:
        return sorted({e.caption for e in self.examples + self.prior_examples})
