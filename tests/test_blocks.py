"""Per-block and per-layer rank, alpha and learning rate in sd-scripts' spelling.

The references are written out here from kohya-ss/sd-scripts networks/lora.py (`get_block_index`,
`get_block_lr_weight`, `get_block_dims_and_alphas`, `remove_block_dims_and_alphas`, `prepare_optimizer_params`: a
block's lr is the UNet lr times its weight) and networks/lora_flux.py (`network_reg_dims` / `network_reg_lrs`:
re.search over the layer's kohya name, first match wins); a trained file is loaded by diffusers' own loader."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import Capture, draw_images, fresh_pipeline, load_checked, tiny_config, unet_and_te_outputs

from sdlora import train
from sdlora.callbacks import Callbacks
from sdlora.config import Config, validate
from sdlora.errors import ConfigError
from sdlora.families import FAMILIES
from sdlora.loras.files import load_lora, read_lora
from sdlora.loras.layout import DENOISER_PREFIX, denoiser_namer, kohya_base
from sdlora.training.run.adapters import layer_ranks
from sdlora.training.run.blocks import lr_weights

RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def kohya_block(lora_name: str, is_sdxl: bool) -> int:
    """sd-scripts' get_block_index, written out: SD 1.x/2.x from diffusers-style names, SDXL from original ones."""
    if not is_sdxl:
        m = RE_UPDOWN.search(lora_name)
        if m:
            i, kind, j = int(m[2]), m[3], int(m[4])
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if m[1] == "down" else 13 + idx
        return 12 if "mid_block_" in lora_name else -1
    name = lora_name.removeprefix("lora_unet_")
    for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(start):
            return first + int(name.split("_")[2])
    return -1


