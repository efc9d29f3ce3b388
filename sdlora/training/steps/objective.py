"""The diffusion objective as pure functions: noise, timesteps, targets, loss and its weights.

The recipe (`Recipe.from_config(cfg.train)`) is written once for every family and every target: timestep sampling
gives fractions of the schedule as well as DDPM's integer timesteps, and the loss and weights take the SNR of each
sample. What differs between noise schedules is a `Schedule` (`schedule_of(scheduler)`): `DDPM` (epsilon or
v-prediction on the scheduler's alphas: SD1/SD2/SDXL) or `Flow` (rectified flow on the FlowMatch scheduler's shifted
sigmas: SD3), each with its own noising, target and SNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Timesteps:
    """Which timesteps train: `kind` uniform, logit-normal (diffusers' logit_normal with mean and scale), sigmoid
    (kohya's sigmoid(scale z)) or mode (SD3's mode sampling, as diffusers' compute_density_for_timestep_sampling),
    restricted to [low, high) of a schedule of `total` steps.

    A draw is a noise fraction in (0, 1) (1 = pure noise). logit-normal and mode are the fraction 1 - u of diffusers'
    draw u, because diffusers' SD3 script indexes a descending timestep table with it: `mean` > 0 favours less noisy
    timesteps, as diffusers' --logit_mean does (kohya's sd3 --logit_mean and the SD3 paper's m take u itself: the
    opposite sign). uniform and sigmoid are symmetric and taken as drawn (kohya's). A schedule may `warp` the
    fraction (SD3's shift) before the window maps it into [low, high), as kohya's sd3_train_utils does."""

    kind: str = "uniform"
    mean: float = 0.0
    scale: float = 1.0
    low: int = 0
    high: int = 1000
    mode_scale: float = 1.29

    def _window(self, total: int) -> tuple[int, int]:
        return self.low, min(self.high, total)

    def _mode(self, u: torch.Tensor) -> torch.Tensor:
        """SD3's mode map of a uniform sample (symmetric about 1/2, decreasing from 1 to 0)."""
        return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n noise fractions in (0, 1) of a non-uniform kind."""
        if self.kind == "mode":
            return 1 - self._mode(torch.rand(n, generator=generator))
        z = torch.randn(n, generator=generator)
        if self.kind == "logit-normal":
            return 1 - torch.sigmoid(self.mean + self.scale * z)
        return torch.sigmoid(self.scale * z)

    def _quantile(self, q: torch.Tensor) -> torch.Tensor:
        """The noise fraction's quantile function on [0, 1] (float64)."""
        if self.kind == "uniform":
            return q
        if self.kind == "mode":  # 1 - map(u) increases with u
            return (1 - self._mode(q)).double()
        mean = -self.mean if self.kind == "logit-normal" else 0.0
        return torch.sigmoid(mean + self.scale * math.sqrt(2) * torch.erfinv(2 * q - 1)).double()

    def fractions(self, n: int, generator: torch.Generator, total: int = 1000, warp=None) -> torch.Tensor:
        """n continuous times in [low/total, high/total): noise fractions, warped by `warp` (an increasing map of
        [0, 1] onto itself) before the window; float32 on the CPU."""
        low, high = self._window(total)
        u = torch.rand(n, generator=generator) if self.kind == "uniform" else self._draw(n, generator)
        u = warp(u) if warp else u
        return (low + u * (high - low)) / total

    def fraction_quantiles(self, k: int, total: int = 1000, warp=None) -> torch.Tensor:
        """k fixed continuous times, the quantiles at (i + 0.5) / k within the window (float32)."""
        low, high = self._window(total)
        u = self._quantile((torch.arange(k, dtype=torch.float64) + 0.5) / k)
        u = warp(u) if warp else u
        return ((low + u * (high - low)) / total).float()

    def sample(self, n: int, total: int, generator: torch.Generator, device) -> torch.Tensor:
        """n integer timesteps in [low, high); uniform draws exactly as torch.randint(low, high) does."""
        low, high = self._window(total)
        if self.kind == "uniform":
            return torch.randint(low, high, (n,), generator=generator).to(device)
        return self._to_steps(self._draw(n, generator), low, high).to(device)

    def quantiles(self, k: int, total: int, device=None) -> torch.Tensor:
        """k fixed integer timesteps, the distribution's quantiles at (i + 0.5) / k: a stratified spread."""
        low, high = self._window(total)
        u = self._quantile((torch.arange(k, dtype=torch.float64) + 0.5) / k)
        return self._to_steps(u, low, high).to(device)

    @staticmethod
    def _to_steps(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
        return (low + u * (high - low)).long().clamp(low, high - 1)


@dataclass(frozen=True)
class Recipe:
    """The training objective's options (`[train]` in the config), independent of what the model predicts."""

    timesteps: Timesteps = Timesteps()
    noise_offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    loss: str = "l2"
    huber_delta: float = 0.1
    huber_schedule: str = "snr"
    min_snr_gamma: float = 0.0
    debiased: bool = False
    flow_weighting: str = "none"
    precondition: bool = True  # flow matching: the loss on x0 = x_t - sigma v (diffusers' precondition_outputs)

    @classmethod
    def from_config(cls, tr) -> Recipe:
        return cls(Timesteps(tr.timestep_sampling, tr.timestep_mean, tr.timestep_scale, tr.min_timestep,
                             tr.max_timestep, tr.mode_scale), tr.noise_offset, tr.multires_noise_iterations,
                   tr.multires_noise_discount, tr.ip_noise_gamma, tr.loss, tr.huber_delta, tr.huber_schedule,
                   tr.min_snr_gamma, tr.debiased_estimation, tr.flow_weighting, tr.precondition_outputs)

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise the model learns to remove: Gaussian, with noise offset and multi-resolution noise."""
        noise = sample_noise(latents, generator, self.noise_offset)
        if self.multires_iterations:
            noise = multires_noise(noise, generator, self.multires_iterations, self.multires_discount)
        return noise

    def perturb(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise that goes into the noised input: with input perturbation, more than the target's."""
        if not self.ip_noise_gamma:
            return noise
        extra = torch.randn(noise.shape, generator=generator, dtype=torch.float32).to(noise.device, noise.dtype)
        return noise + self.ip_noise_gamma * extra

    def weights(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor | None:
        """Per-sample loss weights (min-SNR, debiased estimation), or None when the loss is unweighted."""
        w = snr_weight(snr, self.min_snr_gamma, prediction_type) if self.min_snr_gamma else None
        if self.debiased:
            d = debiased_weight(snr, prediction_type)
            w = d if w is None else w * d
        return w

    def per_sample(self, pred: torch.Tensor, tgt: torch.Tensor, t: torch.Tensor, total: int,
                   snr_of=None, prediction_type: str = "epsilon", mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss per sample (mean over C, H, W) with its weights; `snr_of()` gives the SNR of the samples (only
        called when a weight or the Huber schedule needs it)."""
        needs_snr = self.min_snr_gamma or self.debiased or (self.loss != "l2" and self.huber_schedule == "snr")
        snr = snr_of() if needs_snr else None
        delta = None
        if self.loss != "l2":
            delta = huber_delta(self.huber_delta, self.huber_schedule, t, total, snr)
        return per_sample_loss(pred, tgt, self.weights(snr, prediction_type) if snr is not None else None,
                               self.loss, delta, mask)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; with `offset`, a per-channel constant is added (noise offset)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if offset:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + offset * shift.to(latents.device, latents.dtype)
    return noise


def multires_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution (pyramid) noise as kohya adds it: level i is Gaussian noise r**i times coarser (r drawn in
    [2, 4) per level, level 0 at full size), upsampled bilinearly and weighted discount**i, until a side is one
    pixel; the sum is rescaled to unit std."""
    b, c, h, w = noise.shape
    out = noise.float()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=generator).to(noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


class DDPM:
    """DDPM-style schedules (SD1, SD2, SDXL): integer timesteps, the scheduler's alphas noise the latents, the model
    predicts the noise (epsilon) or the velocity (v-prediction)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def total(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample(self, timesteps: Timesteps, n: int, generator: torch.Generator, device) -> torch.Tensor:
        return timesteps.sample(n, self.total, generator, device)

    def quantiles(self, timesteps: Timesteps, k: int, device) -> torch.Tensor:
        return timesteps.quantiles(k, self.total, device)

    def noisy(self, latents: torch.Tensor, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, inputs, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return target(self.scheduler, latents, noise, t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        return compute_snr(self.scheduler, t)

    def weights(self, t: torch.Tensor, scheme: str) -> torch.Tensor | None:
        return None


class Flow:
    """Rectified flow (SD3, SD3.5): a time u from the recipe's sampling is shifted, shift u / (1 + (shift - 1) u)
    with the FlowMatch scheduler's shift (its sigma table's formula), then mapped into the timestep window (kohya's
    order); sigma = timestep / 1000. The latents are noised as (1 - sigma) x + sigma n, the model gets the timestep
    and predicts the velocity n - x (diffusers' SD3 training); `precondition` gives the loss on the model's x0."""

    prediction_type = "flow"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.shift = float(scheduler.config.shift)
        self.total = scheduler.config.num_train_timesteps

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        """The scheduler's shift of a noise fraction."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sample(self, timesteps: Timesteps, n: int, generator: torch.Generator, device) -> torch.Tensor:
        return (timesteps.fractions(n, generator, self.total, self.shifted) * self.total).to(device)

    def quantiles(self, timesteps: Timesteps, k: int, device) -> torch.Tensor:
        return (timesteps.fraction_quantiles(k, self.total, self.shifted) * self.total).to(device)

    def sigmas(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """sigma of each timestep (float32), shaped to broadcast over `like`."""
        s = t.float() / self.total
        return s if like is None else s.to(like.device).view(-1, *[1] * (like.dim() - 1))

    def noisy(self, latents: torch.Tensor, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigmas(t, latents)
        return ((1 - s) * latents.float() + s * inputs.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def precondition(self, pred: torch.Tensor, tgt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The velocity and its target as the output preconditioning of diffusers' and kohya's SD3 training compares
        them: x0_hat = x_t - sigma v_hat against x0, whose difference is sigma (v - v_hat); so both are scaled by
        sigma (fp32), which also keeps input perturbation's noise out of the target, as without preconditioning."""
        s = self.sigmas(t, pred)
        return s * pred.float(), s * tgt.float()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ((1 - sigma) / sigma)^2 (for the Huber schedule)."""
        s = self.sigmas(t).clamp_min(1e-6)
        return ((1 - s) / s) ** 2

    def weights(self, t: torch.Tensor, scheme: str) -> torch.Tensor | None:
        """diffusers' compute_loss_weighting_for_sd3: sigma_sqrt sigma^-2 (sigma at least 1/total), cosmap
        2 / (pi (1 - 2 sigma + 2 sigma^2)); none: unweighted."""
        s = self.sigmas(t)
        if scheme == "sigma_sqrt":
            return s.clamp_min(1 / self.total) ** -2.0
        if scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
        return None


def schedule_of(scheduler) -> DDPM | Flow:
    """The objective of a training scheduler: Flow for a FlowMatch scheduler, DDPM for every other."""
    return Flow(scheduler) if type(scheduler).__name__.startswith("FlowMatch") else DDPM(scheduler)


def snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023); v-prediction uses min(snr, gamma) / (snr + 1)."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of these DDPM timesteps."""
    from diffusers.training_utils import compute_snr

    return snr_weight(compute_snr(scheduler, timesteps), gamma, scheduler.config.prediction_type)


def debiased_weight(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): 1/sqrt(SNR), or 1/(SNR + 1) for v-prediction; SNR capped at 1000 (t = 0
    has SNR near infinity), as kohya does."""
    snr = torch.minimum(snr, torch.full_like(snr, 1000.0))
    return 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr)


def huber_delta(delta: float, schedule: str, t: torch.Tensor, total: int, snr: torch.Tensor | None) -> torch.Tensor:
    """The scheduled pseudo-Huber delta per sample (Khrapov et al. 2024, as kohya's huber_c): constant; exponential,
    delta**(t/total) (1 at t = 0, delta at the end); snr, (1 - delta)/(1 + sigma)**2 + delta with sigma = 1/sqrt(SNR)
    the noise-to-signal ratio."""
    if schedule == "constant":
        return torch.full(t.shape, delta, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        return torch.exp(math.log(delta) * t.float() / total)
    sigma = snr.float().rsqrt()
    return (1 - delta) / (1 + sigma) ** 2 + delta


def per_sample_loss(pred: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor | None = None, kind: str = "l2",
                    delta: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per sample (mean over C, H, W), optionally weighted: l2 is MSE; huber 2d(sqrt(e^2 + d^2) - d) and
    smooth-l1 2(sqrt(e^2 + d^2) - d) are the pseudo-Huber losses, d per sample. With a `mask` ([B, 1, H, W] weights)
    the mean is taken over the masked area (sum of mask-weighted errors over the mask's sum), so a small mask does
    not mean a small gradient."""
    dims = list(range(1, pred.dim()))
    if kind == "l2":
        err = F.mse_loss(pred.float(), tgt.float(), reduction="none")
    else:
        d = delta.float().view(-1, *[1] * len(dims)).to(pred.device)
        root = torch.sqrt((pred.float() - tgt.float()) ** 2 + d**2) - d
        err = 2 * d * root if kind == "huber" else 2 * root
    if mask is None:
        loss = err.mean(dim=dims)
    else:
        m = mask.to(err.device, err.dtype).expand_as(err)
        loss = (err * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1e-8)
    return loss * weights.to(loss.device) if weights is not None else loss
