"""The web UI's job queue, file-name sanitizer and page helpers, without a browser."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from conftest import draw_images, tiny_config

from sdlora.errors import DataError
from ui import progress
from ui.files import dataset_rows, import_uploads, inside, list_loras, safe_name, write_captions
from ui.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, STOPPED, JobManager


class FakeTrain:
    """Stands in for sdlora.train: reports steps through the callbacks, honours stop, can be held."""

    def __init__(self, steps=3, fail_on=None):
        self.order, self.steps, self.fail_on = [], steps, fail_on
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, cfg, callbacks, commands, resume=False):
        self.order.append(cfg.output.path)
        if cfg.output.path == self.fail_on:
            raise DataError("no images in /nowhere")
        callbacks.on_start(SimpleNamespace(cfg=cfg, start_step=0))
        step = 0
        while step < cfg.train.max_steps:
            self.gate.wait(5)
            step += 1
            callbacks.on_step(step, {"loss": 1.0 / step, "lr": 1e-4, "step": step})
            if commands.stop:
                break
        callbacks.on_sample(step, [f"/x/step_{step}.png"])
        result = SimpleNamespace(output=cfg.output.path, stopped=commands.stop, steps=step)
        callbacks.on_end(result)
        return result


def cfg_named(name, steps=3):
    from sdlora.config import Config

    cfg = Config()
    cfg.output.path, cfg.train.max_steps = name, steps
    return cfg


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_jobs_run_one_at_a_time_in_queue_order(tmp_path):
    fake = FakeTrain()
    fake.gate.clear()  # hold the first job on its first step
    m = JobManager(tmp_path, train_fn=fake)
    jobs = [m.submit(cfg_named(n), n) for n in ("a", "b", "c")]
    wait_for(lambda: jobs[0].state == RUNNING)
    assert [j.state for j in jobs] == [RUNNING, QUEUED, QUEUED] and m.queued() == jobs[1:]
    fake.gate.set()
    for job in jobs:
        m.wait(job, 10)
    assert fake.order == ["a", "b", "c"]
    assert [j.state for j in jobs] == [DONE] * 3
    assert jobs[0].losses == [(1, 1.0), (2, 0.5), (3, 1 / 3)] and jobs[0].samples == [(3, "/x/step_3.png")]
    m.close()


def test_stop_running_job_and_cancel_queued_one(tmp_path):
    fake = FakeTrain(steps=1000)
    fake.gate.clear()
    m = JobManager(tmp_path, train_fn=fake)
    first, second = m.submit(cfg_named("a", 1000), "a"), m.submit(cfg_named("b"), "b")
    wait_for(lambda: first.state == RUNNING)
    assert m.stop(second.id).state == CANCELLED
    assert m.stop() is first  # no id: the running job
    fake.gate.set()
    m.wait(first, 10)
    assert first.state == STOPPED and first.step < 1000
    assert fake.order == ["a"]  # the cancelled job never ran
    m.close()


def test_status_survives_reload(tmp_path):
    """A page that reloads builds its view from the manager again: the same job, progress and history."""
    fake = FakeTrain(steps=5)
    m = JobManager(tmp_path, train_fn=fake)
    job = m.wait(m.submit(cfg_named("a", 5), "a"), 10)
    assert m.current() is job
    html = progress.status_html(m.current())
    assert "Finished" in html and "5 / 5" in html
    assert progress.loss_frame(m.current())["step"].tolist() == [1, 2, 3, 4, 5]
    assert progress.queue_rows(m.jobs())[0][:3] == [job.id, "a", DONE]
    m.close()


def test_error_is_captured_as_a_message(tmp_path):
    fake = FakeTrain(fail_on="bad")
    m = JobManager(tmp_path, train_fn=fake)
    bad, good = m.submit(cfg_named("bad"), "bad"), m.submit(cfg_named("good"), "good")
    m.wait(good, 10)
    assert bad.state == FAILED and bad.error == "no images in /nowhere"
    assert good.state == DONE  # the queue goes on after a failure
    assert "no images in /nowhere" in progress.status_html(bad) and "Traceback" not in progress.status_html(bad)
    m.close()


def test_real_training_error_from_an_empty_folder(tmp_path, tiny_model):
    """The real trainer on the worker thread: a data error ends the job with the library's one-line message."""
    (tmp_path / "empty").mkdir()
    m = JobManager(tmp_path)
    job = m.wait(m.submit(tiny_config(tiny_model, tmp_path / "empty", tmp_path / "o" / "l.safetensors"), "x"), 60)
    assert job.state == FAILED and job.error and "\n" not in job.error
    m.close()


