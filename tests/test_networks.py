"""DoRA, LoHa and LoKr trained end to end on tiny models: the file, applied by sdlora's run-time path, reproduces the
trainer; merging equals applying; stop + resume is bit-exact; SDXL, QLoRA, pivotal tuning and two processes work.

The layout follows what AUTOMATIC1111 (extensions-builtin/Lora: network_hada.py @ c302b3ab9dd0, network_lokr.py
@ fe89b098394a, network.py's apply_weight_decompose from PR #15283, v1.10) and ComfyUI (comfy/weight_adapter:
loha.py @ 17adbb5cacc2, lokr.py @ 179c2d35c84b, base.py weight_decompose @ 9c0cf36cd796) read; the formulas are
checked against independent computations in test_network_files.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Capture, StopAt, draw_images, fresh_pipeline, launch_two, tiny_config, unet_and_te_outputs
from test_qlora import quantized_linears, use_weights
from test_sdxl import xl_outputs

from sdlora import convert_lora, merge_into_model, train
from sdlora.callbacks import Commands
from sdlora.loras.apply import load_lora_into
from sdlora.loras.checks import validate_kohya
from sdlora.loras.files import load_lora, read_lora
from sdlora.loras.modules import DoraModule, LohaModule, LokrModule
from sdlora.training.run.adapters import started_at_zero

# (network, args, rank): at the tiny model's widths (32, 64) these give LoKr both factors full (scale 1), w2
# factorised with Tucker convs (written without the core), and both factorised (w1, the smaller factor, at width 64)
CASES = [("loha", "", 4), ("loha", "use_tucker=true,conv_rank=2", 4), ("lokr", "factor=4,decompose_both=true", 4),
         ("lokr", "use_tucker=true", 2), ("lokr", "factor=8,decompose_both=true", 2), ("dora", "", 4),
         ("dora", "dora_axis=output", 4)]
TYPES = {"loha": LohaModule, "lokr": LokrModule, "dora": DoraModule}


def network_config(model, data, out, network, args="", **kw):
    cfg = tiny_config(model, data, out, **{"train__max_steps": 4, **kw})
    cfg.lora.network, cfg.lora.network_args = network, args
    cfg.lora.targets, cfg.lora.train_text_encoder = "all", True
    return cfg


def check_moved(state) -> None:
    """Every module's zero-started factor (B, w2_b, w2) moved: the update is not zero, so loading it proves a thing."""
    for part in state.lora_states().values():
        keys = started_at_zero(part)
        assert keys and all(part[k].abs().max() > 0 for k in keys)


@pytest.mark.parametrize("network,args,rank", CASES)
def test_trained_file_reproduces_the_trainer_applied_or_merged(tiny_model, images, tmp_path, network, args, rank):
    cfg = network_config(tiny_model, images, tmp_path / "o" / "n.safetensors", network, args, lora__rank=rank)
    cap = Capture()
    train(cfg, cap)
    check_moved(cap.state)
    c = cap.state.components
    want, want_cond = unet_and_te_outputs(c.denoiser.eval(), c.text_encoders[0].eval(), c.tokenizers[0])

    tensors, meta = read_lora(cfg.output.path)
    problems = validate_kohya(tensors)
    assert problems == [] or (args == "dora_axis=output" and "output-axis dora_scale" in problems[0]), problems
    mods = load_lora(cfg.output.path)[0]
    assert mods and all(isinstance(m, TYPES[network]) for m in mods.values())
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["sdlora_network"] == network
    lycoris = json.loads(meta["ss_network_args"])
    assert lycoris["algo"] == {"dora": "locon"}.get(network, network)
    assert all(isinstance(v, str) for v in lycoris.values())
    if network == "dora":  # keepdim dora_scale on the file's axis, never 1-D; the axis is recorded
        axis = "output" if args else "input"
        assert lycoris["wd_on_output"] == str(axis == "output") and lycoris["dora_wd"] == "True"
        lin = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.dora_scale"]
        conv = tensors["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"]
        w_lin = c.denoiser.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").weight
        w_conv = c.denoiser.get_submodule("down_blocks.0.resnets.0.conv1").weight
        if axis == "input":
            assert lin.shape == (1, w_lin.shape[1]) and conv.shape == (1, w_conv.shape[1], 1, 1)
        else:
            assert lin.shape == (w_lin.shape[0], 1) and conv.shape == (w_conv.shape[0], 1, 1, 1)

    pipe = fresh_pipeline(tiny_model)
    base, _ = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    active = load_lora_into(pipe, cfg.output.path)
    got, got_cond = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (got - want).abs().max() < 1e-5 and (got_cond - want_cond).abs().max() < 1e-5
    assert (got - base).abs().max() > 1e-4
    active.set_scales([0.0])
    assert (unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)[0] - base).abs().max() < 1e-6
    active.set_scales([0.6])
    half, half_cond = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    merged = fresh_pipeline(str(merge_into_model(tiny_model, [(cfg.output.path, 0.6)], tmp_path / "merged")))
    m_out, m_cond = unet_and_te_outputs(merged.unet, merged.text_encoder, merged.tokenizer)
    assert (m_out - half).abs().max() < 1e-5 and (m_cond - half_cond).abs().max() < 1e-5
    active.enable(False)
    assert (unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)[0] - base).abs().max() < 1e-6


