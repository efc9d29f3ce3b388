"""Validation: held-out images (a folder, or a seeded share of the training images), their loss at noise and
timesteps fixed once by the seed (so two evaluations differ only because the LoRA changed), and the best loss so
far with the patience counter that early stopping reads (all in checkpoints, so a resumed run decides the same)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import DataError
from ..inputs.data import Example, build_examples, scan_folder
from ..steps import objective
from ..steps.step import denoise_loss
from .best import Best


def held_out_images(cfg) -> set[str]:
    """The images `validation.split` holds out: a share of all training images, chosen per image (not per repeat)
    by the seed; at least one, and at least one left to train on."""
    if not cfg.validation.split:
        return set()
    paths = sorted({item[0] for d in cfg.data for item in scan_folder(d.path, d.prompt, d.use_captions)[0]})
    if len(paths) < 2:
        raise DataError(f"validation.split needs at least 2 training images, found {len(paths)}")
    n = min(max(1, round(cfg.validation.split * len(paths))), len(paths) - 1)
    chosen = np.random.default_rng([cfg.train.seed, 5150]).choice(len(paths), n, replace=False)
    return {paths[i] for i in sorted(chosen)}


def validation_examples(cfg, resolution: int, bucket_step: int, prompt, held_out: set[str]) -> list[Example]:
    """One example per validation image (no repeats), captions through `prompt` (the pivotal trigger), each with the
    mask training would give it: a held-out image its folder's; a validation folder's image its alpha channel when
    the first data folder trains with alpha masks (it is validated as that folder's, source 0)."""
    if cfg.validation.data:
        default = cfg.data[0].prompt if cfg.data else ""
        alpha = bool(cfg.data) and cfg.data[0].alpha_mask
        examples = build_examples([(cfg.validation.data, default, True, 1)], resolution, cfg.augment.bucketing,
                                  bucket_step, masks=[("", alpha)])
    elif held_out:
        folders = [(d.path, d.prompt, d.use_captions, 1) for d in cfg.data]
        masks = [(d.masks, d.alpha_mask) for d in cfg.data]
        seen, examples = set(), []
        for e in build_examples(folders, resolution, cfg.augment.bucketing, bucket_step, masks=masks):
            if e.path in held_out and e.path not in seen:
                seen.add(e.path)
                examples.append(e)
    else:
        return []
    return [dataclasses.replace(e, caption=prompt(e.caption)) for e in examples]


@dataclass
class Validation:
    """The validation set and how its loss is measured."""

    examples: list[Example]
    timesteps: int
    seed: int
    best: Best = dataclasses.field(default_factory=lambda: Best("loss"))

    def loss(self, state) -> float:
        """Mean loss over the validation images (this rank's share, then averaged over ranks), each at the same
        fixed timesteps and noise every time; adapters in eval mode (no dropout), no gradients. It is the loss
        training minimises: masked images count inside their mask (lifted by the folder's unmasked weight); an
        inpainting base repaints each image under a mask the seed fixes."""
        models = state.models.unwrapped()
        recipe = objective.Recipe.from_config(state.cfg.train)
        modules = models.modules()
        modes = [m.training for m in modules]
        total = torch.zeros(2, dtype=torch.float64)
        try:
            for m in modules:
                m.eval()
            with torch.no_grad(), state.acc.autocast():
                for i in range(state.rank, len(self.examples), state.world):
                    total += torch.tensor([self._one(state, models, recipe, i), 1.0], dtype=torch.float64)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if state.world > 1:
            total = state.acc.reduce(total.to(state.device), "sum").cpu()
        return (total[0] / total[1]).item()

    def _one(self, state, models, recipe, i: int) -> float:
        ex, k = self.examples[i], self.timesteps
        lat, crop, mask = state.batches.latents(ex, False)
        if mask is not None:  # as Batches gives it to training
            w = state.batches.unmasked_weights[ex.source]
            mask = (w + (1 - w) * mask)[None].expand(k, *mask.shape)
        micro = models.conditioning.micro(ex.size[::-1], crop, ex.bucket[::-1])
        latents = lat[None].expand(k, *lat.shape)
        gen = torch.Generator("cpu").manual_seed(int(np.random.SeedSequence([self.seed, 77, i]).generate_state(1)[0]))
        noise = recipe.noise(latents, gen)
        t = models.schedule.quantiles(recipe.timesteps, k, latents.device)
        text = models.text  # a text path that trains is encoded afresh, never cached
        cond = text.conditioning.encode(text.tokenizers, text.encoders(), [ex.caption] * k, state.device) \
            if text.trainable else text([ex.caption] * k)
        micro = None if micro is None else micro[None].expand(k, *micro.shape)
        inpainting, image = state.batches.inpainting, None
        if inpainting is not None:  # an inpainting base: a mask drawn once per image by the seed
            image = inpainting.fixed(ex, state.batches.latents, models.conditioning, [self.seed, 78, i])
            image = image[None].expand(k, *image.shape)
        loss, _, _ = denoise_loss(models, recipe, latents, noise, recipe.perturb(noise, gen), t, cond, micro, mask,
                                  image)
        return loss.double().mean().item()
