"""DoRA, LoHa and LoKr files written by hand, as AUTOMATIC1111 and ComfyUI read them, checked against the published
update formulas computed independently here (never against sdlora's own merge); the tools on them.

Key names and shapes follow AUTOMATIC1111 extensions-builtin/Lora (network_hada.py @ c302b3ab9dd0f151cf8cb87a68002b42e5
fc2676, network_lokr.py @ fe89b098394aab3339078eb992f796a4aa1a32b6, DoRA in network.py from PR #15283, v1.10) and
ComfyUI comfy/weight_adapter (loha.py @ 17adbb5cacc2d08310dad408e043a5d18e3ec013, lokr.py @ 179c2d35c84beb3d97
61fcd146ffcba77273413e, base.py weight_decompose @ 9c0cf36cd7964978850fd40f8cf76ac2cf9f9e15)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file
from test_tools import META, fresh, outputs

from sdlora import convert_lora, inspect_lora, merge_into_model, mix_loras, resize_lora
from sdlora.config import parse_network_args, validate
from sdlora.errors import ConfigError, LoraFileError
from sdlora.loras.files import load_lora, read_lora

LIN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"   # Linear
CONV = "down_blocks.0.resnets.0.conv1"                               # 3x3 conv
TE = "encoder.layers.0.self_attn.q_proj"                              # text-encoder Linear
KOHYA = {LIN: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
         CONV: "lora_unet_down_blocks_0_resnets_0_conv1", TE: "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
G = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=G) * 0.3


@pytest.fixture(scope="module")
def weights(tiny_model):
    pipe = fresh(tiny_model)
    return {LIN: pipe.unet.get_submodule(LIN).weight.detach().clone(),
            CONV: pipe.unet.get_submodule(CONV).weight.detach().clone(),
            TE: pipe.text_encoder.get_submodule(TE).weight.detach().clone()}


def kron(a, b):
    """Kronecker product by its definition: K[i*p + j, k*q + l] = a[i, k] * b[j, l] (trailing kernel dims of b kept)."""
    k = torch.einsum("ik,jl...->ijkl...", a, b)
    return k.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])


def column_dora(w, delta, m):
    """DoRA with one magnitude per input column (A1111 apply_weight_decompose): the norm of W + dW over the outputs and
    the kernel for each input channel i."""
    v = w + delta
    norms = torch.stack([v[:, i].norm() for i in range(v.shape[1])])
    shape = (1, -1) + (1,) * (v.dim() - 2)
    return v * (m.reshape(shape) / norms.reshape(shape)) - w


def row_dora(w, delta, m):
    """DoRA with one magnitude per output row (peft, LyCORIS wd_on_out)."""
    v = w + delta
    norms = torch.stack([v[o].norm() for o in range(v.shape[0])])
    shape = (-1,) + (1,) * (v.dim() - 1)
    return v * (m.reshape(shape) / norms.reshape(shape)) - w


def modules_and_expected(weights):
    """{kohya base: (tensors without the base prefix, expected delta)}, one case per layout a loader tells apart."""
    wl, wc = weights[LIN], weights[CONV]
    out_l, in_l = wl.shape
    out_c, in_c = wc.shape[:2]
    r, alpha = 2, 3.0
    cases = {}
    a, b, c, d = rnd(out_l, r), rnd(r, in_l), rnd(out_l, r), rnd(r, in_l)  # LoHa, Linear
    cases[KOHYA[LIN]] = ({"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": c, "hada_w2_b": d},
                         (a @ b) * (c @ d) * alpha / r)
    a, b, c, d = rnd(out_c, r), rnd(r, in_c * 9), rnd(out_c, r), rnd(r, in_c * 9)  # LoHa conv, w*_b flattened 2-D
    cases[KOHYA[CONV]] = ({"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": c, "hada_w2_b": d},
                          ((a @ b) * (c @ d)).reshape(wc.shape) * alpha / r)
    w1, w2a, w2b = rnd(4, 4), rnd(out_l // 4, r), rnd(r, in_l // 4)  # LoKr, Linear, w2 factorised
    cases[KOHYA[TE]] = ({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, kron(w1, w2a @ w2b) * alpha / r)
    return cases


def write(path, cases, dora=None):
    tensors = {f"{base}.{k}": v for base, (parts, _) in cases.items() for k, v in parts.items()}
    tensors.update({f"{base}.alpha": torch.tensor(3.0) for base in cases})
    tensors.update({f"{base}.dora_scale": m for base, m in (dora or {}).items()})
    save_file(tensors, str(path), {**META, "ss_network_dim": "2", "ss_network_alpha": "3"})
    return str(path)


def test_loha_and_lokr_updates_are_the_published_formulas(weights, tmp_path):
    cases = modules_and_expected(weights)
    mods = load_lora(write(tmp_path / "x.safetensors", cases))[0]
    for path, base in KOHYA.items():
        torch.testing.assert_close(mods[base].delta(weights[path]), cases[base][1], rtol=1e-5, atol=1e-7)
    assert {m.kind for m in mods.values()} == {"loha", "lokr"}


def test_lokr_full_factors_tucker_and_conv_follow_the_loaders_rules(weights, tmp_path):
    """Both factors full: scale 1 whatever alpha says (A1111's dim is None); a full 4-D w2 krons with w1[:, :, None,
    None]; Tucker cores rebuild w as sum_ab t[a, b] w_a[a, o] w_b[b, i]."""
    wl, wc = weights[LIN], weights[CONV]
    w1, w2 = rnd(4, 4), rnd(wl.shape[0] // 4, wl.shape[1] // 4)
    w1c, w2c = rnd(2, 2), rnd(wc.shape[0] // 2, wc.shape[1] // 2, 3, 3)
    r = 2
    t1, a1, b1, t2, a2, b2 = rnd(r, r, 3, 3), rnd(r, wc.shape[0]), rnd(r, wc.shape[1]), rnd(r, r, 3, 3), \
        rnd(r, wc.shape[0]), rnd(r, wc.shape[1])
    cases = {KOHYA[LIN]: ({"lokr_w1": w1, "lokr_w2": w2}, kron(w1, w2)),
             KOHYA[CONV]: ({"lokr_w1": w1c, "lokr_w2": w2c}, kron(w1c, w2c))}
    mods = load_lora(write(tmp_path / "full.safetensors", cases))[0]
    for path, base in ((LIN, KOHYA[LIN]), (CONV, KOHYA[CONV])):
        torch.testing.assert_close(mods[base].delta(weights[path]), cases[base][1], rtol=1e-5, atol=1e-7)

    def cp(t, a, b):
        return torch.einsum("abkl,ao,bi->oikl", t, a, b)

    tucker = {KOHYA[CONV]: ({"hada_t1": t1, "hada_w1_a": a1, "hada_w1_b": b1, "hada_t2": t2, "hada_w2_a": a2,
                             "hada_w2_b": b2}, cp(t1, a1, b1) * cp(t2, a2, b2) * 3.0 / r)}
    mods = load_lora(write(tmp_path / "tucker.safetensors", tucker))[0]
    torch.testing.assert_close(mods[KOHYA[CONV]].delta(wc), tucker[KOHYA[CONV]][1], rtol=1e-5, atol=1e-7)


def test_tucker_locon_lora_mid_is_read(weights, tmp_path):
    """LoCon's Tucker conv (A1111 network_lora.py, lyco_helpers.rebuild_cp_decomposition): 1x1 down and up around a
    k x k core: W[o, i, k, l] = sum_ab up[o, a] mid[a, b, k, l] down[b, i]."""
    wc, r = weights[CONV], 2
    down, mid, up = rnd(r, wc.shape[1], 1, 1), rnd(r, r, 3, 3), rnd(wc.shape[0], r, 1, 1)
    expect = torch.einsum("oa,abkl,bi->oikl", up.flatten(1), mid, down.flatten(1)) * 3.0 / r
    cases = {KOHYA[CONV]: ({"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}, expect)}
    mods = load_lora(write(tmp_path / "mid.safetensors", cases))[0]
    assert mods[KOHYA[CONV]].kind == "lora_tucker"
    torch.testing.assert_close(mods[KOHYA[CONV]].delta(wc), expect, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_dora_update_is_the_published_decomposition(weights, tmp_path, axis):
    """A LoRA (Linear and conv) and a LoHa with dora_scale: m * (W + dW) / ||W + dW|| on the file's axis, told by its
    shape as ComfyUI does ([1, in] / [1, in, 1, 1] input, [out, 1] / [out, 1, 1, 1] output)."""
    r = 2
    wl, wc, wt = weights[LIN], weights[CONV], weights[TE]
    down, up = rnd(r, wl.shape[1]), rnd(wl.shape[0], r)
    cdown, cup = rnd(r, wc.shape[1], 3, 3), rnd(wc.shape[0], r, 1, 1)
    a, b, c, d = rnd(wt.shape[0], r), rnd(r, wt.shape[1]), rnd(wt.shape[0], r), rnd(r, wt.shape[1])
    cases = {KOHYA[LIN]: ({"lora_down.weight": down, "lora_up.weight": up}, up @ down * 3.0 / r),
             KOHYA[CONV]: ({"lora_down.weight": cdown, "lora_up.weight": cup},
                           (cup.flatten(1) @ cdown.flatten(1)).reshape(wc.shape) * 3.0 / r),
             KOHYA[TE]: ({"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": c, "hada_w2_b": d}, (a @ b) * (c @ d) * 3.0 / r)}
    decompose = column_dora if axis == "input" else row_dora
    dora, expect = {}, {}
    for path, base in KOHYA.items():
        w = weights[path]
        n = w.shape[1] if axis == "input" else w.shape[0]
        m = torch.rand(n, generator=G) + 0.5
        dora[base] = m.reshape(*((1, n) if axis == "input" else (n, 1)), *([1, 1] if w.dim() == 4 else []))
        expect[base] = decompose(w, cases[base][1], m)
    mods = load_lora(write(tmp_path / "dora.safetensors", cases, dora))[0]
    for path, base in KOHYA.items():
        assert mods[base].kind in ("dora", "loha+dora") and mods[base].axis == axis
        torch.testing.assert_close(mods[base].delta(weights[path]), expect[base], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def hand_dora(weights, tmp_path_factory):
    """A kohya DoRA file made by hand (LoRA + input-axis dora_scale, as LyCORIS < 3.2 and A1111 have it), its true
    delta per layer and the plain-LoRA delta an old reader would have used."""
    r = 2
    wl, wc = weights[LIN], weights[CONV]
    down, up = rnd(r, wl.shape[1]), rnd(wl.shape[0], r)
    cdown, cup = rnd(r, wc.shape[1], 3, 3), rnd(wc.shape[0], r, 1, 1)
    cases = {KOHYA[LIN]: ({"lora_down.weight": down, "lora_up.weight": up}, up @ down * 1.5),
             KOHYA[CONV]: ({"lora_down.weight": cdown, "lora_up.weight": cup},
                           (cup.flatten(1) @ cdown.flatten(1)).reshape(wc.shape) * 1.5)}
    dora = {KOHYA[LIN]: (torch.rand(1, wl.shape[1], generator=G) + 0.5),
            KOHYA[CONV]: (torch.rand(1, wc.shape[1], 1, 1, generator=G) + 0.5)}
    truth = {base: column_dora(weights[path], cases[base][1], dora[base].flatten())
             for path, base in ((LIN, KOHYA[LIN]), (CONV, KOHYA[CONV]))}
    plain = {base: cases[base][1] for base in truth}
    return write(tmp_path_factory.mktemp("dora") / "hand.safetensors", cases, dora), truth, plain


def test_a_kohya_dora_file_merges_exactly_never_as_plain_lora(tiny_model, weights, hand_dora, tmp_path):
    path, truth, plain = hand_dora
    merged = fresh(str(merge_into_model(tiny_model, [(path, 0.7)], tmp_path / "m")))
    for p, base in ((LIN, KOHYA[LIN]), (CONV, KOHYA[CONV])):
        got = merged.unet.get_submodule(p).weight.detach() - weights[p]
        torch.testing.assert_close(got, 0.7 * truth[base], rtol=1e-4, atol=1e-6)
        assert (got - 0.7 * plain[base]).abs().max() > 1e-2  # what reading dora_scale as nothing gave


def test_a_kohya_dora_file_in_mix_and_resize(tiny_model, hand_dora, tmp_path):
    path, truth, plain = hand_dora
    with pytest.raises(LoraFileError, match=r"DoRA update depends on the base model's weights.*--model"):
        mix_loras([(path, 1.0)], tmp_path / "a.safetensors", rank=2)
    with pytest.raises(LoraFileError, match="--model"):
        resize_lora(path, tmp_path / "b.safetensors", rank=2)
    with pytest.raises(LoraFileError, match="give --rank"):  # DoRA is full-rank: no exact stacking
        mix_loras([(path, 1.0)], tmp_path / "c.safetensors", model=tiny_model)
    report = mix_loras([(path, 0.5)], tmp_path / "mix.safetensors", rank=8, model=tiny_model)
    mods = load_lora(tmp_path / "mix.safetensors")[0]
    for row in report.layers:  # the reported error is the true one, against the true DoRA update
        want, got = 0.5 * truth[row["name"]], mods[row["name"]].delta()
        assert row["error"] == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-3, abs=1e-6)
        assert float((got - 0.5 * plain[row["name"]]).norm() / want.norm()) > 0.05
    report = resize_lora(path, tmp_path / "r.safetensors", rank=4, model=tiny_model)
    tensors, meta = read_lora(tmp_path / "r.safetensors")
    assert meta["ss_network_module"] == "networks.lora" and meta["sdlora_converted_from"] == "dora"
    assert not any(k.endswith(".dora_scale") for k in tensors)
    for row in report.layers:
        got = load_lora(tmp_path / "r.safetensors")[0][row["name"]].delta()
        want = truth[row["name"]]
        assert row["error"] == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-3, abs=1e-6)


def test_loha_and_lokr_become_plain_lora_exactly_at_their_rank(tiny_model, weights, tmp_path):
    """rank((w1a w1b) ⊙ (w2a w2b)) <= r1 * r2 and rank(w1 ⊗ w2) = rank(w1) rank(w2): a mix without --rank holds
    them exactly as plain LoRA (the conv's kernel from --model)."""
    cases = modules_and_expected(weights)
    src = write(tmp_path / "x.safetensors", cases)
    report = mix_loras([(src, 0.5)], tmp_path / "m.safetensors", model=tiny_model)
    assert report.overall_error < 1e-5 and not report.exact
    mods = load_lora(tmp_path / "m.safetensors")[0]
    assert all(m.kind == "lora" for m in mods.values())
    for base in KOHYA.values():
        torch.testing.assert_close(mods[base].delta(), 0.5 * cases[base][1], rtol=1e-3, atol=1e-5)
    assert mods[KOHYA[CONV]].down.dim() == 4  # a conv LoRA as A1111 loads it
    report = resize_lora(src, tmp_path / "r.safetensors", rank=1, model=tiny_model)
    assert 0 < report.overall_error < 1


def test_inspect_convert_and_runtime_say_what_loads_where(tiny_model, weights, hand_dora, tmp_path):
    from sdlora.loras.apply import load_lora_into

    cases = modules_and_expected(weights)
    src = write(tmp_path / "x.safetensors", cases)
    info = inspect_lora(src)
    assert info.types == {"loha": 2, "lokr": 1} and "not diffusers" in info.loads_in and info.problems == []
    assert "type: loha 2, lokr 1" in info.summary()
    assert "AUTOMATIC1111 and ComfyUI (exact)" in inspect_lora(hand_dora[0]).loads_in
    with pytest.raises(LoraFileError, match="diffusers cannot load"):
        convert_lora(src, "diffusers", tmp_path / "d.safetensors")
    pipe = fresh(tiny_model)
    with pytest.raises(ValueError):  # diffusers itself cannot load a kohya LoHa/LoKr file
        pipe.load_lora_weights(src)
    base = outputs(fresh(tiny_model))
    pipe = fresh(tiny_model)
    load_lora_into(pipe, src, scale=0.5)  # sdlora's run-time path: hooks, at the scale
    merged = fresh(str(merge_into_model(tiny_model, [(src, 0.5)], tmp_path / "m")))
    got = outputs(pipe)
    assert (got - outputs(merged)).abs().max() < 1e-5 and (got - base).abs().max() > 1e-3


def test_files_with_what_no_client_reads_one_way_are_refused(weights, tmp_path):
    wl = weights[LIN]
    lora = {f"{KOHYA[LIN]}.lora_down.weight": rnd(2, wl.shape[1]), f"{KOHYA[LIN]}.lora_up.weight": rnd(wl.shape[0], 2)}
    for extra, message in (({".dora_scale": torch.rand(wl.shape[1])}, "dora_scale is 1-D"),
                           ({".dora_scale": torch.rand(3, 5)}, "fits neither axis"),
                           ({".lokr_t1": torch.rand(2, 2)}, "lokr_t1"),
                           ({".hada_w1_a": torch.rand(2, 2)}, "does not go with")):
        tensors = {**lora, **{KOHYA[LIN] + k: v for k, v in extra.items()}}
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(LoraFileError, match=message):
            load_lora(tmp_path / "bad.safetensors")
    half = {f"{KOHYA[LIN]}.hada_w1_a": rnd(wl.shape[0], 2), f"{KOHYA[LIN]}.hada_w1_b": rnd(2, wl.shape[1]),
            f"{KOHYA[LIN]}.hada_w2_a": rnd(wl.shape[0], 2)}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraFileError, match="lacks its w2b"):
        load_lora(tmp_path / "half.safetensors")