def kohya_lr_weight(down, mid, up, threshold, n_down, n_mid, ends):
    """sd-scripts' get_block_lr_weight (with parse_block_lr_kwargs), written out."""
    def preset(text):
        name, _, base = text.partition("+")
        base = float(base) if base else 0.0
        steps = [i / (n_down - 1) for i in range(n_down)]
        return {"cosine": [math.sin(math.pi * s / 2) + base for s in reversed(steps)],
                "sine": [math.sin(math.pi * s / 2) + base for s in steps],
                "linear": [s + base for s in steps], "reverse_linear": [s + base for s in reversed(steps)],
                "zeros": [base] * n_down}[name]

    def parse(text, n, named):
        if text is None:
            return [1.0] * n
        values = [float(s) if s else 0.0 for s in text.split(",")] if ("," in text or not named) else preset(text)
        values = values + [1.0] * (n - len(values))
        return [w if w > threshold else 0 for w in values]
    return [1.0] * ends + parse(down, n_down, True) + parse(mid, n_mid, False) + parse(up, n_down, True) + [1.0] * ends


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_index_is_sd_scripts(family):
    """Every layer of the real SD 1.5 / SDXL UNet gets the entry sd-scripts gives its kohya name."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    import sdlora

    fam = FAMILIES[family]
    config = json.loads((Path(sdlora.__file__).parent / "assets" / family / "unet" / "config.json").read_text())
    with torch.device("meta"):  # the shipped SD 1.5 / SDXL UNet config, no weights
        unet = UNet2DConditionModel.from_config(config)
    namer = denoiser_namer(fam, unet.config)
    seen = set()
    for path, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not path.startswith(("down_", "mid_", "up_")):
            continue
        want = kohya_block(kohya_base(DENOISER_PREFIX, namer(path)), family == "sdxl")
        assert fam.kohya_blocks.index(path, unet.config) == want, path
        seen.add(want)
    n = len(fam.kohya_blocks.names)
    assert n == (25 if family == "sd1" else 23)
    # every entry but sd-scripts' LoRA-less ones (SD1: IN00; SDXL: BASE, IN00 = conv_in, OUT) holds layers
    assert seen == set(range(1, 25)) if family == "sd1" else seen == set(range(2, 22))


@pytest.mark.parametrize("family,down,mid,up,threshold", [
    ("sd1", "0,0.5,,1", "2", "cosine+0.25", 0.3), ("sd1", "sine", None, "1,1,1,1,1,1,1,1,1,1,1,0", 0.0),
    ("sdxl", "reverse_linear", "0.5,0,1", "linear+1", 0.0), ("sdxl", None, None, "zeros+0.5", 0.6)])
def test_lr_weights_are_sd_scripts(family, down, mid, up, threshold):
    blocks = FAMILIES[family].kohya_blocks
    cfg = Config()
    for name, value in (("down_lr_weight", down), ("mid_lr_weight", mid), ("up_lr_weight", up)):
        setattr(cfg.lora, name, value or "")
    cfg.lora.block_lr_zero_threshold = threshold
    want = kohya_lr_weight(down, mid, up, threshold, blocks.down, blocks.mid, blocks.ends)
    got = lr_weights(cfg.lora, blocks)
    assert len(got) == len(blocks.names) and got == pytest.approx(want)


# the tiny UNet (2 levels, 1 layer per block) in sd-scripts' list: IN01 (attention, resnet), IN03 (down-sampler),
# IN04 (resnet), MID, OUT00-OUT02 (resnets, up-sampler), OUT03-OUT04 (attention, resnet)
DIMS = [4] * 25
DIMS[1], DIMS[3], DIMS[4], DIMS[12], DIMS[16] = 2, 3, 5, 0, 8
CONV = [2] * 25
CONV[4], CONV[12], CONV[13] = 3, 0, 1  # block_dims 0 leaves a block's convs to conv_block_dims (sd-scripts)
UP = ["1"] * 12
UP[0] = UP[1] = UP[2] = "0"  # OUT00-OUT02: no LoRA at all


def block_config(model, data, out, fmt="kohya"):
    cfg = tiny_config(model, data, out, train__max_steps=3, lora__targets="all")
    lo = cfg.lora
    lo.block_dims, lo.conv_block_dims = ",".join(map(str, DIMS)), ",".join(map(str, CONV))
    lo.block_alphas = ",".join(f"{d / 2:g}" for d in DIMS)
    lo.up_lr_weight, lo.down_lr_weight = ",".join(UP), "1,0.5"  # IN01 at half the rate
    cfg.output.format = fmt
    return cfg


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_ranks_per_block_load_in_diffusers_and_reproduce_the_trainer(tiny_model, images, tmp_path, caplog, fmt):
    cfg = block_config(tiny_model, images, tmp_path / "o" / "b.safetensors", fmt)
    cap = Capture()
    train(cfg, cap)
    c = cap.state.components
    want, _ = unet_and_te_outputs(c.denoiser.eval(), c.text_encoders[0].eval(), c.tokenizers[0])

    mods = load_lora(cfg.output.path)[0]
    blocks = {b: kohya_block(b, False) for b in mods}
    assert 12 not in blocks.values() and not {13, 14, 15} & set(blocks.values())  # rank 0 and lr weight 0: no keys
    assert {1, 3, 4, 16, 17} <= set(blocks.values())
    # the trainer's layers (the kohya file carries one alpha and folds each layer's own into its lora_up)
    trained = {kohya_base("lora_unet", p): v for p, v in layer_ranks(c.denoiser).items()}
    assert len(trained) == len(mods)
    for base, m in mods.items():
        i = blocks[base]
        kernel = m.weight_shape[2:] if len(m.weight_shape) == 4 else (1, 1)
        rank, alpha = (CONV[i], cfg.lora_alpha * CONV[i] / cfg.lora.rank) if tuple(kernel) != (1, 1) else \
            (DIMS[i], DIMS[i] / 2)
        assert m.rank == rank, base
        assert trained[base] == (rank, pytest.approx(alpha)), base
    meta = read_lora(cfg.output.path)[1]
    args = json.loads(meta["ss_network_args"])  # sd-scripts' keys, values as typed
    assert args["block_dims"] == cfg.lora.block_dims and args["up_lr_weight"] == cfg.lora.up_lr_weight
    assert args["conv_block_dims"] == cfg.lora.conv_block_dims and args["down_lr_weight"] == "1,0.5"
    assert all(isinstance(v, str) for v in args.values())

    pipe = fresh_pipeline(tiny_model)
    base, _ = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    load_checked(pipe, cfg.output.path, caplog, has_te=False)
    got, _ = unet_and_te_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (got - want).abs().max() < 1e-5 and (got - base).abs().max() > 1e-4


def setup_state(cfg):
    from sdlora.training.loop import prepare_output
    from sdlora.training.run.setup import make_accelerator, setup

    validate(cfg)
    prepare_output(cfg)
    return setup(cfg, make_accelerator(cfg), Callbacks())


def group_lrs(state) -> dict[str, float]:
    """{module path: lr} from the optimizer's parameter groups."""
    lr_of = {id(p): g["lr"] for g in state.optim.main.param_groups for p in g["params"]}
    out = {}
    for name, p in state.components.denoiser.named_parameters():
        if id(p) in lr_of:
            out.setdefault(re.split(r"\.lora_", name)[0], set()).add(lr_of[id(p)])
    assert all(len(v) == 1 for v in out.values())
    return {k: v.pop() for k, v in out.items()}


