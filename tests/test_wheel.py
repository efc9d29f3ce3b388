"""A plain (non-editable) install works from any folder: the wheel carries the shipped model, judge and concept
images, and `sdlora demo` finds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_the_demo_from_another_folder(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # no build isolation: the venv's setuptools builds it, nothing is downloaded
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheels)], check=True,
                   capture_output=True, timeout=300)
    wheel = next(wheels.glob("sdlora-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (target / "sdlora" / "sample_data" / "shapes-sd" / "model_index.json").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=900)

    where = run("-c", "import sdlora, ui; from sdlora.paths import default_model_path, sample_data; "
                      "print(sdlora.__file__, ui.__file__, default_model_path(), sample_data(), sep='\\n')")
    assert where.returncode == 0, where.stderr[-2000:]
    for line in where.stdout.split():
        assert line.startswith(str(target)), line  # the installed copy, not the source tree
    demo = run("-m", "sdlora", "demo", "--max-steps", "20", "--n", "2", "--output", "demo-out")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "concept fidelity" in demo.stdout
    report = json.loads((elsewhere / "demo-out" / "eval" / "report.json").read_text())
    assert report["n"] == 2 and report["model"].startswith(str(target))
    assert (elsewhere / "demo-out" / "demo.safetensors").is_file()
