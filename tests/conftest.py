"""Tiny offline fixtures: an SD-1-shaped pipeline built from configs, and small image folders."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread beats two contending ones

import pytest
import torch
from PIL import Image, ImageDraw

from sdlora.callbacks import Callbacks

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1-v", prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_xl(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_sdxl_pipeline

    return str(save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="session")
def sd35m(tmp_path_factory):
    """SD3.5 Medium's structure (qk-norm, dual attention in block 0), tiny, with T5."""
    from sdlora.random_pipelines import save_tiny_sd3_pipeline

    return str(save_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd35m", "sd35m"))


@pytest.fixture
def no_network(monkeypatch):
    """HF offline, and any socket connection fails: proves nothing is fetched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def draw_images(folder, n=4, captions=True, sizes=((32, 32),)):
    """Red circles on white, a caption sidecar for each when `captions`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        im = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(im).ellipse((w // 5 + i, h // 5, w - w // 5, h - h // 5 + i % 3), fill=(220, 30, 30))
        im.save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text("a red sks")
    return folder


@pytest.fixture
def images(tmp_path):
    return draw_images(tmp_path / "images")


def tiny_config(model, data, out, **train):
    """A Config for a quick run on the tiny model."""
    from sdlora.config import Config, DataFolder

    cfg = Config()
    cfg.model.path = model
    cfg.data = [DataFolder(path=str(data), prompt="a sks")]
    cfg.augment.resolution = 32
    cfg.output.path = str(out)
    cfg.output.dtype = "fp32"
    cfg.train.mixed_precision = "no"  # fp32 on every CPU (auto picks bf16 where it is native)
    cfg.optim.lr = 1e-3
    cfg.train.max_steps = 6
    for key, value in train.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def launch_two(model, data, out, *flags, precision="no") -> subprocess.CompletedProcess:
    """`sdlora train` on the tiny model under `accelerate launch` with two processes (DDP: gloo on the CPU, NCCL on
    two GPUs), 32 px, lr 1e-3, an fp32 file; `flags` add to it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no", "-m", "sdlora", "train",
           "--model", str(model), "--data", str(data), "--instance-prompt", "a sks", "--resolution", "32",
           "--lr", "1e-3", "--output", str(out), "--save-dtype", "fp32", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


# -- helpers shared by the test modules (`from conftest import Capture, ...`) --

class Capture(Callbacks):
    """Keeps the training state so a test can compare the trainer's in-memory model with what it saved."""

    def on_start(self, state):
        self.state = state


def fresh_pipeline(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_checked(pipe, path, caplog, has_te=True):
    """load_lora_weights(path) as users call it; fail on any sign of keys that did not load."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path), adapter_name="t")
    lines = (caplog.text + "\n" + "\n".join(str(w.message) for w in caught)).splitlines()
    if not has_te:  # diffusers notes that a UNet-only file has no text-encoder keys: expected
        lines = [x for x in lines if "No LoRA keys associated to CLIPTextModel" not in x]
    text = "\n".join(lines)
    for bad in ("unexpected", "alpha_pattern", "did not match", "not loaded", "not found"):
        assert bad not in text.lower(), text


def unet_and_te_outputs(unet, text_encoder, tokenizer):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = tokenizer(["a red sks", "a blue dog"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text_encoder(ids)[0]
        out = unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample
    return out, cond


class StopAt(Callbacks):
    def __init__(self, commands, step):
        self.commands, self.step = commands, step

    def on_step(self, step, stats):
        if step == self.step:
            self.commands.stop = True
