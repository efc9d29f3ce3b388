"""End-to-end training on a tiny model: files load in diffusers and reproduce the trainer, resume is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import Capture, StopAt, draw_images, fresh_pipeline, load_checked, tiny_config, unet_and_te_outputs

from sdlora import train
from sdlora.callbacks import Callbacks, Commands
from sdlora.errors import ConfigError, TrainingError
from sdlora.loras.checks import validate_kohya
from sdlora.loras.files import read_lora


@pytest.mark.parametrize("fmt,te", [("kohya", True), ("diffusers", True), ("kohya", False)])
def test_saved_lora_reproduces_trainer(tiny_model, images, tmp_path, caplog, fmt, te):
    cfg = tiny_config(tiny_model, images, tmp_path / "out" / "l.safetensors", train__max_steps=4)
    cfg.output.format, cfg.lora.train_text_encoder, cfg.lora.targets = fmt, te, "all"
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    unet, te_model = c.denoiser, c.text_encoders[0]
    unet.eval()
    te_model.eval()
    # every LoRA layer moved away from zero (otherwise loading it would prove nothing)
    for state in cap.state.lora_states().values():
        assert all(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)
    expected, expected_cond = unet_and_te_outputs(unet, te_model, c.tokenizers[0])

    tensors, meta = read_lora(cfg.output.path)
    if fmt == "kohya":
        assert validate_kohya(tensors) == []
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors) == te
    pipe = fresh_pipeline(tiny_model)
    base, _ = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    load_checked(pipe, cfg.output.path, caplog, has_te=te)
    got, got_cond = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (got - expected).abs().max() < 1e-5
    assert (got_cond - expected_cond).abs().max() < 1e-5
    assert (got - base).abs().max() > 1e-4  # the LoRA really changes the output
    pipe.set_adapters(["t"], adapter_weights=[0.0])
    zero, _ = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (zero - base).abs().max() < 1e-6
    assert meta["ss_network_dim"] == "4" and meta["modelspec.trigger_phrase"] == "a sks"
    assert json.loads(meta["sdlora_config"])["lora"]["targets"] == "all"


def test_cli_run_loss_falls_and_writes_everything(tiny_model, tmp_path):
    from sdlora.cli import main

    data = draw_images(tmp_path / "imgs", n=3)
    out = tmp_path / "run" / "demo.safetensors"
    rc = main(["train", "--model", tiny_model, "--data", str(data), "--instance-prompt", "a sks",
               "--resolution", "32", "--max-steps", "60", "--lr", "3e-3", "--targets", "all", "--rank", "8",
               "--output", str(out), "--sample-prompt", "a red sks", "--sample-every", "30", "--sample-steps", "2",
               "--save-every", "30", "--seed", "3"])
    assert rc == 0
    records = [json.loads(line) for line in out.with_name("demo_log.jsonl").read_text().splitlines()]
    log = [r for r in records if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 61))
    assert [(r["step"], r["sample"]) for r in records if "sample" in r] == \
        [(0, "step_0000000_0.png"), (30, "step_0000030_0.png"), (60, "step_0000060_0.png")]
    first, last = sum(r["loss"] for r in log[:15]) / 15, sum(r["loss"] for r in log[-15:]) / 15
    assert last < first * 0.9, (first, last)
    samples = sorted(p.name for p in out.with_name("demo_samples").iterdir())
    assert samples == ["step_0000000_0.png", "step_0000030_0.png", "step_0000060_0.png"]
    assert (out.parent / "demo_checkpoints" / "step_0000030.pt").is_file()
    tensors, meta = read_lora(out)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4  # conv LoRA
    assert tensors[next(iter(tensors))].dtype == torch.float16  # default save dtype
    assert meta["sshs_model_hash"] and meta["ss_base_model_version"] == "sd_v1"


def test_interrupt_and_resume_equals_uninterrupted(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=5, sizes=((32, 32), (48, 32)))
    kw = dict(train__max_steps=8, train__batch_size=2, lora__dropout=0.1)
    full = tiny_config(tiny_model, data, tmp_path / "a" / "l.safetensors", **kw)
    full.augment.random_flip, full.augment.caption_dropout = True, 0.3
    full.lora.train_text_encoder = True
    full.optim.lr_scheduler, full.optim.warmup_steps = "cosine", 2
    train(full)

    part = tiny_config(tiny_model, data, tmp_path / "b" / "l.safetensors", **kw)
    part.augment, part.lora, part.optim = full.augment, full.lora, full.optim
    commands = Commands()
    first = train(part, StopAt(commands, 3), commands)
    assert first.stopped and first.steps == 3
    log = tmp_path / "b" / "l_log.jsonl"
    with open(log, "a") as f:  # as if the process died after logging step 4, past the checkpoint
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    second = train(part, resume=True)
    assert second.steps == 8
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(1, 9))
    a, _ = read_lora(full.output.path)
    b, _ = read_lora(part.output.path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dreambooth_prior_preservation_generates_class_images(tiny_model, tmp_path):
    data = draw_images(tmp_path / "inst", n=2, captions=False)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=3)
    cfg.prior.class_prompt, cfg.prior.class_data, cfg.prior.num_class_images = "a dog", str(tmp_path / "cls"), 3
    cfg.sample.steps = 2
    draw_images(tmp_path / "cls", n=1, captions=False)  # one exists, two are generated
    train(cfg)
    assert len(list((tmp_path / "cls").glob("class_*.png"))) == 2
    log = [json.loads(x) for x in (tmp_path / "o" / "l_log.jsonl").read_text().splitlines()]
    for rec in log:
        assert rec["loss_prior"] > 0 and rec["loss_instance"] > 0
        assert rec["loss"] == pytest.approx(rec["loss_instance"] + rec["loss_prior"], rel=1e-5)


def test_prior_from_base_model_needs_no_class_images(tiny_model, images, tmp_path):
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=3)
    cfg.prior.class_prompt, cfg.prior.mode, cfg.prior.weight = "a dog", "model", 0.5
    train(cfg)
    log = [json.loads(x) for x in (tmp_path / "o" / "l_log.jsonl").read_text().splitlines()]
    assert log[0]["loss_prior"] == 0.0  # LoRA starts as the identity: it equals the base model
    assert log[-1]["loss_prior"] > 0.0
    assert log[-1]["loss"] == pytest.approx(log[-1]["loss_instance"] + 0.5 * log[-1]["loss_prior"], rel=1e-5)


def spy_model_prior(monkeypatch, base) -> list:
    """Records each call of the model prior: (prompts, its loss, the reference loss, the noisy latents). The
    reference: the base model loaded apart from the trainer (diffusers' UNet and the CLIP text encoder) against the
    trained LoRA'd UNet and text encoder, at the same latents; the loss is their mean squared gap."""
    from sdlora.training.steps import step as step_mod

    original, calls = step_mod.model_prior_loss, []

    def spy(models, noisy, t, micro, prompts, image=None):
        loss = original(models, noisy, t, micro, prompts, image)
        ids = base.tokenizer(list(prompts), padding="max_length", max_length=base.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            want = base.unet(noisy, t, encoder_hidden_states=base.text_encoder(ids)[0]).sample
            te = models.text.parts[0].module
            got = models.denoiser.module(noisy, t, encoder_hidden_states=te(ids)[0]).sample
        calls.append((list(prompts), loss.item(), ((got - want) ** 2).mean().item(), noisy.detach().clone()))
        return loss

    monkeypatch.setattr(step_mod, "model_prior_loss", spy)
    return calls


def test_prior_from_base_model_on_images_to_preserve(tiny_model, images, tmp_path, monkeypatch):
    """--prior-mode model with a class folder: every step also matches the base model on those images, noised, with
    their own captions; --blank-prompt-weight also on the empty prompt at the training images' noisy latents.
    Reference: `spy_model_prior`."""
    keep = draw_images(tmp_path / "keep", n=2)
    captions = {"a blue dog", "a green cat"}
    for i, caption in enumerate(sorted(captions)):
        (keep / f"img{i}.txt").write_text(caption)
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=4)
    cfg.lora.train_text_encoder, cfg.train.batch_size = True, 2
    cfg.prior.class_prompt, cfg.prior.mode, cfg.prior.class_data = "a dog", "model", str(keep)
    cfg.prior.weight, cfg.prior.blank_weight = 2.0, 0.5
    calls = spy_model_prior(monkeypatch, fresh_pipeline(tiny_model))
    train(cfg)
    kept, blank = calls[0::2], calls[1::2]  # per step: the folder's images, then the empty prompt
    assert len(kept) == len(blank) == 4
    assert all(set(prompts) <= captions and len(prompts) == 2 for prompts, *_ in kept)  # their own captions
    assert all(prompts == ["", ""] for prompts, *_ in blank)
    assert kept[0][1] == blank[0][1] == 0.0  # the LoRA starts as the identity
    assert kept[-1][1] > 1e-8 and blank[-1][1] > 1e-8
    for _, loss, reference, _ in calls:
        assert loss == pytest.approx(reference, rel=1e-3, abs=1e-9)
    log = [json.loads(x) for x in (tmp_path / "o" / "l_log.jsonl").read_text().splitlines()]
    assert [rec["loss_prior"] for rec in log] == pytest.approx([c[1] for c in kept], rel=1e-3)  # 8 decimals
    assert [rec["loss_blank"] for rec in log] == pytest.approx([c[1] for c in blank], rel=1e-3)
    assert log[-1]["loss"] == pytest.approx(log[-1]["loss_instance"] + 2.0 * log[-1]["loss_prior"]
                                            + 0.5 * log[-1]["loss_blank"], rel=1e-5)


def test_differential_output_preservation(tiny_model, images, tmp_path, monkeypatch):
    """--dop-class (ai-toolkit's differential output preservation): each step also matches the base model on the
    training captions with the trigger swapped for the class word, at the training images' own noisy latents.
    Reference: `spy_model_prior`; the latents are the ones the instance loss noised (spied on `denoise_loss`)."""
    from sdlora.training.steps import step as step_mod

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=4)
    cfg.lora.train_text_encoder, cfg.train.batch_size = True, 2
    cfg.output.trigger, cfg.prior.dop_class, cfg.prior.dop_weight = "sks", "dog", 0.5
    calls = spy_model_prior(monkeypatch, fresh_pipeline(tiny_model))
    original, noised = step_mod.denoise_loss, []

    def spy_instance(*args, **kwargs):
        out = original(*args, **kwargs)
        if out[1].device.type != "meta":  # not the memory estimate's trace
            noised.append(out[1].detach().clone())
        return out

    monkeypatch.setattr(step_mod, "denoise_loss", spy_instance)
    train(cfg)
    assert [c[0] for c in calls] == [["a red dog", "a red dog"]] * 4  # "a red sks", the trigger swapped
    assert calls[0][1] == 0.0 and calls[-1][1] > 1e-8
    for (_, loss, reference, noisy), instance in zip(calls, noised, strict=True):
        assert torch.equal(noisy, instance)
        assert loss == pytest.approx(reference, rel=1e-3, abs=1e-9)
    log = [json.loads(x) for x in (tmp_path / "o" / "l_log.jsonl").read_text().splitlines()]
    assert [rec["loss_dop"] for rec in log] == pytest.approx([c[1] for c in calls], rel=1e-3)
    assert log[-1]["loss"] == pytest.approx(log[-1]["loss_instance"] + 0.5 * log[-1]["loss_dop"], rel=1e-5)
    assert step_mod.TriggerSwap("sks", "dog")(["sks, a sksy <sks> tree"]) == ["dog, a sksy <sks> tree"]  # words


