"""QLoRA on the CPU through bitsandbytes: 4-bit NF4 base, LoRA on top, and a file that loads into the full base."""

from __future__ import annotations

import importlib.metadata

import bitsandbytes as bnb  # the test extra installs it: QLoRA's CPU path is tested, never skipped
import pytest
import torch
from conftest import Capture, StopAt, draw_images, fresh_pipeline, load_checked, tiny_config, unet_and_te_outputs
from test_sdxl import xl_outputs

from sdlora import train
from sdlora.callbacks import Commands
from sdlora.loras.checks import validate_kohya
from sdlora.loras.files import read_lora


def quantized_linears(model) -> dict[str, torch.Tensor]:
    """name in the unwrapped base model -> the dequantized weight of each 4-bit layer."""
    from bitsandbytes.functional import dequantize_4bit

    return {name.removesuffix(".base_layer"): dequantize_4bit(m.weight.data, m.weight.quant_state)
            for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def use_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Put the trainer's dequantized NF4 weights into a full-precision model, layer by layer."""
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert linears.keys() == weights.keys()  # every Linear layer, and only those, was quantized
    with torch.no_grad():
        for name, w in weights.items():
            linears[name].weight.copy_(w)


def pipe_encoders(pipe) -> tuple[list, list]:
    """The pipeline's text encoders and tokenizers: one for SD1, two for SDXL."""
    names = [n for n in ("", "_2") if getattr(pipe, f"text_encoder{n}", None) is not None]
    return [getattr(pipe, f"text_encoder{n}") for n in names], [getattr(pipe, f"tokenizer{n}") for n in names]


def fresh_xl(path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(path)


@pytest.mark.parametrize("family", ["sd1", "sdxl-single-file"])
def test_qlora_trains_in_4bit_and_loads_into_the_full_base(tiny_model, tiny_xl, tmp_path, caplog, family):
    from sdlora.single_file import save_single_file

    folder = tiny_model if family == "sd1" else tiny_xl
    model = folder if family == "sd1" else str(save_single_file(tiny_xl, tmp_path / "xl.safetensors"))
    data = draw_images(tmp_path / "imgs", n=3)
    cfg = tiny_config(model, data, tmp_path / "o" / "l.safetensors", train__max_steps=4, model__quantize="nf4")
    cfg.lora.train_text_encoder, cfg.lora.targets = True, "all"
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    unet = c.denoiser.eval()
    encoders = [t.eval() for t in c.text_encoders]
    for m in (unet, *encoders):  # 4-bit storage under every LoRA-wrapped and plain Linear
        packed = [x.weight for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
        assert packed and all(w.dtype == torch.uint8 for w in packed)
    for state in cap.state.lora_states().values():  # (SDXL's last text-encoder layer feeds nothing it uses)
        assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)
    tensors, _ = read_lora(cfg.output.path)
    assert validate_kohya(tensors, family=c.family.name) == []

    if family == "sd1":
        def outputs(pipe_unet, pipe_encoders, tokenizers):
            return unet_and_te_outputs(pipe_unet, pipe_encoders[0], tokenizers[0])
        fresh = fresh_pipeline
    else:
        outputs, fresh = xl_outputs, fresh_xl
    want = outputs(unet, encoders, c.tokenizers)

    # 1. the file loads, with nothing left over, into the unquantized base and changes its output
    full = fresh(folder)
    full_encoders, tokenizers = pipe_encoders(full)
    base = outputs(full.unet, full_encoders, tokenizers)
    load_checked(full, cfg.output.path, caplog)
    got = outputs(full.unet, full_encoders, tokenizers)
    assert (got[0] - base[0]).abs().max() > 1e-4
    # 2. what it loads is exactly the trained LoRA: over the trainer's dequantized base it gives the trainer's output
    deq = fresh(folder)
    deq_encoders, _ = pipe_encoders(deq)
    assert len(deq_encoders) == len(encoders)
    for trained, target in zip((unet, *encoders), (deq.unet, *deq_encoders)):
        use_weights(target, quantized_linears(trained))
    load_checked(deq, cfg.output.path, caplog)
    got = outputs(deq.unet, deq_encoders, tokenizers)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4


def test_qlora_with_8bit_adam_resumes_exactly(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=4)
    kw = dict(train__max_steps=6, model__quantize="nf4", optim__optimizer="adamw8bit")
    full = tiny_config(tiny_model, data, tmp_path / "a" / "l.safetensors", **kw)
    train(full)
    part = tiny_config(tiny_model, data, tmp_path / "b" / "l.safetensors", **kw)
    commands = Commands()
    assert train(part, StopAt(commands, 3), commands).steps == 3
    assert train(part, resume=True).steps == 6
    a, _ = read_lora(full.output.path)
    b, _ = read_lora(part.output.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("installed,says", [
    (None, ("needs bitsandbytes: pip install 'sdlora[qlora]'",) * 2),
    ("0.45.5", ("on the CPU needs bitsandbytes >= 0.47 (this is 0.45.5)",
                "on the CPU needs bitsandbytes >= 0.50 (this is 0.45.5)")),
])
def test_qlora_without_a_usable_bitsandbytes_says_what_to_do(tiny_model, images, tmp_path, capsys, monkeypatch,
                                                              installed, says):
    from sdlora.cli import main

    real = importlib.metadata.version

    def version(name):
        if name != "bitsandbytes":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    for flags, said in zip((["--quantize", "nf4"], ["--optimizer", "adamw8bit"]), says):
        rc = main(["train", "--model", tiny_model, "--data", str(images), *flags,
                   "--output", str(tmp_path / "q.safetensors")])
        err = capsys.readouterr().err.strip().splitlines()  # one line, before any model loads
        assert rc != 0 and len(err) == 1 and said in err[0], err
        assert not (tmp_path / "q.safetensors").exists()


def test_qlora_on_a_cpu_with_avx512_bf16(tiny_model, tmp_path, monkeypatch):
    """bitsandbytes repacks 4-bit layers for inference on AVX512-BF16 CPUs (as on the machine where a fresh clone
    failed: "shape '[32, 0]' is invalid"); sdlora's layers must keep training there. The CPU feature is faked so that
    every machine runs this path."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=3, model__quantize="nf4")
    cfg.lora.train_text_encoder, cfg.sample.prompts, cfg.sample.every, cfg.sample.steps = True, ["a sks"], 1, 2
    cap = Capture()
    train(cfg, cap)  # samples (eval, no grad) between steps, then more training
    layers = [m for m in cap.state.components.text_encoders[0].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight, "packing_format_for_cpu", False) for m in layers)
    assert any(v.float().abs().max() > 0 for k, v in read_lora(cfg.output.path)[0].items() if "lora_up" in k)
