"""The training data as batches: images bucketed into examples, a batch plan per source, and latents (encoded once
and cached, unless a random crop needs a fresh one every step).

A micro-batch is made in two parts: `Batches.prepare` on the CPU (which images, flips, caption dropout and tags, and
for uncached latents the decoded, fitted image; all of its use of the rng), then `Batches.finish` on the device (the
VAE encode, or the cached latents). With speed.prefetch a `Prefetcher` runs the CPU part of the next micro-batch on a
background thread while this one trains."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DataError
from ..steps.inpaint import Drawn, InpaintMasks
from .data import BatchPlan, Example, TagRule, fit_to_bucket, load_image, load_mask, vary_tags


@dataclass
class Batch:
    """One micro-batch: latents, captions, the family's per-image micro-conditioning (SDXL size/crop; else None),
    the loss mask on the latent grid ([B, 1, h, w]; None where no image has one), the prior-preservation (class
    image) batch that goes with it, and an inpainting base's image conditioning ([B, 1 + C, h, w]: the inpainting
    mask and the masked image's latents; None for other models)."""

    latents: torch.Tensor
    captions: list[str]
    micro: torch.Tensor | None = None
    prior: Batch | None = None
    mask: torch.Tensor | None = None
    inpaint: torch.Tensor | None = None


@dataclass
class Fitted:
    """An image fitted to its bucket on the CPU: pixels [1, 3, h, w] in [-1, 1] (in pinned memory when `Latents.pin`),
    the crop's (top, left), and its mask [1, h, w] (None without one)."""

    pixels: torch.Tensor
    crop: tuple[int, int]
    mask: torch.Tensor | None


@dataclass
class Item:
    """One image of a micro-batch as the CPU part leaves it: `fitted` is None where its latent is cached."""

    example: Example
    flip: bool
    caption: str
    fitted: Fitted | None
    inpaint: Drawn | None = None  # an inpainting base's mask and blanked image


def pins(device: torch.device | str, prefetch: bool) -> bool:
    """Whether prefetched pixels go to pinned host memory: only for a CUDA device (its copy then runs asynchronously)
    and only with prefetching (the plain path copies them at once)."""
    return prefetch and torch.device(device).type == "cuda"


@dataclass
class Latents:
    """Image -> latent through the frozen VAE, cached per (image, bucket, flip) when `cached`. `fit` is the CPU part
    (any thread), `encode` the device part (the main thread)."""

    vae: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    cached: bool
    crop: str
    pin: bool = False  # fitted pixels in pinned memory, copied to the device with non_blocking
    cache: dict = field(default_factory=dict)

    def prepare(self, ex: Example, flip: bool, rng) -> Fitted | None:
        """The CPU part of an example's latent: None when latents are cached (they already live on the device)."""
        return None if self.cached else self.fit(ex, flip, self.crop, rng)

    def __call__(self, ex: Example, flip: bool, fitted: Fitted | None = None):
        """Latent of an example at its bucket size, the crop's (top, left), and its mask on the latent grid (None
        when it has no mask): the mask goes through the same resize, crop and flip, then the VAE's down-sampling.
        Uncached, from `fitted` (`prepare`'s), or fitted here with a center crop."""
        if not self.cached:
            return self.encode(fitted if fitted is not None else self.fit(ex, flip, "center", None))
        key = (ex.path, ex.bucket, flip)
        if key not in self.cache:
            self.cache[key] = self.encode(self.fit(ex, flip, "center", None))
        return self.cache[key]

    def fit(self, ex: Example, flip: bool, crop: str, rng) -> Fitted:
        """Decode, resize, crop and mirror an image (and its mask) on the CPU."""
        mask_image = load_mask(ex)
        try:
            image = load_image(ex.path)
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # it was read at the start: changed since
            raise DataError(f"image {ex.path} can no longer be read ({str(e).splitlines()[0] or type(e).__name__}); "
                            "it was changed or removed during training") from None
        pixels, corner, *mask = fit_to_bucket(image, ex.bucket, crop, rng, flip, mask_image)
        pixels = pixels[None]
        return Fitted(pixels.pin_memory() if self.pin else pixels, corner, mask[0] if mask else None)

    def encode(self, fitted: Fitted) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        latent = self.latent(fitted.pixels)
        if fitted.mask is None:
            return latent, fitted.crop, None
        grid = F.interpolate(fitted.mask[None], size=latent.shape[-2:], mode="area")[0]
        return latent, fitted.crop, grid.to(latent.device)

    def latent(self, pixels: torch.Tensor) -> torch.Tensor:
        """The scaled latent [C, h, w] of pixels [1, 3, H, W] in [-1, 1] (the posterior's mode)."""
        vae = self.vae
        with torch.no_grad():
            pixels = pixels.to(self.device, vae.dtype, non_blocking=self.pin)
            lat = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).to(self.dtype)[0]


