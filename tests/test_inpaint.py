"""Inpainting bases: recognised in folders and single files (diffusers' own single-file reader as the reference),
trained as diffusers' inpainting pipelines run them (their input construction, called in the test, as the reference),
random masks seeded per step (resume is bit-exact), files that load in StableDiffusionInpaintPipeline, change it, and
merge into it exactly, and `inspect` naming the base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import Capture, StopAt, draw_images, load_checked, tiny_config
from PIL import Image, ImageDraw

from sdlora import merge_into_model, train
from sdlora.callbacks import Commands
from sdlora.errors import ConfigError, DataError, ModelError
from sdlora.families import FAMILIES
from sdlora.loras.files import read_lora
from sdlora.loras.inspect import inspect_lora
from sdlora.training.inputs.inpaint_masks import random_mask


@pytest.fixture(scope="module")
def inpaint_sd1(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1-inpaint", inpainting=True))


@pytest.fixture(scope="module")
def inpaint_xl(tmp_path_factory):
    from sdlora.random_pipelines import save_tiny_sdxl_pipeline

    return str(save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-xl-inpaint", inpainting=True))


def box_mask(size=32, box=(6, 10, 22, 26)) -> Image.Image:
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).rectangle(box, fill=255)
    return im


def masks_for(images, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted(images.glob("*.png"))):
        box_mask(box=(4 + i, 8, 20 + i, 24)).save(folder / p.name)
    return folder


# ---------------------------------------------------------------- recognising inpainting bases

def test_random_masks_are_seeded_rectangles_and_brush_strokes():
    a = [np.asarray(random_mask(48, 32, np.random.default_rng([0, k]))) for k in range(40)]
    b = [np.asarray(random_mask(48, 32, np.random.default_rng([0, k]))) for k in range(40)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # a function of the seed alone
    assert all(m.shape == (32, 48) and 0 < (m > 127).mean() < 1 for m in a)  # never empty, never everything
    assert len({m.tobytes() for m in a}) == 40

    # one to three rectangles have at most 5 distinct masked rows; a brush stroke's slanted, round-ended lines more
    boxes = [len({row.tobytes() for row in m > 127 if row.any()}) <= 5 for m in a]
    assert 10 < sum(boxes) < 30  # about half rectangles, half strokes


def _real_inpainting_layout(family: str, channels: int) -> dict:
    """Key -> shape of a full-size inpainting file of `family` (the shipped configs, the UNet taking `channels`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.families.checkpoint import asset
    from sdlora.single_file import to_ldm

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config({**asset(family, "unet"), "in_channels": channels}),
                 "vae": AutoencoderKL.from_config(asset(family, "vae"))}
        for e in FAMILIES[family].single_file.encoders:
            cls = CLIPTextModelWithProjection if e.projection else CLIPTextModel
            parts[e.name] = cls(CLIPTextConfig.from_dict(asset(family, e.name)))
    return to_ldm(family, {k: m.state_dict() for k, m in parts.items()})


@pytest.mark.parametrize("family,diffusers_type", [("sd1", "inpainting"), ("sd2", "inpainting_v2"),
                                                   ("sdxl", "xl_inpaint")])
def test_single_file_inpainting_checkpoints_are_recognised(tmp_path, family, diffusers_type):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from test_single_file import header_only

    from sdlora.single_file import detect_checkpoint

    state = _real_inpainting_layout(family, 9)
    assert infer_diffusers_model_type(state) == diffusers_type  # diffusers reads our layout as its inpainting model
    info = detect_checkpoint(header_only(tmp_path / "inpaint.safetensors", {k: v.shape for k, v in state.items()}))
    assert info.family == family and info.configs["unet"]["in_channels"] == 9
    assert FAMILIES[family].inpainting(info.configs["unet"])
    assert FAMILIES[family].pipeline_name(info.configs["unet"]).endswith("InpaintPipeline")
    pix2pix = _real_inpainting_layout(family, 8)  # instruct-pix2pix: still refused, in one line
    with pytest.raises(ModelError, match=r"8 input channels.*instruct-pix2pix") as e:
        detect_checkpoint(header_only(tmp_path / "p2p.safetensors", {k: v.shape for k, v in pix2pix.items()}))
    assert "\n" not in str(e.value)


