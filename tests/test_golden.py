"""Refactors keep results: three jobs (the demo job, an SDXL job, a pivotal job with every augmentation) must give the
LoRA tensors recorded in tests/golden/ before the trainer was restructured.

Bit-identical on the software and CPU kind they were recorded with (tests/golden/platform.json); elsewhere float
kernels may round differently, so other platforms are held to 1e-5 of the recorded values instead.
`python tests/test_golden.py` records them again (only after a change meant to alter results)."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch
from conftest import draw_images, tiny_config
from safetensors.torch import load_file, save_file

from sdlora import train
from sdlora.config import load_toml
from sdlora.loras.files import read_lora
from sdlora.paths import sample_data

GOLDEN = Path(__file__).parent / "golden"


def fingerprint() -> dict:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "machine": platform.machine(),
            "cpu": torch.backends.cpu.get_cpu_capability()}


def demo_job(work: Path):
    cfg = load_toml(sample_data() / "demo.toml")
    cfg.train.max_steps, cfg.sample.prompts, cfg.train.mixed_precision = 20, [], "no"
    cfg.output.path = str(work / "demo.safetensors")
    return cfg


def sdxl_job(work: Path):
    from sdlora.random_pipelines import save_tiny_sdxl_pipeline

    xl = save_tiny_sdxl_pipeline(work / "tiny-sdxl")
    data = draw_images(work / "imgs", n=3, sizes=((32, 32), (48, 32)))
    cfg = tiny_config(str(xl), data, work / "xl.safetensors", train__max_steps=3)
    cfg.lora.train_text_encoder, cfg.lora.targets, cfg.lora.text_encoder_2_lr = True, "all", 5e-4
    return cfg


def pivotal_job(work: Path):
    from sdlora.random_pipelines import save_tiny_pipeline

    sd1 = save_tiny_pipeline(work / "tiny-sd1")
    data = draw_images(work / "imgs", n=3, sizes=((32, 32), (48, 32)))
    cfg = tiny_config(str(sd1), data, work / "pt.safetensors", train__max_steps=3)
    cfg.data[0].prompt, cfg.lora.train_text_encoder = "a sks", True
    cfg.pivotal.token, cfg.pivotal.trigger, cfg.pivotal.num_vectors = "<s1>", "sks", 2
    cfg.pivotal.ti_steps, cfg.pivotal.ti_lr, cfg.pivotal.init_word, cfg.pivotal.continue_lr = 3, 5e-2, "dog", 1e-3
    cfg.augment.random_flip, cfg.augment.caption_dropout, cfg.lora.dropout = True, 0.2, 0.1
    return cfg


JOBS = {"demo": demo_job, "sdxl": sdxl_job, "pivotal": pivotal_job}


@pytest.mark.parametrize("name", list(JOBS))
def test_jobs_give_the_recorded_lora(name, tmp_path):
    cfg = JOBS[name](tmp_path)
    train(cfg)
    got, _ = read_lora(cfg.output.path)
    want = load_file(str(GOLDEN / f"{name}.safetensors"))
    assert got.keys() == want.keys()
    exact = json.loads((GOLDEN / "platform.json").read_text()) == fingerprint()
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), (k, (got[k].float() - want[k].float()).abs().max())
        else:
            torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    for name, job in JOBS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = job(Path(tmp))
            train(cfg)
            tensors, _ = read_lora(cfg.output.path)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(GOLDEN / f"{name}.safetensors"))
    (GOLDEN / "platform.json").write_text(json.dumps(fingerprint(), indent=1) + "\n")
