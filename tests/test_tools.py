"""LoRA tools on a tiny model with random, non-zero LoRAs (UNet attention, ff, 1x1 and 3x3 convs, text encoder):
merge == runtime LoRA in diffusers, exact and SVD mixes, resize, lossless convert, extract, inspect, CLI."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sdlora import convert_lora, extract_lora, inspect_lora, merge_into_model, mix_loras, resize_lora
from sdlora.cli.common import parse_weighted
from sdlora.errors import LoraFileError, SdloraError
from sdlora.loras.files import load_lora as load
from sdlora.loras.files import read_lora, write_lora
from sdlora.loras.layout import kohya_tensors
from sdlora.loras.modules import LoraModule

UNET_A = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
          "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
          "down_blocks.0.attentions.0.proj_in",        # 1x1 conv
          "down_blocks.0.resnets.0.conv1",              # 3x3 conv
          "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"]
UNET_B = UNET_A[2:5] + ["mid_block.resnets.0.conv2", "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"]
# diffusers 0.42 drops a kohya file's text-encoder attention LoRA when no out_proj is in it (inspect warns)
TE_A = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.1.mlp.fc1"]
TE_B = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj"]
META = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-v1/lora", "sdlora_family": "sd1"}


def random_modules(pipe, unet_paths, te_paths, rank, alpha, seed):
    """LoRA modules with random down and up (an untrained up = 0 LoRA would prove nothing), by kohya base name."""
    from sdlora.loras.layout import kohya_base

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for prefix, model, paths in (("lora_unet", pipe.unet, unet_paths), ("lora_te", pipe.text_encoder, te_paths)):
        for path in paths:
            w = model.get_submodule(path).weight
            down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.3
            up = torch.randn((w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank), generator=g) * 0.3
            mods[kohya_base(prefix, path)] = LoraModule(down, up, float(alpha))
    return mods


def write_random_lora(path, pipe, unet_paths, te_paths, rank, alpha, seed, dtype=torch.float32):
    tensors = kohya_tensors(random_modules(pipe, unet_paths, te_paths, rank, alpha, seed), dtype)
    meta = {**META, "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    return str(write_lora(path, tensors, meta))


def fresh(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def outputs(pipe):
    """UNet output (through the text encoder's conditioning) on fixed inputs: covers both LoRA halves."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a red sks", "a blue dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def with_loras(model, loras):
    """The base pipeline with LoRA files applied at run time by diffusers (load_lora_weights + set_adapters),
    failing on any sign of keys that did not load."""
    pipe, handler = fresh(model), _Lines()
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, (path, _) in enumerate(loras):
                pipe.load_lora_weights(path, adapter_name=f"l{i}")
    finally:
        logging.getLogger().removeHandler(handler)
    text = "\n".join([str(w.message) for w in caught] + handler.lines)
    for bad in ("unexpected", "alpha_pattern", "did not match", "not loaded", "not found"):
        assert bad not in text.lower(), text
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    return pipe


@pytest.fixture(scope="module")
def base_pipe(tiny_model):
    return fresh(tiny_model)


@pytest.fixture(scope="module")
def loras(tiny_model, base_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    a = write_random_lora(d / "a.safetensors", base_pipe, UNET_A, TE_A, rank=4, alpha=2, seed=1)
    b = write_random_lora(d / "b.safetensors", base_pipe, UNET_B, TE_B, rank=3, alpha=3, seed=2)
    return a, b


def deltas(path):
    mods, _, _ = load(path)
    return {b: m.delta() for b, m in mods.items()}


# ---------------------------------------------------------------- merge

@pytest.mark.parametrize("which", ["one", "two"])
def test_merge_equals_runtime_lora(tiny_model, base_pipe, loras, tmp_path, which):
    """Folder and single-file (original SD layout, reloaded by diffusers' from_single_file) merges give the
    outputs of diffusers' runtime LoRA at the same weights."""
    from sdlora.models import load_model

    specs = [(loras[0], 0.8)] if which == "one" else [(loras[0], 0.8), (loras[1], -0.6)]
    expected = outputs(with_loras(tiny_model, specs))
    assert (expected - outputs(base_pipe)).abs().max() > 1e-2  # the LoRAs really change the output
    folder = merge_into_model(tiny_model, specs, tmp_path / "merged")
    assert (outputs(fresh(str(folder))) - expected).abs().max() < 1e-4
    single = merge_into_model(tiny_model, specs, tmp_path / "merged.safetensors")
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in read_lora(single)[0])
    c = load_model(single)
    assert (outputs(c.pipeline()) - expected).abs().max() < 1e-4


def test_merge_rejects_lora_for_another_model(tiny_model, loras, tmp_path):
    tensors, meta = read_lora(loras[0])
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    wrong = dict(tensors, **{key: torch.randn(4, 48)})  # cross-attention width 48: another model
    write_lora(tmp_path / "wrong.safetensors", wrong, meta)
    with pytest.raises(LoraFileError, match="attn2_to_k has shape"):
        merge_into_model(tiny_model, [(str(tmp_path / "wrong.safetensors"), 1.0)], tmp_path / "m")
    sdxl = {k.replace("lora_te_", "lora_te1_"): v for k, v in tensors.items()}
    write_lora(tmp_path / "xl.safetensors", sdxl, meta)
    with pytest.raises(LoraFileError, match="3 of 10 LoRA layers match no layer"):
        merge_into_model(tiny_model, [(str(tmp_path / "xl.safetensors"), 1.0)], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- mix / resize

def test_exact_mix_is_the_weighted_sum(loras, tmp_path):
    report = mix_loras([(loras[0], 0.7), (loras[1], -0.4)], tmp_path / "mix.safetensors")
    da, db, dm = deltas(loras[0]), deltas(loras[1]), deltas(tmp_path / "mix.safetensors")
    assert set(dm) == set(da) | set(db)  # modules of only one input are kept
    for base, d in dm.items():
        want = 0.7 * da.get(base, 0) + -0.4 * db.get(base, 0)
        assert (d - want).abs().max() < 1e-5, base
    assert report.exact and report.overall_error == 0
    tensors, _ = read_lora(tmp_path / "mix.safetensors")
    assert len({v.item() for k, v in tensors.items() if k.endswith(".alpha")}) == 1  # one alpha per file


def _recomputed(target: dict, got: dict) -> tuple[dict, float]:
    errs = {b: float((got[b] - t).norm() / t.norm()) for b, t in target.items()}
    total = sum(float(t.norm()) ** 2 for t in target.values())
    overall = (sum(float((got[b] - t).norm()) ** 2 for b, t in target.items()) / total) ** 0.5
    return errs, overall


def test_svd_mix_and_resize_report_true_errors(loras, tmp_path):
    report = mix_loras([(loras[0], 1.0), (loras[1], 0.5)], tmp_path / "m2.safetensors", rank=2)
    da, db = deltas(loras[0]), deltas(loras[1])
    target = {b: da.get(b, 0) + 0.5 * db.get(b, 0) for b in set(da) | set(db)}
    errs, overall = _recomputed(target, deltas(tmp_path / "m2.safetensors"))
    for row in report.layers:
        assert row["rank"] == 2 and row["error"] == pytest.approx(errs[row["name"]], rel=1e-4, abs=1e-6)
    assert report.overall_error == pytest.approx(overall, rel=1e-4) and 0.05 < overall < 1
    assert report.worst_error == pytest.approx(max(errs.values()), rel=1e-4)

    report = resize_lora(loras[0], tmp_path / "r2.safetensors", rank=2)
    errs, overall = _recomputed(da, deltas(tmp_path / "r2.safetensors"))
    assert {r["name"]: r["error"] for r in report.layers} == pytest.approx(errs, rel=1e-4)
    assert report.overall_error == pytest.approx(overall, rel=1e-4)

    full = resize_lora(loras[0], tmp_path / "r4.safetensors", rank=4)  # full rank: lossless
    assert full.overall_error < 1e-6
    for base, d in deltas(tmp_path / "r4.safetensors").items():
        assert (d - da[base]).abs().max() < 1e-5

    resize_lora(loras[0], tmp_path / "e.safetensors", keep_energy=0.9)
    mods, _, _ = load(tmp_path / "e.safetensors")
    for base, m in mods.items():  # the chosen rank is the smallest keeping 90% of the spectrum
        s = torch.linalg.svdvals(da[base].flatten(1).double()) ** 2
        share = s.cumsum(0) / s.sum()
        assert share[m.rank - 1] >= 0.9 - 1e-9 and (m.rank == 1 or share[m.rank - 2] < 0.9)


# ---------------------------------------------------------------- convert

def test_convert_round_trip_is_lossless_and_loads(tiny_model, base_pipe, loras, tmp_path):
    src = write_random_lora(tmp_path / "h.safetensors", base_pipe, UNET_A, TE_A, 4, 2, seed=5, dtype=torch.float16)
    diff = convert_lora(src, "diffusers", tmp_path / "d.safetensors")
    back = convert_lora(diff, "kohya", tmp_path / "k.safetensors")
    a, _ = read_lora(src)
    b, meta_b = read_lora(back)
    d, meta_d = read_lora(diff)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=0), k
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in d)
    assert "lora_adapter_metadata" in meta_d and meta_d["ss_network_alpha"] == "2"
    assert meta_b["ss_base_model_version"] == "sd_v1" and "lora_adapter_metadata" not in meta_b
    want = outputs(with_loras(tiny_model, [(src, 1.0)]))
    for path in (diff, back):
        assert (outputs(with_loras(tiny_model, [(str(path), 1.0)])) - want).abs().max() < 1e-4

    # per-layer ranks (a keep-energy resize) go through diffusers' rank_pattern
    resize_lora(loras[0], tmp_path / "e.safetensors", keep_energy=0.8)
    assert len({m.rank for m in load(tmp_path / "e.safetensors")[0].values()}) > 1
    convert_lora(tmp_path / "e.safetensors", "diffusers", tmp_path / "ed.safetensors")
    want = outputs(with_loras(tiny_model, [(str(tmp_path / "e.safetensors"), 1.0)]))
    got = outputs(with_loras(tiny_model, [(str(tmp_path / "ed.safetensors"), 1.0)]))
    assert (got - want).abs().max() < 1e-4


