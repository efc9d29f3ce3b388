"""The CUDA path on tiny models: bf16 and fp16 training with exact resume, SDPA, gradient checkpointing, QLoRA (NF4 base
with 8-bit AdamW) whose file loads into the full-precision base, the UI's training job, the fit check's emulation of
CUDA autocast against the real saved tensors, and two processes when there are two GPUs.

Marked `cuda` and skipped without a GPU: `pytest -m cuda` (or scripts/gpu_check.py) runs them on one."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import Capture, StopAt, draw_images, fresh_pipeline, launch_two, load_checked, tiny_config
from test_fit import real_saved

from sdlora import train
from sdlora.callbacks import Commands
from sdlora.loras.files import read_lora

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU (scripts/gpu_check.py runs these on one)")]


@pytest.fixture(autouse=True)
def deterministic(monkeypatch):
    """Run-to-run identical kernels where CUDA has them, so 'exact' means exact."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def lora_of(cfg) -> dict[str, torch.Tensor]:
    return read_lora(cfg.output.path)[0]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_exactly(tiny_model, tmp_path, precision):
    data = draw_images(tmp_path / "imgs", n=4)
    kw = dict(train__max_steps=6, train__batch_size=2, train__mixed_precision=precision, speed__attention="math")
    runs = []
    for name in ("a", "a2"):
        cfg = tiny_config(tiny_model, data, tmp_path / name / "l.safetensors", **kw)
        cap = Capture()
        train(cfg, cap)
        assert cap.state.acc.device.type == "cuda" and cap.state.acc.mixed_precision == precision
        assert cap.state.weight_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert all(p.dtype == torch.float32 for p in cap.state.optim.lora_params)  # LoRA trains in fp32
        runs.append(lora_of(cfg))
    noise = max_diff(runs[0], runs[1])  # what the GPU's own run-to-run differences are
    part = tiny_config(tiny_model, data, tmp_path / "b" / "l.safetensors", **kw)
    commands = Commands()
    assert train(part, StopAt(commands, 3), commands).stopped
    assert train(part, resume=True).steps == 6
    assert max_diff(runs[0], lora_of(part)) <= noise, "a resumed run differs more than two plain runs do"
    assert any(v.abs().max() > 0 for k, v in runs[0].items() if "lora_up" in k)


def test_sdpa_and_math_attention_learn_the_same(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=2)
    out = {}
    for attention in ("sdpa", "math"):
        cfg = tiny_config(tiny_model, data, tmp_path / attention / "l.safetensors", train__max_steps=3)
        cfg.speed.attention = attention
        cap = Capture()
        train(cfg, cap)
        kinds = {type(p).__name__ for p in cap.state.components.denoiser.attn_processors.values()}
        assert kinds == {"AttnProcessor2_0" if attention == "sdpa" else "AttnProcessor"}
        out[attention] = lora_of(cfg)
    assert max_diff(out["sdpa"], out["math"]) < 1e-3
    assert torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()


def test_gradient_checkpointing_gives_the_same_update(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=2)
    out = []
    for ckpt in (False, True):
        cfg = tiny_config(tiny_model, data, tmp_path / str(ckpt) / "l.safetensors", train__max_steps=3,
                          train__gradient_checkpointing=ckpt, lora__train_text_encoder=True)
        train(cfg)
        out.append(lora_of(cfg))
    assert max_diff(out[0], out[1]) < 1e-5


def test_qlora_nf4_with_8bit_adam_loads_into_the_full_base(tiny_model, tmp_path, caplog):
    import bitsandbytes as bnb

    data = draw_images(tmp_path / "imgs", n=3)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=4,
                      train__mixed_precision="bf16", model__quantize="nf4", optim__optimizer="adamw8bit")
    cfg.lora.train_text_encoder, cfg.lora.targets = True, "all"
    cap = Capture()
    train(cfg, cap)
    packed = [m for m in cap.state.components.denoiser.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and all(m.weight.device.type == "cuda" and m.weight.dtype == torch.uint8 for m in packed)
    assert "8bit" in type(cap.state.optim.main.optimizer).__name__
    pipe = fresh_pipeline(tiny_model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, 5, encoder_hidden_states=cond).sample
    load_checked(pipe, cfg.output.path, caplog)
    with torch.no_grad():
        assert (pipe.unet(x, 5, encoder_hidden_states=cond).sample - base).abs().max() > 1e-5


def test_ui_job_trains_on_the_gpu(tiny_model, tmp_path):
    from ui.jobs import DONE, JobManager

    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "ui" / "l.safetensors", train__max_steps=3,
                      train__mixed_precision="bf16")
    manager = JobManager(tmp_path / "ui", data_roots=[tmp_path])
    job = manager.wait(manager.submit(cfg, "cuda job"), timeout=300)
    assert job.state == DONE, (job.state, job.error)
    assert [s for s, _ in job.losses] == [1, 2, 3] and os.path.isfile(job.output)


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_fit_emulates_cuda_autocast(tiny_model, precision):
    """The fit check's meta trace against the bytes real CUDA tensors save (weights in the training dtype, CUDA
    autocast, PyTorch's own SDPA kernels)."""
    from sdlora.training.memory import fit

    cfg = tiny_config(tiny_model, ".", "o.safetensors", train__batch_size=2, train__mixed_precision=precision,
                      lora__targets="all")
    got = fit._step_trace(fit.meta_model(tiny_model), cfg, 32, precision, "cuda").saved
    want = real_saved(tiny_model, cfg, device="cuda")
    assert abs(got - want) <= 0.02 * want, (got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_processes_train_one_lora(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=4)
    out = tmp_path / "o" / "ddp.safetensors"
    proc = launch_two(tiny_model, data, out, "--max-steps", "4", precision="bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1
    tensors, meta = read_lora(out)
    assert meta["sdlora_processes"] == "2"
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_up" in k)
