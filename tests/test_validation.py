"""Validation loss, the best file and early stopping: deterministic, never trained on, and exact across resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import draw_images, tiny_config

from sdlora import train
from sdlora.callbacks import Callbacks, Commands
from sdlora.loras.files import read_lora


class Record(Callbacks):
    def __init__(self, commands=None, stop_at=0):
        self.val, self.messages, self.commands, self.stop_at = [], [], commands, stop_at

    def on_start(self, state):
        self.state = state

    def on_step(self, step, stats):
        if step == self.stop_at:
            self.commands.stop = True

    def on_validation(self, step, stats):
        self.val.append((step, stats["val_loss"]))

    def on_message(self, text):
        self.messages.append(text)


def val_lines(path):
    return [(r["step"], r["val_loss"]) for r in map(json.loads, Path(path).read_text().splitlines()) if "val_loss" in r]


@pytest.fixture
def data(tmp_path):
    return draw_images(tmp_path / "imgs", n=8)


def job(model, data, out, **kw):
    kw = {"train__max_steps": 4, "validation__split": 0.25, "validation__every": 2, **kw}
    return tiny_config(model, data, out, **kw)


def test_validation_loss_is_deterministic_and_leaves_training_alone(tiny_model, data, tmp_path):
    a, b = (job(tiny_model, data, tmp_path / x / "l.safetensors") for x in "ab")
    ra, rb = Record(), Record()
    train(a, ra)
    train(b, rb)
    assert [s for s, _ in ra.val] == [2, 4] and ra.val == rb.val  # same seed: identical values
    assert val_lines(tmp_path / "a" / "l_log.jsonl") == [(s, round(v, 8)) for s, v in ra.val]
    every = job(tiny_model, data, tmp_path / "c" / "l.safetensors", validation__every=1)
    rc = Record()
    train(every, rc)
    by_step = dict(rc.val)
    assert by_step[2] == dict(ra.val)[2] and by_step[4] == dict(ra.val)[4]  # fixed noise and timesteps
    assert by_step[3] != by_step[2]  # one more step of the LoRA changes it
    ta, tc = read_lora(a.output.path)[0], read_lora(every.output.path)[0]  # validating more changed no weight
    assert all(torch.equal(ta[k], tc[k]) for k in ta)
    v = rc.state.validation  # measured again on the final weights: the same number
    assert v.loss(rc.state) == by_step[4]


def test_validation_images_are_never_trained_on(tiny_model, tmp_path):
    from sdlora.config import DataFolder
    from sdlora.training.run.setup import make_accelerator, setup
    from sdlora.training.steps.step import seeded

    a, b = draw_images(tmp_path / "a", n=6), draw_images(tmp_path / "b", n=4)
    cfg = job(tiny_model, a, tmp_path / "o" / "l.safetensors", validation__split=0.3, train__batch_size=2)
    cfg.data = [DataFolder(path=str(a), prompt="a sks", repeats=3), DataFolder(path=str(b), prompt="a b")]
    state = setup(cfg, make_accelerator(cfg), Callbacks())
    held = {e.path for e in state.validation.examples}
    assert len(held) == len(state.validation.examples) == 3  # round(0.3 x 10 images), each once
    fetched = set()
    original = state.batches._items
    state.batches._items = lambda ex, idx, rng: (fetched.update(ex[i].path for i in idx), original(ex, idx, rng))[1]
    for k in range(40):  # several epochs
        state.batches.fetch(k, seeded(0, k, 0)[1])
    everything = {str(p) for p in [*a.glob("*.png"), *b.glob("*.png")]}
    assert fetched == everything - held and not fetched & held  # every other image trains, none held out does
    cfg2 = job(tiny_model, a, tmp_path / "p" / "l.safetensors", validation__split=0.3, train__batch_size=2)
    cfg2.data = cfg.data
    assert {e.path for e in setup(cfg2, make_accelerator(cfg2), Callbacks()).validation.examples} == held  # seeded


def test_validation_folder(tiny_model, data, tmp_path):
    held = draw_images(tmp_path / "held", n=2, captions=False)
    cfg = job(tiny_model, data, tmp_path / "o" / "l.safetensors", validation__split=0.0, validation__data=str(held))
    rec = Record()
    train(cfg, rec)
    assert [e.caption for e in rec.state.validation.examples] == ["a sks", "a sks"]  # the data folder's prompt
    assert len(rec.state.batches.examples) == 8 and [s for s, _ in rec.val] == [2, 4]


def test_keep_best_keeps_the_minimum_loss_file(tiny_model, data, tmp_path):
    cfg = job(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=8, validation__every=1,
              validation__keep_best=True, optim__lr=0.05)
    cfg.output.save_every = 1
    result = train(cfg)
    vals = val_lines(result.log)
    best_step, best_loss = min(vals, key=lambda x: x[1])
    assert vals.index((best_step, best_loss)) < len(vals) - 1, "pick a run whose best is not the last step"
    tensors, meta = read_lora(result.best)
    assert int(meta["sdlora_best_step"]) == best_step == result.best_step
    assert round(float(meta["sdlora_best_val_loss"]), 8) == best_loss
    same_step = read_lora(tmp_path / "o" / "l_checkpoints" / f"step_{best_step:07d}.safetensors")[0]
    assert all(torch.equal(tensors[k], same_step[k]) for k in tensors)
    last = read_lora(result.output)[0]
    assert any(not torch.equal(tensors[k], last[k]) for k in tensors)


def expected_stop(vals, patience):
    best, waited = float("inf"), 0
    for step, loss in vals:
        best, waited = (loss, 0) if loss < best else (best, waited + 1)
        if waited >= patience:
            return step
    return None


def test_early_stop_stops_at_the_right_validation_and_resumes_exactly(tiny_model, data, tmp_path):
    kw = dict(train__max_steps=20, validation__every=1, validation__early_stop_patience=2, optim__lr=0.05)
    full = job(tiny_model, data, tmp_path / "a" / "l.safetensors", **kw)
    rec = Record()
    result = train(full, rec)
    vals = val_lines(result.log)
    stop = expected_stop(vals, 2)
    assert stop is not None and stop < 20, vals
    assert result.early_stopped and result.stopped and result.steps == stop == vals[-1][0]
    assert any(m.startswith(f"early stop at step {stop}") for m in rec.messages)
    assert result.output == result.best and result.best_step == min(vals, key=lambda x: x[1])[0]
    assert (tmp_path / "a" / "l_checkpoints" / f"step_{stop:07d}.pt").is_file()  # resumable
    assert not (tmp_path / "a" / "l.safetensors").exists()

    part = job(tiny_model, data, tmp_path / "b" / "l.safetensors", **kw)
    commands = Commands()
    first = train(part, Record(commands, stop_at=stop - 2), commands)
    assert first.stopped and not first.early_stopped and first.steps == stop - 2
    second = train(part, resume=True)
    assert second.early_stopped and second.steps == stop and second.best_step == result.best_step
    assert val_lines(second.log) == vals
    a, b = read_lora(result.best)[0], read_lora(second.best)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_loss_and_the_best_score_keep_their_checkpoint_form():
    """One tracker for both (lower loss, higher score); a checkpoint holds it as it always did ({"loss": ...} or
    {"score": ...} with step and waited), so runs saved before still resume."""
    import math

    from sdlora.training.periodic.best import Best

    loss, score = Best("loss"), Best("score")
    assert [loss.update(s, v) for s, v in ((10, 0.5), (20, 0.7), (30, 0.4))] == [True, False, True]
    assert [score.update(s, v) for s, v in ((10, 0.5), (20, math.nan), (30, 0.4), (40, 0.6))] == \
        [True, False, False, True]
    assert loss.state_dict() == {"loss": 0.4, "step": 30, "waited": 0}
    assert score.state_dict() == {"score": 0.6, "step": 40, "waited": 0}
    tied = Best("score")  # a tie moves the best to the later step; only a gain resets the patience
    assert [tied.update(s, v) for s, v in ((10, 0.5), (20, 0.75), (30, 0.75), (40, 0.5), (50, 0.75))] == \
        [True, True, True, False, True]
    assert tied.state_dict() == {"score": 0.75, "step": 50, "waited": 3}
    assert [loss.update(s, v) for s, v in ((40, 0.4), (50, 0.45))] == [False, False] and loss.step == 30
    saved = Best("score")
    saved.load_state_dict({"score": 0.875, "step": 250, "waited": 3})  # as written by sdlora before the merge
    assert (saved.value, saved.step, saved.waited) == (0.875, 250, 3) and not saved.update(500, 0.8)
    assert saved.waited == 4
