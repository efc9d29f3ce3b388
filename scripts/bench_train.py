"""Training-step benchmark on a full-size SD 1.5-, SDXL- or SD3.5-Medium-shaped model (random weights, nothing
downloaded).

    python scripts/bench_train.py [--family sd1|sdxl|sd3] [--quantize] [--resolution 256] [--steps 5] [--warmup 2]
    python scripts/bench_train.py --family sd3 [--sd3-blocks 24] [--t5-layers 24]
    python scripts/bench_train.py --optimizers [--small] [--family sd1|sdxl] [--resolution 128]

LoRA rank 4 on the UNet cross-attention, batch 1, through sdlora's own trainer (`setup` + optimizer steps),
with latent/text caching on and off, and with `--quantize` also QLoRA (NF4 base, caching on). Each configuration
runs in a fresh process so peak memory is its own. Prints a table of seconds per step, steps per second, the bytes of
the UNet and text-encoder weights, and peak memory during the timed steps (CUDA: allocated; CPU: process RSS).
Default resolution: 512 px on CUDA, 256 px on the CPU.

SD3 (`--family sd3`): the rows are T5 cached and freed (the default: every caption encoded once, then T5 released)
and T5 kept (captions whose tags shuffle every step keep T5 in memory, encoding as they come), and with `--quantize`
QLoRA; `--sd3-blocks` / `--t5-layers` take fewer of SD3.5 Medium's blocks / T5-XXL's layers where memory is short.

`--optimizers` prints one row per optimizer instead (caching on): seconds per step and the bytes of the optimizer's
state (its per-parameter tensors, as a checkpoint stores them); `--small` runs them on the small shapes-world-sized
random model instead of the full-size one (the state's bytes scale with the LoRA's parameter count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OPTIMIZER_LR = {"prodigy": 1.0, "lion": 3e-5}  # each at a learning rate its users would pick


def one(resolution: int, steps: int, warmup: int, cache: bool, family: str, quantize: str = "none",
        optimizer: str = "adamw", small: bool = False, sizes: dict | None = None, t5_kept: bool = False) -> dict:
    import torch
    from PIL import Image

    from sdlora.callbacks import Callbacks
    from sdlora.config import Config, DataFolder
    from sdlora.models import load_components
    from sdlora.random_pipelines import full_size_components, save_tiny_pipeline
    from sdlora.training.loop import optimizer_step
    from sdlora.training.optimizers import state_bytes
    from sdlora.training.setup import make_accelerator, setup

    tmp = Path(tempfile.mkdtemp())
    for i in range(4):
        Image.new("RGB", (resolution, resolution), (40 * i, 90, 200)).save(tmp / f"{i}.png")
    components = load_components(str(save_tiny_pipeline(tmp / "tiny"))) if small else \
        full_size_components(family, tmp / "tok", **(sizes or {}))
    cfg = Config()
    cfg.optim.optimizer, cfg.optim.lr = optimizer, OPTIMIZER_LR.get(optimizer, 1e-4)
    cfg.model.quantize = quantize
    cfg.data = [DataFolder(path=str(tmp), prompt="a photo, of, sks", shuffle_tags=t5_kept)]  # shuffled: T5 stays
    cfg.augment.resolution = resolution
    cfg.train.cache_latents = cfg.train.cache_text = cache
    cfg.output.path = str(tmp / "out.safetensors")
    acc = make_accelerator(cfg)
    state = setup(cfg, acc, Callbacks(), components=components)
    # parameter bytes, 4-bit weights at their packed size
    held = [f.model for f in components.frozen_text if f.model is not None]  # SD3's T5 while it is kept
    weights = sum(p.numel() * p.element_size() for m in (components.denoiser, *components.text_encoders, *held)
                  for p in m.parameters()) / 2**30
    for s in range(warmup):
        optimizer_step(state, s)
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = RssPeak() if acc.device.type == "cpu" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with rss:
        for s in range(warmup, warmup + steps):
            optimizer_step(state, s)
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = rss.peak / 2**30
    sec = (time.perf_counter() - t0) / steps
    return {"cache": cache, "quantize": quantize,
            "t5": "kept" if t5_kept else "freed" if family == "sd3" else "-", "device": acc.device.type,
            "precision": acc.mixed_precision,
            "resolution": resolution, "sec_per_step": sec, "steps_per_sec": 1 / sec, "peak_gib": peak,
            "weights_gib": weights, "threads": torch.get_num_threads(), "optimizer": optimizer,
            "state_mib": state_bytes(state.optim.main) / 2**20,
            "lora_params": sum(p.numel() for p in state.optim.lora_params)}


class RssPeak(threading.Thread):
    """The process's largest resident set while the block runs, sampled every 5 ms (the CPU has no peak counter
    that can be reset after loading, and loading a full model before quantizing it is not part of a step)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()

    def run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.done.wait(0.005):
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--family", default="sd1", choices=("sd1", "sdxl", "sd3"),
                   help="sd1: SD 1.5 shapes; sdxl: SDXL base; sd3: SD3.5 Medium")
    p.add_argument("--sd3-blocks", type=int, default=24, help="sd3: how many of SD3.5 Medium's 24 blocks.")
    p.add_argument("--t5-layers", type=int, default=24, help="sd3: how many of T5-XXL's 24 layers.")
    p.add_argument("--quantize", action="store_true", help="Also run QLoRA (4-bit NF4 base; CUDA + bitsandbytes).")
    p.add_argument("--optimizers", action="store_true", help="One row per optimizer (s/step, state bytes).")
    p.add_argument("--small", action="store_true", help="With --optimizers: the small random model.")
    p.add_argument("--one", choices=("cached", "uncached", "nf4", "t5-kept"), help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        import torch

        res = args.resolution or (64 if args.small else 512 if torch.cuda.is_available() else 256)
        quantize = "nf4" if args.one == "nf4" else "none"
        sizes = {"sd3_blocks": args.sd3_blocks, "t5_layers": args.t5_layers} if args.family == "sd3" else None
        print(json.dumps(one(res, args.steps, args.warmup, args.one != "uncached", args.family, quantize,
                             args.optimizer, args.small, sizes, args.one == "t5-kept")))
        return
    if args.optimizers:
        optimizers_table(args)
        return
    if args.quantize:
        from sdlora.errors import SdloraError
        from sdlora.quantize import require_bitsandbytes

        try:
            require_bitsandbytes("nf4", "QLoRA")  # says what is missing before anything is built
        except SdloraError as e:
            sys.exit(f"error: {e}")
    rows = []
    second = "t5-kept" if args.family == "sd3" else "uncached"
    for mode in ("cached", second) + (("nf4",) if args.quantize else ()):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--resolution", str(args.resolution),
                              "--steps", str(args.steps), "--warmup", str(args.warmup), "--family", args.family,
                              "--sd3-blocks", str(args.sd3_blocks), "--t5-layers", str(args.t5_layers)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = (f"{'caching':<10}{'T5':<7}{'base':<6}{'device':<8}{'precision':<10}{'px':>5}{'s/step':>9}{'steps/s':>9}"
            f"{'weights GiB':>13}{'peak GiB':>10}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{'on' if r['cache'] else 'off':<10}{r['t5']:<7}{'nf4' if r['quantize'] != 'none' else 'full':<6}"
              f"{r['device']:<8}"
              f"{r['precision']:<10}{r['resolution']:>5}{r['sec_per_step']:>9.3f}{r['steps_per_sec']:>9.3f}"
              f"{r['weights_gib']:>13.2f}{r['peak_gib']:>10.2f}")
    if args.quantize:
        full, nf4 = rows[0], rows[2]
        print(f"QLoRA: UNet + text encoder weights {nf4['weights_gib']:.2f} GiB vs {full['weights_gib']:.2f} GiB, "
              f"peak memory in a step {nf4['peak_gib']:.2f} GiB vs {full['peak_gib']:.2f} GiB "
              f"({1 - nf4['peak_gib'] / full['peak_gib']:.0%} less), {nf4['sec_per_step'] / full['sec_per_step']:.2f}x "
              "the time per step")
    what = "T5 kept instead of cached and freed" if args.family == "sd3" else "speed-up from caching"
    print(f"{what}: {rows[1]['sec_per_step'] / rows[0]['sec_per_step']:.2f}x the time per step, "
          f"{rows[1]['peak_gib'] - rows[0]['peak_gib']:+.2f} GiB peak "
          f"({args.family}-shaped denoiser/TE/VAE, random weights, LoRA rank 4 on the default targets, batch 1, "
          f"{rows[0]['threads']} threads)")


def optimizers_table(args) -> None:
    from sdlora.config import OPTIMIZERS

    rows = []
    for name in OPTIMIZERS:
        cmd = [sys.executable, __file__, "--one", "cached", "--optimizer", name, "--resolution", str(args.resolution),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--family", args.family]
        out = subprocess.run(cmd + (["--small"] if args.small else []), capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = f"{'optimizer':<20}{'device':<8}{'px':>5}{'s/step':>9}{'state MiB':>11}{'bytes/param':>13}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['optimizer']:<20}{r['device']:<8}{r['resolution']:>5}{r['sec_per_step']:>9.3f}"
              f"{r['state_mib']:>11.2f}{r['state_mib'] * 2**20 / r['lora_params']:>13.2f}")
    if rows:
        model = "small random" if args.small else f"{args.family}-shaped"
        print(f"({model} UNet, LoRA rank 4 on attn2 = {rows[0]['lora_params']:,} parameters, batch 1, "
              f"{rows[0]['threads']} threads)")


if __name__ == "__main__":
    main()
