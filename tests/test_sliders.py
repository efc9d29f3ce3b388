"""Concept sliders and erasers from prompts alone.

The reference objective is written out here from p1atdev/LECO and rohitgandikota/sliders (train_lora.py: DDIM over
max_denoising_steps, the first k steps from noise on [unconditional, target] at guidance 3 (sdlora draws k from 0,
LECO from 1), then MSE between the
LoRA's prediction for the target and neutral +/- guidance (positive - unconditional), prompt_util.PromptEmbedsPair)
and ai-toolkit's concept slider (the same target mirrored at network multiplier -1; an anchor prompt kept at the
base model's prediction); the partial denoising runs with the LoRA off, as ai-toolkit's does (LECO and Concept
Sliders denoise with it on); the LoRA at +1 and -1 is diffusers' own, loaded from the written file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import StopAt, draw_images, fresh_pipeline, load_checked, unet_and_te_outputs
from test_blocks import setup_state

from sdlora import train
from sdlora.callbacks import Commands
from sdlora.cli import main
from sdlora.config import Config, load_toml, validate
from sdlora.errors import ConfigError
from sdlora.loras.checks import validate_kohya
from sdlora.loras.files import read_lora
from sdlora.paths import sample_data
from sdlora.training.periodic.output import write_output
from sdlora.training.steps.slider import SliderBatch

PROMPTS = dict(target="a dog", positive="a red dog", negative="a blue dog")


def slider_config(model, out, steps=3, action="enhance", **slider):
    cfg = Config()
    cfg.model.path, cfg.output.path, cfg.output.dtype = model, str(out), "fp32"
    cfg.augment.resolution, cfg.train.mixed_precision, cfg.train.max_steps = 32, "no", steps
    cfg.optim.lr = 1e-3
    cfg.slider.action, cfg.slider.denoise_steps = action, 6
    for k, v in {**(PROMPTS if action == "enhance" else {"target": "a dog"}), **slider}.items():
        setattr(cfg.slider, k, v)
    return cfg


def encode(pipe, texts):
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def reference(pipe, sl, noise, k, steps, anchor, attribute=""):
    """LECO's / ai-toolkit's losses for one step, from diffusers' pipeline with the LoRA file loaded as adapter t;
    `attribute` in front of every prompt (Concept Sliders' load_prompts_from_yaml: att + ' ' + prompt)."""
    import dataclasses

    from diffusers import DDIMScheduler

    positive, unconditional = sl.positive or sl.target, sl.negative or ("" if sl.action == "erase" else sl.target)
    with_attribute = (lambda p: f"{attribute} {p}".strip()) if attribute else (lambda p: p)
    sl = dataclasses.replace(sl, target=with_attribute(sl.target))
    positive, unconditional = with_attribute(positive), with_attribute(unconditional)

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    unet = pipe.unet
    with torch.no_grad():
        pipe.disable_lora()
        x = noise
        for t in sched.timesteps[:k]:
            cond = encode(pipe, [""] * len(x) + [sl.target] * len(x))
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
            x = sched.step(u + 3.0 * (c - u), t, x).prev_sample
        t = sched.timesteps[k]

        def eps(prompt):
            return unet(x, t, encoder_hidden_states=encode(pipe, [prompt] * len(x))).sample

        neutral = sl.target if sl.action == "enhance" else unconditional
        base = {p: eps(p) for p in {positive, unconditional, neutral, anchor}}
        pipe.enable_lora()
        out = {}
        for w, name in ((1.0, ""), (-1.0, "_neg")):
            if sl.action == "erase" and w < 0:
                continue
            pipe.set_adapters(["t"], [w])
            sign = w if sl.action == "enhance" else -1.0
            goal = base[neutral] + sign * sl.guidance * (base[positive] - base[unconditional])
            out[f"loss_slider{name}"] = torch.nn.functional.mse_loss(eps(sl.target), goal).item()
            out[f"loss_anchor{name}"] = torch.nn.functional.mse_loss(eps(anchor), base[anchor]).item()
    return out


@pytest.mark.parametrize("action,extra", [("enhance", {"guidance": 2.0}),
                                          ("erase", {"guidance": 1.5, "attributes": ["a red", "a blue"]})])
def test_slider_step_is_the_published_objective(tiny_model, tmp_path, action, extra):
    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors", action=action, anchors=["a cat"],
                        **extra)
    cfg.train.batch_size = 2
    state = setup_state(cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # a LoRA that changes the model, so +1 and -1 differ
        for name, p in state.components.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    path = write_output(state, state.lora_states(), 0, tmp_path / "now.safetensors")
    got_loss, got = state.objective(SliderBatch(3), state.models, cfg, torch.Generator().manual_seed(7))
    state.batches.close()

    pipe = fresh_pipeline(tiny_model)
    g = torch.Generator().manual_seed(7)  # the step's draws: its noise, then k in 0..N-1
    noise = torch.randn((2, 4, 32 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor), generator=g)
    k = int(torch.randint(0, cfg.slider.denoise_steps, (1,), generator=g))
    pipe.load_lora_weights(str(path), adapter_name="t")
    # micro-batch 3: the second attribute in turn (and the only anchor)
    want = reference(pipe, cfg.slider, noise, k, cfg.slider.denoise_steps, "a cat", "a blue" if action == "erase"
                     else "")
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert want["loss_anchor"] > 0 and (action == "erase" or want["loss_slider"] != want["loss_slider_neg"])
    sides = [""] if action == "erase" else ["", "_neg"]
    total = sum(want[f"loss_slider{s}"] + want[f"loss_anchor{s}"] for s in sides) / len(sides)
    assert got_loss.item() == pytest.approx(total, rel=1e-4)


def test_slider_stop_and_resume_is_bit_exact(tiny_model, tmp_path):
    full = slider_config(tiny_model, tmp_path / "a" / "s.safetensors", steps=4, anchors=["a cat", "a photo"])
    train(full)
    part = slider_config(tiny_model, tmp_path / "b" / "s.safetensors", steps=4, anchors=["a cat", "a photo"])
    commands = Commands()
    assert train(part, StopAt(commands, 2), commands).steps == 2
    assert train(part, resume=True).steps == 4
    a, b = read_lora(full.output.path)[0], read_lora(part.output.path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = slider_config(tiny_model, tmp_path / "b" / "s.safetensors", steps=4, positive="a cat")
    with pytest.raises(Exception, match=r"slider\.positive was"):
        train(other, resume=True)


def test_slider_file_loads_like_any_lora_and_says_what_it_is(tiny_model, tmp_path, caplog):
    """kohya layout (A1111 / ComfyUI key rules), diffusers' loader at +1 and at -1 reproduces the trainer at the
    same strengths, and the header names the slider and its range."""
    from conftest import Capture

    from sdlora.training.periodic.output import lora_scaled

    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors", steps=2)
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    tensors, meta = read_lora(cfg.output.path)
    assert validate_kohya(tensors) == [] and all(k.startswith("lora_unet_") for k in tensors)
    record = json.loads(meta["sdlora_slider"])
    assert record == {"action": "enhance", "target": "a dog", "positive": "a red dog", "negative": "a blue dog",
                      "guidance": 1.0, "attributes": [], "anchors": [], "strength_range": [-1, 1]}
    assert "-1 toward 'a blue dog'" in meta["modelspec.usage_hint"] and meta["modelspec.tags"] == "slider"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_num_train_images"] == "0"
    pipe = fresh_pipeline(tiny_model)
    load_checked(pipe, cfg.output.path, caplog, has_te=False)
    for w in (1.0, -1.0):
        with lora_scaled([c.denoiser], w):
            want, _ = unet_and_te_outputs(c.denoiser.eval(), c.text_encoders[0], c.tokenizers[0])
        pipe.set_adapters(["t"], [w])
        got, _ = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        assert (got - want).abs().max() < 1e-5, w

    paths = []  # `sdlora generate --grid --scales -1,0,1` (negative scales on the command line)
    assert main(["generate", "--model", tiny_model, "--lora", cfg.output.path, "--prompt", "a dog", "--grid",
                 "--scales", "-1,0,1", "--steps", "2", "--width", "32", "--height", "32",
                 "--output", str(tmp_path / "grid")]) == 0
    paths = list((tmp_path / "grid").glob("*.png"))
    assert len(paths) == 1 and "[-1.0, 0.0, 1.0]" in __import__("PIL.Image").Image.open(paths[0]).text["sdlora"]


@pytest.mark.parametrize("fixture", ["tiny_xl", "sd35m"])
def test_sliders_train_on_sdxl_and_sd3(fixture, request, tmp_path):
    """SDXL's size conditioning and SD3's flow-matching sampler and cached T5 serve the slider step too."""
    cfg = slider_config(request.getfixturevalue(fixture), tmp_path / "o" / "s.safetensors", steps=2,
                        anchors=["a cat"])
    result = train(cfg)
    assert result.steps == 2 and result.final_loss == result.final_loss
    meta = read_lora(cfg.output.path)[1]
    assert json.loads(meta["sdlora_slider"])["strength_range"] == [-1, 1]


@pytest.mark.parametrize("change,says", [
    (dict(positive=""), "needs slider.positive"),
    (dict(negative="a red dog"), "learn no direction"),
    (dict(anchor_weight=2.0), "anchor_weight needs slider.anchors"),
])
def test_bad_slider_settings_are_one_line_errors(tiny_model, tmp_path, change, says):
    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors", **change)
    with pytest.raises(ConfigError, match=says):
        validate(cfg)


def test_what_a_slider_does_not_use_is_refused(tiny_model, tmp_path):
    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors")
    cfg.validation.scorer = "shapes"  # image scores compare with training images; a slider has none
    with pytest.raises(ConfigError, match=r"validation\.scorer is for training on images"):
        validate(cfg)
    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors")
    cfg.train.noise_offset = 0.05
    with pytest.raises(ConfigError, match=r"train\.noise_offset is for training on images"):
        validate(cfg)
    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors")
    cfg.prior.blank_weight = 1.0  # the slider's step has no training images to pin the empty prompt at
    with pytest.raises(ConfigError, match=r"prior\.blank_weight is for training on images"):
        validate(cfg)
    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors")
    cfg.prior.dop_class, cfg.output.trigger = "dog", "sks"  # nor training captions to swap the trigger in
    with pytest.raises(ConfigError, match=r"prior\.dop_class is for training on images"):
        validate(cfg)
    cfg = slider_config(tiny_model, tmp_path / "o" / "s.safetensors")
    cfg.data = [__import__("sdlora.config", fromlist=["DataFolder"]).DataFolder(path=str(tmp_path))]
    with pytest.raises(ConfigError, match="prompts alone"):
        validate(cfg)
    cfg = Config()
    cfg.slider.positive = "a red dog"
    with pytest.raises(ConfigError, match=r"slider\.target is empty"):
        validate(cfg, check_paths=False)


def test_sdlora_slider_command(tiny_model, tmp_path, capsys):
    data = draw_images(tmp_path / "imgs", n=1)
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\npath = "{tiny_model}"\n[[data]]\npath = "{data}"\nprompt = "a dog"\n')
    assert main(["slider", str(job)]) == 2
    assert "no slider target" in capsys.readouterr().err
    out = tmp_path / "o" / "s.safetensors"
    assert main(["slider", "--model", tiny_model, "--slider-target", "a dog", "--slider-action", "erase",
                 "--max-steps", "1", "--slider-denoise-steps", "3", "--resolution", "32", "--output", str(out),
                 "--mixed-precision", "no"]) == 0
    assert json.loads(read_lora(out)[1]["sdlora_slider"])["strength_range"] == [0, 1]


@pytest.mark.parametrize("job", ["slider_eraser.toml", "slider_colour.toml"])
def test_shipped_slider_jobs_are_valid(job):
    cfg = load_toml(sample_data() / job)
    assert cfg.is_slider and validate(cfg, check_paths=False)
