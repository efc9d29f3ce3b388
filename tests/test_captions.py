"""Captions the user really has: tag lists that vary per step (deterministically), an auto-captioner, samples with
settings of their own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import Capture, StopAt, draw_images, tiny_config
from PIL import Image

from sdlora import train
from sdlora.callbacks import Commands
from sdlora.cli import main
from sdlora.loras.files import read_lora
from sdlora.training.inputs.data import TagRule, vary_tags


def test_tags_keep_drop_and_shuffle_from_the_rng_alone():
    caption = "sks, red, circle, white background, centered, photo"
    rule = TagRule(shuffle=True, keep=1, dropout=0.3)
    seen = {vary_tags(caption, rule, np.random.default_rng([0, k])) for k in range(50)}
    assert len(seen) > 10  # it varies from step to step
    for text in seen:
        tags = text.split(", ")
        assert tags[0] == "sks" and set(tags[1:]) <= set(caption.split(", ")[1:]) and len(tags) == len(set(tags))
    again = {vary_tags(caption, rule, np.random.default_rng([0, k])) for k in range(50)}
    assert seen == again  # a function of (caption, rng) alone
    kept = [vary_tags(caption, TagRule(dropout=0.5, keep=2), np.random.default_rng(k)) for k in range(200)]
    assert all(t.startswith("sks, red") for t in kept)
    share = np.mean([len(t.split(", ")) - 2 for t in kept]) / 4
    assert 0.35 < share < 0.65  # each unkept tag survives with probability 1 - dropout
    assert vary_tags("a|b|c", TagRule(shuffle=True, separator="|"), np.random.default_rng(1)).count("|") == 2


def test_tag_options_train_deterministically_and_resume_exactly(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=3)
    for i in range(3):
        (data / f"img{i}.txt").write_text(f"sks, red, circle, shape{i}, white, plain")

    def job(out):
        cfg = tiny_config(tiny_model, data, out, train__max_steps=6, train__batch_size=2)
        d = cfg.data[0]
        d.shuffle_tags, d.keep_tags, d.tag_dropout = True, 1, 0.3
        cfg.lora.train_text_encoder = True
        return cfg

    seen = []

    class Watch(Capture):
        def on_step(self, step, stats):
            pass

    full = job(tmp_path / "a" / "l.safetensors")
    cap = Watch()
    train(full, cap)
    fetched = [cap.state.batches.fetch(k, np.random.default_rng([0, k])).captions for k in range(4)]
    seen = [cap.state.batches.fetch(k, np.random.default_rng([0, k])).captions for k in range(4)]
    assert fetched == seen and len({c for batch in seen for c in batch}) > 3
    assert all(c.startswith("sks") for batch in seen for c in batch)
    part = job(tmp_path / "b" / "l.safetensors")
    commands = Commands()
    assert train(part, StopAt(commands, 3), commands).stopped
    train(part, resume=True)
    a, b = read_lora(full.output.path)[0], read_lora(part.output.path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_prompt_tables_render_with_their_own_settings(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=2)
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\npath = "{tiny_model}"\n[augment]\nresolution = 32\n[train]\nmax_steps = 2\n'
                   f'[[data]]\npath = "{data}"\nprompt = "a sks"\n[output]\npath = "o/l.safetensors"\n'
                   '[sample]\nsteps = 2\n[[sample.prompts]]\ntext = "a red sks"\n'
                   '[[sample.prompts]]\ntext = "a blue sks"\nnegative = "blurry"\nseed = 7\nwidth = 48\n'
                   'height = 16\nsteps = 3\nguidance = 2.5\nlora_scale = 0.5\n')
    assert main(["train", str(job)]) == 0
    out = tmp_path / "o"
    last = sorted((out / "l_samples").glob("step_0000002_*.png"))
    assert [Image.open(p).size for p in last] == [(32, 32), (48, 16)]
    text = Image.open(last[1]).text
    assert (text["prompt"], text["negative"], text["seed"], text["steps"], text["guidance"], text["lora_scale"]) == \
        ("a blue sks", "blurry", "7", "3", "2.5", "0.5")
    assert "Negative prompt: blurry" in text["parameters"] and "Seed: 7" in text["parameters"]
    logged = [json.loads(x) for x in (out / "l_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["sample"], r["seed"]) for r in logged if "sample" in r][-2:] == \
        [(2, "step_0000002_0.png", 0), (2, "step_0000002_1.png", 7)]


def test_lora_scale_of_a_sample_scales_the_lora(tiny_model, tmp_path):
    from sdlora.training.periodic.output import lora_scaled

    cfg = tiny_config(tiny_model, draw_images(tmp_path / "imgs", n=2), tmp_path / "l.safetensors", train__max_steps=2)
    cap = Capture()
    train(cfg, cap)
    unet = cap.state.components.denoiser.eval()
    x, t, c = torch.randn(1, 4, 4, 4), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        full = unet(x, t, encoder_hidden_states=c).sample
        with lora_scaled([unet], 0.0):
            none = unet(x, t, encoder_hidden_states=c).sample
        with lora_scaled([unet], 0.5):
            half = unet(x, t, encoder_hidden_states=c).sample
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=c).sample
        unet.enable_adapters()
    assert torch.allclose(none, base, atol=1e-6) and not torch.allclose(half, full, atol=1e-6)
    assert torch.allclose(unet(x, t, encoder_hidden_states=c).sample, full)  # restored afterwards


@pytest.mark.parametrize("text,says", [
    ('[[sample.prompts]]\nnegative = "x"\n', "needs a text"),
    ('[[sample.prompts]]\ntext = "a"\nzoom = 2\n', "unknown key 'sample.prompts[0].zoom'"),
    ('[[sample.prompts]]\ntext = "a"\nwidth = 30\n', "multiple of 8"),
    ('[[sample.prompts]]\ntext = "a"\nseed = -1\n', "seed must be"),
    ('[[sample.prompts]]\ntext = "a"\nguidance = "x"\n', "must be float"),
])
def test_bad_sample_tables_are_one_line(tmp_path, capsys, text, says):
    (tmp_path / "imgs").mkdir()
    job = tmp_path / "j.toml"
    job.write_text(text + '[[data]]\npath = "imgs"\n')
    assert main(["train", str(job)]) != 0
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory):
    """A randomly initialised BLIP captioner built from a config (no download)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    d = tmp_path_factory.mktemp("captioner")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "photo", "[DEC]"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=11, pad_token_id=0, sep_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(2)  # a seed whose random weights say several words (seed 0's say nothing)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(d)
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=images, tokenizer=tok).save_pretrained(d)
    return str(d)


