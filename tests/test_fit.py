"""The memory fit check: activations measured on the meta device equal what real tensors save; the published
activation figures (performance.md §1.2); weights and LoRA sizes as a real run holds them; the proposals; the CLI and
the warning before training; and speed.log_every."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import Capture, draw_images, tiny_config

from sdlora import train
from sdlora.config import Config
from sdlora.training import fit, fit_plan

GiB = 2**30


def real_saved(model_path: str, cfg: Config, text_trained: bool, device: str = "cpu") -> int:
    """Bytes real tensors save for backward in one step of `cfg` (PyTorch's own SDPA kernels and autocast), the
    weights placed as `setup` places them (on CUDA in the training precision); SD3's T5 encodes the captions."""
    from sdlora.models import load_components
    from sdlora.training.adapters import target_modules
    from sdlora.training.setup import apply_speed, layer_filter

    c = load_components(model_path)
    fam = c.family
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    for m in (c.denoiser, *c.text_encoders):
        m.to(device, dtype=low if device == "cuda" and low else torch.float32)
    apply_speed(cfg, c, torch.device(device))
    for name in target_modules(c.denoiser, fam.target_patterns(cfg.lora.targets), layer_filter(cfg, c)):
        c.denoiser.get_submodule(name).weight.requires_grad_(True)
    if text_trained:
        for name in target_modules(c.text_encoders[0], fam.text_targets):
            c.text_encoders[0].get_submodule(name).weight.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
        c.denoiser.train()
    weights = {t.untyped_storage().data_ptr() for m in (c.denoiser, *c.text_encoders)
               for t in (*m.parameters(), *m.buffers())}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    b, lat = cfg.train.batch_size, cfg.augment.resolution // c.vae_factor
    autocast = torch.autocast(device, dtype=low) if low else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        with torch.set_grad_enabled(text_trained):
            cond = fam.conditioning.encode(c.tokenizers, c.conditioning_encoders, ["a"] * b, device)
        wdtype = next(c.denoiser.parameters()).dtype
        noisy = torch.randn(b, c.denoiser.config.in_channels, lat, lat).to(device, wdtype)
        pred = fam.conditioning.predict(c.denoiser, noisy, torch.zeros(b, dtype=torch.long, device=device), cond)
        torch.nn.functional.mse_loss(pred.float(), noisy.float(), reduction="none").mean()
    return sum(seen.values())


@pytest.mark.parametrize("targets,text,ckpt,precision", [
    ("cross_attn", False, False, "no"), ("all", True, False, "no"), ("all", False, True, "no"),
    ("all", False, False, "bf16"), ("all", False, True, "bf16"),
])
def test_meta_trace_saves_what_real_tensors_save(tiny_model, targets, text, ckpt, precision):
    cfg = tiny_config(tiny_model, ".", "o.safetensors", train__batch_size=2, train__gradient_checkpointing=ckpt,
                      train__mixed_precision=precision, lora__targets=targets, lora__train_text_encoder=text)
    got = fit._step_trace(fit.meta_model(tiny_model), cfg, 32, precision, "cpu")
    want = real_saved(tiny_model, cfg, text)
    assert abs(got.saved - want) <= 1e-3 * want, (got.saved, want)
    assert got.peak >= got.saved


@pytest.mark.parametrize("targets,ckpt,precision,shuffle", [
    ("attn", False, "no", False), ("all", False, "no", True), ("all", True, "no", False), ("all", False, "bf16", False),
    ("attn_ff", True, "bf16", True),
])
def test_sd3_meta_trace_saves_what_real_tensors_save(sd35m, targets, ckpt, precision, shuffle):
    """The MMDiT step (joint and dual attention, qk-norm) with T5's embeddings as the cache gives them, or T5 kept and
    encoding in the step (shuffled tags)."""
    cfg = tiny_config(sd35m, ".", "o.safetensors", train__batch_size=2, train__gradient_checkpointing=ckpt,
                      train__mixed_precision=precision, lora__targets=targets)
    cfg.data[0].shuffle_tags = shuffle
    got = fit._step_trace(fit.meta_model(sd35m), cfg, 32, precision, "cpu")
    want = real_saved(sd35m, cfg, False)
    assert abs(got.saved - want) <= 1e-3 * want, (got.saved, want)
    assert got.peak >= got.saved


def test_sd3_configs_and_text_cache_sizes_are_the_models(sd35m, tmp_path):
    """The folder's and its single file's configs (T5 included; a file without text encoders takes them from
    --text-encoders) build the parts training loads, and one cached caption is the size the conditioning makes."""
    from test_sd3 import _strip_text_encoders

    from sdlora.models import load_components
    from sdlora.single_file import save_single_file

    c = load_components(sd35m)
    model = fit.meta_model(sd35m)
    counts = fit._counts(model)
    for part, module in (("transformer", c.denoiser), ("vae", c.vae), ("text_encoder", c.text_encoders[0]),
                         ("text_encoder_2", c.text_encoders[1]), ("text_encoder_3", c.frozen_text[0].model)):
        assert counts[part]["params"] == sum(t.numel() for t in (*module.parameters(), *module.buffers())
                                             if t.is_floating_point()), part
    cond = c.family.conditioning.encode(c.tokenizers, c.conditioning_encoders, ["a red sks"], "cpu")
    assert sum(v[0].numel() for v in cond.values()) == c.family.conditioning.caption_numel(model.configs, 256)
    single = save_single_file(sd35m, tmp_path / "m.safetensors")
    bare = _strip_text_encoders(single, tmp_path / "bare.safetensors")
    for source, extra in ((str(single), ""), (str(bare), sd35m)):
        from_file = fit.meta_model(source, extra)
        assert from_file.family.name == "sd3" and fit._counts(from_file) == counts, source


def test_t5_counts_before_the_steps_unless_captions_vary(sd35m):
    """T5 encodes every caption and is released: its weights are in the peak before the steps, not the step's. With
    shuffled tags it stays: the step holds its weights. --no-t5: it is nowhere."""
    from transformers import T5EncoderModel

    model = fit.meta_model(sd35m)
    t5 = sum(p.numel() for p in T5EncoderModel.from_pretrained(sd35m, subfolder="text_encoder_3").parameters())
    cfg = tiny_config(sd35m, ".", "o.safetensors", train__mixed_precision="bf16")
    freed = fit.estimate(cfg, "cuda", model, n_images=4)
    kept_cfg = copy.deepcopy(cfg)
    kept_cfg.data[0].shuffle_tags = True
    kept = fit.estimate(kept_cfg, "cuda", model, n_images=4)
    assert "text_encoder_3" not in freed.weights and kept.weights["text_encoder_3"] == 2 * t5  # bf16
    assert sum(kept.weights.values()) - sum(freed.weights.values()) == 2 * t5
    assert freed.load >= fit.CUDA_CONTEXT + 2 * t5 and kept.load == 0
    assert freed.cache > kept.cache  # shuffled tags: no text cache
    none = fit.estimate(without_t5(cfg), "cuda", model, n_images=4)
    assert none.load == 0 and none.weights == freed.weights
    on_cpu = fit.estimate(cfg, "cpu", model, n_images=4)
    assert on_cpu.load - fit.estimate(without_t5(cfg), "cpu", model, n_images=4).load >= 4 * t5  # loaded, in fp32


def without_t5(cfg: Config) -> Config:
    out = copy.deepcopy(cfg)
    out.model.t5 = False
    return out


def test_the_plan_drops_t5_when_only_that_fits(sd35m):
    """On the CPU T5 is loaded with the rest: a budget under that peak but over the step's is met by --no-t5 alone
    (the cheaper changes tried first are taken back)."""
    model = fit.meta_model(sd35m)
    cfg = tiny_config(sd35m, ".", "o.safetensors", train__batch_size=2)
    with_t5 = fit.estimate(cfg, "cpu", model, n_images=4)
    without = fit.estimate(without_t5(cfg), "cpu", model, n_images=4)
    assert with_t5.total > without.total and with_t5.total == with_t5.load  # the loading peak is the job's peak
    new, est = fit_plan.fit_plan(cfg, "cpu", without.total, model, 4)
    assert fit_plan.changed_flags(cfg, new) == ["--no-t5"] and est.total <= without.total


@pytest.mark.parametrize("family,resolution,ckpt,want", [
    ("sd1", 512, False, 1.49), ("sd1", 512, True, 0.28), ("sdxl", 512, False, 2.64),
])
def test_published_activation_figures(family, resolution, ckpt, want):
    """performance.md §1.2 (real fp32 CPU tensors, PyTorch's flash SDPA, attention LoRA r4, batch 1)."""
    cfg = Config()
    cfg.lora.targets, cfg.train.gradient_checkpointing = "attn", ckpt
    got = fit._step_trace(fit.random_model(family), cfg, resolution, "no", "cpu").saved / GiB
    assert got == pytest.approx(want, rel=0.03)


def test_weights_and_lora_size_are_what_training_holds(tiny_model, tmp_path):
    import bitsandbytes as bnb

    data = draw_images(tmp_path / "imgs", n=2)
    for quantize in ("none", "nf4"):
        cfg = tiny_config(tiny_model, data, tmp_path / quantize / "l.safetensors", train__max_steps=1,
                          lora__targets="all", lora__train_text_encoder=True, model__quantize=quantize)
        cap = Capture()
        train(cfg, cap)
        c = cap.state.components
        est = fit.estimate(cfg, "cpu")
        assert est.lora_params == sum(p.numel() for p in cap.state.optim.lora_params)
        for part, module in (("unet", c.denoiser), ("text_encoder", c.text_encoders[0]), ("vae", c.vae)):
            held = 0
            for name, t in (*module.named_parameters(), *module.named_buffers()):
                if "lora_" in name or not (t.is_floating_point() or isinstance(t, bnb.nn.Params4bit)):
                    continue
                held += t.numel() * t.element_size()
                state = getattr(t, "quant_state", None)
                if isinstance(t, bnb.nn.Params4bit) and state is not None:
                    held += sum(x.numel() * x.element_size() for x in (state.absmax, state.code, state.offset,
                                                                       state.state2.absmax, state.state2.code))
            assert est.weights[part] == held, (quantize, part)


def test_nf4_bytes_follow_bitsandbytes():
    import bitsandbytes as bnb

    for shape in ((320, 768), (1280, 5120), (37, 32)):
        w = bnb.nn.Params4bit(torch.randn(shape), requires_grad=False, quant_type="nf4").to("cpu")
        s = w.quant_state
        held = sum(x.numel() * x.element_size() for x in (w.data, s.absmax, s.code, s.offset, s.state2.absmax,
                                                          s.state2.code))
        assert fit.nf4_bytes(shape[0] * shape[1]) == held


def test_adamw8bit_keeps_small_tensors_in_32_bit():
    assert fit._optimizer_bytes("adamw8bit", 4095) == 8 and fit._optimizer_bytes("adamw8bit", 4096) == 2
    assert fit._optimizer_bytes("adamw", 10**6) == 8


def test_the_plan_fits_and_is_cheapest(tiny_model):
    model = fit.meta_model(tiny_model)
    cfg = tiny_config(tiny_model, ".", "o.safetensors", train__batch_size=8)
    cfg.train.cache_latents = False
    plain = fit.estimate(cfg, "cuda", model, n_images=8)
    assert fit_plan.fit_plan(cfg, "cuda", plain.total, model, 8)[1].total == plain.total  # fits as it is
    new, est = fit_plan.fit_plan(cfg, "cuda", plain.total - 1, model, 8)
    assert est.total < plain.total and est.total == fit.estimate(new, "cuda", model, n_images=8).total
    assert new.train.batch_size * new.train.grad_accum == 8  # the effective batch is kept
    flags = fit_plan.changed_flags(cfg, new)
    assert flags and all(f.startswith("--") for f in flags)
    assert fit_plan.fit_plan(cfg, "cuda", 1, model, 8) is None  # nothing fits in one byte


def test_sizes_parse():
    assert fit_plan.parse_size("12GB") == 12 * GiB and fit_plan.parse_size("8192MB") == 8 * GiB
    assert fit_plan.parse_size("7.5 GiB") == int(7.5 * GiB)
    with pytest.raises(Exception, match="not like 12GB"):
        fit_plan.parse_size("lots")


def test_cli_fit_reports_and_proposes(tiny_model, tmp_path, capsys):
    from sdlora.cli import main

    data = draw_images(tmp_path / "imgs", n=2)
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\npath = "{tiny_model}"\n[[data]]\npath = "{data}"\nprompt = "a sks"\n'
                   '[augment]\nresolution = 32\n[train]\nbatch_size = 4\n')
    assert main(["fit", str(job), "--vram", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "activations at their peak" in out and "fits:" in out
    assert main(["fit", str(job), "--vram", "0.6GB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out


def test_cli_fit_on_an_sd3_folder(sd35m, tmp_path, capsys):
    from sdlora.cli import main

    data = draw_images(tmp_path / "imgs", n=2)
    assert main(["fit", "--model", sd35m, "--data", str(data), "--vram", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "sd3, 32 px" in out and "transformer" in out and "peak before the steps" in out and "fits:" in out
    assert "T5" in out and "released" in out
    assert main(["fit", "--model", sd35m, "--data", str(data), "--vram", "24GB", "--no-t5"]) == 0
    assert "peak before the steps" not in capsys.readouterr().out


def test_warning_before_training(tiny_model, images, tmp_path, monkeypatch):
    said = []

    class Say(Capture):
        def on_message(self, text):
            said.append(text)

    monkeypatch.setattr(fit_plan, "device_budget", lambda device, vram=None: (10**6, "this test's machine"))
    cfg = tiny_config(tiny_model, images, tmp_path / "l.safetensors", train__max_steps=1)
    train(cfg, Say())
    assert any(s.startswith("warning: this job needs about") and "sdlora fit" in s for s in said)


def test_warning_before_training_an_sd3_model(sd35m, monkeypatch):
    said = []
    cfg = tiny_config(sd35m, ".", "o.safetensors")
    assert fit_plan.warn_if_too_big(cfg, torch.device("cpu"), said.append) is not None and not said  # fits here
    monkeypatch.setattr(fit_plan, "device_budget", lambda device, vram=None: (10**6, "this test's machine"))
    est = fit_plan.warn_if_too_big(cfg, torch.device("cpu"), said.append)
    assert est.load > est.allocated + est.overhead  # T5 encoding with every part loaded is the peak
    assert len(said) == 1 and said[0].startswith("warning: this job needs about")


class Steps(Capture):
    def __init__(self):
        self.seen = []

    def on_step(self, step, stats):
        self.seen.append(step)


def test_log_every_reads_late_but_logs_the_same(tiny_model, images, tmp_path):
    from sdlora.loras.files import read_lora

    logs, loras = [], []
    for every in (1, 3):
        cfg = tiny_config(tiny_model, images, tmp_path / str(every) / "l.safetensors", train__max_steps=5,
                          train__grad_accum=2)
        cfg.speed.log_every = every
        steps = Steps()
        result = train(cfg, steps)
        assert steps.seen == [1, 2, 3, 4, 5]
        logs.append([json.loads(x) for x in Path(result.log).read_text().splitlines()])
        loras.append(read_lora(cfg.output.path)[0])
    assert logs[0] == logs[1]
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])


def test_log_every_still_stops_on_nan_before_a_checkpoint(tiny_model, images, tmp_path, monkeypatch):
    import sdlora.training.loop as loop
    from sdlora.errors import TrainingError

    real = loop.training_step
    calls = []

    def poisoned(batch, models, cfg, gen):
        loss, stats = real(batch, models, cfg, gen)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 3 else loss), stats

    monkeypatch.setattr(loop, "training_step", poisoned)
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=8)
    cfg.speed.log_every, cfg.output.save_every = 4, 2
    with pytest.raises(TrainingError, match="loss became nan at step 3") as err:
        train(cfg)
    assert "step_0000002" in str(err.value)
    assert not list((tmp_path / "o" / "l_checkpoints").glob("step_0000004*"))


def test_estimates_hold_the_measured_cpu_peaks():
    """Every committed CPU benchmark row (bench/results/, peak RSS of the timed steps): the estimate is within 12%;
    an NF4 row lies between the step's estimate and the loading peak (the allocator may keep the full-precision weights
    freed after quantizing). scripts/fit_vs_bench.py prints the same comparison, row by row."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from fit_vs_bench import compare, residue, rows_of

    files = sorted((Path(__file__).resolve().parent.parent / "bench" / "results").glob("*.json"))
    checked = compare(rows_of(files, "cpu"))
    assert len(checked) >= 10
    for r in checked:
        where = (r["family"], r["batch"], r["quantize"], r.get("switch"))
        if residue(r):
            assert r["estimate_gb"] <= r["measured_gb"] * 1.12 and r["measured_gb"] <= r["load_gb"] * 1.12, where
        else:
            assert abs(r["error"]) <= 0.12, (where, r["error"])