def test_network_args_are_typed_and_checked(tiny_model, images, tmp_path, capsys):
    from sdlora.cli import main

    assert parse_network_args("lokr", "factor=8, decompose_both=true") == {
        "conv_rank": 0, "conv_alpha": 0.0, "use_tucker": False, "rank_dropout": 0.0, "module_dropout": 0.0,
        "factor": 8, "decompose_both": True}
    assert parse_network_args("dora", "")["dora_axis"] == "input"
    with pytest.raises(ConfigError, match=r"unknown key 'factor' for network loha \(known: conv_rank, conv_alpha, "
                                          r"use_tucker, rank_dropout, module_dropout\)"):
        parse_network_args("loha", "factor=8")
    with pytest.raises(ConfigError, match="dora_axis must be one of input, output"):
        parse_network_args("dora", "dora_axis=columns")
    with pytest.raises(ConfigError, match="factor must be a finite int"):
        parse_network_args("lokr", "factor=eight")
    with pytest.raises(ConfigError, match="conv_alpha must be a finite float"):
        parse_network_args("lora", "conv_alpha=nan")
    cfg = tiny_config(tiny_model, images, tmp_path / "o.safetensors")
    for network, args, fmt, quantize, message in (
            ("dora", "", "diffusers", "none", "needs dora_axis=output"),
            ("loha", "", "diffusers", "none", "diffusers loads no LoHa/LoKr"),
            ("lokr", "", "kohya", "nf4", "QLoRA .quantize nf4. with network lokr is unsupported")):
        cfg.lora.network, cfg.lora.network_args, cfg.output.format, cfg.model.quantize = network, args, fmt, quantize
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
    rc = main(["train", "--model", tiny_model, "--data", str(images), "--network", "loha", "--network-args",
               "dora_axis=input", "--output", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "unknown key 'dora_axis' for network loha" in err[0], err


def test_default_network_keeps_the_plain_lora_file(tiny_model, images, tmp_path):
    from sdlora import train

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=1)
    train(cfg)
    tensors, meta = read_lora(cfg.output.path)
    assert meta["ss_network_module"] == "networks.lora" and json.loads(meta["ss_network_args"]) == {
        "targets": "cross_attn"}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)


