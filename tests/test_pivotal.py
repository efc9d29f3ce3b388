"""Pivotal tuning and textual inversion: new token rows only, embeddings inside the LoRA file and beside it."""

from __future__ import annotations

import pytest
import torch
from conftest import Capture, StopAt, draw_images, fresh_pipeline, tiny_config

from sdlora import train
from sdlora.callbacks import Commands
from sdlora.errors import ConfigError
from sdlora.loras.checks import validate_kohya
from sdlora.loras.files import read_lora
from sdlora.loras.layout import split_embeddings


def pivotal_config(model, data, out, ti_steps=3, lora_steps=3, **kw):
    cfg = tiny_config(model, data, out, train__max_steps=lora_steps, **kw)
    cfg.data[0].prompt = "a sks"
    cfg.pivotal.token, cfg.pivotal.trigger, cfg.pivotal.num_vectors = "<s1>", "sks", 2
    cfg.pivotal.ti_steps, cfg.pivotal.ti_lr, cfg.pivotal.init_word = ti_steps, 5e-2, "dog"
    return cfg


def encode(text_encoder, tokenizer, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_textual_inversion_changes_only_the_new_rows(tiny_model, images, tmp_path):
    cfg = pivotal_config(tiny_model, images, tmp_path / "o" / "ti.safetensors", lora_steps=0)
    cap = Capture()
    result = train(cfg, cap)
    assert result.steps == 3
    state = cap.state
    te = state.components.text_encoders[0]
    weight = te.get_input_embeddings().weight.detach()
    original = fresh_pipeline(tiny_model).text_encoder.get_input_embeddings().weight.detach()
    first = state.concept.tokens.per_encoder[0].first_id
    assert weight.shape == original.shape  # the tiny model has spare rows, as SD's tokenizer/vocab may not
    changed = (weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [first, first + 1]  # every other row is bit-identical
    assert not torch.equal(state.concept.tokens.vectors()[0], state.concept.initial[0])
    caption = state.batches.examples[0].caption
    assert "sks" not in caption and "<s1> <s1>_1" in caption
    # plain TI writes the embedding file diffusers loads
    tensors, _ = read_lora(cfg.output.path)
    assert set(tensors) == {"clip_l"} and tensors["clip_l"].shape == (2, 32)
    pipe = fresh_pipeline(tiny_model)
    pipe.load_textual_inversion(cfg.output.path, token="<s1>")
    got = encode(pipe.text_encoder, pipe.tokenizer, ["a red <s1> <s1>_1"])
    want = encode(te, state.components.tokenizers[0], ["a red <s1> <s1>_1"])
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("continue_lr", [0.0, 1e-2])
def test_pivotal_file_reloads_in_diffusers_and_reproduces_trainer(tiny_model, images, tmp_path, continue_lr):
    cfg = pivotal_config(tiny_model, images, tmp_path / "o" / "pt.safetensors")
    cfg.lora.train_text_encoder, cfg.pivotal.continue_lr = True, continue_lr
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    unet, te = c.denoiser, c.text_encoders[0]
    unet.eval()
    te.eval()
    prompts = ["a red <s1> <s1>_1", "a blue dog"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def outputs(u, t, tok):
        cond = encode(t, tok, prompts)
        with torch.no_grad():
            return u(x, torch.tensor([50, 500]), encoder_hidden_states=cond).sample, cond

    want, want_cond = outputs(unet, te, c.tokenizers[0])
    tensors, meta = read_lora(cfg.output.path)
    assert validate_kohya(tensors) == []
    assert tensors["bundle_emb.<s1>.string_to_param.*"].shape == (2, 32)
    assert meta["modelspec.trigger_phrase"] == "<s1>"
    emb_file = tmp_path / "o" / "pt_emb.safetensors"
    assert set(read_lora(emb_file)[0]) == {"clip_l"}

    # diffusers with the two files: LoRA keys (without the bundle) + the embedding file
    pipe = fresh_pipeline(tiny_model)
    lora_only, bundled = split_embeddings(tensors)
    pipe.load_lora_weights(lora_only)
    pipe.load_textual_inversion(str(emb_file), token="<s1>")
    got, got_cond = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (got_cond - want_cond).abs().max() < 1e-5
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(bundled["<s1>"]["clip_l"], read_lora(emb_file)[0]["clip_l"])

    # sdlora's own loader reads the bundle from the one file
    from sdlora.loras.apply import load_lora_into

    pipe2 = fresh_pipeline(tiny_model)
    load_lora_into(pipe2, cfg.output.path)
    got2, _ = outputs(pipe2.unet, pipe2.text_encoder, pipe2.tokenizer)
    assert (got2 - want).abs().max() < 1e-5
    # the pipeline expands "<s1>" itself, as users type it
    assert pipe2.maybe_convert_prompt("a red <s1>", pipe2.tokenizer) == "a red <s1> <s1>_1"


def test_pivotal_resume_across_phases_is_exact(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=3)
    a = pivotal_config(tiny_model, data, tmp_path / "a" / "l.safetensors", ti_steps=3, lora_steps=3)
    a.pivotal.continue_lr = 1e-3
    train(a)
    b = pivotal_config(tiny_model, data, tmp_path / "b" / "l.safetensors", ti_steps=3, lora_steps=3)
    b.pivotal.continue_lr = 1e-3
    commands = Commands()
    assert train(b, StopAt(commands, 2), commands).stopped
    train(b, resume=True)
    ta, tb = read_lora(a.output.path)[0], read_lora(b.output.path)[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_missing_trigger_is_a_config_error(tiny_model, images, tmp_path):
    cfg = pivotal_config(tiny_model, images, tmp_path / "o" / "x.safetensors")
    cfg.pivotal.trigger = "zzz"
    with pytest.raises(ConfigError, match="contains the trigger 'zzz'"):
        train(cfg)
