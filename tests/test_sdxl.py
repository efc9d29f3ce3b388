"""SDXL: two text encoders, size/crop micro-conditioning, kohya export with SGM names and lora_te1/lora_te2."""

from __future__ import annotations

import pytest
import torch
from conftest import Capture, draw_images, load_checked, tiny_config

from sdlora import train
from sdlora.loras.checks import validate_kohya
from sdlora.loras.files import read_lora
from sdlora.loras.layout import split_embeddings


def xl_outputs(unet, encoders, tokenizers, prompts=("a red sks", "a blue dog"), size=((48, 32), (0, 4), (32, 32))):
    """UNet output, hidden states and pooled embedding of SDXL's conditioning on fixed inputs."""
    from sdlora.families.sdxl import CONDITIONING

    with torch.no_grad():
        cond = CONDITIONING.encode(tokenizers, encoders, list(prompts), "cpu")
        micro = torch.stack([CONDITIONING.micro(*size)] * 2)
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = unet(x, torch.tensor([20, 600]), **CONDITIONING.denoiser_kwargs(cond, micro)).sample
        return out, cond["hidden"], cond["pooled"]


def _base(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    return pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_lora_loads_in_diffusers_and_reproduces_trainer(tiny_xl, tmp_path, caplog, fmt):
    from diffusers import StableDiffusionXLPipeline

    data = draw_images(tmp_path / "imgs", n=3, sizes=((32, 32), (48, 32)))
    cfg = tiny_config(tiny_xl, data, tmp_path / "o" / "xl.safetensors", train__max_steps=3)
    cfg.lora.train_text_encoder, cfg.lora.targets, cfg.output.format = True, "all", fmt
    cfg.lora.text_encoder_2_lr = 5e-4
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    unet, encoders = c.denoiser.eval(), [te.eval() for te in c.text_encoders]
    assert list(cap.state.lora_states()) == ["unet", "text_encoder", "text_encoder_2"]
    assert [g["lr"] for g in cap.state.optim.main.param_groups] == [1e-3, 1e-3, 5e-4]
    want = xl_outputs(unet, encoders, c.tokenizers)

    tensors, meta = read_lora(cfg.output.path)
    if fmt == "kohya":
        assert validate_kohya(tensors, family="sdxl") == []
        bases = {k.split(".")[0] for k in tensors}
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in bases  # SGM names, as kohya
        assert "lora_unet_middle_block_1_proj_in" in bases
        assert any(b.startswith("lora_te1_text_model_encoder_layers_") for b in bases)
        assert any(b.startswith("lora_te2_text_model_encoder_layers_") for b in bases)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    base = xl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    load_checked(pipe, cfg.output.path, caplog)
    got = xl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    for g, w, b in zip(got, want, base):
        assert (g - w).abs().max() < 1e-5
        assert (g - b).abs().max() > 1e-5  # every part (UNet, CLIP-L, CLIP-G) really changed


def test_sdxl_micro_conditioning_follows_size_and_crop(tiny_xl, tmp_path):
    data = draw_images(tmp_path / "imgs", n=2, sizes=((64, 40),))
    cfg = tiny_config(tiny_xl, data, tmp_path / "o" / "xl.safetensors", train__max_steps=1)
    cap = Capture()
    train(cfg, cap)
    state = cap.state
    batch = state.batches.fetch(0, __import__("numpy").random.default_rng(0))
    cond = state.models.text(batch.captions)
    # original (h, w) = (40, 64); bucket (w, h) = (40, 24) for 32 px; centre crop of the resized image
    h, w = state.batches.examples[0].bucket[::-1]
    assert batch.micro[0].tolist()[:2] == [40.0, 64.0]
    assert batch.micro[0].tolist()[4:] == [float(h), float(w)]
    assert cond["pooled"].shape == (1, 32) and cond["hidden"].shape[-1] == 64


def test_sdxl_lora_merges_mixes_and_resizes(tiny_xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdlora import merge_into_model, mix_loras, resize_lora

    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_xl, data, tmp_path / "o" / "xl.safetensors", train__max_steps=3)
    cfg.lora.train_text_encoder, cfg.lora.targets = True, "all"
    train(cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    pipe.load_lora_weights(cfg.output.path, adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.7])
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    want = xl_outputs(pipe.unet, encoders, tokenizers)
    base = xl_outputs(*_base(tiny_xl))
    assert (want[0] - base[0]).abs().max() > 1e-2  # the LoRA changes the output far beyond the tolerance below

    merged = merge_into_model(tiny_xl, [(cfg.output.path, 0.7)], tmp_path / "merged")
    m = StableDiffusionXLPipeline.from_pretrained(merged)
    got = xl_outputs(m.unet, [m.text_encoder, m.text_encoder_2], [m.tokenizer, m.tokenizer_2])
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4

    from sdlora.models import load_model

    single = load_model(merge_into_model(tiny_xl, [(cfg.output.path, 0.7)], tmp_path / "merged.safetensors"))
    assert single.family.name == "sdxl"
    got = xl_outputs(single.denoiser, single.text_encoders, single.tokenizers)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4

    from PIL import Image

    from sdlora import generate

    images = generate(tiny_xl, [(cfg.output.path, 0.8)], "a red sks", steps=2, output_dir=tmp_path / "gen",
                      width=32, height=32, grid=True, scales=[0, 1])
    assert Image.open(images[0]).size[0] > 32  # a labelled contact sheet of two scales

    from sdlora.loras.files import load_lora

    mix_loras([(cfg.output.path, 0.5), (cfg.output.path, 0.25)], tmp_path / "mix.safetensors")
    mods, mixed = load_lora(cfg.output.path)[0], load_lora(tmp_path / "mix.safetensors")[0]
    assert mixed.keys() == mods.keys()
    for base_name, m in mods.items():  # exact: the mix is 0.75 x the LoRA, layer by layer
        torch.testing.assert_close(mixed[base_name].delta(), 0.75 * m.delta(), rtol=1e-3, atol=1e-6)
    resized = resize_lora(cfg.output.path, tmp_path / "r.safetensors", rank=4)
    assert resized.overall_error < 1e-6  # rank 4 is the full rank: lossless
    tensors, _ = read_lora(tmp_path / "r.safetensors")
    assert validate_kohya(tensors, family="sdxl") == []


def test_sdxl_pivotal_tuning_carries_clip_l_and_clip_g(tiny_xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdlora.loras.apply import load_lora_into
    from sdlora.loras.layout import split_embeddings

    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_xl, data, tmp_path / "o" / "pt.safetensors", train__max_steps=2)
    cfg.pivotal.token, cfg.pivotal.trigger, cfg.pivotal.num_vectors = "<s1>", "sks", 2
    cfg.pivotal.ti_steps, cfg.pivotal.ti_lr, cfg.lora.train_text_encoder = 2, 5e-2, True
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    prompts = ("a red <s1> <s1>_1", "a blue dog")

    def outputs(u, encs, toks):
        out, _, pooled = xl_outputs(u, encs, toks, prompts, ((32, 32), (0, 0), (32, 32)))
        return out, pooled

    want = outputs(c.denoiser.eval(), [te.eval() for te in c.text_encoders], c.tokenizers)
    tensors, _ = read_lora(cfg.output.path)
    assert tensors["bundle_emb.<s1>.clip_l"].shape == (2, 32) and tensors["bundle_emb.<s1>.clip_g"].shape == (2, 32)
    emb = read_lora(tmp_path / "o" / "pt_emb.safetensors")[0]
    assert set(emb) == {"clip_l", "clip_g"}

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    pipe.load_lora_weights(split_embeddings(tensors)[0])
    pipe.load_textual_inversion(emb["clip_l"], token="<s1>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token="<s1>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    got = outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5

    own = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    load_lora_into(own, cfg.output.path)
    got2 = outputs(own.unet, [own.text_encoder, own.text_encoder_2], [own.tokenizer, own.tokenizer_2])
    assert (got2[0] - want[0]).abs().max() < 1e-5


def test_sdxl_single_file_trains_offline_and_loads_in_diffusers(tiny_xl, tmp_path, caplog, monkeypatch):
    import socket

    from diffusers import StableDiffusionXLPipeline

    from sdlora.single_file import save_single_file

    single = save_single_file(tiny_xl, tmp_path / "xl.safetensors")
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(str(single), data, tmp_path / "o" / "l.safetensors", train__max_steps=2)
    cfg.lora.train_text_encoder = True
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    assert c.family.name == "sdxl"
    want = xl_outputs(c.denoiser.eval(), c.text_encoders, c.tokenizers)
    monkeypatch.undo()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    load_checked(pipe, cfg.output.path, caplog)
    got = xl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5


def test_sdxl_convert_round_trip_and_pivotal_merge_keep_everything(tiny_xl, tmp_path, caplog):
    """kohya -> diffusers -> kohya for SDXL is lossless and loads in diffusers; a pivotal LoRA merged into a folder
    carries its embedding into both encoders."""
    from diffusers import StableDiffusionXLPipeline

    from sdlora import convert_lora, merge_into_model

    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_xl, data, tmp_path / "o" / "pt.safetensors", train__max_steps=2)
    cfg.pivotal.token, cfg.pivotal.trigger, cfg.pivotal.num_vectors = "<s1>", "sks", 2
    cfg.pivotal.ti_steps, cfg.pivotal.ti_lr, cfg.lora.train_text_encoder, cfg.lora.targets = 2, 5e-2, True, "all"
    train(cfg)
    diff = convert_lora(cfg.output.path, "diffusers", tmp_path / "d.safetensors")
    back = convert_lora(diff, "kohya", tmp_path / "k.safetensors")
    a, b, d = read_lora(cfg.output.path)[0], read_lora(back)[0], read_lora(diff)[0]
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") for k in d)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in d)
    assert a.keys() == b.keys()  # SGM names and lora_te1/lora_te2 again, embeddings bundled again
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-7)

    def outputs(pipe):
        return xl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])

    kohya, diffusers = (StableDiffusionXLPipeline.from_pretrained(tiny_xl) for _ in range(2))
    kohya.load_lora_weights(split_embeddings(a)[0])
    load_checked(diffusers, diff, caplog)
    for g, w in zip(outputs(diffusers), outputs(kohya)):
        assert (g - w).abs().max() < 1e-4

    merged = StableDiffusionXLPipeline.from_pretrained(merge_into_model(tiny_xl, [(cfg.output.path, 1.0)],
                                                                       tmp_path / "merged"))
    bundle = split_embeddings(a)[1]["<s1>"]
    for part, encoder, tokenizer in (("clip_l", merged.text_encoder, merged.tokenizer),
                                     ("clip_g", merged.text_encoder_2, merged.tokenizer_2)):
        ids = tokenizer.convert_tokens_to_ids(["<s1>", "<s1>_1"])
        rows = encoder.get_input_embeddings().weight[ids]
        torch.testing.assert_close(rows, bundle[part].float(), rtol=1e-3, atol=1e-4)