def test_cli_generates_a_scale_grid_and_mixes_with_a_model(tiny_model, weights, hand_dora, tmp_path, capsys):
    from PIL import Image

    from sdlora.cli import main

    src = write(tmp_path / "x.safetensors", modules_and_expected(weights))
    out = tmp_path / "grid"
    assert main(["generate", "--model", tiny_model, "--lora", f"{src}:0.8", "--lora", hand_dora[0], "--prompt", "a sks",
                 "--n", "1", "--steps", "2", "--width", "32", "--height", "32", "--grid", "--scales", "0,1",
                 "-o", str(out)]) == 0
    sheet = Image.open(next(out.glob("*.png")))
    left, right = sheet.crop((70, 18, 102, 50)), sheet.crop((102, 18, 134, 50))
    assert left.tobytes() != right.tobytes()  # scale 0 and 1 differ: the hooks follow the grid's scale
    assert main(["inspect", src]) == 0 and "loads in: AUTOMATIC1111, ComfyUI" in capsys.readouterr().out
    assert main(["mix", hand_dora[0], "--rank", "4", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert main(["mix", hand_dora[0], "--rank", "4", "--model", tiny_model, "-o", str(tmp_path / "m.safetensors")]) == 0


def test_plain_lora_and_loha_together_at_their_own_scales(tiny_model, weights, tmp_path):
    """A plain LoRA through diffusers' adapters and a LoHa through hooks on the same layers, each at its scale: the
    same as merging both."""
    from test_tools import UNET_A, write_random_lora

    from sdlora.loras.apply import apply_loras

    plain = write_random_lora(tmp_path / "p.safetensors", fresh(tiny_model), [LIN, CONV] + UNET_A[:2], [], 4, 2, 3)
    loha = write(tmp_path / "h.safetensors", modules_and_expected(weights))
    specs = [(plain, 0.5), (loha, -0.8)]
    pipe = fresh(tiny_model)
    active = apply_loras(pipe, specs)
    merged = fresh(str(merge_into_model(tiny_model, specs, tmp_path / "m")))
    assert (outputs(pipe) - outputs(merged)).abs().max() < 1e-5
    active.remove()
    assert (outputs(pipe) - outputs(fresh(tiny_model))).abs().max() < 1e-6