def test_caption_writes_one_file_per_image_and_keeps_existing(tiny_captioner, tmp_path, capsys):
    data = draw_images(tmp_path / "imgs", n=3, captions=False)
    (data / "img1.txt").write_text("my own caption")
    (data / "notes.md").write_text("not an image")
    assert main(["caption", str(data), "--captioner", tiny_captioner, "--prefix", "sks, ", "--batch-size", "2"]) == 0
    assert "wrote 2 caption(s), kept 1 existing" in capsys.readouterr().out
    assert (data / "img1.txt").read_text() == "my own caption"
    for i in (0, 2):
        text = (data / f"img{i}.txt").read_text()
        assert text.startswith("sks, ") and len(text.split()) > 2
    assert main(["caption", str(data), "--captioner", tiny_captioner, "--overwrite"]) == 0
    assert (data / "img1.txt").read_text() != "my own caption"


def test_caption_fails_clearly(tiny_captioner, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(tmp_path / "empty"), "--captioner", tiny_captioner]) == 2
    assert "no images in" in capsys.readouterr().err
    draw_images(tmp_path / "imgs", n=1, captions=False)
    assert main(["caption", str(tmp_path / "imgs"), "--captioner", "someone/not-here"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not load the captioner" in err and "hub is not reachable" in err and "\n" not in err