def test_dora_on_the_output_axis_loads_in_diffusers(tiny_model, images, tmp_path, caplog):
    """--format diffusers: peft's lora_magnitude_vector, which diffusers' own loader reads (use_dora)."""
    from conftest import load_checked

    cfg = network_config(tiny_model, images, tmp_path / "o" / "d.safetensors", "dora", "dora_axis=output")
    cfg.output.format = "diffusers"
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    want, want_cond = unet_and_te_outputs(c.denoiser.eval(), c.text_encoders[0].eval(), c.tokenizers[0])
    tensors, meta = read_lora(cfg.output.path)
    assert any(k.endswith(".lora_magnitude_vector.weight") for k in tensors)
    assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
    pipe = fresh_pipeline(tiny_model)
    load_checked(pipe, cfg.output.path, caplog)
    got, got_cond = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (got - want).abs().max() < 1e-5 and (got_cond - want_cond).abs().max() < 1e-5
    own = fresh_pipeline(tiny_model)  # sdlora's run-time path reads the same file the same way
    load_lora_into(own, cfg.output.path)
    assert (unet_and_te_outputs(own.unet, own.text_encoder, own.tokenizer)[0] - want).abs().max() < 1e-5
    back = convert_lora(cfg.output.path, "kohya", tmp_path / "k.safetensors")  # -> dora_scale [out, 1]
    scales = {k: v for k, v in read_lora(back)[0].items() if k.endswith(".dora_scale")}
    assert scales and all(v.dim() >= 2 and v.shape[1] == 1 for v in scales.values())
    kohya = fresh_pipeline(tiny_model)
    load_lora_into(kohya, back)
    assert (unet_and_te_outputs(kohya.unet, kohya.text_encoder, kohya.tokenizer)[0] - want).abs().max() < 1e-5


@pytest.mark.parametrize("network,args", [("loha", "rank_dropout=0.2,module_dropout=0.1"), ("lokr", "factor=4"),
                                          ("dora", "")])
