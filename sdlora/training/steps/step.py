"""The training step: a batch, the models, the config and a generator in; the loss and a few numbers out.

It prints, saves and samples nothing, so the CLI, the UI, the tests and the benchmark share it. Step N's noise and
timesteps come from a generator seeded by (seed, N, rank, micro-batch) alone, so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ...families.sd import Conditioning
from ..inputs.batches import Batch
from ..run.embeddings import replace_trigger
from ..run.parts import Part
from . import objective
from .text import TextEncoding, adapters_off


@dataclass(frozen=True)
class TriggerSwap:
    """Differential output preservation's prompts: captions as the model reads them, with the trigger as it appears
    there (`seen`: the word, or pivotal tuning's token expansion) replaced by the class word, whole words only."""

    seen: str
    word: str

    def __call__(self, captions: list[str]) -> list[str]:
        return [replace_trigger(c, self.seen, self.word, 1) for c in captions]


@dataclass
class Models:
    """What the step runs: the denoiser (a `Part`: which form to use when is written there), the text encoding, the
    noise schedule, the family's conditioning, and differential output preservation's caption swap (or None)."""

    denoiser: Part
    text: TextEncoding
    scheduler: object              # the training scheduler (DDPM-style, or FlowMatch for SD3)
    conditioning: Conditioning
    dop: TriggerSwap | None = None

    @property
    def schedule(self) -> objective.DDPM | objective.Flow:
        """The objective of the scheduler: how it noises, what the model predicts."""
        return objective.schedule_of(self.scheduler)

    def modules(self) -> list[torch.nn.Module]:
        """The denoiser's and the text encoders' modules, in that order (eval/train, adapters, weights)."""
        return [self.denoiser.module, *(p.module for p in self.text.parts)]

    def unwrapped(self) -> Models:
        """The same models with the denoiser's forward through the module itself (not accelerate's wrapper): for
        forwards that processes do not all make alike (validation)."""
        return replace(self, denoiser=Part.unwrapped(self.denoiser.module))


def seeded(seed: int, step: int, rank: int, micro: int = 0) -> tuple[torch.Generator, np.random.Generator]:
    """Generators for one micro-batch, from (seed, step, rank, micro) alone."""
    key = [seed, step, rank, micro]
    g = torch.Generator("cpu").manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
    return g, np.random.default_rng(key)


def draw_noise(models: Models, recipe, latents: torch.Tensor, gen: torch.Generator):
    """The recipe's noise and timesteps for these latents, drawn from `gen` in that order."""
    noise = recipe.noise(latents, gen)
    return noise, models.schedule.sample(recipe.timesteps, latents.shape[0], gen, latents.device)


def diffusion_loss(models: Models, batch: Batch, train_cfg, gen: torch.Generator):
    """Per-sample loss of the denoiser on this batch's noised latents, and (noisy latents, timesteps)."""
    recipe = objective.Recipe.from_config(train_cfg)
    cond = models.text(batch.captions)
    latents = batch.latents
    noise, t = draw_noise(models, recipe, latents, gen)
    return denoise_loss(models, recipe, latents, noise, recipe.perturb(noise, gen), t, cond, batch.micro, batch.mask,
                        batch.inpaint)


def denoise_loss(models: Models, recipe, latents, noise, inputs, t, cond, micro, mask=None, image=None):
    """The recipe's per-sample loss at given noise (`inputs`: what noises the latents, `noise`: what the target is
    made of) and timesteps, weighted by the loss `mask` on the latent grid, an inpainting base seeing its `image`
    conditioning beside the noisy latents; and (noisy latents, timesteps)."""
    schedule = models.schedule
    noisy = schedule.noisy(latents, inputs, t)
    pred = models.conditioning.predict(models.denoiser.wrapped, models.conditioning.denoiser_input(noisy, image), t,
                                       cond, micro)
    tgt = schedule.target(latents, noise, t)
    if schedule.prediction_type == "flow" and recipe.precondition:
        pred, tgt = schedule.precondition(pred, tgt, t)
    loss = recipe.per_sample(pred, tgt, t, schedule.total, lambda: schedule.snr(t), schedule.prediction_type, mask)
    weights = schedule.weights(t, recipe.flow_weighting)
    return (loss if weights is None else loss * weights.to(loss.device)), noisy, t


def model_prior_loss(models: Models, noisy: torch.Tensor, t: torch.Tensor, micro, prompts: list[str],
                     image: torch.Tensor | None = None) -> torch.Tensor:
    """Prior preservation from the model: on these prompts, at these noisy latents, match the base model (adapters
    off, in the denoiser and the text encoders); an inpainting base sees its `image` conditioning."""
    predict = models.conditioning.predict
    noisy = models.conditioning.denoiser_input(noisy, image)
    with torch.no_grad(), adapters_off([models.denoiser.module]):
        base = predict(models.denoiser.module, noisy, t, models.text(prompts, base=True), micro)
    pred = predict(models.denoiser.wrapped, noisy, t, models.text(prompts), micro)
    return objective.per_sample_loss(pred, base).mean()


def model_prior_on(models: Models, prior: Batch, train_cfg, gen: torch.Generator) -> torch.Tensor:
    """The model prior on a batch of images to preserve, noised as the training images are, with their captions."""
    noise, t = draw_noise(models, objective.Recipe.from_config(train_cfg), prior.latents, gen)
    return model_prior_loss(models, models.schedule.noisy(prior.latents, noise, t), t, prior.micro, prior.captions,
                            prior.inpaint)


def training_step(batch: Batch, models: Models, cfg, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch: the instance loss, plus the prior-preservation, blank-prompt and differential output
    preservation losses when configured."""
    loss, noisy, t = diffusion_loss(models, batch, cfg.train, gen)
    loss = loss.mean()
    stats = {"loss_instance": loss.detach()}
    prior = None
    if batch.prior is not None and cfg.prior.mode == "images":
        prior = diffusion_loss(models, batch.prior, cfg.train, gen)[0].mean()
    elif batch.prior is not None:
        prior = model_prior_on(models, batch.prior, cfg.train, gen)
    elif cfg.prior.class_prompt and cfg.prior.mode == "model":
        prior = model_prior_loss(models, noisy, t, batch.micro, [cfg.prior.class_prompt] * noisy.shape[0],
                                 batch.inpaint)
    if prior is not None:
        stats["loss_prior"] = prior.detach()
        loss = loss + cfg.prior.weight * prior
    if cfg.prior.blank_weight:
        blank = model_prior_loss(models, noisy, t, batch.micro, [""] * noisy.shape[0], batch.inpaint)
        stats["loss_blank"] = blank.detach()
        loss = loss + cfg.prior.blank_weight * blank
    if models.dop is not None:
        dop = model_prior_loss(models, noisy, t, batch.micro, models.dop(batch.captions), batch.inpaint)
        stats["loss_dop"] = dop.detach()
        loss = loss + cfg.prior.dop_weight * dop
    return loss, stats
