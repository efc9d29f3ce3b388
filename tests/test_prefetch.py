"""speed.prefetch: the next micro-batch's CPU part is made on a background thread while this one trains. It changes
when the work happens, never what is learned; its thread ends with the run however the run ends."""

from __future__ import annotations

import os
import threading
import traceback

import pytest
import torch
from conftest import Capture, StopAt, tiny_config
from PIL import Image, ImageDraw

from sdlora import train
from sdlora.callbacks import Callbacks, Commands
from sdlora.errors import DataError
from sdlora.loras.files import read_lora
from sdlora.training.inputs.batches import Batches, Latents, pins

PREPARE = Batches.prepare


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sdlora-prefetch")]


def tagged_images(folder, n=3):
    """RGBA images (their alpha is the loss mask) of other aspect ratios than their buckets, so a random crop has
    room to move, each captioned with a tag list."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = ((80, 40), (40, 80), (56, 40))[i % 3]
        im = Image.new("RGBA", (w, h), (255, 255, 255, 60))
        ImageDraw.Draw(im).ellipse((w // 5 + i, h // 5, w - w // 5, h - h // 5), fill=(220, 30, 30, 255))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("sks, red, circle, white background, round")
    return folder


def uncached_config(model, data, out, prefetch, **kw):
    cfg = tiny_config(model, data, out, **kw)
    cfg.augment.crop, cfg.augment.random_flip, cfg.augment.caption_dropout = "random", True, 0.2
    cfg.data[0].shuffle_tags, cfg.data[0].keep_tags, cfg.data[0].tag_dropout = True, 1, 0.2
    cfg.data[0].alpha_mask, cfg.data[0].unmasked_weight = True, 0.3
    cfg.speed.prefetch = prefetch
    return cfg


class Record(Capture):
    """The thread that prepared each micro-batch, and the crops and captions it made."""

    def __init__(self, monkeypatch):
        self.threads, self.crops, self.captions = [], set(), set()
        def prepare(batches, k, rng):
            items, prior = PREPARE(batches, k, rng)
            self.threads.append(threading.current_thread().name)
            self.crops.update(it.fitted.crop for it in items)
            self.captions.update(it.caption for it in items)
            return items, prior

        monkeypatch.setattr(Batches, "prepare", prepare)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_prefetch_learns_what_the_plain_path_learns(tiny_model, tmp_path, monkeypatch, grad_accum):
    data = tagged_images(tmp_path / "imgs")
    got, seen = {}, {}
    for prefetch in (True, False):
        cfg = uncached_config(tiny_model, data, tmp_path / f"{prefetch}.safetensors", prefetch, train__max_steps=4,
                              train__grad_accum=grad_accum)
        rec = Record(monkeypatch)
        train(cfg, rec)
        assert prefetch_threads() == []
        assert (rec.state.batches.prefetcher is not None) == prefetch and not rec.state.batches.latents.pin
        got[prefetch], seen[prefetch] = read_lora(cfg.output.path)[0], rec
    on, off = seen[True], seen[False]
    assert len(on.threads) == len(off.threads) == 4 * grad_accum
    assert on.threads[0] == "MainThread" and all(t.startswith("sdlora-prefetch") for t in on.threads[1:])
    assert set(off.threads) == {"MainThread"}
    assert len(on.crops) > 1 and len(on.captions) > 1  # the rng mattered: crops and tag orders varied
    assert on.crops == off.crops and on.captions == off.captions
    for k in got[False]:
        assert torch.equal(got[True][k], got[False][k]), k


def test_stop_and_resume_with_prefetch_equal_an_uninterrupted_run(tiny_model, tmp_path):
    data = tagged_images(tmp_path / "imgs")
    full = uncached_config(tiny_model, data, tmp_path / "a" / "l.safetensors", True, train__max_steps=5)
    train(full)
    part = uncached_config(tiny_model, data, tmp_path / "b" / "l.safetensors", True, train__max_steps=5)
    commands = Commands()
    first = train(part, StopAt(commands, 2), commands)  # the thread had micro-batch 3 under way
    assert first.stopped and first.steps == 2 and prefetch_threads() == []
    assert train(part, resume=True).steps == 5 and prefetch_threads() == []
    a, b = read_lora(full.output.path)[0], read_lora(part.output.path)[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Corrupt(Callbacks):
    """After step 1, the image becomes unreadable (replaced at once, as an editor saving over it would)."""

    def __init__(self, image):
        self.image = image

    def on_step(self, step, stats):
        if step == 1:
            tmp = self.image.with_suffix(".tmp")
            tmp.write_bytes(b"not a png any more")
            os.replace(tmp, self.image)


def test_an_image_that_breaks_mid_run_is_the_same_one_line_error_either_way(tiny_model, tmp_path, capfd):
    errors = {}
    for prefetch in (True, False):
        data = tagged_images(tmp_path / f"imgs{prefetch}", n=1)
        cfg = uncached_config(tiny_model, data, tmp_path / f"{prefetch}.safetensors", prefetch, train__max_steps=4)
        cfg.data[0].alpha_mask = False  # the mask is read first; here the image itself breaks
        with pytest.raises(DataError) as e:
            train(cfg, Corrupt(data / "img0.png"))
        assert prefetch_threads() == []
        frames = {f.filename for f in traceback.extract_tb(e.value.__traceback__)}
        assert any(f.endswith(os.path.join("concurrent", "futures", "thread.py")) for f in frames) == prefetch
        errors[prefetch] = str(e.value).replace(str(data), "DATA")
    assert errors[True] == errors[False]
    assert "\n" not in errors[True] and "DATA/img0.png can no longer be read" in errors[True]
    err = capfd.readouterr().err
    assert "Exception in thread" not in err and "Traceback" not in err


def test_pinned_memory_only_for_cuda_with_prefetch(monkeypatch, tmp_path):
    from sdlora.training.inputs.data import Example

    assert pins(torch.device("cuda", 0), True) and pins("cuda", True)
    assert not pins("cpu", True) and not pins("cuda", False) and not pins("mps", True)
    pinned = []  # pin_memory() needs CUDA: recorded instead
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.shape) or t)
    Image.new("RGB", (40, 32), "red").save(tmp_path / "a.png")
    ex = Example(path=str(tmp_path / "a.png"), caption="", bucket=(32, 32), size=(40, 32))
    for pin in (True, False):
        Latents(None, torch.device("cpu"), torch.float32, cached=False, crop="center", pin=pin).fit(
            ex, False, "center", None)
    assert pinned == [torch.Size([1, 3, 32, 32])]  # only the pin=True Latents pinned its pixels


def test_cached_latents_have_no_prefetcher(tiny_model, tmp_path):
    data = tagged_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "l.safetensors", train__max_steps=1)
    cap = Capture()
    train(cfg, cap)
    assert cap.state.batches.latents.cached and cap.state.batches.prefetcher is None


def test_no_prefetch_flag():
    from sdlora.cli import build_parser
    from sdlora.cli.train import apply_flags
    from sdlora.config import Config

    args = build_parser().parse_args(["train", "--no-prefetch"])
    assert Config().speed.prefetch and not apply_flags(Config(), args).speed.prefetch
