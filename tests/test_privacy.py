"""Shared files carry no path or user name from the machine that trained them (issue: LoRA headers, samples and the
files the UI offers for download), unless the user asks for `--metadata full`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import draw_images, fresh_pipeline, load_checked, tiny_config
from PIL import Image

from sdlora import convert_lora, inspect_lora, train
from sdlora.loras.files import read_lora
from sdlora.loras.metadata import LOADER_KEYS

USER = "zed_quill"


def everything_in(path) -> str:
    """Every header key and value of a LoRA file, or every text chunk of a PNG, as one string."""
    if str(path).endswith(".png"):
        return json.dumps(dict(Image.open(path).text))
    tensors, meta = read_lora(path)
    return json.dumps(meta) + json.dumps(sorted(tensors))


@pytest.fixture
def private_job(tiny_model, tmp_path):
    home = tmp_path / "home" / USER
    model = shutil.copytree(tiny_model, home / "models" / "client-acme-sd")
    data = draw_images(home / "photos" / "client_acme_shoot", n=2)
    draw_images(home / "class_imgs", n=1, captions=False)
    cfg = tiny_config(str(model), data, home / "out" / "acme.safetensors", train__max_steps=2)
    cfg.prior.class_prompt, cfg.prior.class_data, cfg.prior.num_class_images = "a dog", str(home / "class_imgs"), 1
    cfg.sample.prompts, cfg.sample.steps = ["a red sks"], 2
    return cfg, home


@pytest.mark.parametrize("mode", ["public", "full", "none"])
def test_lora_and_samples_keep_private_paths_out(private_job, tiny_model, caplog, mode):
    cfg, home = private_job
    cfg.output.metadata = mode
    train(cfg)
    out = home / "out" / "acme.safetensors"
    samples = sorted(out.with_name("acme_samples").glob("*.png"))
    assert samples
    header = everything_in(out)
    if mode == "full":
        assert str(home / "photos") in header and USER in header
        return
    for text in [header] + [everything_in(p) for p in samples]:
        assert USER not in text and str(home) not in text and "/tmp" not in text, text[:300]
    meta = read_lora(out)[1]
    if mode == "public":  # what a reader needs is still there: folder names, counts, repeats, tags, settings
        dirs = json.loads(meta["ss_dataset_dirs"])
        assert dirs == {"client_acme_shoot": {"n_repeats": 1, "img_count": 2}}
        assert json.loads(meta["sdlora_config"])["data"][0]["path"] == "client_acme_shoot"
        assert meta["ss_sd_model_name"] == "client-acme-sd" and meta["ss_num_train_images"] == "2"
        assert inspect_lora(out).problems == []
    else:
        assert set(meta) <= LOADER_KEYS and {"ss_network_alpha", "ss_base_model_version"} <= set(meta)
        load_checked(fresh_pipeline(tiny_model), out, caplog, has_te=False)  # still loads, cleanly


def test_files_the_ui_offers_for_download_are_public(private_job, tmp_path):
    from ui.files import list_loras, samples_of

    cfg, home = private_job
    train(cfg)
    offered = list_loras(home / "out")
    assert offered
    for path in offered + [p for lora in offered for p in samples_of(lora)]:
        text = everything_in(path)
        assert USER not in text and str(home) not in text, path


def test_inspect_flags_paths_and_convert_removes_them(tiny_model, tmp_path):
    from safetensors.torch import save_file

    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{base}.lora_down.weight": torch.randn(2, 32), f"{base}.lora_up.weight": torch.randn(32, 2),
               f"{base}.alpha": torch.tensor(2.0)}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "2",
            "ss_base_model_version": "sd_v1", "ss_dataset_dirs": '{"/home/someone/secret_client/x": {}}',
            "ss_output_name": "C:\\Users\\someone\\loras\\thing"}
    save_file(tensors, str(tmp_path / "leaky.safetensors"), meta)
    problems = "\n".join(inspect_lora(tmp_path / "leaky.safetensors").problems)
    assert "/home/someone/secret_client/x" in problems and "user name 'someone'" in problems
    assert "C:\\Users\\someone" in problems
    clean = convert_lora(tmp_path / "leaky.safetensors", None, tmp_path / "clean.safetensors", metadata="public")
    assert "someone" not in everything_in(clean) and inspect_lora(clean).problems == []
    a, b = read_lora(tmp_path / "leaky.safetensors")[0], read_lora(clean)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tensors untouched
    bare = convert_lora(tmp_path / "leaky.safetensors", None, tmp_path / "bare.safetensors", metadata="none")
    assert set(read_lora(bare)[1]) <= LOADER_KEYS