def test_real_training_records_progress(tmp_path, tiny_model):
    data = draw_images(tmp_path / "imgs", n=3)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=3,
                      validation__split=0.3, validation__every=2)
    cfg.sample.prompts, cfg.sample.steps = ["a red sks"], 2
    m = JobManager(tmp_path)
    job = m.wait(m.submit(cfg, "l"), 120)
    assert job.state == DONE, job.error
    assert [s for s, _ in job.losses] == [1, 2, 3] and job.total == 3 and job.rate > 0
    assert [s for s, _ in job.samples] == [0, 3]
    frame = progress.loss_frame(job)  # the plot's two curves, told apart by `series`
    assert frame[frame.series == "training"]["step"].tolist() == [1, 2, 3]
    assert frame[frame.series == "validation"]["step"].tolist() == [2, 3]
    assert "validation" in progress.status_html(job)
    assert job.output == str(cfg.output.path)
    m.close()


@pytest.mark.parametrize("raw,expected", [
    ("cat.png", "cat.png"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\evil.png", "evil.png"),
    ("/abs/path/x.jpg", "x.jpg"),
    ("..", "file"),
    ("a..b...png", "a.b.png"),
    (".hidden.png", "hidden.png"),
    ("my photo (1).JPG", "my_photo_1_.JPG"),
    ("naïve café.png", "naive_cafe.png"),
    ("a\x00b.png", "a_b.png"),
    ("", "file"),
])
def test_safe_name(raw, expected):
    assert safe_name(raw) == expected


def test_safe_name_is_short_and_keeps_extension():
    name = safe_name("x" * 500 + ".png")
    assert len(name) <= 100 and name.endswith(".png")


def test_uploads_cannot_escape_the_job_folder(tmp_path):
    src = tmp_path / "src"
    draw_images(src, n=1)
    evil = tmp_path / "src" / "..%2f..%2fevil.png"
    evil.write_bytes((src / "img0.png").read_bytes())
    (src / "notes.exe").write_text("no")
    job = tmp_path / "out" / "job" / "images"
    copied = import_uploads([str(src / "img0.png"), str(src / "img0.txt"), str(evil), str(src / "notes.exe")], job)
    assert all(p.parent == job.resolve() for p in copied)
    assert sorted(p.name for p in job.iterdir()) == ["2f._2fevil.png", "img0.png", "img0.txt"]
    assert inside(job, "../../x.png") == job.resolve() / "x.png"


def test_captions_round_trip_through_sidecars(tmp_path):
    folder = draw_images(tmp_path / "d", n=2, captions=False)
    assert dataset_rows(folder) == [["img0.png", ""], ["img1.png", ""]]
    assert write_captions(folder, [["img0.png", "a red sks"], ["img1.png", ""], ["../escape.png", "x"]]) == \
        ["img0.png"]
    assert (folder / "img0.txt").read_text() == "a red sks\n" and not (folder / "img1.txt").exists()
    assert write_captions(folder, [["img0.png", "a red sks"], ["img1.png", ""]]) == []  # nothing changed: none written
    assert not (tmp_path / "escape.txt").exists()
    assert dataset_rows(folder)[0] == ["img0.png", "a red sks"]


def test_list_loras_skips_checkpoints(tmp_path):
    (tmp_path / "a_checkpoints").mkdir()
    (tmp_path / "a_checkpoints" / "step_1.safetensors").write_bytes(b"")
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert list_loras(tmp_path) == [tmp_path / "a.safetensors"]


def test_form_round_trips_a_config():
    """The generated inputs map back to the same Config (what Save/Load settings and Start rely on); a number typed
    wrong is named by its label and kept out of the config, the other fields read as they are."""
    import gradio as gr

    from sdlora.config import Config, DataFolder
    from sdlora.options import options
    from ui.form import ConfigForm

    cfg = Config()
    cfg.data = [DataFolder(path="/d", prompt="a sks")]
    cfg.lora.rank, cfg.sample.prompts, cfg.optim.lr_scheduler, cfg.optim.lr = 8, ["p1", "p2"], "cosine", 3e-05
    with gr.Blocks():
        form = ConfigForm()
        for o in options():
            form.add(*o.key)
    again, errors = form.read(form.values_of(cfg))
    assert again.to_dict() == cfg.to_dict() and errors == {}
    assert all(c.info and c.label and "_" not in c.label for c in form.components)  # words, and a line of help
    values = form.values_of(cfg)
    values[form.keys.index(("lora", "rank"))] = "abc"
    values[form.keys.index(("train", "max_steps"))] = "2.5"
    wrong, errors = form.read(values)
    assert errors == {("lora", "rank"): "Rank must be a whole number, got 'abc'",
                      ("train", "max_steps"): "Steps must be a whole number, got '2.5'"}
    assert wrong.optim.lr == 3e-05 and wrong.lora.rank == Config().lora.rank


def test_status_says_loading_until_the_steps_begin_and_the_chart_draws_every_step(tmp_path):
    from ui.chart import loss_chart, nice_ticks

    fake = FakeTrain(steps=3)
    fake.gate.clear()
    started = threading.Event()

    def slow_load(cfg, callbacks, commands, resume=False):
        started.set()
        fake.gate.wait(5)  # the model is still loading: on_start not called yet
        return fake(cfg, callbacks, commands, resume)

    m = JobManager(tmp_path, train_fn=slow_load)
    job = m.submit(cfg_named("a", 3), "a")
    started.wait(5)
    html = progress.status_html(job)
    assert "Loading the model" in html and "step 0" not in html and 'class="running loading"' in html
    fake.gate.set()
    m.wait(job, 10)
    chart = loss_chart(job.losses, job.val_losses)
    points = chart.split('class="loss-raw" points="')[1].split('"')[0].split()
    assert len(points) == 3 and "Loss by step" in chart
    assert nice_ticks(0, 260) == [0, 100, 200] and nice_ticks(1, 60) == [20, 40, 60]  # few round ticks: no overlap
    m.close()


def test_resume_continues_the_same_job(tmp_path):
    from sdlora.errors import SdloraError

    fake = FakeTrain(steps=1000)
    fake.gate.clear()
    m = JobManager(tmp_path, train_fn=fake)
    job = m.submit(cfg_named("a", 1000), "a")
    wait_for(lambda: job.state == RUNNING)
    with pytest.raises(SdloraError, match="stop it before resuming"):
        m.resume(job, cfg_named("a", 2))
    m.stop()
    fake.gate.set()
    m.wait(job, 10)
    assert job.state == STOPPED
    again = m.wait(m.resume(job, cfg_named("a", 2)), 10)
    assert again is job and job.state == DONE and job.resume and len(m.jobs()) == 1
    m.close()


def test_toasts_keep_angle_brackets(monkeypatch):
    import gradio as gr

    from ui import notify

    shown = []
    monkeypatch.setattr(gr, "Warning", shown.append)
    notify.warn("pivotal tuning needs a token (e.g. '<s1>')")
    assert shown == ["pivotal tuning needs a token (e.g. &#x27;&lt;s1&gt;&#x27;)"]  # rendered as the text


def test_uploads_follow_a_renamed_lora_and_embedding_files_are_no_loras(tmp_path):
    import torch

    from sdlora.loras.files import write_embedding
    from ui.files import move_uploads

    draw_images(tmp_path / "first" / "images", n=1)
    folder, masks = move_uploads(tmp_path, "first", "second", str(tmp_path / "first" / "images"), "")
    assert folder == str(tmp_path / "second" / "images") and masks == ""
    assert (tmp_path / "second" / "images" / "img0.png").is_file() and not (tmp_path / "first" / "images").exists()
    typed = str(tmp_path / "elsewhere")  # a folder the user typed is theirs: it stays where it is
    assert move_uploads(tmp_path, "second", "third", typed, "") == (typed, "")
    write_embedding(tmp_path / "l_emb.safetensors", "<s1>", {"clip_l": torch.zeros(1, 8)})
    assert list_loras(tmp_path) == []


def test_real_training_stop_then_resume(tmp_path, tiny_model):
    """Stop (pressed during step 2) saves a resumable checkpoint; a Resume job continues from it to the end."""
    from sdlora import train

    def train_and_press_stop_at_step_2(cfg, callbacks, commands, resume=False):
        step_hook = callbacks.on_step

        def on_step(step, stats):
            step_hook(step, stats)
            if step == 2 and not resume:
                m.stop()

        callbacks.on_step = on_step
        return train(cfg, callbacks, commands, resume=resume)

    data = draw_images(tmp_path / "imgs", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=6)
    m = JobManager(tmp_path, train_fn=train_and_press_stop_at_step_2)
    job = m.wait(m.submit(cfg, "l"), 60)
    assert job.state == STOPPED and job.step == 2, job.error
    again = m.wait(m.submit(cfg, "l", resume=True), 60)
    assert again.state == DONE and again.start_step == 2 and again.step == 6
    assert any("resumed" in text for text in again.messages)
    m.close()


def test_cli_ui_safe_defaults_and_auth():
    from sdlora.cli import build_parser
    from sdlora.errors import SdloraError
    from ui.app import parse_auth

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.share, args.auth) == ("127.0.0.1", False, None)  # local only, no public link
    args = build_parser().parse_args(["ui", "--auth", "bob:s:e:c", "--output-dir", "o", "--port", "9"])
    assert parse_auth(args.auth) == ("bob", "s:e:c") and args.port == 9
    assert parse_auth(None) is None
    with pytest.raises(SdloraError, match="USER:PASSWORD"):
        parse_auth("bob")


