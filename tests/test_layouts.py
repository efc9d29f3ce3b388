"""Every LoRA layout that diffusers, ComfyUI or AUTOMATIC1111 load is read correctly: the same weights written in each
layout (from the published key rules) merge into the same model as the kohya file; a layout sdlora does not read is
refused naming a key, and never read as zero modules."""

from __future__ import annotations

import json

import pytest
import torch
from test_tools import TE_A, UNET_A, fresh, outputs, random_modules, with_loras

from sdlora import convert_lora, inspect_lora, merge_into_model, mix_loras, resize_lora
from sdlora.errors import LoraFileError
from sdlora.loras.files import load_lora, write_lora
from sdlora.loras.layout import kohya_tensors, te_path

ALPHA, RANK = 2.0, 4
# keys of attention layers only: the older diffusers styles could express nothing else
ATTN = [p for p in UNET_A if ".attn" in p]


def modules(pipe):
    return random_modules(pipe, ATTN, TE_A, RANK, ALPHA, seed=3)


def by_path(pipe):
    """(part, module path, LoraModule) of the test LoRA."""
    from sdlora.loras.layout import kohya_base

    out = []
    for part, prefix, paths in (("unet", "lora_unet", ATTN), ("text_encoder", "lora_te", TE_A)):
        mods = modules(pipe)
        out += [(part, p, mods[kohya_base(prefix, p)]) for p in paths]
    return out


def peft(pipe, with_metadata: bool):
    """diffusers/PEFT: <part>.<path>.lora_A/B.weight; alphas in lora_adapter_metadata, or folded into B."""
    t, meta = {}, {}
    for part, path, m in by_path(pipe):
        key = f"{part}.{te_path(path) if part == 'text_encoder' else path}"
        t[f"{key}.lora_A.weight"] = m.down
        t[f"{key}.lora_B.weight"] = m.up if with_metadata else m.up * m.scale
    if with_metadata:  # as diffusers' save_lora_weights writes it: each part's LoraConfig under its prefix
        meta["lora_adapter_metadata"] = json.dumps(
            {"unet.r": RANK, "unet.lora_alpha": ALPHA, "unet.target_modules": ATTN, "text_encoder.r": RANK,
             "text_encoder.lora_alpha": ALPHA, "text_encoder.target_modules": TE_A})
    return t, meta


TE_PROCESSOR = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def old_diffusers(pipe, processors: bool):
    """diffusers' 2023 styles (the key rules of diffusers 0.42's utils/state_dict_utils.py): UNet
    <path>.lora.down/up.weight and text encoder <path>.lora_linear_layer.down/up.weight; or the attention-processor
    era: UNet <attention>.processor.to_q_lora.down.weight, text encoder <attention>.to_q_lora.down.weight (q/k/v/out)
    with the MLP as lora_linear_layer. alpha folded into up (those files have no alphas)."""
    t = {}
    for part, path, m in by_path(pipe):
        attention, _, name = path.rpartition(".")
        if part == "unet" and processors:
            if name == "0":  # to_out.0
                attention, name = attention.rpartition(".")[0], "to_out"
            stem = f"unet.{attention}.processor.{name}_lora"
        elif part == "unet":
            stem = f"unet.{path}.lora"
        elif processors and name in TE_PROCESSOR:
            stem = f"text_encoder.{te_path(attention)}.{TE_PROCESSOR[name]}_lora"
        else:
            stem = f"text_encoder.{te_path(path)}.lora_linear_layer"
        t[f"{stem}.down.weight"], t[f"{stem}.up.weight"] = m.down, m.up * m.scale
    return t, {}


LAYOUTS = {
    "peft with adapter metadata": lambda p: peft(p, True),
    "peft, alpha folded": lambda p: peft(p, False),
    "diffusers lora.down and lora_linear_layer": lambda p: old_diffusers(p, False),
    "diffusers attention processors": lambda p: old_diffusers(p, True),
}


@pytest.fixture(scope="module")
def kohya_result(tiny_model, tmp_path_factory):
    pipe = fresh(tiny_model)
    d = tmp_path_factory.mktemp("layouts")
    path = write_lora(d / "kohya.safetensors", kohya_tensors(modules(pipe), torch.float32),
                      {"ss_network_module": "networks.lora"})
    merged = merge_into_model(tiny_model, [(str(path), 0.8)], d / "merged_kohya")
    return path, outputs(fresh(str(merged)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_merges_like_the_kohya_file(tiny_model, kohya_result, tmp_path, layout):
    kohya, want = kohya_result
    tensors, meta = LAYOUTS[layout](fresh(tiny_model))
    path = write_lora(tmp_path / "l.safetensors", tensors, meta)
    mods = load_lora(path)[0]
    assert len(mods) == len(ATTN) + len(TE_A)
    merged = merge_into_model(tiny_model, [(str(path), 0.8)], tmp_path / "merged")
    assert (outputs(fresh(str(merged))) - want).abs().max() < 1e-4
    # the key rules are diffusers' own: its loader reads this file to the same model
    assert (outputs(with_loras(tiny_model, [(str(path), 0.8)])) - want).abs().max() < 1e-4
    info = inspect_lora(path)
    assert (info.unet_modules, info.te_modules) == (len(ATTN), len(TE_A)) and info.layout == "diffusers"
    # every tool reads it: convert, mix and resize write the same update as from the kohya file
    back = convert_lora(path, "kohya", tmp_path / "k.safetensors")
    mix_loras([(str(path), 1.0)], tmp_path / "m.safetensors")
    resize_lora(path, tmp_path / "r.safetensors", rank=RANK)
    ref = load_lora(kohya)[0]
    for out in (back, tmp_path / "m.safetensors", tmp_path / "r.safetensors"):
        got = load_lora(out)[0]
        assert got.keys() == ref.keys()
        for b, m in ref.items():
            assert (got[b].delta() - m.delta()).abs().max() < 1e-4, (out, b)


@pytest.mark.parametrize("key,says", [
    ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", "Tucker"),
    ("unet.down_blocks.0.attentions.0.proj_in.weight", "in no LoRA layout"),
    ("transformer_blocks.0.attn.to_q.lora_A.weight", "expected a kohya name"),
    ("something_else.lora_down.weight", "expected a kohya name"),
])
def test_unknown_keys_are_refused_by_name(tmp_path, key, says):
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{base}.lora_down.weight": torch.randn(2, 32), f"{base}.lora_up.weight": torch.randn(32, 2),
               key: torch.randn(2, 2)}
    path = write_lora(tmp_path / "odd.safetensors", tensors, {})
    with pytest.raises(LoraFileError, match=says) as err:
        load_lora(path)
    assert key in str(err.value) and "\n" not in str(err.value)
    for tool in (lambda: convert_lora(path, "diffusers", tmp_path / "c.safetensors"),
                 lambda: mix_loras([(str(path), 1.0)], tmp_path / "m.safetensors"),
                 lambda: resize_lora(path, tmp_path / "r.safetensors", rank=1)):
        with pytest.raises(LoraFileError):
            tool()
    assert not list(tmp_path.glob("[cmr].safetensors"))  # no file written
    assert any(key in p for p in inspect_lora(path).problems)
