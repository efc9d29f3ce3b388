"""The CUDA check in one command: proves and measures sdlora on one GPU in under 8 minutes, safe to rerun.

    python scripts/gpu_check.py [--dry-run] [--out DIR] [--peer-script PATH] [--budget SECONDS] [--only PART ...]

Parts, each in its own process with its own time limit; a part that fails or runs out of time is reported and the
rest still run:
  tests      pytest -m cuda (tests/test_cuda.py): bf16/fp16 training with exact resume, SDPA, gradient checkpointing,
             QLoRA NF4 + 8-bit AdamW loading into the full base, the UI's job, the fit check's CUDA autocast
             emulation, two processes when there are two GPUs
  bench-sd1  SD 1.5 at 512 px, batch 1 and 4, cached / uncached / NF4, bf16; the speed-switch pairs; the top kernels
  bench-sdxl SDXL at 1024 px, batch 1 and 4, cached / uncached / NF4, bf16
  bench-sd3  SD3.5 Medium (all 24 blocks, T5-XXL) at 1024 px, batch 1: T5 cached and freed / kept / NF4, bf16
  fit        the memory fit check's estimate against every measured peak (scripts/fit_vs_bench.py)
  peer       diffusers' train_dreambooth_lora.py against sdlora at 512 px (scripts/bench_vs_peer.py; needs
             --peer-script, or .peer/train_dreambooth_lora.py)
Everything is written to --out (default bench/results/, where the JSON is committed) and copied to $OUT when it is
set, as at most 8 files: summary.md, gpu_check.log, and the benchmark's JSON, table and profile, the fit and peer
results. `--dry-run` runs what the CPU can: the cuda tests collected and skipped with their reason, tiny benchmark
rows (into a temporary folder), the fit check's error against the committed CPU rows, and the peer script when given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def parts(args, cuda: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each part."""
    bench = [PY, "scripts/bench_train.py", "--out", str(out)]
    peer_script = args.peer_script or (ROOT / ".peer" / "train_dreambooth_lora.py")
    peer = [PY, "scripts/bench_vs_peer.py", "--script", str(peer_script), "--json", str(out / "peer.json")]
    if not cuda:
        return [
            ("tests", [PY, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"],
             300),
            ("bench-tiny", bench + ["--tiny", "--family", "sd1", "--batch", "1", "--modes", "cached", "uncached",
                                    "--steps", "2", "--warmup", "1", "--switches"], 400),
            ("bench-tiny-sd3", bench + ["--tiny", "--family", "sd3", "--batch", "1", "--modes", "cached", "t5-kept",
                                        "--steps", "2", "--warmup", "1"], 300),
            ("fit", [PY, "scripts/fit_vs_bench.py", "--device", "cpu", "--json", str(out / "fit_vs_bench.json")],
             400),
        ] + ([("peer", peer + ["--resolution", "256", "--steps", "1", "3"], 1800)] if args.peer_script else [])
    return [  # in order of importance: what is left of the budget goes to the later parts
        ("tests", [PY, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"],
         130),
        ("bench-sd1", bench + ["--family", "sd1", "--batch", "1", "4", "--modes", "cached", "uncached", "nf4",
                               "--profile"], 100),
        ("bench-sdxl", bench + ["--family", "sdxl", "--batch", "1", "4", "--modes", "cached", "uncached", "nf4",
                                "--steps", "4"], 110),
        ("bench-sd3", bench + ["--family", "sd3", "--batch", "1", "--modes", "cached", "t5-kept", "nf4",
                               "--steps", "3"], 100),
        ("fit", [], 60),  # the command is made when it runs (fit_gpu_command)
        ("bench-switches", bench + ["--family", "sd1", "--batch", "4", "--only-switches"], 150),
        ("peer", peer + ["--resolution", "512", "--precision", "bf16", "--steps", "3", "13"], 150),
    ]


def run_part(name: str, cmd: list[str], limit: int, log) -> dict:
    """Run one part with a time limit, its output into the log; its status."""
    log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit} s)\n")
    log.flush()
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=limit, env=env)
        text, status = proc.stdout, "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        text = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout) or ""
        status = f"timed out after {limit} s"
    log.write(text)
    log.flush()
    tail = [x for x in text.strip().splitlines() if x.strip()][-12:]
    return {"part": name, "status": status, "seconds": round(time.time() - t0, 1), "tail": tail}


def fit_gpu_command(out: Path) -> list[str]:
    """The fit part compares the JSON files the bench parts have just written (known only after they ran)."""
    return [PY, "scripts/fit_vs_bench.py", *map(str, sorted(out.glob("20*.json"))), "--device", "cuda",
            "--json", str(out / "fit_vs_bench.json")]


def summary(results: list[dict], env: dict) -> str:
    lines = [f"# gpu_check {env['date']}: {env['device']}", "", f"torch {env['torch']}, {env['mode']}", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['status']} | {r['seconds']} |" for r in results]
    for r in results:
        lines += ["", f"## {r['part']}", "```", *r["tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="The CPU-possible parts (no GPU needed).")
    p.add_argument("--out", type=Path, help="Results folder (default: bench/results/; a temporary one with --dry-run).")
    p.add_argument("--peer-script", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora.py.")
    p.add_argument("--budget", type=int, help="Seconds for all parts together (default 470 on a GPU, 3600 for a "
                   "dry run).")
    p.add_argument("--only", nargs="+", help="Run only these parts.")
    args = p.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    out = args.out or (ROOT / "bench" / "results" if cuda else Path(tempfile.mkdtemp(prefix="gpu_check_")))
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)",
           "mode": "full" if cuda else "dry run"}
    budget = args.budget or (470 if cuda else 3600)
    start, results = time.time(), []
    log_path = out / "gpu_check.log"
    with open(log_path, "a") as log:
        for name, cmd, limit in parts(args, cuda, out):
            if args.only and name not in args.only:
                continue
            if name == "fit" and cuda:
                cmd = fit_gpu_command(out)
            left = int(budget - (time.time() - start))
            if left < 20:
                results.append({"part": name, "status": "not run: out of time", "seconds": 0, "tail": []})
                continue
            print(f"[{time.time() - start:5.0f} s] {name} (limit {min(limit, left)} s)", flush=True)
            results.append(run_part(name, cmd, min(limit, left), log))
            print(f"        {results[-1]['status']} in {results[-1]['seconds']} s", flush=True)
    text = summary(results, env)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"env": env, "parts": results}, indent=1) + "\n")
    print(text)
    copy_out(out)
    return 0 if all(r["status"] == "ok" for r in results) else 1


def copy_out(out: Path) -> None:
    """The results into $OUT (the device tool brings back at most 8 files from it), newest first."""
    dest = os.environ.get("OUT")
    if not dest:
        return
    keep = ["summary.md", "gpu_check.log"]
    files = [out / k for k in keep] + sorted((f for f in out.iterdir() if f.name not in keep and f.is_file()
                                             and f.name != "summary.json"), key=lambda f: -f.stat().st_mtime)
    for f in files[:8]:
        shutil.copy2(f, Path(dest) / f.name)
    print(f"copied to $OUT: {', '.join(f.name for f in files[:8])}")


if __name__ == "__main__":
    sys.exit(main())
