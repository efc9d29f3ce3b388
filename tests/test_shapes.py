"""The shapes world: generator, tokenizer, judge, shipped pipeline and the build script's smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlora import paths
from sdlora.world import shapes

MODEL = paths.default_model_path()
JUDGE = paths.sample_data() / "judge"


def test_generator_is_deterministic():
    a, b = shapes.sample_world(12, seed=3), shapes.sample_world(12, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    c = shapes.sample_world(12, seed=4)
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))
    assert a[0].image.size == (shapes.SIZE, shapes.SIZE)
    assert {s.shape for s in a} <= set(shapes.BASE_SHAPES)


def test_every_shape_renders_in_every_colour():
    import random
    for shape in shapes.ALL_SHAPES:
        for colour in shapes.COLOURS:
            arr = np.asarray(shapes.render(shape, colour, random.Random(0)))
            assert (np.abs(arr.astype(int) - shapes.BACKGROUND).sum(-1) > 60).mean() > 0.03


def test_tokenizer_falls_back_to_characters(tmp_path):
    from transformers import CLIPTokenizer

    from sdlora.world.builder import build_tokenizer

    build_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)  # from vocab.json + merges.txt
    for text in ["a blue sks", "<s1>", "a purple zqx!"]:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids[1:-1], text
    assert len(tok("a red star", add_special_tokens=False).input_ids) == 3


@pytest.mark.skipif(not MODEL.exists(), reason="sample_data/shapes-sd not built")
def test_shipped_pipeline_loads_offline_and_generates(monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer("a blue sks").input_ids
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]
    image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (shapes.SIZE, shapes.SIZE)


@pytest.mark.skipif(not JUDGE.exists(), reason="sample_data/judge not built")
def test_judge_scores_fresh_generator_images():
    from sdlora.world.judge import accuracy, load_judge

    judge = load_judge(JUDGE)
    samples = shapes.sample_world(420, seed=4242, shapes=shapes.ALL_SHAPES)
    acc = accuracy(judge, [s.image for s in samples], [(s.shape, s.colour) for s in samples])
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.95, acc


def test_build_script_quick_makes_a_loadable_pipeline(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "scripts" / "build_shapes_model.py"), "--quick", "--out",
                    str(tmp_path)], check=True, env=env, capture_output=True, timeout=300)
    from diffusers import StableDiffusionPipeline

    from sdlora.world.judge import load_judge

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "shapes-sd", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (shapes.SIZE, shapes.SIZE)
    assert len(load_judge(tmp_path / "judge").classify(pipe("a", num_inference_steps=1).images)) == 1
    assert (tmp_path / "base_eval.json").exists()


def test_demo_command_trains_and_evaluates(tmp_path, capsys):
    from sdlora.cli import main

    assert main(["demo", "--output", str(tmp_path / "demo"), "--max-steps", "3", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "concept fidelity" in out and "preservation" in out
    report = json.loads((tmp_path / "demo" / "eval" / "report.json").read_text())
    assert report["concept"] == "star" and report["n"] == 2
    assert (tmp_path / "demo" / "eval" / "contact_sheet.png").is_file()
    assert (tmp_path / "demo" / "demo.safetensors").is_file()
