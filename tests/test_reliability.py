"""Nothing lost, nothing silent: outputs never replace inputs, late write failures keep the work, an interrupted run
resumes past torn files, killed runs leave nothing behind, files follow the umask, Ctrl-C is one line."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from conftest import StopAt, draw_images, tiny_config

from sdlora import train
from sdlora.callbacks import Commands
from sdlora.cli import main
from sdlora.errors import TrainingError, WriteError
from sdlora.loras.files import read_lora


def test_output_equal_to_the_base_model_is_refused_before_training(tiny_model, images, tmp_path, capsys):
    from sdlora.single_file import save_single_file

    model = save_single_file(tiny_model, tmp_path / "base.safetensors")
    before = model.read_bytes()
    capsys.readouterr()
    rc = main(["train", "--model", str(model), "--data", str(images), "--output", str(model), "--resolution", "32"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "is the base model" in err and "\n" not in err
    assert model.read_bytes() == before


def test_batch_jobs_with_one_output_are_refused_before_any_trains(tiny_model, images, tmp_path, capsys):
    job = (f'[model]\npath = "{tiny_model}"\n[augment]\nresolution = 32\n[train]\nmax_steps = 1\n'
           f'[[data]]\npath = "{images}"\nprompt = "a sks"\n[output]\npath = "same.safetensors"\n')
    (tmp_path / "a.toml").write_text(job)
    (tmp_path / "b.toml").write_text(job)
    rc = main(["train", str(tmp_path / "a.toml"), str(tmp_path / "b.toml")])
    err = capsys.readouterr().err
    assert rc == 2 and "both write" in err and not (tmp_path / "same.safetensors").exists()


@pytest.mark.parametrize("where", ["folder", "parent-file"])
def test_unwritable_outputs_are_refused_before_loading_the_model(images, tmp_path, where, monkeypatch):
    import sdlora.models

    monkeypatch.setattr(sdlora.models, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    if where == "folder":
        out = tmp_path / "x.safetensors"
        out.mkdir()
        says = "a folder of that name exists"
    else:
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "x.safetensors"
        says = "is a file, not a folder"
    cfg = tiny_config("unused-model", images, out)
    cfg.model.path = ""
    with pytest.raises(WriteError, match=says):
        train(cfg)


def test_full_disk_during_a_checkpoint_says_where_the_last_good_one_is(tiny_model, images, tmp_path, monkeypatch):
    import sdlora.io

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=6)
    cfg.output.save_every = 2
    real = torch.save
    calls = []

    def full_disk(obj, f, *a, **k):  # torch.save reports a full disk as a RuntimeError
        calls.append(f)
        if len(calls) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(sdlora.io.torch, "save", full_disk)
    with pytest.raises(WriteError) as err:
        train(cfg)
    message = str(err.value)
    assert "step_0000004.pt" in message and "last good checkpoint is" in message and "step_0000002.pt" in message
    assert "\n" not in message
    assert not list((tmp_path / "o" / "l_checkpoints").glob(".*.tmp"))  # nothing torn left behind


def test_a_failed_final_write_keeps_the_run_and_resume_finishes_it(tiny_model, images, tmp_path, monkeypatch):
    import sdlora.training.periodic.output as output

    cfg = tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__max_steps=3)
    real = output.write_lora

    def no_room(path, *a, **k):
        if path == tmp_path / "o" / "l.safetensors":
            raise WriteError(f"cannot write {path}: No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(output, "write_lora", no_room)
    with pytest.raises(TrainingError, match=r"the run is kept in .*step_0000003\.pt.*--resume"):
        train(cfg)
    monkeypatch.undo()
    assert train(cfg, resume=True).steps == 3
    assert read_lora(cfg.output.path)[1]["ss_steps"] == "3"


def test_resume_skips_a_torn_checkpoint_and_a_torn_log_line(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", n=3)
    full = tiny_config(tiny_model, data, tmp_path / "a" / "l.safetensors", train__max_steps=6)
    train(full)
    part = tiny_config(tiny_model, data, tmp_path / "b" / "l.safetensors", train__max_steps=6)
    part.output.save_every = 2
    commands = Commands()
    assert train(part, StopAt(commands, 4), commands).stopped
    ckpts = tmp_path / "b" / "l_checkpoints"
    newest = ckpts / "step_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a power cut mid-write
    log = tmp_path / "b" / "l_log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 5, "lo')  # and a torn last log line
    messages = []

    class Listen(StopAt):
        def on_message(self, text):
            messages.append(text)

    second = train(part, Listen(Commands(), -1), resume=True)
    assert second.steps == 6
    assert any("skipping step_0000004.pt" in m for m in messages)
    assert any("resumed from" in m and "step_0000002.pt" in m for m in messages)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(1, 7))
    a, b = read_lora(full.output.path)[0], read_lora(part.output.path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if never interrupted


def test_stale_temp_files_are_removed_at_start(tiny_model, images, tmp_path):
    out = tmp_path / "o" / "l.safetensors"
    ckpts = out.with_name("l_checkpoints")
    ckpts.mkdir(parents=True)
    stale = [out.with_name(".l.safetensors.abcd1234.tmp"), ckpts / ".step_0000002.pt.k3j4h5g6.tmp",
             ckpts / ".step_0000002.safetensors.zz99yy88.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    other = out.with_name(".other.safetensors.abcd1234.tmp")  # not this run's: left alone
    other.write_bytes(b"")
    train(tiny_config(tiny_model, images, out, train__max_steps=1))
    assert not any(p.exists() for p in stale) and other.exists()


def test_files_follow_the_umask(tiny_model, loras_for_umask, tmp_path):
    from sdlora import merge_into_model

    old = os.umask(0o002)
    try:
        merged = merge_into_model(tiny_model, [(loras_for_umask, 1.0)], tmp_path / "merged")
        single = merge_into_model(tiny_model, [(loras_for_umask, 1.0)], tmp_path / "merged.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(merged.stat().st_mode) == 0o775
    assert stat.S_IMODE((merged / "unet").stat().st_mode) == 0o775
    assert stat.S_IMODE(single.stat().st_mode) == 0o664


@pytest.fixture
def loras_for_umask(tiny_model, images, tmp_path):
    cfg = tiny_config(tiny_model, images, tmp_path / "t" / "l.safetensors", train__max_steps=2)
    train(cfg)
    assert stat.S_IMODE(os.stat(cfg.output.path).st_mode) == 0o666 & ~_umask()
    return cfg.output.path


def _umask():
    from sdlora.io import umask

    return umask()


@pytest.mark.parametrize("when", ["start-up", "second"])
def test_ctrl_c_is_one_line(tiny_model, images, tmp_path, capsys, monkeypatch, when):
    """Ctrl-C while the model loads, or a second Ctrl-C while the first waits for the step to end."""
    import signal

    import sdlora.training.loop as loop
    import sdlora.training.run.setup as setup

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    real_step = loop.optimizer_step

    def twice(state, step, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop after this step
        os.kill(os.getpid(), signal.SIGINT)  # the second means: now
        return real_step(state, step, **kw)

    if when == "start-up":
        monkeypatch.setattr(setup, "resolve_resolution", interrupted)
    else:
        monkeypatch.setattr(loop, "optimizer_step", twice)
    rc = main(["train", "--model", tiny_model, "--data", str(images), "--output", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and "Traceback" not in err  # start-up: the fit check runs setup's pieces first, so it stops there
    assert any(line.startswith("interrupted (a run stopped this way resumes") for line in err.splitlines()), err


def test_damaged_loras_are_refused_by_every_tool_and_flagged_by_inspect(tiny_model, tmp_path):
    from test_tools import UNET_A, fresh, random_modules

    from sdlora import convert_lora, generate, inspect_lora, merge_into_model, mix_loras
    from sdlora.errors import LoraFileError
    from sdlora.loras.files import write_lora
    from sdlora.loras.layout import kohya_tensors

    mods = random_modules(fresh(tiny_model), UNET_A[:2], [], 2, 2, seed=0)
    good = write_lora(tmp_path / "good.safetensors", kohya_tensors(mods, torch.float32), {})
    cases = {}
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("zero", 0.0)):
        t = kohya_tensors(mods, torch.float32)
        for k in t:
            if k.endswith("lora_up.weight"):
                t[k] = torch.full_like(t[k], value) if name != "zero" else torch.zeros_like(t[k])
        cases[name] = write_lora(tmp_path / f"{name}.safetensors", t, {})
    for name, path in cases.items():
        says = "changes nothing" if name == "zero" else "NaN or infinite"
        assert any(says in p for p in inspect_lora(path).problems), name
        for tool in (lambda p=path: merge_into_model(tiny_model, [(str(p), 1.0)], tmp_path / "m"),
                     lambda p=path: mix_loras([(str(p), 1.0)], tmp_path / "x.safetensors"),
                     lambda p=path: convert_lora(p, "diffusers", tmp_path / "c.safetensors"),
                     lambda p=path: generate(tiny_model, [(str(p), 1.0)], "a", steps=1, output_dir=tmp_path / "g")):
            with pytest.raises(LoraFileError, match=says):
                tool()
    for weight in (float("nan"), float("inf")):
        with pytest.raises(LoraFileError, match="not a finite number"):
            merge_into_model(tiny_model, [(str(good), weight)], tmp_path / "m")
    assert not any((tmp_path / n).exists() for n in ("m", "x.safetensors", "c.safetensors", "g"))


def test_bad_images_are_skipped_with_a_reason_and_training_goes_on(tiny_model, tmp_path, capsys):
    from PIL import Image

    data = draw_images(tmp_path / "imgs", n=2)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "imgs" / "full.jpg", quality=95)
    blob = (tmp_path / "imgs" / "full.jpg").read_bytes()
    (tmp_path / "imgs" / "truncated.jpg").write_bytes(blob[: len(blob) // 2])
    bomb = Image.new("1", (20000, 20000))
    bomb.save(tmp_path / "imgs" / "bomb.png")
    Image.new("RGB", (1, 1), "blue").save(tmp_path / "imgs" / "tiny.png")
    rc = main(["train", "--model", tiny_model, "--data", str(data), "--resolution", "32", "--max-steps", "1",
               "--output", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipped truncated.jpg" in err and "cannot be decoded" in err
    assert "skipped bomb.png" in err and "decompression-bomb" in err
    assert "upscaled more than 4x" in err and "tiny.png" in err
