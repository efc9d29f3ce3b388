"""SD3 / SD3.5: training by flow matching on tiny MMDiT pipelines (with and without T5, one with SD3.5 Medium's dual
attention and qk-norm), files in the original-MMDiT kohya layout and diffusers' SD3 layout, checked against
diffusers' loader and converter and ComfyUI's key mapping."""

from __future__ import annotations

import pytest
import torch
from conftest import draw_images, tiny_config
from test_train import Capture, load_checked

from sdlora import train
from sdlora.loras.files import read_lora

PROMPTS = ("a red sks", "a blue dog")


@pytest.fixture(scope="module")
def sd35m(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_sd3_pipeline

    return str(save_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd35m", "sd35m"))


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_sd3_pipeline

    return str(save_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", "sd3", t5=False))


def pipeline(folder):
    from pathlib import Path

    from diffusers import StableDiffusion3Pipeline

    none = {} if (Path(folder) / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_outputs(transformer, clips, tokenizers, t5, prompts=PROMPTS):
    """The transformer's prediction and the conditioning (hidden, pooled) of fixed prompts at fixed inputs, through
    sdlora's SD3 conditioning (which mirrors StableDiffusion3Pipeline.encode_prompt)."""
    from sdlora.families.sd3 import CONDITIONING

    with torch.no_grad():
        cond = CONDITIONING.encode(tokenizers, [*clips, t5], list(prompts), "cpu")
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = CONDITIONING.predict(transformer, x, torch.tensor([300.0, 800.0]), cond)
    return out, cond["hidden"], cond["pooled"]


def t5_of(pipe, length=256):
    from sdlora.families.sd3 import T5Text

    return T5Text(pipe.tokenizer_3, pipe.text_encoder_3, length, pipe.transformer.config.joint_attention_dim)


def pipe_outputs(pipe, length=256):
    return sd3_outputs(pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                       t5_of(pipe, length))


def test_encode_matches_the_pipelines_encode_prompt(sd35m):
    """sdlora's SD3 conditioning is StableDiffusion3Pipeline.encode_prompt's (with T5 and without)."""
    from sdlora.families.sd3 import CONDITIONING

    pipe = pipeline(sd35m)
    for t5 in (t5_of(pipe, 40), t5_of(pipe.__class__(**{**pipe.components, "text_encoder_3": None}), 40)):
        p = pipe if t5.model is not None else pipe.__class__(**{**pipe.components, "text_encoder_3": None})
        want = p.encode_prompt(list(PROMPTS), None, None, do_classifier_free_guidance=False, max_sequence_length=40)
        got = CONDITIONING.encode([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2, t5],
                                  list(PROMPTS), "cpu")
        torch.testing.assert_close(got["hidden"], want[0])
        torch.testing.assert_close(got["pooled"], want[2])


def _train_sd3(model, tmp_path, fmt="kohya", **options):
    data = draw_images(tmp_path / "imgs", n=3, sizes=((32, 32), (48, 32)))
    cfg = tiny_config(model, data, tmp_path / "o" / "sd3.safetensors", train__max_steps=3)
    cfg.lora.train_text_encoder, cfg.lora.text_encoder_2_lr, cfg.output.format = True, 5e-4, fmt
    for key, value in options.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    cap = Capture()
    train(cfg, cap)
    return cfg, cap.state


@pytest.mark.parametrize("which,fmt,targets", [("sd35m", "kohya", "all"), ("no_t5", "diffusers", "auto")])
def test_sd3_lora_reproduces_the_trainer_in_diffusers(sd35m, sd3_no_t5, tmp_path, caplog, which, fmt, targets):
    """The trained file (or its diffusers-layout twin), loaded by load_lora_weights into a fresh
    StableDiffusion3Pipeline, gives the trainer's transformer and text-encoder outputs; scale 0 gives the base."""
    from sdlora import convert_lora

    model = sd35m if which == "sd35m" else sd3_no_t5
    cfg, state = _train_sd3(model, tmp_path, fmt, lora__targets=targets, model__t5=which == "sd35m")
    c = state.components
    assert c.family.name == "sd3" and c.prediction_type == "flow"
    assert list(state.lora_states()) == ["transformer", "text_encoder", "text_encoder_2"]
    assert [g["lr"] for g in state.optim.main.param_groups] == [1e-3, 1e-3, 5e-4]
    frozen = c.frozen_text[0]
    assert frozen.model is None and (frozen.released == (which == "sd35m"))  # T5 cached, then let go
    fresh = pipeline(model)
    t5 = t5_of(fresh)
    want = sd3_outputs(c.denoiser.eval(), [e.eval() for e in c.text_encoders], c.tokenizers, t5)
    base = pipe_outputs(fresh)

    tensors, meta = read_lora(cfg.output.path)
    assert meta["sdlora_family"] == "sd3" and meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_base_model_version"] == ("5-medium" if which == "sd35m" else "medium")
    assert meta["modelspec.architecture"] == ("stable-diffusion-3-5-medium/lora" if which == "sd35m"
                                              else "stable-diffusion-3-medium/lora")
    assert meta["sdlora_t5"] == ('{"used": true, "max_length": 256}' if which == "sd35m" else
                                 '{"used": false, "max_length": 256}')
    twin = cfg.output.path
    if fmt == "kohya":
        bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
        assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
                "lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_final_layer_adaLN_modulation_1",
                "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1", "lora_unet_x_embedder_proj"} <= bases
        assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (96, 12)
        assert float(tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 12.0  # 3 x alpha: alpha/rank kept
        assert float(tensors["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 4.0
        assert any(b.startswith("lora_te1_text_model_encoder_layers_") for b in bases)
        assert any(b.startswith("lora_te2_text_model_encoder_layers_") for b in bases)
        twin = convert_lora(cfg.output.path, "diffusers", tmp_path / "twin.safetensors")
    else:
        assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in tensors)
    pipe = pipeline(model)
    load_checked(pipe, twin, caplog)
    got = pipe_outputs(pipe)
    for g, w, b in zip(got, want, base):
        assert (g - w).abs().max() < 1e-5
        assert (g - b).abs().max() > 1e-5  # the transformer, CLIP-L and CLIP-G all changed
    pipe.set_adapters(["t"], adapter_weights=[0.0])
    for g, b in zip(pipe_outputs(pipe), base):
        assert (g - b).abs().max() < 1e-6
