"""Optimizers, LoRA+, EMA and trackers: each optimizer resumes bit-exactly (with the objective options and EMA
along), EMA follows its formula, a missing package is one line naming the extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import StopAt, draw_images, tiny_config

from sdlora import train
from sdlora.callbacks import Callbacks, Commands
from sdlora.errors import ConfigError
from sdlora.loras.files import read_lora

# every optimizer once, and along with it every timestep sampling, loss, huber schedule and noise option
RESUME_CASES = {
    "adamw+ema+loraplus": {"optim__ema_decay": 0.9, "optim__save_ema": "both", "optim__loraplus_ratio": 4.0,
                           "train__multires_noise_iterations": 3, "train__ip_noise_gamma": 0.1},
    "adamw8bit+logit-normal+huber": {"optim__optimizer": "adamw8bit", "train__timestep_sampling": "logit-normal",
                                     "train__timestep_mean": 0.3, "train__loss": "huber",
                                     "train__huber_schedule": "exponential"},
    "prodigy+sigmoid+smooth-l1": {"optim__optimizer": "prodigy", "optim__lr": 1.0, "train__loss": "smooth-l1",
                                  "train__timestep_sampling": "sigmoid", "train__timestep_scale": 1.5,
                                  "train__debiased_estimation": True},
    "adafactor+huber-constant+window": {"optim__optimizer": "adafactor", "train__loss": "huber",
                                   "train__huber_schedule": "constant", "train__min_timestep": 100,
                                   "train__max_timestep": 900, "train__min_snr_gamma": 5.0},
    "schedulefree+validation": {"optim__optimizer": "adamw-schedulefree", "optim__warmup_steps": 2,
                                "validation__split": 0.25, "validation__every": 2, "validation__keep_best": True},
    "lion+ema-warmup+huber-snr": {"optim__optimizer": "lion", "optim__lr": 3e-4, "optim__ema_decay": 0.95,
                                  "optim__ema_warmup": True, "train__loss": "huber", "lora__dropout": 0.1},
}



@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_stop_and_resume_is_bit_exact(tiny_model, tmp_path, case):
    data = draw_images(tmp_path / "imgs", n=5, sizes=((32, 32), (48, 32)))
    kw = {"train__max_steps": 6, "train__batch_size": 2, "lora__train_text_encoder": True, **RESUME_CASES[case]}
    full = tiny_config(tiny_model, data, tmp_path / "a" / "l.safetensors", **kw)
    done = train(full)
    part = tiny_config(tiny_model, data, tmp_path / "b" / "l.safetensors", **kw)
    commands = Commands()
    assert train(part, StopAt(commands, 3), commands).steps == 3
    again = train(part, resume=True)
    assert again.steps == 6
    names = ["l.safetensors"] + (["l_raw.safetensors"] if "save_ema" in str(kw) else []) + \
        (["l_best.safetensors"] if "validation__keep_best" in kw else [])
    for name in names:
        a, b = read_lora(tmp_path / "a" / name)[0], read_lora(tmp_path / "b" / name)[0]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    log = lambda r: [json.loads(x) for x in Path(r.log).read_text().splitlines()]  # noqa: E731
    assert log(done) == log(again)  # losses, lr and validation losses alike


class Capture(Callbacks):
    def __init__(self):
        self.raw = []

    def on_start(self, state):
        self.state = state

    def on_step(self, step, stats):
        self.raw.append([p.detach().clone() for p in self.state.optim.lora_params])


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_its_formula_and_is_what_is_saved(tiny_model, images, tmp_path, warmup):
    from sdlora.training.periodic.output import write_output

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=6,
                      optim__ema_decay=0.8, optim__ema_warmup=warmup, optim__save_ema="both")
    cap = Capture()
    train(cfg, cap)
    ema = [w.clone() for w in cap.raw[0]]
    for n, weights in enumerate(cap.raw, start=1):  # the n-th update: diffusers' / OneTrainer's schedule
        k = n - 1
        decay = 0.0 if k == 0 else min(0.8, 1 - (1 + k) ** (-2 / 3) if warmup else (1 + k) / (10 + k))
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
    state = cap.state
    for e, s in zip(ema, state.optim.ema.shadow_params):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-7)
    raw = [p.detach().clone() for p in state.optim.lora_params]
    assert all(torch.equal(a, b) for a, b in zip(raw, cap.raw[-1]))  # training weights are the raw ones
    with state.optim.evaluation():
        assert all(torch.equal(p, s) for p, s in zip(state.optim.lora_params, state.optim.ema.shadow_params))
        write_output(state, state.lora_states(), 6, tmp_path / "ref.safetensors")
    assert all(torch.equal(p, r) for p, r in zip(state.optim.lora_params, raw))  # swapped back exactly
    saved, ref = read_lora(cfg.output.path)[0], read_lora(tmp_path / "ref.safetensors")[0]
    raw_file = read_lora(tmp_path / "o" / "l_raw.safetensors")[0]
    assert all(torch.equal(saved[k], ref[k]) for k in ref)
    assert any(not torch.equal(saved[k], raw_file[k]) for k in ref)


def test_schedule_free_saves_its_averaged_weights(tiny_model, images, tmp_path):
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=3,
                      optim__optimizer="adamw-schedulefree")
    cap = Capture()
    train(cfg, cap)
    opt = cap.state.optim.main
    assert opt.param_groups[0]["train_mode"]  # back in train mode after sampling and saving
    y = [p.detach().clone() for p in cap.state.optim.lora_params]
    opt.eval()  # schedule-free's own switch: y -> x
    x = [p.detach().clone() for p in cap.state.optim.lora_params]
    opt.train()  # x -> y again, up to rounding; put y back exactly
    with torch.no_grad():
        for p, b in zip(cap.state.optim.lora_params, y):
            p.copy_(b)
    assert any(not torch.equal(a, b) for a, b in zip(x, y))
    with cap.state.optim.evaluation():
        assert all(torch.equal(p, b) for p, b in zip(cap.state.optim.lora_params, x))
    assert all(torch.equal(p, b) for p, b in zip(cap.state.optim.lora_params, y))
    assert opt.param_groups[0]["train_mode"]


def test_loraplus_gives_b_matrices_the_higher_rate(tiny_model, images, tmp_path):
    from sdlora.training.run.setup import make_accelerator, setup

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", optim__loraplus_ratio=16.0)
    cfg.lora.train_text_encoder, cfg.lora.text_encoder_lr = True, 5e-4
    state = setup(cfg, make_accelerator(cfg), Callbacks())
    lr_of = {id(p): g["lr"] for g in state.optim.main.param_groups for p in g["params"]}
    unet, te = state.components.denoiser, state.components.text_encoders[0]
    rates = lambda m, kind: {lr_of[id(p)] for n, p in m.named_parameters() if kind in n}  # noqa: E731
    assert rates(unet, "lora_B") == {1e-3 * 16} and rates(te, "lora_B") == {5e-4 * 16}
    assert rates(unet, "lora_A") == {1e-3} and rates(te, "lora_A") == {5e-4}


@pytest.mark.parametrize("optimizer,module,extra", [("prodigy", "prodigyopt", "optimizers"),
                                                    ("lion", "lion_pytorch", "optimizers")])
def test_missing_optional_package_is_one_line_before_loading(tiny_model, images, tmp_path, monkeypatch,
                                                             optimizer, module, extra):
    import sdlora.models

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    monkeypatch.setattr(sdlora.models, "load_components", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = tiny_config(tiny_model, images, tmp_path / "l.safetensors", optim__optimizer=optimizer)
    with pytest.raises(ConfigError, match=rf"needs the {module} package: pip install 'sdlora\[{extra}\]'"):
        train(cfg)


def test_tensorboard_gets_loss_and_validation_loss(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = draw_images(tmp_path / "imgs", n=4)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=4,
                      validation__split=0.25, validation__every=2, output__log_with="tensorboard")
    cfg.sample.prompts, cfg.sample.steps = ["a sks"], 2
    train(cfg)
    runs = list((tmp_path / "o" / "l_logs" / "sdlora").rglob("events.out.tfevents.*"))
    assert runs
    acc = EventAccumulator(str(runs[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val_loss")] == [2, 4]
    assert "samples" in " ".join(acc.Tags()["images"])


def test_wandb_runs_offline(tiny_model, images, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=2,
                      output__log_with="wandb")
    train(cfg)
    runs = list((tmp_path / "o" / "l_logs").rglob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
