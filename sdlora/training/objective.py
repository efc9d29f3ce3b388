"""The diffusion objective as pure functions: noise, timesteps, targets and loss weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; with `offset`, a per-channel constant is added (noise offset)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if offset:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + offset * shift.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (n,), generator=generator).to(device)


def target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023); v-prediction uses min(snr, gamma) / (snr + 1)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def per_sample_loss(pred: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per sample (mean over C, H, W), optionally weighted."""
    loss = F.mse_loss(pred.float(), tgt.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
    return loss * weights if weights is not None else loss
