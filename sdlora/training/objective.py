"""The diffusion objective as pure functions: noise, timesteps, targets, loss and its weights.

The recipe (`Recipe.from_config(cfg.train)`) is written once for every family and every target: timestep sampling
gives fractions of the schedule as well as DDPM's integer timesteps, and the loss and weights take the SNR of each
sample, so a flow-matching objective reuses them with its own target and its own SNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Timesteps:
    """Which timesteps train: `kind` uniform, logit-normal (sigmoid(mean + scale z)) or sigmoid (sigmoid(scale z),
    kohya's name), restricted to [low, high) of a schedule of `total` steps."""

    kind: str = "uniform"
    mean: float = 0.0
    scale: float = 1.0
    low: int = 0
    high: int = 1000

    def _window(self, total: int) -> tuple[int, int]:
        return self.low, min(self.high, total)

    def _from_normal(self, z: torch.Tensor) -> torch.Tensor:
        """A standard normal sample -> a fraction in (0, 1) by this distribution."""
        return torch.sigmoid((self.mean if self.kind == "logit-normal" else 0.0) + self.scale * z)

    def fractions(self, n: int, generator: torch.Generator, total: int = 1000) -> torch.Tensor:
        """n continuous times in [low/total, high/total) (flow matching's sigmas), float32 on the CPU."""
        low, high = self._window(total)
        u = torch.rand(n, generator=generator) if self.kind == "uniform" else \
            self._from_normal(torch.randn(n, generator=generator))
        return (low + u * (high - low)) / total

    def sample(self, n: int, total: int, generator: torch.Generator, device) -> torch.Tensor:
        """n integer timesteps in [low, high); uniform draws exactly as torch.randint(low, high) does."""
        low, high = self._window(total)
        if self.kind == "uniform":
            return torch.randint(low, high, (n,), generator=generator).to(device)
        return self._to_steps(self._from_normal(torch.randn(n, generator=generator)), low, high).to(device)

    def quantiles(self, k: int, total: int, device=None) -> torch.Tensor:
        """k fixed integer timesteps, the distribution's quantiles at (i + 0.5) / k: a stratified spread."""
        low, high = self._window(total)
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        u = q if self.kind == "uniform" else self._from_normal(math.sqrt(2) * torch.erfinv(2 * q - 1)).double()
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

    @classmethod
    def from_config(cls, tr) -> Recipe:
        return cls(Timesteps(tr.timestep_sampling, tr.timestep_mean, tr.timestep_scale, tr.min_timestep,
                             tr.max_timestep), tr.noise_offset, tr.multires_noise_iterations,
                   tr.multires_noise_discount, tr.ip_noise_gamma, tr.loss, tr.huber_delta, tr.huber_schedule,
                   tr.min_snr_gamma, tr.debiased_estimation)

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