def test_browser_paths_stay_inside_the_allowed_folders(tmp_path):
    from sdlora.errors import SdloraError
    from ui.files import Allowed

    out, data, elsewhere = tmp_path / "out", tmp_path / "data", tmp_path / "elsewhere"
    for d in (out, data, elsewhere):
        d.mkdir()
    (data / "escape").symlink_to(elsewhere)  # a link inside an allowed folder that points out of it
    allowed = Allowed(out, [data], model="/models/given-at-start")
    assert allowed.path(data / "sub") == (data / "sub").resolve()
    assert allowed.path(out / "lora" / "images") == (out / "lora" / "images").resolve()
    for bad in (elsewhere, data / "escape", data / ".." / "elsewhere", "/etc", "~"):
        with pytest.raises(SdloraError, match="outside the folders this UI may use"):
            allowed.path(bad)
    with pytest.raises(SdloraError, match="not in the output folder"):
        allowed.output(data / "x.safetensors")
    assert allowed.model_path("") == "" and allowed.model_path("someone/some-model") == "someone/some-model"
    assert allowed.model_path("/models/given-at-start") == "/models/given-at-start"
    with pytest.raises(SdloraError, match="base model"):
        allowed.model_path(str(elsewhere))


def test_train_tab_refuses_folders_and_captions_outside(tmp_path):
    import gradio as gr
    from PIL import Image

    from ui.train_tab import TrainTab

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    tab = TrainTab(JobManager(tmp_path / "out", data_roots=[tmp_path / "data"]))
    rows, gallery, status = tab.dataset.on_folder(str(outside))
    assert (rows, gallery) == ([], []) and "outside the folders" in status and "--data-root" in status
    with pytest.raises(gr.Error, match="outside the folders"):
        tab.dataset.on_captions(str(outside), [["secret.png", "written"]])
    with pytest.raises(gr.Error, match="outside the folders"):
        tab.dataset.on_captions(str(outside), [["secret.png", ""]])  # an empty caption would delete a sidecar
    assert [p.name for p in outside.iterdir()] == ["secret.png"]