def test_block_learning_rates_reach_the_optimizer_as_sd_scripts_computes_them(tiny_model, images, tmp_path):
    cfg = block_config(tiny_model, images, tmp_path / "o" / "b.safetensors")
    cfg.lora.mid_lr_weight, cfg.lora.block_dims, cfg.lora.block_alphas = "0.25", "", ""
    state = setup_state(cfg)
    weights = kohya_lr_weight("1,0.5", "0.25", ",".join(UP), 0.0, 12, 1, 0)
    lrs = group_lrs(state)
    assert lrs
    for path, lr in lrs.items():  # prepare_optimizer_params: unet_lr x get_lr_weight(block index)
        assert lr == pytest.approx(cfg.optim.lr * weights[kohya_block(kohya_base("lora_unet", path), False)]), path
    assert not any(p.startswith("up_blocks.0.") for p in lrs)  # weight 0: no LoRA, so no parameters
    assert {round(lr / cfg.optim.lr, 4) for lr in lrs.values()} == {1.0, 0.5, 0.25}
    assert state.optim.main.param_groups[0]["lr"] == cfg.optim.lr  # the logged lr is the UNet's own


def test_an_alpha_of_zero_is_the_rank_as_sd_scripts_reads_it(tiny_model, images, tmp_path):
    """sd-scripts' LoRAModule: `alpha = lora_dim if alpha is None or alpha == 0 else alpha` (scale 1), for block_alphas,
    conv_block_alphas and sdlora's network_reg_alphas alike; a LoRA scaled to nothing would train nothing."""
    def scales(state):
        return {n: m.scaling["default"] for n, m in state.components.denoiser.named_modules()
                if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}

    cfg = block_config(tiny_model, images, tmp_path / "o" / "z.safetensors")
    cfg.lora.block_alphas = ",".join("0" for _ in DIMS)
    cfg.lora.conv_block_alphas = ",".join("0" for _ in CONV)
    got = scales(setup_state(cfg))
    assert got and set(got.values()) == {1.0}, got  # alpha / rank with alpha = rank
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "r.safetensors", lora__targets="all")
    cfg.lora.network_reg_dims, cfg.lora.network_reg_alphas = "attn2=6", "attn2=0"
    got = scales(setup_state(cfg))
    assert {v for n, v in got.items() if "attn2" in n} == {1.0}
    assert {v for n, v in got.items() if "attn2" not in n} == {cfg.lora_alpha / cfg.lora.rank}


