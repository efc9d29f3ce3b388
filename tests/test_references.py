"""Right answers against the reference implementations: each test writes the reference's formula out itself (from
the file and function its docstring names) and compares sdlora's result with it, never sdlora with itself."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

# ---------------------------------------------------------------- SD3's objective (diffusers, kohya)

SHIFT = 3.0


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def _diffusers_sd3_loss(denoise, x, noise, sigma, weighting_scheme: str, precondition: bool) -> torch.Tensor:
    """The per-sample loss of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (main(), the training loop)
    at given sigmas: noisy = (1 - s) x + s n; model_pred; with --precondition_outputs, model_pred = model_pred * (-s)
    + noisy and target = x, else target = n - x; weighting from training_utils.compute_loss_weighting_for_sd3
    (sigma_sqrt: s^-2, cosmap: 2 / (pi (1 - 2 s + 2 s^2)), else 1); loss = mean over C, H, W of weighting (pred -
    target)^2."""
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x + s * noise
    model_pred = denoise(noisy, s.flatten() * 1000)
    if precondition:
        model_pred = model_pred * (-s) + noisy
    if weighting_scheme == "sigma_sqrt":
        weighting = (s**-2.0).float()
    elif weighting_scheme == "cosmap":
        weighting = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    else:
        weighting = torch.ones_like(s)
    target = x if precondition else noise - x
    return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(x.shape[0], -1), 1)


class _Linear:
    """A fixed 'transformer': a random channel mix of the input plus a timestep-dependent bias."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w, self.b = torch.randn(4, 4, generator=g) / 2, torch.randn(4, generator=g)

    def __call__(self, x, t):
        return torch.einsum("oc,bchw->bohw", self.w, x) + (t / 1000).view(-1, 1, 1, 1) * self.b.view(1, 4, 1, 1)


def _models(denoiser):
    from sdlora.training.step import Models

    conditioning = SimpleNamespace(predict=lambda den, x, t, cond, micro: den(x, t))
    return Models(denoiser, denoiser, None, _flow_scheduler(), conditioning)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("precondition", [True, False])
def test_sd3_loss_is_diffusers_for_every_weighting_and_preconditioning(weighting, precondition):
    """sdlora's per-sample SD3 loss (denoise_loss) is train_dreambooth_lora_sd3.py's, for each --weighting_scheme
    and --precondition_outputs 1 / 0; the default config preconditions, as diffusers' default (1) and kohya's
    sd3_train_network.get_noise_pred_and_target (always) do."""
    from sdlora.config import TrainConfig
    from sdlora.training.objective import Recipe
    from sdlora.training.step import denoise_loss

    assert TrainConfig().precondition_outputs is True
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.002, 0.03, 0.2, 0.5, 0.8, 0.999])
    den = _Linear()
    recipe = Recipe.from_config(TrainConfig(flow_weighting=weighting, precondition_outputs=precondition))
    got, _, _ = denoise_loss(_models(den), recipe, x, noise, noise, sigma * 1000, None, None)
    want = _diffusers_sd3_loss(den, x, noise, sigma, weighting, precondition)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)


def test_sd3_preconditioned_sigma_sqrt_is_the_unweighted_velocity_loss():
    """With preconditioning, sigma_sqrt's 1/sigma^2 cancels the sigma^2 of x0 - (x_t - sigma v) = sigma (v - v):
    the loss is the plain velocity loss, with no weight near 1e6 at nearly clean timesteps (kohya's sd3 docs)."""
    from sdlora.config import TrainConfig
    from sdlora.training.objective import Recipe
    from sdlora.training.step import denoise_loss

    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma, den = torch.tensor([0.001, 0.01, 0.6]), _Linear(3)
    got = denoise_loss(_models(den), Recipe.from_config(TrainConfig(flow_weighting="sigma_sqrt")), x, noise, noise,
                       sigma * 1000, None, None)[0]
    s = sigma.view(-1, 1, 1, 1)
    velocity = ((den((1 - s) * x + s * noise, sigma * 1000) - (noise - x)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, velocity, rtol=1e-4, atol=1e-6)


def test_sd3_timestep_window_applies_after_the_shift_as_kohya():
    """kohya's library/sd3_train_utils.get_noisy_model_input_and_timesteps: u (uniform), shifted u s / (1 + (s - 1)
    u), then the window: timesteps = (u (t_max - t_min) + t_min).long(). sdlora's timesteps are the same draws
    before the floor, so every one lies in [t_min, t_max)."""
    from sdlora.training.objective import Flow, Timesteps

    flow, window = Flow(_flow_scheduler()), Timesteps(low=200, high=500)
    got = flow.sample(window, 4000, torch.Generator().manual_seed(5), "cpu")
    u = torch.rand(4000, generator=torch.Generator().manual_seed(5))
    u = (u * SHIFT) / (1 + (SHIFT - 1) * u)
    kohya = (u * (500 - 200) + 200).long()
    assert got.min() >= 200 and got.max() < 500
    assert torch.all((got >= kohya) & (got < kohya + 1 + 1e-3))
    q = flow.quantiles(window, 5, "cpu")  # validation's fixed timesteps: the same distribution's quantiles
    assert q.min() >= 200 and q.max() < 500 and abs(q[2].item() - (200 + 300 * 0.75)) < 1e-3  # the median: u = 1/2


@pytest.mark.parametrize("kind,mean,scale", [("logit-normal", 0.8, 1.0), ("logit-normal", -0.5, 1.3),
                                             ("mode", 0.0, 1.0)])
def test_sd3_timestep_sampling_draws_diffusers_timesteps(kind, mean, scale):
    """The same --logit_mean / --logit_std / --mode_scale give the same timesteps as train_dreambooth_lora_sd3.py:
    u = compute_density_for_timestep_sampling (training_utils; logit_normal: sigmoid(normal(mean, std)), mode: 1 - u
    - mode_scale (cos^2(pi u / 2) - 1 + u)), indices = (u * 1000).long(), timesteps = scheduler.timesteps[indices]
    (a descending table: mean > 0 favours less noise). sdlora draws the same u from the same generator and does not
    round to the table, so each timestep lies within one table step of diffusers'."""
    from sdlora.training.objective import Flow, Timesteps

    sched, n = _flow_scheduler(), 4000
    g = torch.Generator().manual_seed(7)
    if kind == "logit-normal":
        u = torch.sigmoid(torch.normal(mean=mean, std=scale, size=(n,), generator=g))
    else:
        u = torch.rand(n, generator=g)
        u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    want = sched.timesteps[(u * 1000).long().clamp(max=999)]
    ts = Timesteps(kind, mean, scale) if kind == "logit-normal" else Timesteps(kind)
    got = Flow(sched).sample(ts, n, torch.Generator().manual_seed(7), "cpu")
    step = SHIFT + 1e-3  # the table's largest step in timesteps: d sigma / d u <= shift, over 1000 rows
    assert (got - want).abs().max() <= step, (got - want).abs().max()