def test_share_needs_auth_and_empty_auth_is_an_error(capsys):
    from sdlora.cli import main
    from sdlora.errors import SdloraError
    from ui.app import parse_auth, serve

    assert main(["ui", "--share"]) == 2
    assert "--share makes a public link" in capsys.readouterr().err
    with pytest.raises(SdloraError, match="USER:PASSWORD"):
        parse_auth("")
    with pytest.raises(SdloraError, match="needs --auth"):
        serve(JobManager("unused"), share=True, block=False)


def test_logins_are_slowed_and_locked_after_repeated_failures():
    from ui.auth import Login

    now, slept = [0.0], []
    login = Login("bob", "right", max_failures=5, window=60, delay=1.0, clock=lambda: now[0],
                  sleep=lambda s: slept.append(s))
    assert login("bob", "right")
    results = [login("bob", f"guess{i}") for i in range(30)]
    assert not any(results) and sum(slept) >= 30  # each failure costs a second
    assert not login("bob", "right")  # locked: even the right password waits for the window to pass
    now[0] = 61.0
    assert login("bob", "right")


def test_the_page_picks_the_models_preset_and_settings_files_round_trip(tmp_path):
    """A model of another family picks (and fills in) its family's preset for the same goal, leaving the page's own
    fields alone; a saved settings file loads back into the same widgets, name and method."""
    import gradio as gr

    from sdlora.config import DataFolder, load_toml
    from sdlora.presets import load_preset
    from ui.train_tab import TrainTab

    tab = TrainTab(JobManager(tmp_path / "out"))
    with gr.Blocks():
        tab.build()
    assert tab.settings.initial_preset == "shapes-world"  # the built-in model
    update, picked = tab.settings.on_model("stabilityai/stable-diffusion-xl-base-1.0", "shapes-world")
    assert picked and update["value"] == "sdxl-character"
    values = tab.form.values_of(tab.settings.initial)
    filled = tab.settings.on_picked(True, "sdxl-character", *values)
    at = tab.form.keys.index
    assert filled[at(("lora", "rank"))] == str(load_preset("sdxl-character").lora.rank)
    assert filled[at(("model", "path"))] == gr.skip() and filled[at(("data", "prompt"))] == gr.skip()
    assert tab.settings.on_model("stabilityai/stable-diffusion-xl-base-1.0", "sdxl-object")[1] is False
    cfg = load_preset("sd15-style")
    cfg.data = [DataFolder(path=str(tmp_path), prompt="a sks")]
    cfg.output.path = str(tmp_path / "mine.safetensors")
    cfg.pivotal.token = "<s1>"
    (tmp_path / "mine.toml").write_text(cfg.to_toml())
    name, method, last, *loaded = tab.on_load(str(tmp_path / "mine.toml"))
    assert (name, method, last) == ("mine", "Pivotal tuning", "mine")
    assert loaded == tab.form.values_of(load_toml(tmp_path / "mine.toml"))


