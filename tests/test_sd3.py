"""SD3 / SD3.5: training by flow matching on tiny MMDiT pipelines (with and without T5, one with SD3.5 Medium's dual
attention and qk-norm), files in the original-MMDiT kohya layout and diffusers' SD3 layout, checked against
diffusers' loader and converter and ComfyUI's key mapping."""

from __future__ import annotations

import pytest
import torch
from conftest import Capture, draw_images, load_checked, tiny_config

from sdlora import train
from sdlora.loras.files import read_lora

PROMPTS = ("a red sks", "a blue dog")


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_sd3_pipeline

    return str(save_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", "sd3", t5=False))


def pipeline(folder):
    from pathlib import Path

    from diffusers import StableDiffusion3Pipeline

    none = {} if (Path(folder) / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_outputs(transformer, clips, tokenizers, t5, prompts=PROMPTS):
    """The transformer's prediction and the conditioning (hidden, pooled) of fixed prompts at fixed inputs, through
    sdlora's SD3 conditioning (which mirrors StableDiffusion3Pipeline.encode_prompt)."""
    from sdlora.families.sd3 import CONDITIONING

    with torch.no_grad():
        cond = CONDITIONING.encode(tokenizers, [*clips, t5], list(prompts), "cpu")
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = CONDITIONING.predict(transformer, x, torch.tensor([300.0, 800.0]), cond)
    return out, cond["hidden"], cond["pooled"]


def t5_of(pipe, length=256):
    from sdlora.families.sd3 import T5Text

    return T5Text(pipe.tokenizer_3, pipe.text_encoder_3, length, pipe.transformer.config.joint_attention_dim)


def pipe_outputs(pipe, length=256):
    return sd3_outputs(pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                       t5_of(pipe, length))


def test_encode_matches_the_pipelines_encode_prompt(sd35m):
    """sdlora's SD3 conditioning is StableDiffusion3Pipeline.encode_prompt's (with T5 and without)."""
    from sdlora.families.sd3 import CONDITIONING

    pipe = pipeline(sd35m)
    for t5 in (t5_of(pipe, 40), t5_of(pipe.__class__(**{**pipe.components, "text_encoder_3": None}), 40)):
        p = pipe if t5.model is not None else pipe.__class__(**{**pipe.components, "text_encoder_3": None})
        want = p.encode_prompt(list(PROMPTS), None, None, do_classifier_free_guidance=False, max_sequence_length=40)
        got = CONDITIONING.encode([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2, t5],
                                  list(PROMPTS), "cpu")
        torch.testing.assert_close(got["hidden"], want[0])
        torch.testing.assert_close(got["pooled"], want[2])


def _train_sd3(model, tmp_path, fmt="kohya", **options):
    data = draw_images(tmp_path / "imgs", n=3, sizes=((32, 32), (48, 32)))
    cfg = tiny_config(model, data, tmp_path / "o" / "sd3.safetensors", train__max_steps=3)
    cfg.lora.train_text_encoder, cfg.lora.text_encoder_2_lr, cfg.output.format = True, 5e-4, fmt
    for key, value in options.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    cap = Capture()
    train(cfg, cap)
    return cfg, cap.state


@pytest.mark.parametrize("which,fmt,targets", [("sd35m", "kohya", "all"), ("no_t5", "diffusers", "auto")])
def test_sd3_lora_reproduces_the_trainer_in_diffusers(sd35m, sd3_no_t5, tmp_path, caplog, which, fmt, targets):
    """The trained file (or its diffusers-layout twin), loaded by load_lora_weights into a fresh
    StableDiffusion3Pipeline, gives the trainer's transformer and text-encoder outputs; scale 0 gives the base."""
    from sdlora import convert_lora

    model = sd35m if which == "sd35m" else sd3_no_t5
    extra = dict(sample__prompts=["a red sks"], sample__steps=2, validation__split=0.34) if which == "sd35m" else {}
    cfg, state = _train_sd3(model, tmp_path, fmt, lora__targets=targets, model__t5=which == "sd35m", **extra)
    c = state.components
    assert c.family.name == "sd3" and c.prediction_type == "flow"
    assert list(state.lora_states()) == ["transformer", "text_encoder", "text_encoder_2"]
    assert [g["lr"] for g in state.optim.main.param_groups] == [1e-3, 1e-3, 5e-4]
    frozen = c.frozen_text[0]
    assert frozen.model is None and (frozen.released == (which == "sd35m"))  # T5 cached, then let go
    if extra:  # samples (from the cached T5) and the validation loss after T5 was released
        assert len(list((tmp_path / "o" / "sd3_samples").glob("*.png"))) == 2
        assert state.validation is not None and state.validation.best.step == 3
    fresh = pipeline(model)
    t5 = t5_of(fresh)
    want = sd3_outputs(c.denoiser.eval(), [e.eval() for e in c.text_encoders], c.tokenizers, t5)
    base = pipe_outputs(fresh)

    tensors, meta = read_lora(cfg.output.path)
    assert meta["sdlora_family"] == "sd3" and meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_base_model_version"] == ("5-medium" if which == "sd35m" else "medium")
    assert meta["modelspec.architecture"] == ("stable-diffusion-3-5-medium/lora" if which == "sd35m"
                                              else "stable-diffusion-3-medium/lora")
    assert meta["sdlora_t5"] == ('{"used": true, "max_length": 256}' if which == "sd35m" else
                                 '{"used": false, "max_length": 256}')
    twin = cfg.output.path
    if fmt == "kohya":
        bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
        assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
                "lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_final_layer_adaLN_modulation_1",
                "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1", "lora_unet_x_embedder_proj"} <= bases
        assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (96, 12)
        assert float(tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 12.0  # 3 x alpha: alpha/rank kept
        assert float(tensors["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 4.0
        assert any(b.startswith("lora_te1_text_model_encoder_layers_") for b in bases)
        assert any(b.startswith("lora_te2_text_model_encoder_layers_") for b in bases)
        twin = convert_lora(cfg.output.path, "diffusers", tmp_path / "twin.safetensors")
    else:
        assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in tensors)
    pipe = pipeline(model)
    load_checked(pipe, twin, caplog)
    got = pipe_outputs(pipe)
    for g, w, b in zip(got, want, base):
        assert (g - w).abs().max() < 1e-5
        assert (g - b).abs().max() > 1e-5  # the transformer, CLIP-L and CLIP-G all changed
    pipe.set_adapters(["t"], adapter_weights=[0.0])
    for g, b in zip(pipe_outputs(pipe), base):
        assert (g - b).abs().max() < 1e-6


def test_sd3_single_file_trains_offline_and_loads_in_diffusers(sd35m, tmp_path, caplog, no_network):
    """An all-in-one SD3.5-Medium-shaped single file (Stability's layout, T5 included) trains with networking off;
    the file's diffusers twin reproduces the trainer in a pipeline loaded from the folder."""
    from sdlora import convert_lora
    from sdlora.single_file import save_single_file

    single = save_single_file(sd35m, tmp_path / "sd35m.safetensors")
    cfg, state = _train_sd3(str(single), tmp_path)
    c = state.components
    assert c.family.name == "sd3" and list(c.denoiser.config.dual_attention_layers) == [0]
    fresh = pipeline(sd35m)
    want = sd3_outputs(c.denoiser.eval(), c.text_encoders, c.tokenizers, t5_of(fresh))
    pipe = pipeline(sd35m)
    load_checked(pipe, convert_lora(cfg.output.path, "diffusers", tmp_path / "d.safetensors"), caplog)
    for g, w in zip(pipe_outputs(pipe), want):
        assert (g - w).abs().max() < 1e-5


def _strip_text_encoders(single, out):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(single), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith("text_encoders.")}, str(out),  # noqa: SIM118
                  metadata=f.metadata())
    return out


def test_sd3_file_without_text_encoders_takes_them_from_a_folder(sd35m, tmp_path, no_network):
    """An MMDiT + VAE file gets its encoders from --text-encoders (a diffusers folder, or ComfyUI-style clip_l /
    clip_g / t5xxl files with tokenizer folders); without them, or without T5's tokenizer, one line says what to
    pass."""
    import json

    from safetensors.torch import save_file

    from sdlora.errors import ModelError
    from sdlora.models import load_components
    from sdlora.single_file import save_single_file

    bare = _strip_text_encoders(save_single_file(sd35m, tmp_path / "full.safetensors"), tmp_path / "bare.safetensors")
    with pytest.raises(ModelError, match=r"has no CLIP-L text encoder: pass --text-encoders FOLDER"):
        load_components(str(bare))
    fresh = pipeline(sd35m)
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    for part, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl_fp16")):
        model = getattr(fresh, part)
        sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
        save_file(sd, str(comfy / f"{name}.safetensors"),
                  metadata={"sdlora.diffusers_configs": json.dumps({part: model.config.to_dict()})})
    for tok in ("tokenizer", "tokenizer_2"):
        getattr(fresh, tok).save_pretrained(comfy / tok)
    with pytest.raises(ModelError, match=r"T5 needs its tokenizer.*--text-encoders FOLDER.*or --no-t5"):
        load_components(str(bare), text_encoders=str(comfy))
    fresh.tokenizer_3.save_pretrained(comfy / "tokenizer_3")
    want = pipe_outputs(fresh)
    for folder in (sd35m, comfy):
        c = load_components(str(bare), text_encoders=str(folder))
        got = sd3_outputs(c.denoiser, c.text_encoders, c.tokenizers, c.frozen_text[0])
        for g, w in zip(got, want):
            assert (g - w).abs().max() < 1e-6
    c = load_components(str(bare), text_encoders=str(sd35m), t5=False)
    assert not c.frozen_text[0].present  # --no-t5: zero T5 embeddings


@pytest.fixture(scope="module")
def trained(sd35m, tmp_path_factory):
    """One SD3.5-Medium-shaped LoRA on every layer kind (targets all: fused q/k/v, swapped adaLN, convolution) and
    both CLIP encoders, with its diffusers twin."""
    from sdlora import convert_lora

    tmp = tmp_path_factory.mktemp("trained")
    cfg, _ = _train_sd3(sd35m, tmp, lora__targets="all")
    twin = convert_lora(cfg.output.path, "diffusers", tmp / "twin.safetensors")
    return cfg.output.path, str(twin)


def _comfy_merged(pipe, path):
    """The pipeline's weights patched as ComfyUI does it, then read back by diffusers' own converter: the LoRA's
    kohya names mapped by ComfyUI's generic rule ('lora_unet_' + the original key with '.' as '_'; 'lora_te1_' /
    'lora_te2_' + the CLIP key), W += alpha / lora_down.shape[0] * up @ down on the original (fused) weights."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from sdlora.families.sd3 import original_transformer

    tensors, _ = read_lora(path)
    parts = {"lora_unet_": {k[len("model.diffusion_model."):]: v.clone() for k, v in
                            original_transformer(pipe.transformer.state_dict()).items()},
             "lora_te1_": dict(pipe.text_encoder.state_dict()), "lora_te2_": dict(pipe.text_encoder_2.state_dict())}
    key_map = {prefix + k[:-len(".weight")].replace(".", "_"): (prefix, k)
               for prefix, sd in parts.items() for k in sd if k.endswith(".weight")}
    bases = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    for base in bases:
        prefix, key = key_map[base]  # every module of the file has its layer in ComfyUI's map
        down, up = tensors[f"{base}.lora_down.weight"].float(), tensors[f"{base}.lora_up.weight"].float()
        w = parts[prefix][key]
        parts[prefix][key] = w + (float(tensors[f"{base}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
                                  ).reshape(w.shape)
    pipe.transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(parts["lora_unet_"]))
    pipe.text_encoder.load_state_dict(parts["lora_te1_"])
    pipe.text_encoder_2.load_state_dict(parts["lora_te2_"])
    return pipe


def test_default_file_is_the_mmdit_layout_comfyui_maps(sd35m, trained, tmp_path, caplog):
    """The kohya file's layers are keys of the original MMDiT as ComfyUI maps them, and patching the original
    weights with it (ComfyUI's way) equals the runtime LoRA of its diffusers twin in diffusers."""
    kohya, twin = trained
    runtime = pipeline(sd35m)
    load_checked(runtime, twin, caplog)
    comfy = _comfy_merged(pipeline(sd35m), kohya)
    for g, w in zip(pipe_outputs(comfy), pipe_outputs(runtime)):
        assert (g - w).abs().max() < 1e-4


def test_convert_round_trips_are_lossless(trained, tmp_path):
    """kohya -> diffusers -> kohya and diffusers -> kohya -> diffusers give back the same tensors and keys."""
    from sdlora import convert_lora

    kohya, twin = trained
    back = convert_lora(twin, "kohya", tmp_path / "back.safetensors")
    again = convert_lora(back, "diffusers", tmp_path / "again.safetensors")
    for x, y in ((kohya, back), (twin, again)):
        a, b = read_lora(x)[0], read_lora(y)[0]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_a_kohya_trained_fused_lora_splits_and_fuses_back_exactly():
    """sd-scripts trains one LoRA on the fused qkv (one down, three up thirds): read, it is three LoRAs sharing that
    down; written, it is the same tensors again. A split_qkv (block-diagonal) file splits into its blocks."""
    from sdlora.loras.layout import kohya_tensors, parse_modules
    from sdlora.loras.mmdit import fuse
    from sdlora.loras.modules import LoraModule

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=g), torch.randn(96, 4, generator=g)
    file = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
            "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(2.0)}
    mods = parse_modules(file)
    assert sorted(mods) == [f"lora_unet_transformer_blocks_0_attn_to_{x}" for x in "kqv"]
    delta = torch.cat([mods[f"lora_unet_transformer_blocks_0_attn_to_{x}"].delta() for x in "qkv"])
    torch.testing.assert_close(delta, 2.0 / 4 * up @ down)  # as ComfyUI applies it to the fused weight
    back = kohya_tensors(mods, torch.float32)
    assert back.keys() == file.keys() and all(torch.equal(back[k], file[k].float()) for k in file)

    parts = {j: LoraModule(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 2.0) for j in range(3)}
    fused = fuse(parts)
    assert fused.rank == 6 and fused.alpha == 6.0
    split = parse_modules({"lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight": fused.down,
                           "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_up.weight": fused.up,
                           "lora_unet_joint_blocks_0_context_block_attn_qkv.alpha": torch.tensor(6.0)})
    for j, x in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        m = split[f"lora_unet_transformer_blocks_0_attn_{x}"]
        assert m.rank == 2 and torch.equal(m.down, parts[j].down) and torch.equal(m.up, parts[j].up)


def test_merge_mix_resize_extract_inspect_generate(sd35m, tiny_model, trained, tmp_path, caplog):
    from sdlora import extract_lora, generate, inspect_lora, merge_into_model, mix_loras, resize_lora
    from sdlora.errors import LoraFileError
    from sdlora.loras.files import load_lora
    from sdlora.models import load_model

    kohya, twin = trained
    runtime = pipeline(sd35m)
    load_checked(runtime, twin, caplog)
    runtime.set_adapters(["t"], adapter_weights=[0.7])
    want = pipe_outputs(runtime)
    merged = pipeline(merge_into_model(sd35m, [(kohya, 0.7)], tmp_path / "merged"))
    for g, w in zip(pipe_outputs(merged), want):
        assert (g - w).abs().max() < 1e-4
    single = load_model(merge_into_model(sd35m, [(kohya, 0.7)], tmp_path / "merged.safetensors"))
    assert single.family.name == "sd3"
    for g, w in zip(sd3_outputs(single.denoiser, single.text_encoders, single.tokenizers, single.frozen_text[0]),
                    want):
        assert (g - w).abs().max() < 1e-4

    mix_loras([(kohya, 0.5), (twin, 0.25)], tmp_path / "mix.safetensors")
    mods, mixed = load_lora(kohya)[0], load_lora(tmp_path / "mix.safetensors")[0]
    assert mixed.keys() == mods.keys()
    for name, m in mods.items():  # exact: 0.75 x the LoRA, layer by layer
        torch.testing.assert_close(mixed[name].delta(), 0.75 * m.delta(), rtol=1e-3, atol=1e-6)
    assert resize_lora(kohya, tmp_path / "r.safetensors", rank=4).overall_error < 1e-6
    full = merge_into_model(sd35m, [(kohya, 1.0)], tmp_path / "full")
    report = extract_lora(sd35m, full, 4, tmp_path / "x.safetensors")
    assert report.overall_error < 1e-3
    assert read_lora(tmp_path / "x.safetensors")[1]["ss_base_model_version"] == "5-medium"

    for path, layout, loads in ((kohya, "kohya", "ComfyUI, Forge"), (twin, "diffusers", "diffusers, ComfyUI")):
        info = inspect_lora(path)
        assert (info.family, info.layout, info.problems) == ("sd3", layout, [])
        assert info.loads_in.startswith(loads)
    images = generate(sd35m, [(kohya, 0.8)], "a red sks", steps=2, output_dir=tmp_path / "gen", width=32, height=32,
                      grid=True, scales=[0, 1])
    assert len(images) == 1

    with pytest.raises(LoraFileError, match="match no layer of the model"):
        merge_into_model(tiny_model, [(kohya, 1.0)], tmp_path / "sd1")  # an SD3 LoRA on SD1
    sd1_lora = _sd1_lora(tiny_model, tmp_path)
    with pytest.raises(LoraFileError, match="match no layer of the model"):
        merge_into_model(sd35m, [(sd1_lora, 1.0)], tmp_path / "sd3")  # and the reverse


def _sd1_lora(model, tmp_path):
    cfg = tiny_config(model, draw_images(tmp_path / "sd1imgs", n=1), tmp_path / "sd1" / "l.safetensors",
                      train__max_steps=1)
    return train(cfg).output


def test_stop_and_resume_is_bit_exact_and_the_loss_falls(sd3_no_t5, tmp_path):
    import json

    from conftest import StopAt

    from sdlora.callbacks import Commands

    data = draw_images(tmp_path / "imgs", n=3, sizes=((32, 32), (48, 32)))
    kw = dict(train__max_steps=6, train__batch_size=2, lora__dropout=0.1, train__timestep_sampling="logit-normal",
              train__flow_weighting="cosmap")
    full = tiny_config(sd3_no_t5, data, tmp_path / "a" / "l.safetensors", **kw)
    full.model.t5, full.lora.train_text_encoder, full.augment.caption_dropout = False, True, 0.3
    train(full)
    part = tiny_config(sd3_no_t5, data, tmp_path / "b" / "l.safetensors", **kw)
    part.model, part.lora, part.augment = full.model, full.lora, full.augment
    commands = Commands()
    assert train(part, StopAt(commands, 3), commands).steps == 3
    assert train(part, resume=True).steps == 6
    a, b = read_lora(full.output.path)[0], read_lora(part.output.path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the loss falls: a few dozen steps on one image at a fixed caption, measured at fixed noise and timesteps (the
    # validation loss: the preconditioned step loss, sigma^2 times the velocity error, swings with each step's sigma)
    one = draw_images(tmp_path / "one", n=1)
    cfg = tiny_config(sd3_no_t5, one, tmp_path / "c" / "l.safetensors", train__max_steps=40, optim__lr=5e-3,
                      validation__data=str(one), validation__every=4)
    cfg.model.t5, cfg.lora.rank = False, 8
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "c" / "l_log.jsonl").read_text().splitlines()]
    val = [x["val_loss"] for x in lines if "val_loss" in x]
    assert len(val) == 10 and val[-1] < 0.8 * val[0]


def test_shuffled_tags_keep_t5_and_its_cache_bounded(sd35m, tmp_path, monkeypatch):
    """Captions that change every step keep T5 in memory and encode each as it comes, exactly as T5 itself does,
    without keeping it: the cache holds the fixed texts only, however many steps run."""
    from sdlora.callbacks import Callbacks
    from sdlora.training.loop import optimizer_step
    from sdlora.training.run.setup import make_accelerator, setup

    data = draw_images(tmp_path / "imgs", n=2, captions=False)
    cfg = tiny_config(sd35m, data, tmp_path / "o" / "sd3.safetensors", train__max_steps=6)
    cfg.data[0].prompt, cfg.data[0].shuffle_tags = "a, red, round, sks, thing", True
    state = setup(cfg, make_accelerator(cfg), Callbacks())
    t5 = state.components.frozen_text[0]
    assert t5.model is not None and not t5.released and t5.closed
    fixed = dict(t5.cache)
    seen, encode = [], type(t5).__call__
    monkeypatch.setattr(type(t5), "__call__", lambda self, captions, device: (seen.extend(captions),
                                                                               encode(self, captions, device))[1])
    for step in range(6):
        optimizer_step(state, step)
    monkeypatch.undo()
    varied = {c for c in seen if c not in fixed}
    assert len(varied) >= 2  # the tags were shuffled into new captions
    assert t5.cache.keys() == fixed.keys()  # and none of them was kept
    caption = sorted(varied)[0]
    ids = t5.tokenizer([caption], padding="max_length", max_length=t5.length, truncation=True,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(t5([caption], "cpu"), t5.model(ids)[0].float())


@pytest.mark.parametrize("options,message", [
    ({"train__min_snr_gamma": 5.0}, "min_snr_gamma .min-SNR. is for noise .epsilon/v. prediction"),
    ({"train__debiased_estimation": True}, "debiased_estimation is for noise"),
    ({"lora__targets": "cross_attn"}, "cross_attn is not a preset of Stable Diffusion 3 / 3.5 .its text and image"),
    ({"lora__network": "loha"}, "trains plain LoRA"),
    ({"lora__blocks": "0,5"}, "block 5 does not exist; .* has blocks 0-2"),
    ({"model__prediction_type": "v_prediction"}, "train by flow matching; leave it auto"),
])
def test_options_that_make_no_sense_for_sd3_are_one_line_errors(sd3_no_t5, images, tmp_path, options, message):
    from sdlora.errors import ConfigError

    cfg = tiny_config(sd3_no_t5, images, tmp_path / "o" / "l.safetensors", model__t5=False, **options)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_t5_missing_and_flow_weighting_on_ddpm_are_one_line_errors(sd3_no_t5, tiny_model, images, tmp_path):
    from sdlora.errors import ConfigError, ModelError

    with pytest.raises(ModelError, match=r"has no text_encoder_3/ \(T5\): pass --no-t5"):
        train(tiny_config(sd3_no_t5, images, tmp_path / "o" / "l.safetensors"))
    with pytest.raises(ConfigError, match="flow_weighting applies to flow matching"):
        train(tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__flow_weighting="cosmap"))
    with pytest.raises(ConfigError, match=r"lora\.blocks selects transformer blocks"):
        train(tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", lora__blocks="0-3"))


def test_blocks_and_presets_choose_the_layers(sd35m, images, tmp_path):
    """lora.blocks keeps the chosen blocks' layers; attn adds SD3.5 Medium's attn2 and never the last block's
    context query (its output is discarded); the file's ss_network_args names the preset and the blocks."""
    cfg = tiny_config(sd35m, images, tmp_path / "o" / "l.safetensors", train__max_steps=1, lora__blocks="0,2")
    cap = Capture()
    train(cfg, cap)
    targets = cap.state.adapters.targets
    assert {t.split(".")[1] for t in targets} == {"0", "2"}
    assert "transformer_blocks.0.attn2.to_q" in targets and "transformer_blocks.2.attn.to_add_out" not in targets
    assert "transformer_blocks.2.attn.add_q_proj" not in targets and "transformer_blocks.2.attn.add_k_proj" in targets
    meta = read_lora(cfg.output.path)[1]
    assert meta["ss_network_args"] == '{"targets": "attn", "train_block_indices": "0,2"}'
    assert meta["ss_network_module"] == "networks.lora_sd3"


def test_flow_objective_follows_diffusers_sd3_training():
    """Noising, target, timestep shift, mode sampling and the loss weights are diffusers' SD3 script's
    (training_utils and FlowMatchEulerDiscreteScheduler are the references)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from sdlora.training.steps.objective import Flow, Timesteps

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = Flow(sched)
    u = torch.arange(1, 1001, dtype=torch.float32) / 1000  # the scheduler's own grid
    t = flow.shifted(u) * 1000
    torch.testing.assert_close(t.flip(0), sched.timesteps)  # shifted exactly as its sigma table
    torch.testing.assert_close(flow.sigmas(t).flip(0), sched.sigmas[:1000])
    x, n = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    ts = t[[10, 300, 700, 999]]
    s = flow.sigmas(ts, x)
    torch.testing.assert_close(flow.noisy(x, n, ts), (1 - s) * x + s * n)
    torch.testing.assert_close(flow.target(x, n, ts), n - x)
    for scheme in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(flow.weights(ts, scheme), compute_loss_weighting_for_sd3(scheme, s).flatten())
    assert flow.weights(ts, "none") is None
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = compute_density_for_timestep_sampling("mode", 5000, mode_scale=1.29, generator=g1)
    torch.testing.assert_close(Timesteps("mode", mode_scale=1.29).fractions(5000, g2), 1 - want)  # descending table
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    want = compute_density_for_timestep_sampling("logit_normal", 5000, logit_mean=0.5, logit_std=1.2, generator=g1)
    torch.testing.assert_close(Timesteps("logit-normal", 0.5, 1.2).fractions(5000, g2), 1 - want)
    q = Timesteps("mode").fraction_quantiles(5)
    assert q.tolist() == sorted(q.tolist()) and abs(q[2].item() - 0.5) < 1e-6  # symmetric about 1/2


def test_the_web_ui_trains_and_previews_an_sd3_model(sd3_no_t5, tmp_path):
    """The UI's job queue trains an SD3 model (samples included) and its Preview tab renders the LoRA beside the
    base, through the same calls as for SD1/SDXL."""
    from ui.jobs import DONE, JobManager
    from ui.preview_tab import PreviewTab

    m = JobManager(tmp_path / "ui", model=sd3_no_t5, data_roots=[tmp_path])
    cfg = tiny_config(sd3_no_t5, draw_images(tmp_path / "imgs", n=2), tmp_path / "ui" / "l" / "l.safetensors",
                      train__max_steps=2, model__t5=False)
    cfg.sample.prompts, cfg.sample.steps = ["a red sks"], 2
    job = m.wait(m.submit(cfg, "l"), 300)
    assert job.state == DONE, job.error
    assert [s for s, _ in job.samples] == [0, 2]
    preview = PreviewTab(m)
    base, mine = (preview._render(sd3_no_t5, "a red sks", "", 0, 2, 4.0, 32, loras)[0]
                  for loras in ([], [(job.output, 1.0)]))
    assert base.is_file() and mine.is_file()
    m.close()
