"""Image loading, captions, buckets and the deterministic batch plan."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.errors import DataError
from sdlora.training.inputs.data import BatchPlan, build_examples, fit_to_bucket, load_image, make_buckets, pick_bucket


def test_awkward_images_load_as_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (8, 4), 128).save(tmp_path / "gray.png")
    Image.fromarray(np.full((4, 8), 65535, dtype=np.uint16)).save(tmp_path / "16bit.png")
    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rotated = Image.new("RGB", (8, 4), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(tmp_path / "rot.jpg", exif=exif)

    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_image(tmp_path / "16bit.png").getpixel((0, 0)) == (255, 255, 255)
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((4, 2))
    assert r > 200 and g < 60 and b < 60
    rot = load_image(tmp_path / "rot.jpg")
    assert rot.size == (4, 8) and rot.mode == "RGB"
    ex = build_examples([(tmp_path, "", True, 1)], 64, True, 16)
    assert {e.bucket for e in ex if e.path.endswith("rot.jpg")} == {pick_bucket((4, 8), make_buckets(64, 16))}


def test_corrupt_and_non_image_files_are_named_and_skipped(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("a caption")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "notes.md").write_text("hello")
    ex = build_examples([(tmp_path, "fallback", True, 2)], 32, False)
    assert [e.caption for e in ex] == ["a caption", "a caption"]  # sidecar wins, repeats apply
    assert "broken.png" in caplog.text and "notes.md" in caplog.text


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no readable images"):
        build_examples([(tmp_path, "", True, 1)], 32, True)


def test_buckets_keep_aspect_ratio_and_area():
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert pick_bucket((1600, 900), buckets) == (640, 384)
    assert pick_bucket((900, 1600), buckets) == (384, 640)
    pixels, crop = fit_to_bucket(Image.new("RGB", (1600, 900), "red"), (640, 384), "center", None)
    assert crop == (0, 21)  # 1600x900 -> 683x384: 43 px wider than the bucket, centred
    assert pixels.shape == (3, 384, 640) and float(pixels[0].mean()) == pytest.approx(1.0, abs=0.01)


def test_batch_plan_is_a_function_of_seed_and_index(tmp_path):
    for i in range(5):
        Image.new("RGB", (16, 16) if i % 2 else (32, 16)).save(tmp_path / f"{i}.png")
    ex = build_examples([(tmp_path, "x", True, 2)], 32, True, 8)
    plan = BatchPlan(ex, 2, seed=1)
    batches = [plan(k) for k in range(3 * plan.per_epoch)]
    assert batches == [BatchPlan(ex, 2, seed=1)(k) for k in range(3 * plan.per_epoch)]
    for b in batches:
        assert len({ex[i].bucket for i in b}) == 1  # a batch never mixes sizes
    epoch0 = sorted(i for b in batches[:plan.per_epoch] for i in b)
    assert epoch0 == list(range(len(ex)))  # each example once per epoch
    assert batches[:plan.per_epoch] != batches[plan.per_epoch:2 * plan.per_epoch]
