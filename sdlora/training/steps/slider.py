"""Concept sliders and erasers trained from prompts alone (`[slider]`, `sdlora slider`).

No images: each step draws fresh noise, lets the frozen base model (adapters off) denoise it toward the target prompt
for a random k = 0 .. N-1 of N sampler steps (with guidance 3), and asks the base model what it predicts there for
the prompts that define the direction (LECO draws k from 1; k = 0, pure noise, is the noise level of a sampler's
first step, where a picture's colours and layout are settled). The LoRA then learns to make the target's prediction
at that noise level (the targets of LECO's and Concept Sliders' train_lora.py, ESD and ai-toolkit's slider trainer;
the partial denoising runs with the LoRA off as ai-toolkit's does, where LECO and Concept Sliders denoise with the
LoRA applied, so the latents the LoRA learns on do not move with it):

- enhance (a slider), at strength +1:  eps(target) + eta (eps(positive) - eps(negative)),
  and at strength -1 (ai-toolkit's second pass):  eps(target) - eta (eps(positive) - eps(negative));
- erase (an eraser), at +1:  eps(negative) - eta (eps(positive) - eps(negative)), positive defaulting to the target
  and negative to the empty prompt, which is ESD's eps(x) - eta (eps(x, c) - eps(x)).

Anchor prompts, one per step in turn, keep the base model's prediction at the same strength. The objective stands
where the diffusion step stands (`TrainState.objective`), so setup, adapters, optimizers, checkpoints, resume, samples
and the output file are the ones every run uses; its randomness comes from the step's generator alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..periodic.output import lora_scaled
from .objective import per_sample_loss
from .text import adapters_off

DENOISE_GUIDANCE = 3.0  # LECO's, Concept Sliders' and ai-toolkit's guidance while partly denoising


@dataclass(frozen=True)
class SliderPrompts:
    """The prompts of one slider, defaults resolved: `neutral` is what the target's prediction starts from."""

    action: str
    target: str
    positive: str
    negative: str
    anchors: tuple[str, ...]
    guidance: float
    attributes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, sl) -> SliderPrompts:
        enhance = sl.action == "enhance"
        return cls(sl.action, sl.target, sl.positive or sl.target, sl.negative or (sl.target if enhance else ""),
                   tuple(sl.anchors), sl.guidance, tuple(sl.attributes))

    def at(self, k: int) -> SliderPrompts:
        """Micro-batch k's prompts: with attributes, the k-th in turn put in front of each (Concept Sliders:
        attribute + ' ' + prompt, the empty prompt included)."""
        if not self.attributes:
            return self
        a = self.attributes[k % len(self.attributes)]
        return SliderPrompts(self.action, *(f"{a} {p}".strip() for p in (self.target, self.positive, self.negative)),
                             self.anchors, self.guidance)

    @property
    def neutral(self) -> str:
        return self.target if self.action == "enhance" else self.negative

    @property
    def strengths(self) -> tuple[float, ...]:
        """The strengths training visits: a slider both ways, an eraser +1."""
        return (-1.0, 1.0) if self.action == "enhance" else (1.0,)

    def texts(self) -> list[str]:
        """Every prompt the steps encode (the text cache, and SD3's T5, take them all before the steps)."""
        each = [self.at(i) for i in range(max(len(self.attributes), 1))]
        return sorted({t for p in each for t in (p.target, p.positive, p.negative, p.neutral)} | {"", *self.anchors})


def strength_range(sl) -> tuple[float, float]:
    """The strengths a slider is meant for: -1 to +1, an eraser 0 to 1."""
    return (-1.0, 1.0) if sl.action == "enhance" else (0.0, 1.0)


@dataclass
class SliderBatch:
    """Micro-batch k of a slider run: only its number (its noise and noise level come from the step's generator)."""

    index: int


class SliderBatches:
    """Stands where the image batches stand: no images, no latents to cache or prefetch."""

    prefetcher = None

    def __init__(self, prompts: SliderPrompts):
        self.prompts = prompts

    def fetch(self, k: int, rng=None, following=None) -> SliderBatch:
        return SliderBatch(k)

    def close(self) -> None:
        pass

    def fill_cache(self) -> None:
        pass

    def captions(self) -> list[str]:
        return self.prompts.texts()