Prepared = tuple[list[Item], list[Item] | None]  # a micro-batch's items, and its prior batch's (None without)


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
    prefetcher: Prefetcher | None = None  # speed.prefetch with uncached latents
    inpainting: InpaintMasks | None = None  # an inpainting base's masks (None for other models)

    def fetch(self, k: int, rng: np.random.Generator, following: tuple[int, np.random.Generator] | None = None) \
            -> Batch:
        """Micro-batch k. With a prefetcher, `following` is the (k, rng) of the micro-batch after it, whose CPU part
        is prepared on the prefetcher's thread while this one trains."""
        if self.prefetcher is None:
            return self.finish(self.prepare(k, rng))
        prepared = self.prefetcher.take(k, rng)
        if following is not None:
            self.prefetcher.start(*following)
        return self.finish(prepared)

    def prepare(self, k: int, rng: np.random.Generator) -> Prepared:
        """The CPU part of micro-batch k, and all of its use of `rng` (so it may run on another thread)."""
        items = self._items(self.examples, self.plan(k), rng)
        prior = None if self.prior_plan is None else self._items(self.prior_examples, self.prior_plan(k), rng)
        return items, prior

    def finish(self, prepared: Prepared) -> Batch:
        """The device part: latents encoded (or taken from the cache) and the batch put together."""
        items, prior = prepared
        batch = self._batch(items)
        if prior is not None:
            batch.prior = self._batch(prior)
        return batch

    def close(self) -> None:
        """End the prefetcher's thread (it starts again if fetch is called afterwards)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    def _items(self, examples: list[Example], indices: list[int], rng) -> list[Item]:
        items = []
        for i in indices:
            ex = examples[i]
            flip = bool(self.random_flip and rng.random() < 0.5)
            drop = bool(self.caption_dropout and rng.random() < self.caption_dropout)
            fitted = self.latents.prepare(ex, flip, rng)
            rule = None if ex.is_prior or ex.source >= len(self.tag_rules) else self.tag_rules[ex.source]
            caption = vary_tags(ex.caption, rule, rng) if rule is not None and rule.active else ex.caption
            items.append(Item(ex, flip, "" if drop else caption, fitted, self._inpaint(ex, flip, fitted, rng)))
        return items

    def _inpaint(self, ex: Example, flip: bool, fitted: Fitted | None, rng) -> Drawn | None:
        """An inpainting base's mask of this image (its pixels fitted here where its latent is cached)."""
        if self.inpainting is None:
            return None
        fitted = fitted if fitted is not None else self.latents.fit(ex, flip, "center", None)
        return self.inpainting.draw(ex, fitted.pixels, fitted.crop, flip, rng)

    def _batch(self, items: list[Item]) -> Batch:
        lats, micro, masks = [], [], []
        for item in items:
            ex = item.example
            lat, crop, mask = self.latents(ex, item.flip, item.fitted)
            lats.append(lat)
            if mask is not None and not ex.is_prior:  # lifted outside the mask by the folder's unmasked weight
                w = self.unmasked_weights[ex.source]
                mask = w + (1 - w) * mask
            masks.append(None if ex.is_prior else mask)
            micro.append(self.conditioning.micro(ex.size[::-1], crop, ex.bucket[::-1]))
        inpaint = None if self.inpainting is None else \
            torch.stack([self.inpainting.condition(item.inpaint, self.latents, self.conditioning) for item in items])
        return Batch(torch.stack(lats), [item.caption for item in items],
                     None if micro[0] is None else torch.stack(micro), mask=self._mask(masks, lats), inpaint=inpaint)

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
                self.latents(ex, flip)

    def captions(self) -> list[str]:
        return sorted({e.caption for e in self.examples + self.prior_examples})


class Prefetcher:
    """The CPU part of the next micro-batch (`prepare`: decode, fit, crop, flip, mask, caption tags), made on one
    background thread while the current one trains; the VAE encode stays on the main thread. Only for uncached
    latents: cached ones already live on the device, so there is nothing to prepare ahead.

    A micro-batch is a pure function of (k, its rng), so one prepared ahead is used only when asked for with the
    same k and an rng in the same state; otherwise it is made anew. An error on the thread (a bad image) raises in
    the main thread when its micro-batch is taken, as the same exception."""

    def __init__(self, prepare):
        self.prepare = prepare
        self.pool: ThreadPoolExecutor | None = None
        self.ahead: tuple[tuple, Future] | None = None  # ((k, rng state), the prepared micro-batch to come)

    def take(self, k: int, rng: np.random.Generator) -> Prepared:
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            key, future = ahead
            if key == (k, rng.bit_generator.state):
                return future.result()
            future.cancel()  # not the one asked for (another start step): made anew below
        return self.prepare(k, rng)

    def start(self, k: int, rng: np.random.Generator) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="sdlora-prefetch")
        key = (k, rng.bit_generator.state)  # taken before the thread draws from it
        self.ahead = (key, self.pool.submit(self.prepare, k, rng))

    def close(self) -> None:
        """Drop what was prepared ahead and end the thread (waiting for a micro-batch it is still making)."""
        pool, self.pool, self.ahead = self.pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
