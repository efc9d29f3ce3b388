"""The demo job under a changing load: training time with the CPU thread count re-checked during the run
(`--thread-check N`, the default 30) against counted once at the start (`--thread-check 0`, sdlora before it).

    python scripts/bench_threads_load.py [--max-steps 300] [--resolution 0] [--busy-until 0.5] [--check 10]
                                         [--repeats 1] [--exact]

Each run trains `sample_data/demo.toml` (no sample renders) with the automatic thread count (no OMP_NUM_THREADS, no
--threads) while a busy process (one core of pure Python) runs from before the start until the run is
`--busy-until` of its steps in, then stops: the machine goes quiet mid-run. Runs alternate (once, recheck, once, ...)
so a change in the machine's own background load hits both modes alike. The table: seconds of the training loop
(model loading excluded), steps/s, the thread counts the run used, and the load average before the run (other
programs on the machine besides the busy process).

`--exact` first answers whether a step's numbers depend on the thread count here: the demo (5 steps) and the test
suite's tiny model (6 steps) trained at 1 and at 2 threads, LoRA tensors compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the automatic count
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def demo_job(folder: Path, max_steps: int, resolution: int = 0) -> Path:
    """demo.toml with absolute paths, `max_steps`, no sample renders (they would time the same in both modes), at
    `resolution` px (0: the demo's 64)."""
    from sdlora.config import load_toml
    from sdlora.paths import sample_data

    cfg = load_toml(sample_data() / "demo.toml")
    cfg.train.max_steps, cfg.sample.prompts = max_steps, []
    cfg.augment.resolution = resolution or cfg.augment.resolution
    cfg.output.path = str(folder / "demo.safetensors")
    job = folder / "demo.toml"
    job.write_text(cfg.to_toml())
    return job


def run(job: Path, out: Path, flags: list[str], busy_until: int | None) -> dict:
    """One training run; a busy process runs until the run's log reaches step `busy_until` (None: no busy process)."""
    log = out.with_name(out.stem + "_log.jsonl")
    load = os.getloadavg()[0]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy_until else None
    time.sleep(1.0)  # the busy core shows in /proc/stat before training counts the free cores
    cmd = [sys.executable, "-m", "sdlora", "train", str(job), "--output", str(out), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    stopped_at = None
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if busy and busy.poll() is None and _last_step(log) >= busy_until:
                busy.kill()
                stopped_at = _last_step(log)
        out_text, err = proc.communicate()
    finally:
        if busy and busy.poll() is None:
            busy.kill()
    if proc.returncode:
        raise SystemExit(f"training failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    done = re.search(r"\((\d+) steps, loss ([\d.]+), ([\d.]+)s\)", out_text)
    start = re.search(r"^(\d+) CPU thread\(s\) \(", err, re.MULTILINE)  # said only when not torch's default
    threads = [start.group(1) if start else str(_torch_default_threads())]
    threads += re.findall(r"(\d+) CPU thread\(s\) from now on", err)
    return {"seconds": float(done.group(3)), "steps": int(done.group(1)), "loss": float(done.group(2)),
            "threads": " -> ".join(threads), "load_before": load, "busy_stopped_at": stopped_at}


def _torch_default_threads() -> int:
    """torch's own count in a process without OMP_NUM_THREADS (sdlora keeps it, unsaid, when that many are free)."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment()).stdout)


def _last_step(log: Path) -> int:
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except ValueError:
            continue
    return 0


def thread_dependence(folder: Path) -> list[str]:
    """Max |difference| of the LoRA tensors trained at 1 vs 2 threads (demo 5 steps, tiny model 6 steps)."""
    import torch
    from safetensors.torch import load_file

    from sdlora.random_pipelines import save_tiny_pipeline

    tiny = save_tiny_pipeline(folder / "tiny")
    images = folder / "imgs"
    images.mkdir()
    from PIL import Image, ImageDraw

    for i in range(3):
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).ellipse((6 + i, 6, 26, 26), fill=(220, 30, 30))
        im.save(images / f"{i}.png")
    jobs = {"demo (5 steps)": [str(demo_job(folder, 5))],
            "tiny model (6 steps)": ["--model", str(tiny), "--data", str(images), "--instance-prompt", "a red sks",
                                     "--resolution", "32", "--max-steps", "6", "--lr", "1e-3"]}
    lines = []
    for name, args in jobs.items():
        outs = []
        for threads in (1, 2):
            out = folder / f"{name.split()[0]}-{threads}.safetensors"
            subprocess.run([sys.executable, "-m", "sdlora", "train", *args, "--threads", str(threads),
                            "--mixed-precision", "no", "--save-dtype", "fp32", "--output", str(out)],
                           check=True, capture_output=True, env=environment())
            outs.append(load_file(str(out)))
        a, b = outs
        differ = sum(not torch.equal(a[k], b[k]) for k in a)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        lines.append(f"{name}: {differ} of {len(a)} tensors differ between 1 and 2 threads, max |diff| {worst:.2g}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--busy-until", type=float, default=0.5, help="Share of the steps the busy process runs for.")
    ap.add_argument("--check", type=int, default=10, help="--thread-check of the re-checking runs (seconds).")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=0, help="Training px (0: the demo's 64, where a step is too "
                    "small for a second thread to help on a 2-core machine; 192: where it does).")
    ap.add_argument("--exact", action="store_true", help="First compare 1 vs 2 threads bit for bit.")
    args = ap.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.exact:
            (tmp / "exact").mkdir()
            for line in thread_dependence(tmp / "exact"):
                print(line, flush=True)
        job = demo_job(tmp, args.max_steps, args.resolution)
        rows = []
        for r in range(args.repeats):
            for mode, check in (("once", 0), ("recheck", args.check)):
                out = tmp / f"{mode}-{r}.safetensors"
                row = run(job, out, ["--thread-check", str(check)], round(args.busy_until * args.max_steps))
                rows.append({"mode": f"{mode} (--thread-check {check})", **row})
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    px = f"{args.resolution} px" if args.resolution else "64 px"
    print(f"\nDemo at {px}, {args.max_steps} steps, a busy process on one core for the first "
          f"{args.busy_until:.0%} of them:\n")
    print("| mode | training s | steps/s | threads | final loss | busy stopped at step | load avg before |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['seconds']:.1f} | {row['steps'] / row['seconds']:.2f} | {row['threads']} | "
              f"{row['loss']:.4f} | {row['busy_stopped_at']} | {row['load_before']:.2f} |")
    print(f"\n{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
