"""Single-file checkpoints load offline: family and sizes from the header, CLIP's tokenizer from shipped files, a
LoRA trained on the file loads into the matching diffusers pipeline and reproduces the trainer."""

from __future__ import annotations

import json
import logging
import re
import struct

import pytest
import torch
from conftest import draw_images, tiny_config
from safetensors.torch import save_file

from sdlora.callbacks import Callbacks
from sdlora.errors import ModelError
from sdlora.families import FAMILIES
from sdlora.single_file import (
    ASSETS,
    ckpt_to_safetensors,
    clip_tokenizer,
    detect_checkpoint,
    load_single_file,
    save_single_file,
    to_ldm,
)


def save_tiny_sd2(folder, seed=0):
    """A tiny SD2-shaped v-prediction pipeline: 1024-wide OpenCLIP-style text encoder (2 layers), linear projections."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdlora.random_pipelines import TINY, build_components, write_tokenizer

    parts = build_components(TINY, seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY["unet"], "cross_attention_dim": 1024, "use_linear_projection": True})
    te = CLIPTextModel(CLIPTextConfig(vocab_size=600, hidden_size=1024, intermediate_size=64, num_attention_heads=16,
                                      num_hidden_layers=2, hidden_act="gelu", bos_token_id=0, eos_token_id=2,
                                      pad_token_id=1))
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_tok", ("a", "red", "sks", "blue", "dog")),
                                        pad_token="!")
    scheduler = DDIMScheduler.from_config(parts["scheduler"].config, prediction_type="v_prediction")
    StableDiffusionPipeline(vae=parts["vae"], text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_pipeline

    root = tmp_path_factory.mktemp("single")
    return {"sd1": save_tiny_pipeline(root / "tiny-sd1"), "sd2": save_tiny_sd2(root / "tiny-sd2")}


@pytest.fixture(scope="module")
def files(folders):
    return {k: save_single_file(v, v.with_suffix(".safetensors")) for k, v in folders.items()}


def test_clip_tokenizer_rebuilt_from_shipped_merges():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # SD2 / SDXL's second tokenizer pad with '!'


def header_only(path, shapes, metadata=None):
    """A .safetensors whose header lists `shapes` (fp16) over a sparse data area that is never written."""
    header, offset = {"__metadata__": metadata or {}}, 0
    for key, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def real_layout(family):
    """Key -> tensor (meta device) of the real SD 1.5 / SD 2.1 / SDXL base file, from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(part):
        return json.loads((ASSETS / family / part / "config.json").read_text())

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(cfg("unet")).state_dict(),
                 "vae": AutoencoderKL.from_config(cfg("vae")).state_dict()}
        for e in FAMILIES[family].single_file.encoders:
            cls = CLIPTextModelWithProjection if e.projection else CLIPTextModel
            parts[e.name] = cls(CLIPTextConfig.from_dict(cfg(e.name))).state_dict()
    return to_ldm(family, parts), cfg


@pytest.mark.parametrize("family,diffusers_type", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_real_sized_headers_give_the_shipped_configs(tmp_path, family, diffusers_type, no_network):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state, cfg = real_layout(family)
    assert infer_diffusers_model_type(state) == diffusers_type  # diffusers reads our layout as the real thing
    info = detect_checkpoint(header_only(tmp_path / "model.safetensors", {k: v.shape for k, v in state.items()}))
    assert info.family == family
    for part, derived in info.configs.items():
        shipped = cfg(part)
        assert {k: derived[k] for k in shipped} == shipped, part
    assert info.model_channels == 320 and info.context_dim == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    assert info.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    if family == "sd2":  # 512-base is epsilon: the name (or modelspec resolution) tells
        base = header_only(tmp_path / "v2-1_512-ema-pruned.safetensors", {k: v.shape for k, v in state.items()})
        assert detect_checkpoint(base).prediction_type == "epsilon"
        assert "768-v" in info.reason


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_lora_trained_on_single_file_reproduces_in_diffusers(folders, files, tmp_path, caplog, no_network, family):
    from diffusers import StableDiffusionPipeline

    from sdlora import train
    from sdlora.models import load_components

    c = load_components(str(files[family]))
    assert c.family.name == family and c.source == str(files[family]) and len(c.model_hash()) == 64
    assert c.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    pipe = StableDiffusionPipeline.from_pretrained(str(folders[family]), safety_checker=None)
    mine = {"unet": c.denoiser, "vae": c.vae, "text_encoder": c.text_encoders[0]}
    for name in ("unet", "vae", "text_encoder"):  # the file holds exactly the folder's weights
        want, got = getattr(pipe, name).state_dict(), mine[name].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name

    class Capture(Callbacks):
        def on_start(self, state):
            self.state = state

    cfg = tiny_config(str(files[family]), draw_images(tmp_path / "img", n=2), tmp_path / "l.safetensors",
                      train__max_steps=2)
    cfg.lora.targets, cfg.lora.train_text_encoder = "all", True
    cap = Capture()
    train(cfg, cap)
    trained = cap.state.components
    unet, te = trained.denoiser.eval(), trained.text_encoders[0].eval()
    assert trained.family.name == family
    for state in cap.state.lora_states().values():
        assert all(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)

    base = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(cfg.output.path), adapter_name="t")
    assert not any(w in caplog.text.lower() for w in ("unexpected", "not loaded", "did not match")), caplog.text
    got, expected = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer), outputs(unet, te, trained.tokenizers[0])
    assert (got[0] - expected[0]).abs().max() < 1e-5 and (got[1] - expected[1]).abs().max() < 1e-5
    assert (got[0] - base[0]).abs().max() > 1e-4