def test_tiny_inpainting_folder_and_single_file_load_as_inpainting(inpaint_sd1, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from sdlora.models import load_components
    from sdlora.single_file import save_single_file

    folder = load_components(inpaint_sd1)
    single = load_components(str(save_single_file(inpaint_sd1, tmp_path / "inpaint.safetensors")))
    ref = StableDiffusionInpaintPipeline.from_pretrained(inpaint_sd1, safety_checker=None)
    for c in (folder, single):
        assert c.inpainting and c.family.name == "sd1" and type(c.pipeline()).__name__ == type(ref).__name__
        want = ref.unet.state_dict()
        assert all(torch.equal(want[k], v) for k, v in c.denoiser.state_dict().items())


# ---------------------------------------------------------------- the step: the pipeline's input

def _pipeline_input(pipe, prompt, image, mask, monkeypatch):
    """What diffusers' inpainting pipeline hands its UNet for (image, mask): channels 4 on, [mask, masked latents]
    (its VAE posterior's mode, as the trainer encodes images, instead of a sample)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt, image=image, mask_image=mask, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
         strength=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    hook.remove()
    monkeypatch.undo()
    return seen[0][:, 4:]


class FirstInput(Capture):
    """The UNet's first input during training."""

    def on_start(self, state):
        super().on_start(state)
        self.seen = []
        state.components.denoiser.register_forward_pre_hook(
            lambda m, args: self.seen.append(args[0].detach().clone()) if not self.seen else None)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_step_builds_the_unet_input_as_the_inpainting_pipeline(inpaint_sd1, inpaint_xl, tmp_path, monkeypatch,
                                                                    family):
    import diffusers

    model = inpaint_sd1 if family == "sd1" else inpaint_xl
    data = draw_images(tmp_path / "img", n=1)
    cfg = tiny_config(model, data, tmp_path / "l.safetensors", train__max_steps=1)
    cfg.data[0].inpaint_masks = str(masks_for(data, tmp_path / "masks"))
    cfg.inpaint.full_mask = 0.0
    cap = FirstInput()
    train(cfg, cap)
    got = cap.seen[0]
    assert got.shape[1] == 9
    pipe = getattr(diffusers, FAMILIES[family].inpaint_pipeline_class).from_pretrained(model)
    image = Image.open(data / "img0.png").convert("RGB")
    want = _pipeline_input(pipe, "a sks", image, Image.open(tmp_path / "masks" / "img0.png"), monkeypatch)
    assert got[:, 4].sum() == want[:, 0].sum() > 0  # the mask on the latent grid
    assert (got[:, 4:] - want).abs().max() < 1e-5
    whole = _pipeline_input(pipe, "a sks", image, Image.new("L", (32, 32), 255), monkeypatch)
    cfg.inpaint.full_mask, cfg.output.path = 1.0, str(tmp_path / "full.safetensors")
    cap = FirstInput()
    train(cfg, cap)
    assert (cap.seen[0][:, 4:] - whole).abs().max() < 1e-5  # the share masked whole: the image blanked


# ---------------------------------------------------------------- the file

def _inpaint_outputs(pipe, image, mask):
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red sks", "a blue dog"], image=image, mask_image=mask, height=32, width=32, num_inference_steps=3,
                guidance_scale=2.0, output_type="np", generator=[torch.Generator().manual_seed(i) for i in (1, 2)],
                strength=1.0).images


