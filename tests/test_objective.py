"""The objective's recipe against the published formulas: timestep sampling, pseudo-Huber losses and their
schedules, debiased estimation, multi-resolution noise, input perturbation, zero terminal SNR."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from sdlora import train
from sdlora.callbacks import Callbacks
from sdlora.config import validate
from sdlora.errors import ConfigError
from sdlora.training.steps.objective import (
    Recipe,
    Timesteps,
    debiased_weight,
    huber_delta,
    multires_noise,
    per_sample_loss,
)


def test_uniform_sampling_draws_exactly_as_randint():
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = Timesteps().sample(7, 1000, a, "cpu")
    assert torch.equal(got, torch.randint(0, 1000, (7,), generator=b))
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))  # same generator state after
    window = Timesteps(low=200, high=300).sample(500, 1000, a, "cpu")
    assert window.min() >= 200 and window.max() < 300


@pytest.mark.parametrize("kind,mean,scale", [("logit-normal", 0.5, 0.8), ("sigmoid", 0.0, 1.5)])
def test_logit_normal_sampling_has_its_moments(kind, mean, scale):
    """The noise fraction's logit is normal with the scale, and mean -mean: diffusers' --logit_mean draws u and
    indexes a descending timestep table with it, so its noise fraction is 1 - u."""
    ts = Timesteps(kind, mean, scale)
    u = ts.fractions(40_000, torch.Generator().manual_seed(0))
    z = torch.logit(u.double())
    assert abs(z.mean() + mean) < 0.02 and abs(z.std() - scale) < 0.02
    t = ts.sample(40_000, 1000, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 1000
    median = 1000 / (1 + math.exp(mean))  # the logit-normal's median: sigmoid(-mean)
    assert abs(t.float().median() - median) < 5
    assert abs(ts.quantiles(1, 1000).item() - median) <= 1


def test_validation_timesteps_are_the_quantiles():
    assert Timesteps().quantiles(4, 1000).tolist() == [125, 375, 625, 875]
    assert Timesteps(low=100, high=200).quantiles(2, 1000).tolist() == [125, 175]
    q = Timesteps("logit-normal", 0.0, 1.0).quantiles(5, 1000)
    z = torch.tensor([-1.28155, -0.52440, 0.0, 0.52440, 1.28155])  # standard normal quantiles at 0.1, 0.3, ... 0.9
    assert q.tolist() == (1000 * torch.sigmoid(z)).long().tolist()


def test_pseudo_huber_losses_match_the_published_form():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g) * 3
    d = torch.tensor([0.1, 0.5, 2.0])
    e, dd = pred - tgt, d.view(-1, 1, 1, 1)
    pseudo = dd**2 * (torch.sqrt(1 + (e / dd) ** 2) - 1)  # pseudo-Huber L_d(e) = d^2 (sqrt(1 + (e/d)^2) - 1)
    huber = per_sample_loss(pred, tgt, kind="huber", delta=d)
    torch.testing.assert_close(huber, (2 * pseudo).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(per_sample_loss(pred, tgt, kind="smooth-l1", delta=d),
                               (2 * pseudo / dd).mean(dim=(1, 2, 3)))
    small = tgt + 0.05 * torch.randn(tgt.shape, generator=g)  # small errors: huber -> MSE
    torch.testing.assert_close(per_sample_loss(small, tgt, kind="huber", delta=torch.full((3,), 1.0)),
                               per_sample_loss(small, tgt), rtol=1e-2, atol=0)


def test_huber_schedules():
    t = torch.tensor([0, 500, 1000])
    assert huber_delta(0.1, "constant", t, 1000, None).tolist() == pytest.approx([0.1] * 3)
    assert huber_delta(0.1, "exponential", t, 1000, None).tolist() == pytest.approx([1.0, 0.1**0.5, 0.1])
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 250, 999])
    ac = s.alphas_cumprod[t]
    kohya = (1 - 0.1) / (1 + ((1 - ac) / ac) ** 0.5) ** 2 + 0.1  # sigmas from alphas_cumprod, as kohya computes
    torch.testing.assert_close(huber_delta(0.1, "snr", t, 1000, compute_snr(s, t)), kohya.float())


def test_debiased_and_min_snr_weights_multiply():
    snr = torch.tensor([0.01, 1.0, 4.0, 1e6])
    assert debiased_weight(snr, "epsilon").tolist() == pytest.approx([10.0, 1.0, 0.5, 1 / math.sqrt(1000)])
    assert debiased_weight(snr, "v_prediction").tolist() == pytest.approx([1 / 1.01, 0.5, 0.2, 1 / 1001])
    w = Recipe(min_snr_gamma=5.0, debiased=True).weights(snr, "epsilon")
    want = torch.minimum(snr, torch.tensor(5.0)) / snr * debiased_weight(snr, "epsilon")
    torch.testing.assert_close(w, want)


def test_multires_noise_is_pyramid_noise_at_unit_std():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 4, 32, 32, generator=g)
    out = multires_noise(base.clone(), torch.Generator().manual_seed(2), 6, 0.8)
    assert out.shape == base.shape and abs(out.std().item() - 1) < 1e-5
    # the pyramid adds low frequencies: neighbouring pixels correlate, unlike white noise
    corr = lambda x: torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]  # noqa: E731
    assert corr(out) > corr(base) + 0.1
    # one level: level 0 is a second full-size noise at weight 1, so the result is (base + n0) / std
    g2 = torch.Generator().manual_seed(3)
    one = multires_noise(base.clone(), g2, 1, 0.3)
    g3 = torch.Generator().manual_seed(3)
    torch.rand((), generator=g3)
    ref = base + torch.randn(2, 4, 32, 32, generator=g3)
    torch.testing.assert_close(one, ref / ref.std())


def test_input_perturbation_noises_the_input_not_the_target():
    noise = torch.randn(2, 4, 8, 8)
    r = Recipe(ip_noise_gamma=0.1)
    got = r.perturb(noise, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got - noise, 0.1 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)))
    assert Recipe().perturb(noise, torch.Generator()) is noise


class Capture(Callbacks):
    def on_start(self, state):
        self.state = state


def test_zero_terminal_snr_rescales_the_schedule(tiny_vpred_model, tiny_model, images, tmp_path):
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    cfg = tiny_config(tiny_vpred_model, images, tmp_path / "v" / "l.safetensors", train__max_steps=2,
                      train__zero_terminal_snr=True, train__min_snr_gamma=5.0)
    cap = Capture()
    train(cfg, cap)
    sched = cap.state.models.scheduler
    base = DDPMScheduler.from_pretrained(tiny_vpred_model, subfolder="scheduler")
    want = torch.cumprod(1 - rescale_zero_terminal_snr(base.betas), 0)
    torch.testing.assert_close(sched.alphas_cumprod, want)
    assert sched.alphas_cumprod[-1] == 0 and base.alphas_cumprod[-1] > 0
    with pytest.raises(ConfigError, match="needs a v-prediction model"):
        train(tiny_config(tiny_model, images, tmp_path / "e" / "l.safetensors", train__zero_terminal_snr=True))
    cfg = tiny_config(tiny_model, images, tmp_path / "e" / "l.safetensors", train__zero_terminal_snr=True)
    cfg.model.prediction_type = "epsilon"
    with pytest.raises(ConfigError, match="needs v-prediction"):
        validate(cfg)


@pytest.mark.parametrize("options,message", [
    ({"train__timestep_mean": 0.5}, "timestep_mean applies to timestep_sampling logit-normal only"),
    ({"train__huber_delta": 0.3}, "apply to loss huber or smooth-l1 only"),
    ({"train__min_timestep": 500, "train__max_timestep": 400}, "0 <= min < max <= 1000"),
    ({"train__multires_noise_discount": 0.5}, "needs train.multires_noise_iterations"),
    ({"optim__save_ema": "both"}, "need EMA"),
    ({"optim__optimizer": "adamw-schedulefree", "optim__lr_scheduler": "cosine"}, "set optim.lr_scheduler constant"),
    ({"optim__optimizer": "adamw-schedulefree", "optim__ema_decay": 0.9}, "averages the weights itself"),
    ({"optim__optimizer": "prodigy", "optim__loraplus_ratio": 16.0}, "prodigy takes one learning rate"),
    ({"validation__keep_best": True}, "need validation images"),
    ({"validation__split": 0.2, "validation__early_stop_patience": 2}, "set validation.every"),
])
def test_options_that_would_do_nothing_are_one_line_errors(tiny_model, images, tmp_path, options, message):
    cfg = tiny_config(tiny_model, images, tmp_path / "l.safetensors", **options)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
