"""Image validation during training: scores from the weights a file would get, deterministic, exact across resume
(scores and the best file), driving --keep-best and early stopping with --select-by images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_images, tiny_config

from sdlora import train
from sdlora.callbacks import Callbacks, Commands
from sdlora.config import Config, DataFolder, validate
from sdlora.errors import ConfigError, TrainingError
from sdlora.loras.files import read_lora
from sdlora.scoring.base import Scores
from sdlora.training.periodic import image_validation
from sdlora.training.periodic.image_validation import trigger_of, validation_prompts

SCORE_KEYS = ("score", "likeness", "adherence", "preservation", "copying")


def score_lines(log):
    return [{k: r[k] for k in ("step", *SCORE_KEYS) if k in r}
            for r in map(json.loads, Path(log).read_text().splitlines()) if "score" in r]


@pytest.fixture
def data(tmp_path):
    return draw_images(tmp_path / "imgs", n=6)


def job(model, data, out, **kw):
    kw = {"train__max_steps": 6, "validation__scorer": "shapes", "validation__every": 2, "validation__seeds": 1,
          "validation__image_steps": 2, "validation__prompts": ["a red sks", "a blue square"],
          "output__trigger": "sks", **kw}
    return tiny_config(model, data, out, **kw)


class Stop(Callbacks):
    def __init__(self, commands, at):
        self.commands, self.at = commands, at

    def on_step(self, step, stats):
        if step == self.at:
            self.commands.stop = True


def test_scores_are_deterministic_and_a_resumed_run_logs_the_same_and_keeps_the_same_best(tiny_model, data,
                                                                                          tmp_path):
    a = job(tiny_model, data, tmp_path / "a" / "l.safetensors", validation__keep_best=True)
    ra = train(a)
    lines = score_lines(ra.log)
    assert [r["step"] for r in lines] == [2, 4, 6] and all(set(SCORE_KEYS) <= set(r) for r in lines)
    assert score_lines(train(job(tiny_model, data, tmp_path / "b" / "l.safetensors",
                                 validation__keep_best=True)).log) == lines  # same seed: identical scores
    sheets = sorted((tmp_path / "a" / "l_validation").glob("*.png"))
    assert [p.name for p in sheets] == [f"step_{s:07d}.png" for s in (2, 4, 6)]

    c = job(tiny_model, data, tmp_path / "c" / "l.safetensors", validation__keep_best=True)
    commands = Commands()
    first = train(c, Stop(commands, 3), commands)
    assert first.stopped and first.steps == 3
    reweighted = job(tiny_model, data, tmp_path / "c" / "l.safetensors", validation__keep_best=True,
                     validation__score_weights="likeness=1")
    with pytest.raises(TrainingError, match=r"validation\.score_weights was"):  # the kept best is on another scale
        train(reweighted, resume=True)
    second = train(c, resume=True)
    assert score_lines(second.log) == lines and second.best_step == ra.best_step and second.best_score == ra.best_score
    (ta, ma), (tc, mc) = read_lora(ra.best), read_lora(second.best)
    assert all(torch.equal(ta[k], tc[k]) for k in ta)
    assert {k: ma[k] for k in ma if k.startswith("sdlora_best") or k == "sdlora_scores"} == \
        {k: mc[k] for k in mc if k.startswith("sdlora_best") or k == "sdlora_scores"}
    assert ma["sdlora_best_by"] == "images" and float(ma["sdlora_best_score"]) == ra.best_score


class Scripted:
    """A scorer whose likeness follows a script, one value per validation, so the best falls where the test wants
    (the same on every CPU): what is tested is the selection, not the scorer."""

    name = "scripted"
    values = [0.3, 0.6, 0.9, 0.5, 0.7, 0.2, 0.8, 0.4] + [0.1] * 20

    def __init__(self):
        self.calls = 0

    def reference(self, images):
        return "scripted scorer"

    def score(self, shots):
        self.calls += 1
        return Scores(likeness=self.values[self.calls - 1])


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(image_validation, "make_scorer", lambda *a, **k: Scripted())


def test_keep_best_by_images_keeps_the_highest_score_file(tiny_model, data, tmp_path, scripted):
    cfg = job(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=8, validation__every=1,
              validation__keep_best=True, validation__score_weights="likeness=1", optim__lr=0.05)
    cfg.output.save_every = 1
    result = train(cfg)
    lines = score_lines(result.log)
    best = max(lines, key=lambda r: (r["score"], r["step"]))  # the latest of the highest
    assert best["step"] == 3 and best["score"] == 0.9
    assert result.best_step == best["step"] and round(result.best_score, 8) == best["score"]
    tensors, meta = read_lora(result.best)
    assert int(meta["sdlora_best_step"]) == best["step"] and "sdlora_best_val_loss" not in meta
    same_step, step_meta = read_lora(tmp_path / "o" / "l_checkpoints" / f"step_{best['step']:07d}.safetensors")
    assert all(torch.equal(tensors[k], same_step[k]) for k in tensors)
    assert json.loads(step_meta["sdlora_scores"])["score"] == pytest.approx(best["score"])


class TwoParts(Scripted):
    """Likeness and adherence scripted so that the two weightings below keep different files."""

    likeness = (0.2, 0.9, 0.5, 0.9, 0.6, 0.8)
    adherence = (0.9, 0.3, 0.8, 0.2, 0.9, 0.4)

    def score(self, shots):
        self.calls += 1
        return Scores(likeness=self.likeness[self.calls - 1], adherence=self.adherence[self.calls - 1])


def test_a_log_replayed_under_other_weights_keeps_what_a_run_with_them_keeps(tiny_model, data, tmp_path,
                                                                             monkeypatch):
    """`selection.rescored` (what heldout_concepts --replay and measure_selection use) on one run's log names the
    file a run trained with the other weights keeps, and gives the scores that run logs."""
    from sdlora.config import parse_score_weights
    from sdlora.training.periodic.selection import rescored, validation_history

    def run(name, weights):
        monkeypatch.setattr(image_validation, "make_scorer", lambda *a, **k: TwoParts())
        cfg = job(tiny_model, data, tmp_path / name / "l.safetensors", train__max_steps=6, validation__every=1,
                  validation__keep_best=True, validation__score_weights=weights, optim__lr=0.05)
        return train(cfg)

    likeness, equal = run("l", "likeness=1,adherence=0"), run("e", "likeness=1,adherence=1")
    assert (likeness.best_step, equal.best_step) == (4, 5)  # ties keep the later step; worked out by hand
    history = validation_history(likeness.log)
    scores, step = rescored(history, parse_score_weights("likeness=1,adherence=1"))
    assert step == equal.best_step
    assert scores == pytest.approx([r["score"] for r in score_lines(equal.log)])
    assert rescored(history, parse_score_weights("likeness=1,adherence=0"))[1] == likeness.best_step


def expected_stop(scores, patience):
    best, waited = -float("inf"), 0
    for step, s in scores:
        best, waited = (s, 0) if s > best else (best, waited + 1)
        if waited >= patience:
            return step
    return None


def test_early_stop_by_images(tiny_model, data, tmp_path, scripted):
    cfg = job(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=20, validation__every=1,
              validation__early_stop_patience=2, validation__score_weights="likeness=1", optim__lr=0.05)
    messages = []

    class Say(Callbacks):
        def on_message(self, text):
            messages.append(text)

    result = train(cfg, Say())
    lines = score_lines(result.log)
    stop = expected_stop([(r["step"], r["score"]) for r in lines], 2)
    assert stop == 5 and [r["score"] for r in lines] == Scripted.values[:5]
    assert result.early_stopped and result.steps == stop == lines[-1]["step"]
    assert any(m.startswith(f"early stop at step {stop}: the validation score has not improved") for m in messages)


def test_a_tied_image_score_keeps_the_later_file_and_early_stop_counts_from_the_last_gain(tiny_model, data,
                                                                                          tmp_path, monkeypatch):
    """Rounds of a few images tie often: the best file moves to the later of equal scores, while early stopping
    still counts validations since the score last rose."""
    class Tied(Scripted):
        values = (0.3, 0.9, 0.5, 0.9, 0.4, 0.1, 0.1, 0.1)

    monkeypatch.setattr(image_validation, "make_scorer", lambda *a, **k: Tied())
    cfg = job(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=8, validation__every=1,
              validation__keep_best=True, validation__early_stop_patience=3, validation__score_weights="likeness=1",
              optim__lr=0.05)
    cfg.output.save_every = 1
    result = train(cfg)
    assert [r["score"] for r in score_lines(result.log)] == list(Tied.values[:5])
    assert result.early_stopped and result.steps == 5  # 3 validations after step 2's gain, the tie at 4 among them
    assert result.best_step == 4 and result.best_score == 0.9
    tensors, meta = read_lora(result.best)
    assert int(meta["sdlora_best_step"]) == 4
    step_4 = read_lora(tmp_path / "o" / "l_checkpoints" / "step_0000004.safetensors")[0]
    step_2 = read_lora(tmp_path / "o" / "l_checkpoints" / "step_0000002.safetensors")[0]
    assert all(torch.equal(tensors[k], step_4[k]) for k in tensors)
    assert any(not torch.equal(tensors[k], step_2[k]) for k in tensors)


class Recording:
    """The shapes scorer, keeping every image it is given."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.name = inner.name

    def reference(self, images):
        return self.inner.reference(images)

    def score(self, shots):
        self.seen.append(shots)
        return self.inner.score(shots)


