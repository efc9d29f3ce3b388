"""Training under `accelerate launch` with two CPU processes (DDP over gloo), no code changes.

`accelerate launch --cpu` starts several processes only through MPI; `--multi_gpu` on a machine without a GPU
starts them with torchrun, and sdlora's Accelerator(cpu=True) then runs DDP over gloo."""

from __future__ import annotations

import json

import torch
from conftest import draw_images, launch_two

from sdlora.loras.files import read_lora


def test_two_process_training_saves_a_synchronised_lora(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=4)
    out = tmp_path / "o" / "ddp.safetensors"
    proc = launch_two(tiny_model, data, out, "--max-steps", "4", "--validation-split", "0.25", "--validate-every", "2",
                      "--keep-best", "--ema-decay", "0.9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # exactly one job report: only rank 0 reports and writes
    assert proc.stdout.count("done:") == 1, proc.stdout
    tensors, meta = read_lora(out)
    assert meta["sdlora_processes"] == "2"
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_up" in k)
    log = [json.loads(x) for x in out.with_name("ddp_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]  # every rank validated its share, one line each
    assert out.with_name("ddp_best.safetensors").is_file() and proc.stdout.count("best validation loss") == 1

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    base = pipe.unet(x, 5, encoder_hidden_states=cond).sample
    pipe.load_lora_weights(str(out))
    assert (pipe.unet(x, 5, encoder_hidden_states=cond).sample - base).abs().max() > 1e-5
