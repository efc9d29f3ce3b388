"""Training an inpainting base (the family's inpainting variant: a UNet that takes the mask and the masked image's
latents beside the noisy latents, `Family.inpainting`).

Each image of a step gets a mask: the whole image for `inpaint.full_mask` of them, else its own (data.inpaint_masks)
or a random one (`inpaint_masks`). The mask is binarised and the image blanked under it in pixels, the VAE encodes the
blanked image, and the family's conditioning puts the mask (on the latent grid) and those latents beside the noisy
latents: what diffusers' inpainting pipelines do at inference and its inpainting training example
(train_dreambooth_inpaint.py) does in training. The blanked image is encoded every step, as there: its mask changes
every step, so no cache can hold it (cached latents still hold the image's own latents, the target); a whole-image
mask blanks everything, so those latents are encoded once per size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ...errors import DataError
from ..inputs.data import Example, cover_size, load_image, load_mask, mask_file
from ..inputs.inpaint_masks import centred_rectangle, random_mask


@dataclass
class Drawn:
    """One image's inpainting mask, [1, 1, H, W] (1 = repaint), and the image blanked under it, [1, 3, H, W] in
    [-1, 1] (None where the whole image is masked: it is all zeros)."""

    mask: torch.Tensor
    masked: torch.Tensor | None


@dataclass
class InpaintMasks:
    """The masks of an inpainting run, and the latents of the all-blank image per size."""

    full_mask: float  # share of images masked whole
    blank: dict = field(default_factory=dict)

    def draw(self, ex: Example, pixels: torch.Tensor, crop: tuple[int, int], flip: bool, rng) -> Drawn:
        """The mask of an image fitted to its bucket (`pixels` [1, 3, H, W], cropped at `crop`, mirrored when `flip`):
        the CPU part, drawing from the micro-batch's `rng` (so it may run on the prefetch thread)."""
        h, w = pixels.shape[-2:]
        if rng.random() < self.full_mask:
            return Drawn(torch.ones(1, 1, h, w), None)
        if ex.inpaint_mask:
            mask = fit_like(load_mask(dataclasses.replace(ex, mask=ex.inpaint_mask)), ex.bucket, crop, flip)
        else:
            mask = torch.from_numpy(np.asarray(random_mask(w, h, rng), dtype=np.float32) / 255.0)[None]
        mask = (mask >= 0.5).to(torch.float32)[None]  # binarised, as the pipelines' mask processor does
        return Drawn(mask, pixels * (mask < 0.5))

    def condition(self, drawn: Drawn, latents, conditioning) -> torch.Tensor:
        """The device part: the image conditioning the UNet takes, [1 + C, h, w] (the VAE encodes the blanked
        image through `latents`, the batch's `Latents`)."""
        if drawn.masked is None:
            key = tuple(drawn.mask.shape[-2:])
            if key not in self.blank:
                # in the layout images have (channels last, as from numpy): the VAE's convolutions round the same
                self.blank[key] = latents.latent(torch.zeros(1, *key, 3).permute(0, 3, 1, 2))
            masked = self.blank[key]
        else:
            masked = latents.latent(drawn.masked)
        return conditioning.image_condition(drawn.mask.to(masked.device), masked[None])[0]

    def fixed(self, ex: Example, latents, conditioning, key: list[int]) -> torch.Tensor:
        """The image conditioning of a validation image: its center crop with a mask drawn from a generator seeded by
        `key` alone, the same at every validation."""
        fitted = latents.fit(ex, False, "center", None)
        drawn = self.draw(ex, fitted.pixels, fitted.crop, False, np.random.default_rng(key))
        return self.condition(drawn, latents, conditioning)


def fit_like(mask: Image.Image, bucket: tuple[int, int], crop: tuple[int, int], flip: bool) -> torch.Tensor:
    """A mask of the image's size put through the image's resize, crop at (top, left) and mirror: [1, h, w] in
    [0, 1]."""
    (bw, bh), (top, left) = bucket, crop
    placed = mask.resize(cover_size(mask.size, bucket), Image.Resampling.BILINEAR)
    placed = placed.crop((left, top, left + bw, top + bh))
    placed = ImageOps.mirror(placed) if flip else placed
    return torch.from_numpy(np.asarray(placed, dtype=np.float32).copy())[None] / 255.0


def masks_for(cfg) -> InpaintMasks:
    return InpaintMasks(cfg.inpaint.full_mask)


def attach_masks(cfg, examples: list[Example]) -> list[Example]:
    """The examples with their inpainting masks from their folder's data.inpaint_masks (class images and folders
    without one: random masks)."""
    found: dict[str, str] = {}
    out = []
    for e in examples:
        folder = cfg.data[e.source].inpaint_masks if not e.is_prior and e.source < len(cfg.data) else ""
        if not folder:
            out.append(e)
            continue
        if e.path not in found:
            found[e.path] = inpaint_mask_file(e.path, e.size, folder)
        out.append(dataclasses.replace(e, inpaint_mask=found[e.path]))
    return out


def inpaint_mask_file(image: str, size: tuple[int, int], folder: str) -> str:
    """An image's inpainting mask in `folder` (same stem); missing, mis-sized or all black: a DataError naming it."""
    path = mask_file(image, folder)
    if path is None:
        raise DataError(f"no inpainting mask for {Path(image).name} in {folder} (it needs a mask image named "
                        f"{Path(image).stem}.png or similar, white where the model repaints)")
    mask = load_mask(Example(image, "", (0, 0), mask=str(path)))
    if mask.size != tuple(size):
        raise DataError(f"inpainting mask {path} is {mask.size[0]}x{mask.size[1]} but its image is "
                        f"{size[0]}x{size[1]}")
    if mask.getextrema()[1] < 128:
        raise DataError(f"inpainting mask {path} is black everywhere: it repaints nothing of {Path(image).name}")
    return str(path)


def sample_inputs(cfg, examples: list[Example], width: int, height: int) -> dict:
    """The `image` and `mask` sample images repaint at width x height: inpaint.sample_image (else the first training
    image) and inpaint.sample_mask (else that image's own inpainting mask, else a centred rectangle), both fitted to
    the size by the same resize and center crop."""
    first = examples[0] if examples else None
    source = cfg.inpaint.sample_image or (first.path if first else "")
    if not source:
        return {}
    image = ImageOps.fit(load_image(source), (width, height), Image.Resampling.LANCZOS)
    own = first.inpaint_mask if first is not None and not cfg.inpaint.sample_image else ""
    mask_path = cfg.inpaint.sample_mask or own
    if not mask_path:
        return {"image": image, "mask": centred_rectangle(width, height)}
    mask = load_mask(Example(source, "", (0, 0), mask=mask_path))
    return {"image": image, "mask": ImageOps.fit(mask, (width, height), Image.Resampling.BILINEAR)}
