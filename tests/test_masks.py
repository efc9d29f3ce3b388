"""Masked training: a mask says where the loss counts. It follows the image through buckets, crops, flips and the
latent cache; the loss is the mean over the masked area; cells outside it send no gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Capture, draw_images, tiny_config
from PIL import Image

from sdlora import train
from sdlora.cli import main
from sdlora.loras.files import read_lora
from sdlora.training.steps.objective import per_sample_loss


def masks_for(folder, out, paint):
    """A mask per image of `folder`, drawn by paint(mask_array) on a black canvas."""
    out.mkdir(parents=True, exist_ok=True)
    for p in folder.glob("*.png"):
        w, h = Image.open(p).size
        arr = np.zeros((h, w), dtype=np.uint8)
        paint(arr)
        Image.fromarray(arr, "L").save(out / p.name)
    return out


def test_white_masks_and_opaque_alpha_train_exactly_as_no_mask(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=3)
    white = masks_for(data, tmp_path / "white", lambda a: a.fill(255))
    results = {}
    for name, setup in (("none", {}), ("white", {"masks": str(white)}), ("alpha", {"alpha_mask": True})):
        cfg = tiny_config(tiny_model, data, tmp_path / name / "l.safetensors", train__max_steps=3)
        for k, v in setup.items():
            setattr(cfg.data[0], k, v)
        train(cfg)
        results[name] = read_lora(cfg.output.path)[0]
    for name in ("white", "alpha"):
        assert all(torch.equal(results["none"][k], results[name][k]) for k in results["none"]), name


def test_an_all_ones_mask_is_the_plain_mean_and_a_small_mask_is_not_a_small_loss():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(per_sample_loss(pred, tgt, mask=ones), per_sample_loss(pred, tgt), rtol=1e-6, atol=0)
    one_cell = torch.zeros(2, 1, 8, 8)
    one_cell[:, :, 3, 5] = 1
    want = ((pred - tgt)[:, :, 3, 5] ** 2).mean(dim=1)  # that cell's mean over channels, not divided by 64
    torch.testing.assert_close(per_sample_loss(pred, tgt, mask=one_cell), want)
    half = torch.full((2, 1, 8, 8), 0.5)  # grey weighs evenly: the same mean
    torch.testing.assert_close(per_sample_loss(pred, tgt, mask=half), per_sample_loss(pred, tgt))


def test_cells_outside_the_mask_send_no_gradient(tiny_model, tmp_path):
    from sdlora.training.run.setup import make_accelerator, setup
    from sdlora.training.steps.step import seeded, training_step

    data = draw_images(tmp_path / "imgs", n=2, sizes=((64, 64),))
    left = masks_for(data, tmp_path / "left", lambda a: a.__setitem__((slice(None), slice(0, 32)), 255))
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors")
    cfg.augment.resolution = 64
    cfg.data[0].masks = str(left)
    state = setup(cfg, make_accelerator(cfg), Capture())
    gen, rng = seeded(0, 0, 0)
    batch = state.batches.fetch(0, rng)
    half = batch.latents.shape[-1] // 2
    assert batch.mask.shape == (1, 1, *batch.latents.shape[-2:])
    assert torch.all(batch.mask[..., :half] == 1) and torch.all(batch.mask[..., half:] == 0)
    outputs = []
    hook = state.components.denoiser.register_forward_hook(
        lambda m, i, o: (o[0] if isinstance(o, tuple) else o.sample).retain_grad() or outputs.append(o))
    loss, _ = training_step(batch, state.models, cfg, gen)
    loss.backward()
    hook.remove()
    out = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0].sample
    assert out.grad[..., half:].abs().max() == 0  # nothing from the masked-out half
    assert out.grad[..., :half].abs().max() > 0


def test_unmasked_weight_lifts_the_outside(tiny_model, tmp_path):
    from sdlora.training.run.setup import make_accelerator, setup
    from sdlora.training.steps.step import seeded

    data = draw_images(tmp_path / "imgs", n=1, sizes=((64, 64),))
    left = masks_for(data, tmp_path / "left", lambda a: a.__setitem__((slice(None), slice(0, 32)), 255))
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors")
    cfg.augment.resolution, cfg.data[0].masks, cfg.data[0].unmasked_weight = 64, str(left), 0.25
    state = setup(cfg, make_accelerator(cfg), Capture())
    mask = state.batches.fetch(0, seeded(0, 0, 0)[1]).mask
    half = mask.shape[-1] // 2
    assert torch.allclose(mask[..., :half], torch.ones(1)) and torch.allclose(mask[..., half:], torch.tensor(0.25))


def test_masks_follow_flips_crops_and_the_cache():
    from sdlora.training.inputs.data import fit_to_bucket

    im = Image.new("RGB", (96, 64), "white")
    im.paste((255, 0, 0), (0, 0, 30, 64))  # a red band on the left
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 30, 64))  # the mask covers exactly the band
    for crop, flip in (("center", False), ("center", True), ("random", True), ("random", False)):
        pixels, _, m = fit_to_bucket(im, (48, 48), crop, np.random.default_rng(3), flip, mask)
        red_columns = ((pixels[0] > 0.5) & (pixels[1] < 0)).float().mean(0) > 0.5
        mask_columns = m[0].mean(0) > 0.5
        assert m.shape == (1, 48, 48) and mask_columns.any()
        # the same columns, up to one column of resampling at the band's edge
        assert (red_columns != mask_columns).sum() <= 1, (crop, flip)


def test_class_images_are_never_masked(tiny_model, tmp_path):
    from sdlora.training.run.setup import make_accelerator, setup
    from sdlora.training.steps.step import seeded

    data = draw_images(tmp_path / "imgs", n=2)
    half = masks_for(data, tmp_path / "m", lambda a: a.__setitem__((slice(0, 16),), 255))
    draw_images(tmp_path / "cls", n=2, captions=False)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors")
    cfg.data[0].masks = str(half)
    cfg.prior.class_prompt, cfg.prior.class_data = "a dog", str(tmp_path / "cls")
    state = setup(cfg, make_accelerator(cfg), Capture())
    batch = state.batches.fetch(0, seeded(0, 0, 0)[1])
    assert batch.mask is not None and batch.prior.mask is None


@pytest.mark.parametrize("problem,says", [
    ("black", "is black everywhere"), ("missing", "no mask for img1.png"), ("size", "is 8x8 but its image is 32x32"),
])
def test_bad_masks_are_one_line_errors(tiny_model, tmp_path, capsys, problem, says):
    data = draw_images(tmp_path / "imgs", n=2)
    masks = masks_for(data, tmp_path / "m", lambda a: a.fill(255))
    if problem == "black":
        Image.new("L", (32, 32), 0).save(masks / "img1.png")
    elif problem == "missing":
        (masks / "img1.png").unlink()
    else:
        Image.new("L", (8, 8), 255).save(masks / "img1.png")
    rc = main(["train", "--model", tiny_model, "--data", str(data), "--masks", str(masks), "--resolution", "32",
               "--output", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and says in err[-1] and "img1.png" in err[-1]


def test_masked_training_runs_from_the_cli_with_alpha(tiny_model, tmp_path):
    data = tmp_path / "cutouts"
    data.mkdir()
    for i in range(2):
        im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
        im.paste((200, 30, 30, 255), (8, 8, 24, 24))  # an opaque subject on a transparent background
        im.save(data / f"c{i}.png")
    assert main(["train", "--model", tiny_model, "--data", str(data), "--alpha-mask", "--instance-prompt", "a sks",
                 "--resolution", "32", "--max-steps", "2", "--output", str(tmp_path / "o.safetensors")]) == 0
    assert read_lora(tmp_path / "o.safetensors")[0]
