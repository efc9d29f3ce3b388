"""Where entry points meet exceptions and the machine (issue 27): a bug is one line naming its crash log, the
machine's errors name the file, captions that are not text are skipped by name, `--allow-pickle` reads what
legitimate SD 1.x checkpoints hold and runs no code, no start prints a warning no user can act on, and the automatic
CPU thread count follows the machine's load."""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import draw_images, tiny_config

from sdlora.cli import main

# ---------------------------------------------------------------- the boundary: bugs and the machine's errors


@pytest.fixture
def crash_dir(tmp_path, monkeypatch):
    folder = tmp_path / "crash-logs"
    monkeypatch.setenv("SDLORA_LOG_DIR", str(folder))
    return folder


def raiser(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _fail_inspect(monkeypatch, exc):
    import sdlora.loras.inspect

    monkeypatch.setattr(sdlora.loras.inspect, "inspect_lora", raiser(exc))


def test_a_bug_is_one_line_naming_a_log_with_its_traceback(crash_dir, monkeypatch, capsys):
    _fail_inspect(monkeypatch, ZeroDivisionError("division by zero"))
    rc = main(["inspect", "x.safetensors"])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and "\n" not in err and "Traceback" not in err
    assert "internal error (ZeroDivisionError: division by zero): a bug in sdlora" in err
    log = Path(re.search(r"the traceback is in (\S+\.log)", err).group(1))
    assert log.parent == crash_dir
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: division by zero" in text
    assert "torch " in text and "command:" in text


def test_the_same_bug_again_reuses_its_log(crash_dir, monkeypatch, capsys):
    """A UI timer hitting one bug every second must not write a file per tick."""
    from sdlora.failures import describe

    try:
        raise KeyError("same")
    except KeyError as e:
        first, again = describe(e), describe(e)
    assert first[1] and first == again and len(list(crash_dir.iterdir())) == 1


@pytest.mark.parametrize("exc, says", [
    (PermissionError(13, "Permission denied", "/data/x.safetensors"), "cannot use /data/x.safetensors: Permission "
                                                                      "denied"),
    (OSError(28, "No space left on device", "/out/x.png"), "cannot use /out/x.png: No space left on device"),
    (MemoryError(), "out of memory: lower --batch-size or --resolution, or run `sdlora fit`"),
])
def test_the_machines_errors_are_one_line_naming_the_file(crash_dir, monkeypatch, capsys, exc, says):
    _fail_inspect(monkeypatch, exc)
    rc = main(["inspect", "x.safetensors"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: {says}") and "\n" not in err
    assert not crash_dir.exists()  # the user's to fix: no crash log


def test_a_bug_in_one_job_of_a_batch_does_not_stop_the_next(tiny_model, images, tmp_path, crash_dir, monkeypatch,
                                                              capsys):
    import sdlora.training.loop as loop

    real, seen = loop.train, []

    def first_fails(cfg, *args, **kwargs):
        seen.append(cfg.output.path)
        if len(seen) == 1:
            raise AttributeError("'NoneType' object has no attribute 'shape'")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train", first_fails)
    jobs = []
    for name in ("a", "b"):
        job = tmp_path / f"{name}.toml"
        job.write_text(f'[model]\npath = "{tiny_model}"\n[augment]\nresolution = 32\n[train]\nmax_steps = 1\n'
                       f'[[data]]\npath = "{images}"\nprompt = "a sks"\n[output]\npath = "{name}.safetensors"\n')
        jobs.append(str(job))
    rc = main(["train", *jobs])
    captured = capsys.readouterr()
    assert rc == 1 and "1 of 2 jobs succeeded" in captured.out
    assert re.search(r"a\.toml: error: internal error \(AttributeError: .*\): a bug in sdlora, .*; the traceback is "
                     r"in \S+\.log", captured.err)
    assert (tmp_path / "b.safetensors").is_file()


def test_ui_handlers_show_any_exception_as_one_line(tmp_path, crash_dir, monkeypatch):
    """Every handler of the built page is guarded: a bug becomes a one-line gr.Error naming the crash log, an OS
    error names its file; Gradio would otherwise show a bare 'Error'."""
    import gradio as gr

    import ui.library_tab
    from ui.app import build_app
    from ui.jobs import JobManager

    manager = JobManager(tmp_path / "out", data_roots=[tmp_path])
    demo = build_app(manager)
    refresh = next(f.fn for f in demo.fns.values()
                   if f.name == "on_refresh" and type(f.fn.__wrapped__.__self__).__name__ == "LibraryTab")
    for exc, says in ((ValueError("bad"), "internal error (ValueError: bad): a bug in sdlora"),
                      (FileNotFoundError(2, "No such file or directory", "/out/gone.safetensors"),
                       "cannot use /out/gone.safetensors: No such file or directory")):
        monkeypatch.setattr(ui.library_tab, "lora_choices", raiser(exc))
        with pytest.raises(gr.Error) as raised:
            refresh(None)
        assert says in raised.value.message and "\n" not in raised.value.message
    assert len(list(crash_dir.iterdir())) == 1  # the bug's log; the OS error wrote none
    manager.close()


def test_a_ui_job_that_hits_a_bug_says_where_the_traceback_is(tmp_path, crash_dir):
    from ui.jobs import FAILED, JobManager

    def broken(cfg, callbacks, commands, resume=False):
        raise IndexError("list index out of range")

    manager = JobManager(tmp_path, train_fn=broken)
    job = manager.wait(manager.submit(tiny_config("m", tmp_path, tmp_path / "o.safetensors"), "x"), 10)
    assert job.state == FAILED and "\n" not in job.error
    assert "internal error (IndexError: list index out of range)" in job.error
    assert str(crash_dir) in job.error
    manager.close()


# ---------------------------------------------------------------- captions that are not text


def test_captions_are_read_as_text_or_skipped_by_name(tmp_path):
    from sdlora.training.inputs.data import scan_folder

    folder = draw_images(tmp_path / "imgs", n=5)
    (folder / "img0.txt").write_bytes((folder / "img0.png").read_bytes())  # a PNG saved as a caption
    (folder / "img1.txt").write_bytes(codecs.BOM_UTF16_LE + "a blue sks, café".encode("utf-16-le"))  # Notepad
    (folder / "img2.txt").write_bytes(codecs.BOM_UTF8 + b"a green sks")
    (folder / "img3.txt").write_bytes(b"a red \x1b[31msks")  # an escape sequence pasted from a terminal
    items, skipped = scan_folder(folder)
    assert {Path(p).name: c for p, c, _ in items} == {"img1.png": "a blue sks, café", "img2.png": "a green sks",
                                                      "img4.png": "a red sks"}
    assert skipped == ["img0.png (its caption img0.txt is not text: byte 0x89 at 0 is not UTF-8; save captions as "
                       "UTF-8 text)", "img3.png (its caption img3.txt is not text: control character U+001B at 6)"]


def test_training_goes_on_without_an_image_whose_caption_is_not_text(tiny_model, tmp_path, capsys):
    data = draw_images(tmp_path / "imgs", n=3)
    (data / "img1.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    rc = main(["train", "--model", tiny_model, "--data", str(data), "--resolution", "32", "--max-steps", "1",
               "--output", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 0 and "skipped img1.png (its caption img1.txt is not text: byte 0x89 at 0 is not UTF-8" in err


# ---------------------------------------------------------------- --allow-pickle


@pytest.fixture
def lightning_module(monkeypatch):
    """`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` as the pickler finds it (Lightning itself is not
    installed), so a checkpoint can hold it the way SD 1.x's original checkpoints do."""
    name = "pytorch_lightning.callbacks.model_checkpoint"

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss_simple_ema", torch.tensor(0.125)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = name, "ModelCheckpoint"
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.setitem(sys.modules, part, types.ModuleType(part))
    sys.modules[name].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint


def test_allow_pickle_reads_a_lightning_checkpoint(tiny_model, tmp_path, lightning_module, capsys):
    """What CompVis' v1 checkpoints hold besides weights: the callback class as a key, an instance, NumPy scalars
    and the step; torch's weights-only loader refuses them, ComfyUI and A1111 allow exactly these."""
    from safetensors.torch import load_file

    from sdlora.single_file import detect_checkpoint, save_single_file

    state = load_file(str(save_single_file(tiny_model, tmp_path / "m.safetensors")))
    ckpt = tmp_path / "sd-v1-x.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6, "pytorch-lightning_version": "1.4.2",
                "callbacks": {lightning_module: {"best_model_score": np.float64(0.125), "dirpath": "/logs"}},
                "checkpoint_callback": lightning_module(), "lr": np.float32(1e-4)}, ckpt)
    assert detect_checkpoint(ckpt, allow_pickle=True).family == "sd1"
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    try:
        import make_single_file
    finally:
        sys.path.pop(0)
    assert make_single_file.main(["--from-ckpt", str(ckpt), str(tmp_path / "out.safetensors")]) == 0
    out = load_file(str(tmp_path / "out.safetensors"))
    assert out.keys() == state.keys() and all(torch.equal(out[k], state[k]) for k in state)
    assert "wrote" in capsys.readouterr().out


def test_a_pickle_that_would_run_code_is_refused_everywhere(tiny_model, tmp_path, capsys):
    from test_malformed import RunsCode

    marker = tmp_path / "RAN"
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": RunsCode(str(marker))}, ckpt)
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    try:
        import make_single_file
    finally:
        sys.path.pop(0)
    assert make_single_file.main(["--from-ckpt", str(ckpt), str(tmp_path / "x.safetensors")]) == 2
    for argv in (["generate", "--model", str(ckpt), "--allow-pickle", "--prompt", "a", "-o", str(tmp_path / "g")],
                 ["extract", "--base", str(ckpt), "--tuned", tiny_model, "--allow-pickle", "--rank", "1", "-o",
                  str(tmp_path / "x.safetensors")]):
        assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("refused: loading it would import posix.system" in x for x in lines), lines
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- warnings nobody can act on

HOOK = '''
import importlib.abc, importlib.util, sys

class ForceAvx512Bf16(importlib.abc.MetaPathFinder):
    """bitsandbytes warns about its optional `kernels` package only on a CPU with AVX512-BF16: claim one."""
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, ForceAvx512Bf16())
if sys.argv[1] == "api":
    from sdlora import generate
    generate(sys.argv[2], [], "a red sks", steps=1, width=32, height=32, output_dir=sys.argv[3])
else:
    from sdlora.cli import main
    sys.exit(main(sys.argv[1:]))
'''
WARNING_LIKE = re.compile(r"warn|fail|deprecat|falling back|torchvision|kernels|not installed", re.IGNORECASE)


def test_no_start_prints_a_warning_nobody_can_act_on(tiny_model, images, tmp_path):
    """A fresh install (no verbosity variables), on a CPU bitsandbytes takes for AVX512-BF16: `train --help`,
    `inspect`, a training run that renders samples, and the Python API print nothing warning-like."""
    lora = tmp_path / "l.safetensors"
    script = tmp_path / "run.py"
    script.write_text(HOOK)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    runs = [["train", "--help"],
            ["train", "--model", tiny_model, "--data", str(images), "--resolution", "32", "--max-steps", "1",
             "--sample-prompt", "a red sks", "--sample-every", "1", "--sample-steps", "1", "--output", str(lora)],
            ["inspect", str(lora)], ["api", tiny_model, str(tmp_path / "g")]]
    for argv in runs:
        done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = (done.stdout + done.stderr).replace(str(tmp_path), "TMP").replace("\r", "\n").splitlines()
        said = [x for x in lines if WARNING_LIKE.search(x) and "--" not in x[:4]]  # help lines name options
        assert not said, f"{argv[0]} printed: {said}"


# ---------------------------------------------------------------- CPU threads that follow the load


class FakeProc:
    """/proc/stat and this process's CPU time, advanced by hand: `tick(seconds, busy_by_others, ours)`."""

    def __init__(self, monkeypatch, cpus=2):
        import sdlora.hardware as hw

        self.busy, self.total, self.own, self.cpus = [0] * cpus, [0] * cpus, 0.0, cpus
        monkeypatch.setattr(hw, "usable_cpus", lambda: list(range(cpus)))
        monkeypatch.setattr(hw, "_cpu_times", lambda: {c: (self.busy[c], self.total[c]) for c in range(cpus)})
        monkeypatch.setattr(hw, "_own_cpu_seconds", lambda: self.own)
        monkeypatch.setattr(hw, "time", SimpleNamespace(monotonic=lambda: self.clock))  # hardware's clock only
        self.clock, self.hz = 0.0, os.sysconf("SC_CLK_TCK")

    def tick(self, seconds: float, others: float, ours: float) -> None:
        """`others` and `ours`: cores' worth of work (spread evenly over the cores)."""
        for c in range(self.cpus):
            self.total[c] += int(self.hz * seconds)
            self.busy[c] += int(self.hz * seconds * min(1.0, (others + ours) / self.cpus))
        self.own += ours * seconds
        self.clock += seconds


@pytest.mark.parametrize("others, ours, free", [(0.0, 1.0, 2), (1.0, 1.0, 1), (0.7, 1.3, 1), (0.0, 2.0, 2),
                                                (0.3, 1.0, 2), (2.0, 0.0, 1)])
def test_free_cores_subtract_this_process_from_the_busy_time(monkeypatch, others, ours, free):
    from sdlora.hardware import FreeCores

    proc = FakeProc(monkeypatch)
    cores = FreeCores()
    proc.tick(30, others, ours)
    assert cores.since_last() == free


def test_thread_count_follows_the_load_every_interval(monkeypatch):
    from sdlora.hardware import follow_free_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    proc, said = FakeProc(monkeypatch), []
    torch.set_num_threads(1)
    try:
        follow = follow_free_cores(0, 30, 1, said.append)
        proc.tick(10, 0.0, 1.0)
        follow()
        assert torch.get_num_threads() == 1 and not said  # not yet 30 s
        proc.tick(25, 0.0, 1.0)  # the other program ended: both cores free
        follow()
        assert torch.get_num_threads() == 2 and said == ["2 CPU thread(s) from now on (2 of 2 cores free)"]
        proc.tick(40, 1.0, 1.0)  # one started
        follow()
        assert torch.get_num_threads() == 1 and said[-1].startswith("1 CPU thread(s) from now on")
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("requested, omp, every, processes", [(2, None, 30, 1), (0, "1", 30, 1), (0, None, 0, 1),
                                                              (0, None, 30, 2)])
def test_a_fixed_thread_count_is_never_changed(monkeypatch, requested, omp, every, processes):
    """--threads N, OMP_NUM_THREADS, --thread-check 0 and multi-process runs keep their count (a fixed count is
    what keeps --resume bit-exact: the count changes a step's last bits)."""
    import sdlora.hardware as hw

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(hw, "FreeCores", lambda: pytest.fail("measured the load"))
    hw.follow_free_cores(requested, every, processes, print)()


def test_training_follows_the_load_and_says_so(tiny_model, images, tmp_path, monkeypatch):
    """The loop asks after every step; every 30 s (here: every other step) the count follows the free cores."""
    import sdlora.hardware as hw
    from sdlora import train
    from sdlora.callbacks import Callbacks

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    clock, counts = iter(range(0, 10**6, 20)), iter([2, 1])
    monkeypatch.setattr(hw, "time", SimpleNamespace(monotonic=lambda: next(clock)))  # 20 s a reading
    monkeypatch.setattr(hw, "free_cores", lambda sample=0.25: 1)  # busy at the start

    def measured(self):
        self._mark()
        return next(counts)

    monkeypatch.setattr(hw.FreeCores, "since_last", measured)

    class Messages(Callbacks):
        def __init__(self):
            self.said = []

        def on_message(self, text):
            self.said.append(text)

    cfg = tiny_config(tiny_model, images, tmp_path / "o.safetensors", train__max_steps=4)
    cfg.speed.thread_check = 30
    said = Messages()
    try:
        train(cfg, said)
    finally:
        torch.set_num_threads(1)
    threads = [m for m in said.said if "CPU thread" in m]
    assert [m.split(" (")[0] for m in threads] == ["2 CPU thread(s) from now on", "1 CPU thread(s) from now on"]