def test_validation_draws_the_weights_a_file_gets_and_the_base_model(tiny_model, data, tmp_path, monkeypatch):
    """With EMA, the validation images are those diffusers draws from the step's LoRA file (the averaged weights);
    the preservation prompts' base images are those of the model without any LoRA."""
    from diffusers import StableDiffusionPipeline

    from sdlora.loras.apply import load_lora_into
    from sdlora.scoring.make import make_scorer

    made = []
    monkeypatch.setattr(image_validation, "make_scorer",
                        lambda *a, **k: made.append(Recording(make_scorer(*a, **k))) or made[-1])
    cfg = job(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=4, validation__every=4,
              optim__ema_decay=0.5, optim__lr=0.05, validation__image_steps=3)
    cfg.output.save_every, cfg.sample.guidance = 4, 3.0
    result = train(cfg)
    shots = made[0].seen[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompt, seed):
        gen = torch.Generator("cpu").manual_seed(seed)
        return np.asarray(pipe(prompt, num_inference_steps=3, guidance_scale=3.0, width=32, height=32,
                               generator=gen).images[0], dtype=np.int16)

    base = draw("a blue square", 1)  # prompt 1, seed sample.seed + 1
    assert np.abs(np.asarray(shots.base[1], dtype=np.int16) - base).max() <= 1
    load_lora_into(pipe, result.output)  # the final file: EMA weights, fp32
    for i, prompt in enumerate(["a red sks", "a blue square"]):
        assert np.abs(np.asarray(shots.images[i], dtype=np.int16) - draw(prompt, i)).max() <= 1
    assert np.abs(np.asarray(shots.images[1], dtype=np.int16) - base).max() > 1  # the LoRA changed it