def test_captioning_errors_leave_the_images_and_say_why(tmp_path):
    """The gallery and captions table are never replaced by an error: each case is said beside the button."""
    import gradio as gr

    from ui.train_tab import TrainTab

    folder = draw_images(tmp_path / "data" / "imgs", n=2)  # both have a caption
    tab = TrainTab(JobManager(tmp_path / "out", data_roots=[tmp_path / "data"]))
    quiet = lambda *a, **k: None  # noqa: E731 - Gradio's progress, outside an event
    missing = str(tmp_path / "data" / "no-model")
    rows, gallery, status = tab.dataset.on_caption(str(folder), missing, "", False, progress=quiet)
    assert (rows, gallery) == (gr.skip(), gr.skip()) and "tick <b>Overwrite" in status  # no silent "done"
    rows, gallery, status = tab.dataset.on_caption(str(folder), missing, "", True, progress=quiet)
    assert (rows, gallery) == (gr.skip(), gr.skip()) and "Captioning failed" in status and "no-model" in status
    assert "give a captioner" in tab.dataset.on_caption(str(folder), "", "", True, progress=quiet)[2]


def test_dreambooth_help_says_what_the_page_does():
    from sdlora.options import by_key

    opts = by_key()
    assert "needed for DreamBooth" in opts[("prior", "class_prompt")].short
    assert "empty = off" not in opts[("prior", "class_prompt")].short
    assert "class_images folder" in opts[("prior", "num_class_images")].short  # where the page puts them


