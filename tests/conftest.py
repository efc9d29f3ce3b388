"""Tiny offline fixtures: an SD-1-shaped pipeline built from configs, and small image folders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread beats two contending ones

import pytest
import torch
from PIL import Image, ImageDraw

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