# ---------------------------------------------------------------- extract

def test_extract_recovers_a_merged_lora(tiny_model, loras, tmp_path):
    tuned = merge_into_model(tiny_model, [(loras[0], 1.0)], tmp_path / "tuned")
    report = extract_lora(tiny_model, str(tuned), 4, tmp_path / "x.safetensors", conv_rank=4, dtype="fp32")
    want, got = deltas(loras[0]), deltas(tmp_path / "x.safetensors")
    assert set(got) == set(want)  # every other layer is unchanged and skipped
    for base, d in want.items():
        assert float((got[base] - d).norm() / d.norm()) < 1e-4
    assert report.overall_error < 1e-4 and report.worst_error < 1e-4
    assert len(report.skipped) > 20


# ---------------------------------------------------------------- inspect

def test_inspect_our_file_and_a_hand_written_a1111_file(loras, tmp_path):
    info = inspect_lora(loras[0])
    assert (info.layout, info.ranks, info.alphas) == ("kohya", [4], [2.0])
    assert (info.unet_modules, info.te_modules) == (7, 3)
    assert info.kinds == {"attn1": 1, "attn2": 3, "conv": 1, "ff": 1, "proj": 1, "te": 3}
    assert info.family == "sd1" and info.problems == []
    assert "rank: 4" in info.summary() and json.dumps(info.to_dict())

    g = torch.Generator().manual_seed(0)
    def module(base, out, inp, kernel=()):  # as kohya's sd-scripts write it: fp16, int64 alpha
        return {f"{base}.lora_down.weight": torch.randn(8, inp, *kernel, generator=g).half(),
                f"{base}.lora_up.weight": torch.randn(out, 8, *[1 for _ in kernel], generator=g).half(),
                f"{base}.alpha": torch.tensor(4)}

    a1111 = {**module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
             **module("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, (3, 3)),
             **module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
             **module("lora_te_text_model_encoder_layers_0_self_attn_out_proj", 768, 768),
             "bundle_emb.mytok.string_to_param.*": torch.randn(2, 768, generator=g).half()}  # A1111's bundle
    save_file(a1111, str(tmp_path / "a1111.safetensors"),
              {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
               "ss_base_model_version": "sd_v1", "ss_output_name": "mytok"})
    info = inspect_lora(tmp_path / "a1111.safetensors")
    assert (info.layout, info.family, info.ranks, info.alphas) == ("kohya", "sd1", [8], [4.0])
    assert (info.unet_modules, info.te_modules, info.kinds) == (2, 2, {"attn2": 1, "conv": 1, "te": 2})
    assert info.embeddings == {"mytok": {"clip_l": [2, 768]}} and info.problems == []
    assert info.metadata["ss_output_name"] == "mytok"
    convert_lora(tmp_path / "a1111.safetensors", "diffusers", tmp_path / "a1111_d.safetensors")
    assert next(iter(read_lora(tmp_path / "a1111_d.safetensors")[0].values())).dtype == torch.float16
    assert (tmp_path / "a1111_d_emb.safetensors").is_file()  # the embedding travels beside it

    bad = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in a1111.items()
           if not k.endswith("conv1.alpha") and "out_proj" not in k}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    problems = "\n".join(inspect_lora(tmp_path / "bad.safetensors").problems)
    assert "conv1 has no .alpha" in problems and "lacks 'text_model_'" in problems and "metadata lacks" in problems
    assert "without any out_proj" in problems