def test_image_scores_reach_the_page(tmp_path, tiny_model):
    """A run with the shapes scorer: the page's score curve has a point for each validation and part (the values of
    the run's JSON-lines log), the validation sheets are listed, and the checkpoint table gives each checkpoint's
    scores and marks the step the best file was picked at."""
    import json
    import re

    from ui.chart import score_chart

    data = draw_images(tmp_path / "imgs", n=4)
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=4,
                      validation__scorer="shapes", validation__every=2, validation__seeds=1,
                      validation__image_steps=2, validation__prompts=["a red sks", "a blue square"],
                      validation__keep_best=True, output__trigger="sks", output__save_every=2)
    m = JobManager(tmp_path)
    job = m.wait(m.submit(cfg, "l"), 300)
    m.close()
    assert job.state == DONE, job.error
    from sdlora.training.periodic.runlog import log_path

    lines = [json.loads(x) for x in log_path(cfg.output.path).read_text().splitlines()]
    lines = [r for r in lines if "score" in r]
    assert [r["step"] for r in lines] == [s for s, _ in job.scores] == [2, 4]
    parts = ("score", "likeness", "adherence", "preservation", "copying")
    for (_, got), r in zip(job.scores, lines):
        assert {k: got[k] for k in parts if k in got} == pytest.approx({k: r[k] for k in parts if k in r})
    chart = score_chart(job.scores, job.best_step, job.cfg.select_by)
    n_values = sum(len(p) for _, p in job.scores)
    assert len(re.findall(r'<circle class="score-point', chart)) == n_values > 0
    assert f"step {job.best_step}" in chart and "picked by the combined score" in chart
    best = max(lines, key=lambda r: (r["score"], r["step"]))["step"]  # on ties the later step, as the trainer keeps
    assert job.best_step == best
    assert [c for _, c in progress.validation_items(job)] == ["validation at step 4", "validation at step 2"]
    rows = progress.checkpoint_rows(job)
    assert [r[0] for r in rows] == [2, 4, best] and all(r[1].endswith(".safetensors") for r in rows)
    for row, r in zip(rows, lines):
        assert row[2] == f"{r['score']:.4f}"
    picked = [r for r in rows if r[-1].startswith("best")]
    assert len(picked) == 1 and picked[0][0] == best
    assert rows[-1][1] == "l_best.safetensors" and rows[-1][2] == f"{max(r['score'] for r in lines):.4f}"
    assert "image score" in progress.status_html(job)


