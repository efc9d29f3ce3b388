"""The [speed] switches change speed, not what is learned; `auto` precision and thread counts follow the machine."""

from __future__ import annotations

import pytest
import torch
from conftest import Capture, tiny_config

from sdlora import train
from sdlora.loras.files import read_lora


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    from conftest import draw_images

    d = tmp_path_factory.mktemp("speed")
    images = draw_images(d / "imgs", n=2)
    cfg = tiny_config(tiny_model, images, d / "ref.safetensors", train__max_steps=3)
    train(cfg)
    return images, read_lora(cfg.output.path)[0]


@pytest.mark.parametrize("option,value,exact", [
    ("attention", "math", False), ("attention", "sdpa", True), ("channels_last", True, False),
    ("compile", "regional", True), ("compile", "full", True), ("tf32", False, True),
])
def test_speed_switches_keep_what_is_learned(tiny_model, reference, tmp_path, monkeypatch, option, value, exact):
    images, want = reference
    if option == "compile":  # dynamo traces it for real; the eager backend skips inductor's minute-long CPU build
        real = torch.nn.Module.compile
        compiled = []
        monkeypatch.setattr(torch.nn.Module, "compile",
                            lambda self, **kw: (compiled.append(type(self).__name__), real(self, backend="eager")))
    cfg = tiny_config(tiny_model, images, tmp_path / "l.safetensors", train__max_steps=3)
    setattr(cfg.speed, option, value)
    cap = Capture()
    train(cfg, cap)
    if option == "compile":
        blocks = {"BasicTransformerBlock"} if value == "regional" else {"UNet2DConditionModel"}
        assert compiled and set(compiled) == blocks
    if option == "attention":
        kinds = {type(p).__name__ for p in cap.state.components.denoiser.attn_processors.values()}
        assert kinds == {"AttnProcessor2_0" if value == "sdpa" else "AttnProcessor"}
    if option == "channels_last":
        conv = cap.state.components.denoiser.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
    got = read_lora(cfg.output.path)[0]
    for k in want:  # the same LoRA: exactly, or within float reordering
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5)


def test_xformers_missing_is_one_line(tiny_model, reference, tmp_path, monkeypatch):
    import builtins

    from sdlora.errors import ConfigError

    real_import = builtins.__import__

    def no_xformers(name, *a, **k):
        if name.startswith("xformers"):
            raise ModuleNotFoundError("No module named 'xformers'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    cfg = tiny_config(tiny_model, reference[0], tmp_path / "l.safetensors", train__max_steps=1)
    cfg.speed.attention = "xformers"
    with pytest.raises(ConfigError, match="xformers"):
        train(cfg)


@pytest.mark.parametrize("flags,cuda,want", [
    ({"avx2", "fma"}, False, "no"), ({"avx512f", "avx512_bf16"}, False, "bf16"), ({"amx_bf16"}, False, "bf16"),
])
def test_auto_precision_follows_the_cpu(monkeypatch, flags, cuda, want):
    import sdlora.hardware as hw
    from sdlora.config import Config
    from sdlora.training.run.setup import mixed_precision

    monkeypatch.setattr(hw, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert mixed_precision(Config()) == want
    cfg = Config()
    cfg.train.mixed_precision = "no"
    assert mixed_precision(cfg) == "no"  # an explicit choice wins


def test_threads_follow_the_free_cores(monkeypatch):
    import sdlora.hardware as hw

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hw, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(hw, "free_cores", lambda sample=0.25: 1)
    assert hw.pick_threads(0) == (1, "1 of 2 cores free")
    assert hw.pick_threads(2) == (2, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert hw.pick_threads(0) == (3, "OMP_NUM_THREADS")


def test_free_cores_sees_a_busy_core():
    """A process spinning on one core leaves one of two free (only meaningful where there are two cores)."""
    import multiprocessing as mp
    import os

    import sdlora.hardware as hw

    cpus = hw.usable_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two cores")
    idle_before = hw.free_cores(0.3)
    spinner = mp.get_context("spawn").Process(target=_spin, args=(cpus[0],), daemon=True)
    spinner.start()
    try:
        busy = hw.free_cores(0.5)
    finally:
        spinner.kill()
    assert busy < len(cpus) and busy <= max(idle_before, 1) and os.cpu_count()


def _spin(cpu):
    import os

    os.sched_setaffinity(0, {cpu})
    while True:
        pass