def test_differential_output_preservation_with_pivotal_tuning(tiny_model, images, tmp_path, monkeypatch):
    """With pivotal tuning the captions hold the new token's vectors where the trigger was: those are swapped."""
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=3)
    cfg.pivotal.token, cfg.pivotal.trigger, cfg.pivotal.num_vectors, cfg.pivotal.ti_steps = "<s1>", "sks", 2, 1
    cfg.prior.dop_class = "dog"
    calls = spy_model_prior(monkeypatch, fresh_pipeline(tiny_model))
    train(cfg)
    assert len(calls) >= 3 and all(c[0] == ["a red dog"] for c in calls)  # "a red <s1> <s1>_1", swapped


def test_differential_output_preservation_needs_the_trigger_in_captions(tiny_model, images, tmp_path):
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors")
    cfg.prior.dop_class = "dog"
    with pytest.raises(ConfigError, match="--trigger"):
        train(cfg)
    cfg.output.trigger = "ohwx"  # the captions say "a red sks"
    with pytest.raises(ConfigError, match="no training caption holds the trigger 'ohwx'"):
        train(cfg)


def test_vprediction_model_trains_on_velocity(tiny_vpred_model, images, tmp_path):
    cap = Capture()
    cfg = tiny_config(tiny_vpred_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=2)
    train(cfg, cap)
    assert cap.state.models.scheduler.config.prediction_type == "v_prediction"
    assert read_lora(cfg.output.path)[1]["modelspec.prediction_type"] == "v_prediction"