def test_the_page_trains_a_slider(tmp_path):
    """Method "Slider / eraser": the page's slider fields (no images) make the job `sdlora slider` runs; the
    image-only settings of the preset are dropped as hidden, and the LoRA file says it is a slider."""
    import json

    import gradio as gr

    from sdlora.loras.files import read_lora
    from sdlora.options import SLIDER
    from ui.runs import FormError
    from ui.train_tab import TrainTab

    tab = TrainTab(JobManager(tmp_path / "out"))
    with gr.Blocks():
        tab.build()
    cfg = tab.settings.initial  # the shapes-world preset: caption dropout, flips, text encoder on
    cfg.slider.target, cfg.slider.denoise_steps = "a circle", 2
    cfg.train.max_steps, cfg.sample.every, cfg.augment.resolution = 2, 0, 32
    values = tab.form.values_of(cfg)
    with pytest.raises(FormError, match="needs Positive prompt"):  # enhance needs the +1 direction
        tab.runs.make_config("slide", SLIDER, values)
    cfg.slider.positive = "a big circle"
    made, name = tab.runs.make_config("slide", SLIDER, tab.form.values_of(cfg))
    assert made.is_slider and not made.data and not made.lora.train_text_encoder
    job = tab.manager.wait(tab.manager.submit(made, name), 300)
    tab.manager.close()
    assert job.state == DONE, job.error
    meta = read_lora(job.output)[1]
    assert json.loads(meta["sdlora_slider"])["positive"] == "a big circle" and meta["modelspec.tags"] == "slider"


@pytest.mark.parametrize("method", ["DreamBooth (prior preservation)", "Pivotal tuning"])
def test_dreambooth_and_pivotal_at_the_pages_starting_values_change_the_image(tmp_path, method):
    """At the form's first values every image once stayed the base model's, for DreamBooth and pivotal runs too. The
    preset the page picks for the built-in model, the shipped stars, 100 steps and only the fields the method needs
    (a class prompt and how many class images, which Start asks for by name rather than failing in the run; a token
    for the trigger): the Preview draws, at the same seed, a visibly different image with the trained file than
    without it."""
    import gradio as gr
    import numpy as np
    from PIL import Image

    from sdlora.config import DataFolder
    from sdlora.options import DREAMBOOTH, METHODS
    from sdlora.paths import sample_data
    from ui.preview_tab import SLOTS, PreviewTab
    from ui.runs import FormError
    from ui.train_tab import TrainTab

    assert method in METHODS
    tab = TrainTab(JobManager(tmp_path / "out"))
    with gr.Blocks():
        tab.build()
    folder = tab.manager.output_dir / "stars" / "images"
    import_uploads([str(p) for p in sorted((sample_data() / "concepts" / "star").iterdir())], folder)
    cfg = tab.settings.initial
    cfg.data, cfg.train.max_steps = [DataFolder(path=str(folder))], 100
    if method == DREAMBOOTH:
        cfg.prior.class_prompt, prompt = "a red shape", "a red sks"
        with pytest.raises(FormError) as e:  # the page's class folder is empty: the run would fail on it
            tab.runs.make_config("stars", method, tab.form.values_of(cfg))
        assert list(e.value.fields) == [("prior", "num_class_images")] and "class images" in e.value.fields[
            ("prior", "num_class_images")]
        cfg.prior.num_class_images = 8
    else:
        cfg.pivotal.token, cfg.pivotal.trigger, prompt = "<s1>", "sks", "a red <s1>"
    made, name = tab.runs.make_config("stars", method, tab.form.values_of(cfg))
    assert made.train.max_steps == 100 and made.lora.rank == tab.settings.initial.lora.rank  # the preset's values
    job = tab.manager.wait(tab.manager.submit(made, name), 600)
    tab.manager.close()
    assert job.state == DONE, job.error
    picks = [job.output] + [""] * (SLOTS - 1)
    base, mine, _ = PreviewTab(tab.manager).on_generate(tab.manager.model, prompt, "", 0, 20, 7.5, 0, *picks,
                                                         *[1.0] * SLOTS)
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=float) for p in (base, mine))
    assert np.abs(a - b).mean() > 10, f"{method}: the trained file draws the base model's image"