def test_regexes_set_rank_alpha_and_lr_on_sd3_joint_blocks(sd35m, images, tmp_path):
    """network_reg_*: on SD3's diffusers paths or its kohya (original MMDiT, fused q/k/v) names, first match wins."""
    cfg = tiny_config(sd35m, images, tmp_path / "o" / "r.safetensors", train__max_steps=2, lora__targets="attn_ff")
    lo = cfg.lora
    lo.network_reg_dims = r"joint_blocks_1_context_block=2,transformer_blocks\.0\.attn\.to_[qk]$=8,ff_context=0"
    lo.network_reg_alphas = r"to_out=3"
    lo.network_reg_lrs = r"joint_blocks_2_=5e-4,transformer_blocks\.0\.=2e-3"
    state = setup_state(cfg)
    ranks, lrs = layer_ranks(state.components.denoiser), group_lrs(state)
    assert ranks["transformer_blocks.0.attn.to_q"] == (8, 8.0) and ranks["transformer_blocks.0.attn.to_v"][0] == 4
    assert ranks["transformer_blocks.1.attn.add_k_proj"] == (2, 2.0)  # the fused context_block qkv's part
    assert ranks["transformer_blocks.1.attn.to_k"] == (4, 4.0)
    assert ranks["transformer_blocks.2.attn.to_out.0"] == (4, 3.0)
    context_ff = {p: r for p, r in ranks.items() if "ff_context" in p}  # 0, but block 1's took the first match: 2
    assert context_ff and all(p.startswith("transformer_blocks.1.") and r == (2, 2.0) for p, r in context_ff.items())
    assert any(".ff." in p for p in ranks)
    assert {p for p, lr in lrs.items() if lr == 5e-4} == {p for p in ranks if p.startswith("transformer_blocks.2.")}
    assert all(lrs[p] == 2e-3 for p in ranks if p.startswith("transformer_blocks.0."))
    assert all(lrs[p] == cfg.optim.lr for p in ranks if p.startswith("transformer_blocks.1."))
    state.batches.close()
    train(cfg)
    mods = load_lora(cfg.output.path)[0]  # the kohya SD3 file, fused and split back: the same ranks
    assert mods["lora_unet_transformer_blocks_0_attn_to_q"].rank == 8
    assert mods["lora_unet_transformer_blocks_1_attn_add_k_proj"].rank == 2
    assert json.loads(read_lora(cfg.output.path)[1]["ss_network_args"])["network_reg_lrs"] == lo.network_reg_lrs


def test_sdxl_block_dims_follow_the_original_block_names(tiny_xl, tmp_path):
    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_xl, data, tmp_path / "o" / "x.safetensors", lora__targets="attn")
    dims = list(range(1, 24))  # a different rank in every entry
    cfg.lora.block_dims = ",".join(map(str, dims))
    state = setup_state(cfg)
    namer = denoiser_namer(FAMILIES["sdxl"], state.components.denoiser.config)
    ranks = layer_ranks(state.components.denoiser)
    assert ranks
    for path, (rank, alpha) in ranks.items():
        i = kohya_block(kohya_base("lora_unet", namer(path)), True)
        assert (rank, alpha) == (dims[i], float(dims[i])), path


@pytest.mark.parametrize("change,says", [
    (dict(block_dims="4,4"), "needs 25 values"),
    (dict(down_lr_weight="cosine,x"), "is not a number"),
    (dict(up_lr_weight="wavy"), "neither a comma-separated list"),
    (dict(network_reg_dims="attn(=4"), "not a regular expression"),
    (dict(network_reg_lrs="attn"), "REGEX=VALUE"),
    (dict(block_alphas="1"), "need block_dims"),
    (dict(network_args="block_dims=1,2"), "has an option of its own"),
    (dict(block_lr_zero_threshold=0.1), "applies to down/mid/up_lr_weight"),
    (dict(down_lr_weight="0.5"), "comma-separated values"),  # sd-scripts: an unknown preset, no effect
])
def test_bad_block_settings_are_one_line_errors(tiny_model, images, tmp_path, change, says):
    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "e.safetensors")
    for k, v in change.items():
        setattr(cfg.lora, k, v)
    with pytest.raises(ConfigError, match=says):
        validate(cfg)
        train(cfg)


def test_block_lists_need_a_unet_and_prodigy_one_rate(sd35m, images, tmp_path):
    cfg = tiny_config(sd35m, images, tmp_path / "o" / "e.safetensors", lora__block_dims="4")
    with pytest.raises(ConfigError, match="network_reg_dims"):
        train(cfg)
    cfg = tiny_config(sd35m, images, tmp_path / "o" / "e.safetensors", lora__down_lr_weight="1,0",
                      optim__optimizer="prodigy")
    with pytest.raises(ConfigError, match="prodigy takes one learning rate"):
        validate(cfg)