def test_an_inpainting_lora_loads_in_the_inpaint_pipeline_changes_it_and_merges_exactly(inpaint_sd1, tmp_path,
                                                                                          caplog):
    from diffusers import StableDiffusionInpaintPipeline

    from sdlora.models import load_model

    data = draw_images(tmp_path / "img", n=3)
    cfg = tiny_config(inpaint_sd1, data, tmp_path / "out" / "l.safetensors", train__max_steps=6)
    cfg.optim.lr, cfg.lora.targets, cfg.lora.train_text_encoder = 1e-2, "all", True
    cfg.sample.prompts, cfg.validation.split = ["a red sks"], 0.34
    result = train(cfg)
    assert np.isfinite(result.best_val_loss)  # validation repaints under seeded masks
    meta = read_lora(result.output)[1]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1-inpainting/lora"
    assert meta["ss_base_model_version"] == "sd_v1"  # A1111 still files it under SD 1.x
    info = inspect_lora(result.output)
    assert info.inpainting and "base: an inpainting model" in info.summary() and not info.problems

    def fresh(path):
        return StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None)

    image, mask = Image.open(data / "img1.png").convert("RGB"), box_mask()
    base = _inpaint_outputs(fresh(inpaint_sd1), image, mask)
    pipe = fresh(inpaint_sd1)
    load_checked(pipe, result.output, caplog)
    runtime = _inpaint_outputs(pipe, image, mask)
    assert np.abs(runtime - base).max() > 1e-2  # the LoRA changes what the inpainting pipeline draws
    folder = merge_into_model(inpaint_sd1, [(result.output, 1.0)], tmp_path / "merged")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert np.abs(_inpaint_outputs(fresh(str(folder)), image, mask) - runtime).max() < 1e-4
    single = merge_into_model(inpaint_sd1, [(result.output, 1.0)], tmp_path / "merged.safetensors")
    merged = load_model(single).pipeline()
    merged.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a file brings SD1's PNDM
    assert np.abs(_inpaint_outputs(merged, image, mask) - runtime).max() < 1e-4

    # the training sample repainted the first image under a centred rectangle, as the pipeline does with the file
    from sdlora.training.inputs.inpaint_masks import centred_rectangle

    first = Image.open(data / "img0.png").convert("RGB")
    want = pipe("a red sks", image=first, mask_image=centred_rectangle(32, 32), height=32, width=32,
                num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance, strength=1.0,
                generator=[torch.Generator().manual_seed(cfg.sample.seed)], output_type="np").images[0]
    got = np.asarray(Image.open(result.samples[-1]), dtype=np.float32) / 255
    assert np.abs(got - want).max() < 3 / 255


# ---------------------------------------------------------------- resume, and what is refused

def test_stop_and_resume_with_random_masks_is_bit_exact(inpaint_sd1, tmp_path):
    def job(out):
        cfg = tiny_config(inpaint_sd1, draw_images(tmp_path / "img", n=3), out, train__max_steps=5)
        cfg.augment.random_flip, cfg.augment.crop, cfg.inpaint.full_mask = True, "random", 0.3
        return cfg

    full = job(tmp_path / "a" / "l.safetensors")
    train(full)
    part = job(tmp_path / "b" / "l.safetensors")
    commands = Commands()
    assert train(part, StopAt(commands, 2), commands).steps == 2
    assert train(part, resume=True).steps == 5
    a, b = read_lora(full.output.path)[0], read_lora(part.output.path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inpainting_settings_and_bases_are_checked(inpaint_sd1, tiny_model, tmp_path):
    data = draw_images(tmp_path / "img", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "l.safetensors", train__max_steps=1)
    cfg.inpaint.full_mask = 0.5
    with pytest.raises(ConfigError, match=r"inpaint\.full_mask is for inpainting bases.*is a text-to-image model"):
        train(cfg)
    cfg = tiny_config(inpaint_sd1, data, tmp_path / "l.safetensors", train__max_steps=1)
    (tmp_path / "masks").mkdir()
    box_mask().save(tmp_path / "masks" / "img0.png")  # img1 has none
    cfg.data[0].inpaint_masks = str(tmp_path / "masks")
    with pytest.raises(DataError, match=r"no inpainting mask for img1\.png"):
        train(cfg)
    Image.new("L", (32, 32), 0).save(tmp_path / "masks" / "img1.png")
    with pytest.raises(DataError, match="black everywhere"):
        train(cfg)
    cfg = tiny_config(inpaint_sd1, None, tmp_path / "s.safetensors", train__max_steps=1)
    cfg.data, cfg.slider.target, cfg.slider.positive = [], "a dog", "a red dog"
    with pytest.raises(ConfigError, match="inpainting model; sliders"):
        train(cfg)