def test_default_validation_prompts_come_from_the_captions():
    cfg = Config()
    cfg.data = [DataFolder(path="star"), DataFolder(path="world")]
    captions = {"star": [f"a {c} sks" for c in ("red", "blue", "green", "yellow", "purple", "orange")],
                "world": ["a blue circle", "a red square", "a green triangle"]}
    assert trigger_of(cfg, captions) == "sks"  # in every caption of the first folder, in none of the others
    got = validation_prompts(cfg, captions, "sks")
    assert [p.text for p in got if p.concept] == ["a blue sks", "a orange sks", "a purple sks", "a yellow sks"]
    assert [p.text for p in got if not p.concept] == ["a blue circle", "a red square"]
    cfg.prior.class_prompt = "a shape"
    assert [p.text for p in validation_prompts(cfg, captions, "sks") if not p.concept] == ["a shape", "a blue circle"]
    cfg.pivotal.token, cfg.pivotal.trigger = "<s1>", "sks"
    assert trigger_of(cfg, captions) == "sks"
    cfg.validation.prompts = ["a red sks at night", {"text": "a dog", "kind": "concept"}, "a cat"]
    got = validation_prompts(cfg, captions, "sks")
    assert [(p.text, p.concept) for p in got] == [("a red sks at night", True), ("a dog", True), ("a cat", False)]


@pytest.mark.parametrize("changes,message", [
    ({"validation__select_by": "images"}, "select_by images needs image validation"),
    ({"validation__scorer": "shapes", "validation__select_by": "loss"}, "select_by loss needs held-out images"),
    ({"validation__scorer": "shapes", "validation__score_weights": "likeness=x"}, "likeness needs a number"),
    ({"validation__scorer": "shapes", "validation__score_weights": "copying=1"}, "give likeness, adherence or"),
    ({"validation__scorer": "shapes", "validation__score_weights": "style=1"}, "unknown part 'style'"),
    ({"validation__scorer": "shapes", "validation__prompts": [{"text": "a", "kind": "x"}]}, "kind must be concept"),
    ({"validation__scorer": "shapes", "validation__image_size": 30}, "multiple of 8"),
    ({"validation__prompts": ["a red sks"]}, r"validation\.prompts is for image validation"),  # read by no one
    ({"validation__seeds": 4}, r"validation\.seeds is for image validation"),
])
def test_bad_image_validation_settings_are_one_line(tmp_path, changes, message):
    cfg = tiny_config("", tmp_path, tmp_path / "o.safetensors", **changes)
    with pytest.raises(ConfigError, match=message) as e:
        validate(cfg)
    assert "\n" not in str(e.value)
    assert Config().select_by == "" and validate(tiny_config("", tmp_path, tmp_path / "o.safetensors",
                                                             validation__scorer="shapes")).select_by == "images"


def test_a_job_file_takes_validation_prompt_tables(tmp_path):
    from sdlora.config import load_toml

    (tmp_path / "job.toml").write_text('[[data]]\npath = "."\n[validation]\nscorer = "shapes"\n'
                                       '[[validation.prompts]]\ntext = "a red sks"\n'
                                       '[[validation.prompts]]\ntext = "a blue circle"\nkind = "preservation"\n')
    cfg = validate(load_toml(tmp_path / "job.toml"))
    assert cfg.validation.prompts == ["a red sks", {"text": "a blue circle", "kind": "preservation"}] or \
        cfg.validation.prompts == [{"text": "a red sks"}, {"text": "a blue circle", "kind": "preservation"}]
    (tmp_path / "bad.toml").write_text('[[data]]\npath = "."\n[[validation.prompts]]\ntext = "a"\nseed = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key 'validation\.prompts\[0\]\.seed'"):
        load_toml(tmp_path / "bad.toml")