class Poison(Callbacks):
    """Turns one LoRA weight into NaN after `step`: the next loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_start(self, state):
        self.state = state

    def on_step(self, step, stats):
        if step == self.step:
            with torch.no_grad():
                self.state.optim.lora_params[0].fill_(float("nan"))


def test_nan_loss_stops_with_advice_and_keeps_checkpoint(tiny_model, images, tmp_path):
    from sdlora.training.periodic.checkpoint import load_state

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=6)
    cfg.output.save_every = 2
    with pytest.raises(TrainingError, match="loss became nan at step 4: lower the learning rate") as err:
        train(cfg, Poison(3))
    kept = tmp_path / "o" / "l_checkpoints" / "step_0000002.pt"
    assert f"last good checkpoint: {kept}" in str(err.value)
    saved = load_state(kept, cfg.to_dict())
    assert all(torch.isfinite(v).all() for s in saved["lora"].values() for v in s.values())
    assert not (tmp_path / "o" / "l.safetensors").exists()

    cfg = tiny_config(tiny_model, images, tmp_path / "p" / "l.safetensors", train__max_steps=6)
    cfg.output.save_every, cfg.optim.lr, cfg.optim.max_grad_norm = 2, 1e30, 0.0
    with pytest.raises(TrainingError, match="lower the learning rate") as err:  # NaN before any checkpoint
        train(cfg)
    assert "checkpoint" not in str(err.value) and not (tmp_path / "p" / "l.safetensors").exists()


def test_zero_update_is_an_error_not_a_file(tiny_model, images, tmp_path):
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=1)
    cfg.optim.lr = 1e-45  # below float32's smallest step: B stays exactly zero
    cfg.optim.weight_decay = 0.0
    with pytest.raises(TrainingError, match="still zero"):
        train(cfg)
    assert not (tmp_path / "o" / "l.safetensors").exists()


def test_targets_that_match_nothing_are_an_error():
    from sdlora.training.run.adapters import inject

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TrainingError, match="matched no layer"):
        inject(model, [r"attn2\.to_q"], 4, 4)


@pytest.mark.parametrize("options", [
    {"train__gradient_checkpointing": True, "lora__targets": "attn"},
    {"train__min_snr_gamma": 5.0, "train__noise_offset": 0.05, "train__grad_accum": 2},
    {"train__mixed_precision": "bf16", "lora__targets": "attn_ff"},
    {"augment__crop": "random", "augment__random_flip": True, "train__batch_size": 2},
    {"augment__bucketing": False, "optim__lr_scheduler": "cosine", "optim__warmup_steps": 1},
])
def test_training_options_give_a_working_lora(tiny_model, tmp_path, options):
    data = draw_images(tmp_path / "imgs", n=3, sizes=((32, 32), (48, 24)))
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=3, **options)
    cap = Capture()
    result = train(cfg, cap)
    assert math.isfinite(result.final_loss) and result.steps == 3
    assert all(p.grad is None for p in cap.state.optim.params)  # zeroed after the step
    tensors, _ = read_lora(cfg.output.path)
    ups = [v for k, v in tensors.items() if "lora_up" in k]
    assert ups and all(v.float().abs().max() > 0 for v in ups)  # backward reached every layer and the step used it


def test_lora_parameters_get_finite_nonzero_gradients(tiny_model, images, tmp_path):
    from sdlora.training.run.setup import make_accelerator, setup
    from sdlora.training.steps.step import seeded, training_step

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors")
    cfg.lora.train_text_encoder = True
    state = setup(cfg, make_accelerator(cfg), Callbacks())
    gen, rng = seeded(cfg.train.seed, 0, 0)
    loss, _ = training_step(state.batches.fetch(0, rng), state.models, cfg, gen)
    loss.backward()
    c = state.components
    named = [(n, p) for m in (c.denoiser, c.text_encoders[0]) for n, p in m.named_parameters() if p.requires_grad]
    assert named and all("lora_" in n for n, _ in named)  # only LoRA parameters train
    for n, p in named:
        if "lora_B" in n:  # B = 0 at the start, so A's gradient is zero: B's must be finite and non-zero
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
    opt_params = {id(p) for g in state.optim.main.param_groups for p in g["params"]}
    assert opt_params == {id(p) for _, p in named}  # optimizer state only for LoRA parameters


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    from sdlora.errors import ModelError
    from sdlora.models import load_components

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hub is not reachable"):
        load_components("someone/some-sd-model")
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        load_components(".")


@pytest.mark.parametrize("cache", [True, False])
def test_cached_latents_and_text_mean_no_per_step_encoder_work(tiny_model, images, tmp_path, cache):
    from sdlora.training.loop import optimizer_step
    from sdlora.training.run.setup import make_accelerator, setup

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors")
    cfg.train.cache_latents = cfg.train.cache_text = cache
    state = setup(cfg, make_accelerator(cfg), Callbacks())
    calls = {"vae": 0, "text": 0}
    vae, te = state.components.vae, state.components.text_encoders[0]
    vae_encode, te_forward = vae.encode, te.forward
    vae.encode = lambda *a, **k: (calls.__setitem__("vae", calls["vae"] + 1), vae_encode(*a, **k))[1]
    te.forward = lambda *a, **k: (calls.__setitem__("text", calls["text"] + 1), te_forward(*a, **k))[1]
    for step in range(3):
        optimizer_step(state, step)
    assert (calls["vae"] == 0 and calls["text"] == 0) if cache else (calls["vae"] >= 3 and calls["text"] >= 3)