def sampler_of(scheduler):
    """A fresh sampler over the training schedule: DDIM for DDPM-style schedules (its latents are the model's input
    as they are), the flow-matching Euler scheduler itself for SD3."""
    from diffusers import DDIMScheduler

    if type(scheduler).__name__.startswith("FlowMatch"):
        return type(scheduler).from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config)


class SliderObjective:
    """The slider's step: `(batch, models, cfg, generator) -> (loss, stats)` like `training_step`. The -1 pass
    (enhance) is back-propagated inside, at its strength (gradient checkpointing recomputes the forward at the
    strength set when backward runs), through `backward`; the +1 pass is left for the loop."""

    def __init__(self, prompts: SliderPrompts, shape: tuple[int, int, int], steps: int, micro, backward):
        self.prompts, self.shape, self.steps, self.micro, self.backward = prompts, shape, steps, micro, backward

    def __call__(self, batch: SliderBatch, models, cfg, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        p, n, module = self.prompts.at(batch.index), cfg.train.batch_size, models.denoiser.module
        device = next(module.parameters()).device
        noise = torch.randn((n, *self.shape), generator=gen).to(device)
        k = int(torch.randint(0, self.steps, (1,), generator=gen))  # LECO: 1..N-1; 0 trains the first step too
        anchor = p.anchors[batch.index % len(p.anchors)] if p.anchors else None
        with torch.no_grad(), adapters_off([module]):
            x, t = self.partly_denoise(models, noise, k, p.target)
            asked = sorted({p.positive, p.negative, p.neutral} | ({anchor} if anchor is not None else set()))
            preds = dict(zip(asked, self.predict(module, models, x, t, asked).float().chunk(len(asked))))
        direction = p.guidance * (preds[p.positive] - preds[p.negative])
        stats = {}
        total = torch.zeros((), device=device)
        for strength in p.strengths:
            goal = preds[p.neutral] + strength * direction if p.action == "enhance" else preds[p.neutral] - direction
            with lora_scaled([module], strength):
                asked = [p.target] + ([anchor] if anchor is not None else [])
                got = self.predict(models.denoiser.wrapped, models, x, t, asked).float().chunk(len(asked))
                loss = per_sample_loss(got[0], goal).mean()
                side = "_neg" if strength < 0 else ""
                stats[f"loss_slider{side}"] = loss.detach()
                if anchor is not None:
                    kept = per_sample_loss(got[1], preds[anchor]).mean()
                    stats[f"loss_anchor{side}"] = kept.detach()
                    loss = loss + cfg.slider.anchor_weight * kept
                loss = loss / len(p.strengths)
                if strength != p.strengths[-1]:
                    self.backward(loss)
                    loss = loss.detach()
            total = total + loss
        return total, stats

    def partly_denoise(self, models, noise: torch.Tensor, k: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The first k of `steps` sampler steps from `noise` on the target prompt (classifier-free guidance), and
        the timestep the latents have reached."""
        sampler = sampler_of(models.scheduler)
        sampler.set_timesteps(self.steps, device=noise.device)
        x = noise  # DDIM and flow matching start from the noise itself and feed their latents to the model as they are
        for t in sampler.timesteps[:k]:
            uncond, cond = self.predict(models.denoiser.module, models, x, t, ["", target]).float().chunk(2)
            x = sampler.step(uncond + DENOISE_GUIDANCE * (cond - uncond), t, x).prev_sample
        return x, sampler.timesteps[k]

    def predict(self, denoiser, models, x: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The denoiser's prediction at latents x (batch n) and timestep t for each prompt: [len(prompts) * n]."""
        n = x.shape[0]
        captions = [p for p in prompts for _ in range(n)]
        xs = x.repeat(len(prompts), *[1] * (x.dim() - 1))
        micro = None if self.micro is None else self.micro.to(x.device).reshape(1, -1).expand(len(captions), -1)
        return models.conditioning.predict(denoiser, xs, t.reshape(1).expand(len(captions)), models.text(captions),
                                           micro)