def outputs(unet, text_encoder, tokenizer):
    g = torch.Generator().manual_seed(1)
    ids = tokenizer(["a red sks", "a blue dog"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text_encoder(ids)[0]
        out = unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), encoder_hidden_states=cond)
    return out.sample, cond


def test_sdxl_single_file_round_trip(tmp_path, no_network):
    from diffusers import StableDiffusionXLPipeline

    from sdlora.random_pipelines import save_tiny_sdxl_pipeline

    folder = save_tiny_sdxl_pipeline(tmp_path / "xl")
    path = save_single_file(folder, tmp_path / "xl.safetensors")
    assert detect_checkpoint(path).family == "sdxl"
    parts = load_single_file(path)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(pipe, name).state_dict(), parts[name].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert type(parts["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert parts["tokenizer_2"]("a red dog").input_ids == pipe.tokenizer_2("a red dog").input_ids


def test_ckpt_needs_opt_in_and_converts(files, tmp_path, no_network):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(files["sd1"])), "global_step": 10}, ckpt)
    with pytest.raises(ModelError, match="safetensors"):
        detect_checkpoint(ckpt)
    assert detect_checkpoint(ckpt, allow_pickle=True).family == "sd1"
    converted = ckpt_to_safetensors(ckpt, tmp_path / "model.safetensors")
    assert detect_checkpoint(converted).family == "sd1"


def test_unknown_files_say_what_was_found(tmp_path):
    from safetensors.torch import save_file

    llm = tmp_path / "llm.safetensors"
    save_file({f"transformer.h.{i}.weight": torch.zeros(2) for i in range(3)}, str(llm))
    said = re.escape("found 3 keys starting with 'transformer.' — not a Stable Diffusion")
    with pytest.raises(ModelError, match=said):
        detect_checkpoint(llm)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2)}, str(lora))
    with pytest.raises(ModelError, match="a LoRA, not a base model"):
        detect_checkpoint(lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"not a readable \.safetensors"):
        detect_checkpoint(junk)


def test_script_writes_a_loadable_file(folders, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_single_file",
                                                  Path(__file__).parents[1] / "scripts" / "make_single_file.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(folders["sd2"]), str(tmp_path / "m.safetensors")])
    assert "sd2, v_prediction" in capsys.readouterr().out
    assert (tmp_path / "m.tokenizer").is_dir()  # its tokenizer is not CLIP's: it travels next to the file


def test_extract_labels_an_sd2_768_v_lora_as_768_v(folders, files, tmp_path, no_network):
    from sdlora import extract_lora, merge_into_model
    from sdlora.loras.files import read_lora

    d = tmp_path / "lora.safetensors"
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = {f"{base}.lora_down.weight": torch.randn(2, 1024), f"{base}.lora_up.weight": torch.randn(32, 2),
            f"{base}.alpha": torch.tensor(2.0)}
    save_file(lora, str(d))
    tuned = merge_into_model(str(files["sd2"]), [(str(d), 1.0)], tmp_path / "tuned.safetensors")
    extract_lora(str(files["sd2"]), str(tuned), 2, tmp_path / "x.safetensors")
    meta = read_lora(tmp_path / "x.safetensors")[1]
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["modelspec.prediction_type"] == "v_prediction"