# ---------------------------------------------------------------- CLI

def test_cli_tools_run(tiny_model, loras, tmp_path, capsys):
    from PIL import Image

    from sdlora.cli import main

    a, b = loras
    out = tmp_path / "o"
    assert main(["inspect", a, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == [4]
    assert main(["convert", a, "--to", "diffusers", "-o", str(out / "d.safetensors")]) == 0
    assert main(["mix", f"{a}:0.5", f"{b}:0.5", "--rank", "2", "-o", str(out / "mix.safetensors")]) == 0
    assert "overall relative error" in capsys.readouterr().out
    assert main(["resize", a, "--keep-energy", "0.95", "-o", str(out / "r.safetensors")]) == 0
    assert main(["merge", "--model", tiny_model, "--lora", f"{a}:1", "-o", str(out / "merged")]) == 0
    assert main(["extract", "--base", tiny_model, "--tuned", str(out / "merged"), "--rank", "4",
                 "-o", str(out / "x.safetensors")]) == 0
    assert main(["generate", "--model", tiny_model, "--lora", f"{a}:0.8", "--lora", b, "--prompt", "a red sks",
                 "--n", "2", "--steps", "2", "--width", "32", "--height", "32", "-o", str(out / "img")]) == 0
    pngs = sorted((out / "img").glob("*.png"))
    assert len(pngs) == 2 and "Seed: 1" in Image.open(pngs[1]).text["parameters"]
    assert main(["generate", "--model", tiny_model, "--lora", a, "--prompt", "a sks", "--n", "2", "--steps", "2",
                 "--width", "32", "--height", "32", "--grid", "--scales", "0,1", "--scheduler", "euler_a",
                 "-o", str(out / "grid")]) == 0
    sheet = Image.open(next((out / "grid").glob("*.png")))
    assert sheet.size == (70 + 2 * 32, 18 + 2 * 32) and "EulerAncestral" in sheet.text["parameters"]
    # safety: no overwriting without --overwrite, never an input, no pickles by default
    assert main(["resize", a, "--rank", "2", "-o", str(out / "r.safetensors")]) == 2
    assert main(["resize", a, "--rank", "2", "-o", a, "--overwrite"]) == 2
    (tmp_path / "m.ckpt").write_bytes(b"not read")
    assert main(["merge", "--model", str(tmp_path / "m.ckpt"), "--lora", a, "-o", str(out / "m2")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_parse_weighted():
    assert parse_weighted("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_weighted(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_weighted(r"C:\loras\a.safetensors:-1") == (r"C:\loras\a.safetensors", -1.0)
    assert parse_weighted("a.safetensors") == ("a.safetensors", 1.0)
    with pytest.raises(SdloraError):
        resize_lora("x.safetensors", "y.safetensors")


def test_load_lora_into_applies_the_scale(tiny_model, loras):
    from sdlora.loras.apply import load_lora_into

    half = fresh(tiny_model)
    load_lora_into(half, loras[0], scale=0.5)
    want = outputs(with_loras(tiny_model, [(loras[0], 0.5)]))
    assert (outputs(half) - want).abs().max() < 1e-5
    assert (want - outputs(with_loras(tiny_model, [(loras[0], 1.0)]))).abs().max() > 1e-3


def test_corrupt_adapter_metadata_is_an_error_not_a_wrong_scale(tiny_model, loras, tmp_path):
    from sdlora.errors import LoraFileError

    diff = convert_lora(loras[0], "diffusers", tmp_path / "d.safetensors")
    tensors, meta = read_lora(diff)
    write_lora(tmp_path / "bad.safetensors", tensors, {**meta, "lora_adapter_metadata": '{"unet.r": 4, '})
    with pytest.raises(LoraFileError, match="lora_adapter_metadata header is not valid JSON"):
        load(tmp_path / "bad.safetensors")
    with pytest.raises(LoraFileError, match="not valid JSON"):
        merge_into_model(tiny_model, [(str(tmp_path / "bad.safetensors"), 1.0)], tmp_path / "m")
    assert "not valid JSON" in "\n".join(inspect_lora(tmp_path / "bad.safetensors").problems)