def test_stop_and_resume_is_bit_exact(tiny_model, tmp_path, network, args):
    data = draw_images(tmp_path / "imgs", n=4)
    kw = dict(train__max_steps=6, train__batch_size=2)
    full = network_config(tiny_model, data, tmp_path / "a" / "l.safetensors", network, args, **kw)
    train(full)
    part = network_config(tiny_model, data, tmp_path / "b" / "l.safetensors", network, args, **kw)
    commands = Commands()
    assert train(part, StopAt(commands, 3), commands).steps == 3
    assert train(part, resume=True).steps == 6
    a, b = read_lora(full.output.path)[0], read_lora(part.output.path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = network_config(tiny_model, data, tmp_path / "b" / "l.safetensors", "lora", **kw)
    with pytest.raises(Exception, match=r"lora\.network was"):  # a checkpoint of another network is not resumed
        train(other, resume=True)


def test_sdxl_lokr_reproduces_the_trainer(tiny_xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    data = draw_images(tmp_path / "imgs", n=3)
    cfg = network_config(tiny_xl, data, tmp_path / "o" / "xl.safetensors", "lokr", "factor=4", train__max_steps=3)
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    want = xl_outputs(c.denoiser.eval(), [te.eval() for te in c.text_encoders], c.tokenizers)
    tensors = read_lora(cfg.output.path)[0]
    assert validate_kohya(tensors, family="sdxl") == []
    bases = {k.split(".")[0] for k in tensors}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in bases  # SGM names, as kohya
    assert any(b.startswith("lora_te2_text_model_encoder_layers_") for b in bases)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    base = xl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    load_lora_into(pipe, cfg.output.path)
    got = xl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    for g, w, b in zip(got, want, base):
        assert (g - w).abs().max() < 1e-5 and (g - b).abs().max() > 1e-5


@pytest.mark.parametrize("axis", ["input", "output"])
def test_qlora_dora_trains_in_4bit_and_applies_to_the_dequantized_base(tiny_model, images, tmp_path, axis):
    import bitsandbytes as bnb

    cfg = network_config(tiny_model, images, tmp_path / "o" / "q.safetensors", "dora", f"dora_axis={axis}",
                         model__quantize="nf4")
    cap = Capture()
    train(cfg, cap)
    check_moved(cap.state)
    c = cap.state.components
    unet, te = c.denoiser.eval(), c.text_encoders[0].eval()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in unet.modules())
    want = unet_and_te_outputs(unet, te, c.tokenizers[0])
    deq = fresh_pipeline(tiny_model)
    for trained, target in ((unet, deq.unet), (te, deq.text_encoder)):
        use_weights(target, quantized_linears(trained))
    load_lora_into(deq, cfg.output.path)
    got = unet_and_te_outputs(deq.unet, deq.text_encoder, deq.tokenizer)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4


def test_pivotal_tuning_with_loha(tiny_model, images, tmp_path):
    cfg = network_config(tiny_model, images, tmp_path / "o" / "pt.safetensors", "loha", train__max_steps=2)
    cfg.pivotal.token, cfg.pivotal.trigger, cfg.pivotal.ti_steps, cfg.pivotal.ti_lr = "<s1>", "sks", 2, 5e-2
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    tensors, _ = read_lora(cfg.output.path)
    assert "bundle_emb.<s1>.string_to_param.*" in tensors and any(k.endswith(".hada_w1_a") for k in tensors)

    def outputs(unet, te, tok):
        ids = tok(["a red <s1>", "a blue dog"], padding="max_length", return_tensors="pt").input_ids
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cond = te(ids)[0]
            return unet(x, torch.tensor([50, 500]), encoder_hidden_states=cond).sample, cond

    want = outputs(c.denoiser.eval(), c.text_encoders[0].eval(), c.tokenizers[0])
    pipe = fresh_pipeline(tiny_model)
    load_lora_into(pipe, cfg.output.path)  # the LoHa through hooks, the bundled embedding into the tokenizer
    got = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5


def test_two_processes_train_an_input_axis_dora(tiny_model, tmp_path):
    """sdlora's own input-axis magnitude under DDP: synchronised (the run checks it) and written once."""
    data = draw_images(tmp_path / "imgs", n=4)
    out = tmp_path / "o" / "ddp.safetensors"
    proc = launch_two(tiny_model, data, out, "--max-steps", "3", "--network", "dora", "--network-args",
                      "dora_axis=input", "--train-text-encoder")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors, meta = read_lora(out)
    assert meta["sdlora_processes"] == "2" and meta["sdlora_network"] == "dora"
    scales = [k for k in tensors if k.endswith(".dora_scale")]
    assert scales and all(tensors[k].shape[0] == 1 for k in scales)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_up" in k)


def test_the_lokr_cases_cover_every_factor_layout(tiny_model, images, tmp_path):
    """The cases above really train each LoKr layout the loaders tell apart (full or factorised w1/w2; LyCORIS's
    split never makes w1, the smaller factor, factorised beside a full w2), and Tucker cores, which the file holds
    multiplied out."""
    seen, tucker = set(), False
    for network, args, rank in (c for c in CASES if c[0] == "lokr"):
        cfg = network_config(tiny_model, images, tmp_path / f"{rank}{args}" / "k.safetensors", network, args,
                             train__max_steps=1, lora__rank=rank)
        cap = Capture()
        train(cfg, cap)
        tucker |= any(k.endswith("lokr_t2") for part in cap.state.lora_states().values() for k in part)
        for m in load_lora(cfg.output.path)[0].values():
            seen.add((m.w1 is None, m.w2 is None, m.t2 is not None))
    assert seen == {(False, False, False), (False, True, False), (True, True, False)} and tucker
