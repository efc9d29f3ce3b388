"""Training-step benchmark on full-size SD 1.5-, SDXL- and SD3.5-Medium-shaped models (random weights, nothing
downloaded).

    python scripts/bench_train.py [--family sd1 sdxl sd3] [--resolution PX] [--batch 1 4]
                                  [--modes cached uncached nf4 t5-kept] [--precision auto] [--switches] [--profile]
                                  [--optimizers] [--networks [NET ...]] [--steps N] [--warmup N] [--tiny]
    python scripts/bench_train.py --family sd3 --modes cached t5-kept nf4 [--sd3-blocks 24] [--t5-layers 24]

sdlora's own trainer (`setup`, then `optimizer_step` with the loss left on the device) with LoRA rank 4 on the UNet
cross-attention, for each family x batch x mode (cached latents and text / uncached / NF4 base, cached). `--switches`
adds one pair of rows per speed switch, measured against the default path in the same run: attention sdpa vs math,
channels_last, TF32 (fp32 rows), torch.compile regional (compile time excluded: it happens in the warm-up steps),
fused vs foreach AdamW, the loss read every step vs every 10, and the next micro-batch prefetched on a thread vs not
(uncached: the one switch whose rows turn caching off). `--profile` writes the top kernels of SD 1.5 batch 4
(torch.profiler). Results: bench/results/<date>-<device>.json (rows: family, resolution, batch, precision, cached,
quantize, device, images_per_s, s_per_step, peak_allocated_gb, peak_reserved_gb, ...; GB are GiB) and a markdown
table. On the CPU each row runs in its own process, so its peak RSS is its own; on CUDA (and with --tiny) the rows
share one process and the peak counters are reset between them. `--tiny` runs the same rows on the test suite's tiny
models (a dry run). Default resolution: 512 px (SDXL and SD3 1024) on CUDA, 256 px on the CPU.

SD3: `t5-kept` is T5 kept in memory and encoding every step (captions whose tags shuffle), against the default of
every caption encoded once and T5 released; `--sd3-blocks` / `--t5-layers` take fewer of SD3.5 Medium's blocks /
T5-XXL's layers where memory is short. `--optimizers` adds one row per optimizer (cached, the first family and
batch) with the bytes of its state as a checkpoint stores it. `--networks` (`--only-networks`: only these) adds one
row per network type (lora, dora, loha, lokr; cached, the first family and batch) with an adapter on every layer
(lora.targets all), where what each network holds beyond LoRA is largest; scripts/fit_vs_bench.py checks the fit
estimate against every row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SWITCHES = [  # (label, config overrides of the "on" row, of the "off" row)
    ("attention sdpa vs math", {"speed.attention": "sdpa"}, {"speed.attention": "math"}),
    ("channels_last on vs off", {"speed.channels_last": True}, {"speed.channels_last": False}),
    ("tf32 on vs off (fp32)", {"speed.tf32": True, "train.mixed_precision": "no"},
     {"speed.tf32": False, "train.mixed_precision": "no"}),
    ("compile regional vs none", {"speed.compile": "regional"}, {"speed.compile": "none"}),
    ("fused vs foreach AdamW", {"speed.fused_optimizer": True}, {"speed.fused_optimizer": False}),
    ("loss read every 10 steps vs every step", {"speed.log_every": 10}, {"speed.log_every": 1}),
    ("gradient checkpointing on vs off", {"train.gradient_checkpointing": True},
     {"train.gradient_checkpointing": False}),
    ("prefetch on vs off (uncached)", {"speed.prefetch": True, "train.cache_latents": False, "train.cache_text": False},
     {"speed.prefetch": False, "train.cache_latents": False, "train.cache_text": False}),
]
CPU_SWITCHES = ("attention sdpa vs math", "channels_last on vs off", "gradient checkpointing on vs off",
                "prefetch on vs off (uncached)")
OPTIMIZER_LR = {"prodigy": 1.0, "lion": 3e-5}  # each at a learning rate its users would pick


def components(spec: dict, tmp: Path, device: str):
    from sdlora.random_pipelines import full_size_components

    family = spec["family"]
    if spec.get("tiny"):
        from sdlora.families import FAMILIES
        from sdlora.models import load_components

        return load_components(str(FAMILIES[family].save_tiny(tmp / "model")))
    sizes = {k: spec[k] for k in ("sd3_blocks", "t5_layers") if family == "sd3" and k in spec}
    if device == "cuda":
        try:
            return full_size_components(family, tmp / "tok", device="cuda", **sizes)
        except Exception as e:  # noqa: BLE001 - fall back to the CPU build, and say so
            print(f"building on the GPU failed ({str(e).splitlines()[0]}); building on the CPU", file=sys.stderr)
    return full_size_components(family, tmp / "tok", **sizes)


def one(spec: dict) -> dict:
    """Time `spec['steps']` optimizer steps after `spec['warmup']` of one configuration; peak memory of the timed
    steps (CUDA: allocated and reserved; CPU: the process's resident set)."""
    import torch
    from PIL import Image

    from sdlora.callbacks import Callbacks
    from sdlora.config import Config, DataFolder
    from sdlora.training.loop import optimizer_step
    from sdlora.training.run.optimizers import state_bytes
    from sdlora.training.run.setup import make_accelerator, setup

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp())
    res, batch = spec["resolution"], spec["batch"]
    (tmp / "data").mkdir()
    for i in range(max(4, 2 * batch)):
        Image.new("RGB", (res, res), (40 * i % 255, 90, 200)).save(tmp / "data" / f"{i}.png")
    c = components(spec, tmp, device)
    cfg = Config()
    t5_kept = spec.get("t5_kept", False)  # shuffled tags: the text changes every step, so SD3's T5 stays
    cfg.data = [DataFolder(path=str(tmp / "data"), prompt="a photo, of, sks", shuffle_tags=t5_kept)]
    cfg.augment.resolution, cfg.train.batch_size = res, batch
    cfg.train.mixed_precision, cfg.model.quantize = spec["precision"], spec["quantize"]
    cfg.train.cache_latents = cfg.train.cache_text = spec["cached"]
    cfg.train.max_steps = spec["warmup"] + spec["steps"]
    cfg.output.path = str(tmp / "out.safetensors")
    for key, value in spec.get("overrides", {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    acc = make_accelerator(cfg)
    state = setup(cfg, acc, Callbacks(), components=c)
    held = [f.model for f in c.frozen_text if f.model is not None]  # SD3's T5 while it is kept
    weights = sum(p.numel() * p.element_size() for m in (c.denoiser, *c.text_encoders, *held) for p in m.parameters())
    read = cfg.speed.log_every == 1
    t0 = time.perf_counter()
    for s in range(spec["warmup"]):
        optimizer_step(state, s, read=read)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss = RssPeak() if device == "cpu" else contextlib.nullcontext()
    t0, cpu0 = time.perf_counter(), time.process_time()
    with rss:
        for s in range(spec["warmup"], spec["warmup"] + spec["steps"]):
            loss, _ = optimizer_step(state, s, read=read or (s + 1) % cfg.speed.log_every == 0)
        sync(device)
    sec = (time.perf_counter() - t0) / spec["steps"]
    cpu_sec = (time.process_time() - cpu0) / spec["steps"]  # on a shared CPU: the step's own compute time
    state.batches.close()  # the prefetch thread, when there is one
    row = {k: spec[k] for k in ("family", "resolution", "batch", "quantize")}
    row["cached"] = cfg.train.cache_latents  # as run: a switch's overrides may turn caching off
    if spec["family"] == "sd3":
        row.update(t5="kept" if t5_kept else "freed", sd3_blocks=spec.get("sd3_blocks", 24),
                   t5_layers=spec.get("t5_layers", 24))
    row.update(precision=acc.mixed_precision, device=device, images_per_s=batch / sec, s_per_step=sec,
               cpu_s_per_step=cpu_sec,
               peak_allocated_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
               peak_reserved_gb=torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None,
               peak_rss_gb=rss.peak / 2**30 if device == "cpu" else None, weights_gb=weights / 2**30,
               switch=spec.get("switch", ""), overrides=spec.get("overrides", {}), targets=cfg.lora.targets,
               rank=cfg.lora.rank, optimizer=cfg.optim.optimizer, attention=cfg.speed.attention,
               gradient_checkpointing=cfg.train.gradient_checkpointing, images=len(list((tmp / "data").iterdir())),
               steps=spec["steps"], warmup=spec["warmup"], warmup_s=warmup_s, threads=torch.get_num_threads(),
               tiny=spec.get("tiny", False), final_loss=float(loss),
               state_mib=state_bytes(state.optim.main) / 2**20,
               lora_params=sum(p.numel() for p in state.optim.lora_params))
    if spec.get("profile"):
        row["profile"] = profile(state, spec["warmup"] + spec["steps"], device)
    del state, c
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def profile(state, start: int, device: str, steps: int = 3) -> str:
    """The top kernels (CUDA) or operators (CPU) of a few steps, by their own time."""
    import torch
    from torch.profiler import ProfilerActivity

    from sdlora.training.loop import optimizer_step

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for s in range(start, start + steps):
            optimizer_step(state, s, read=False)
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70)


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


def plan(args, cuda: bool) -> list[dict]:
    """The rows to measure: each family x batch x mode, then the speed-switch pairs on the first family's first
    batch (cached)."""
    specs = []
    for family in args.family:
        res = args.resolution or (32 if args.tiny else 256 if not cuda else 512 if family == "sd1" else 1024)
        for batch in args.batch:
            for mode in args.modes:
                if mode == "t5-kept" and family != "sd3":
                    continue
                spec = dict(family=family, resolution=res, batch=batch, precision=args.precision,
                            cached=mode != "uncached", quantize="nf4" if mode == "nf4" else "none",
                            steps=args.steps, warmup=args.warmup, tiny=args.tiny)
                if family == "sd3":
                    spec.update(sd3_blocks=args.sd3_blocks, t5_layers=args.t5_layers, t5_kept=mode == "t5-kept")
                specs.append(spec)
    core, specs = specs, [] if args.only_switches or args.only_networks is not None else specs
    if args.switches or args.only_switches:
        base = dict(core[0], cached=True, quantize="none")
        base["batch"] = max(args.batch) if cuda else min(args.batch)
        for label, on, off in SWITCHES:
            if not cuda and label not in CPU_SWITCHES:
                continue
            warm = max(args.warmup, 3) if "compile" in label else args.warmup
            for side, over in (("on", on), ("off", off)):
                specs.append(dict(base, switch=f"{label}: {side}", overrides=over, warmup=warm))
    if args.optimizers:
        from sdlora.config import OPTIMIZERS

        for name in OPTIMIZERS:
            specs.append(dict(core[0], cached=True, quantize="none", t5_kept=False, switch=f"optimizer {name}",
                              overrides={"optim.optimizer": name, "optim.lr": OPTIMIZER_LR.get(name, 1e-4)}))
    networks = args.only_networks if args.only_networks is not None else args.networks
    if networks is not None:
        from sdlora.config import NETWORKS

        for name in networks or NETWORKS:
            specs.append(dict(core[0], cached=True, quantize="none", t5_kept=False, switch=f"network {name}",
                              overrides={"lora.network": name, "lora.targets": "all"}))
    if args.profile:
        specs.append(dict(core[0], cached=True, quantize="none", batch=max(args.batch), profile=True,
                          switch="profile"))
    return specs


def environment(note: str) -> dict:
    """GPU, driver, library versions and the machine, for the results file."""
    import importlib.metadata as md
    import platform

    import torch

    libs = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors"):
        try:
            libs[name] = md.version(name)
        except md.PackageNotFoundError:
            libs[name] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    driver = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    return {"gpu": gpu, "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.date.today().isoformat(), "libraries": libs, "python": platform.python_version(),
            "sdlora_commit": commit, "cpu": cpu, "cores": os.cpu_count(), "load_average_start": os.getloadavg(),
            "note": note, "units": "GB fields are GiB (2**30 bytes); CPU rows report peak_rss_gb (process RSS)"}


def run(specs: list[dict], isolate: bool, done=lambda rows: None) -> list[dict]:
    """Measure each spec (in its own process when `isolate`); `done(rows)` after each, so a run cut short keeps
    what it measured."""
    rows = []
    for spec in specs:
        label = f"{spec['family']} {spec['resolution']}px b{spec['batch']} {spec.get('switch') or spec['quantize']}"
        print(f"... {label}{'' if spec['cached'] else ' uncached'}", file=sys.stderr, flush=True)
        try:
            if isolate:
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                     text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            else:
                rows.append(one(spec))
        except (subprocess.CalledProcessError, Exception) as e:  # noqa: BLE001 - one row's failure is reported
            err = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr \
                else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"    failed: {err}", file=sys.stderr)
            rows.append(dict(spec, error=err))
        done(rows)
    return rows


def step_time(r: dict) -> float:
    """Seconds per step; on the CPU the process's own CPU time (other processes sharing the cores stretch the wall
    time, not that), where it was recorded."""
    return r["cpu_s_per_step"] if r["device"] == "cpu" and r.get("cpu_s_per_step") else r["s_per_step"]


def own(r: dict) -> str:
    return f" ({r['cpu_s_per_step']:.2f} CPU)" if r["device"] == "cpu" and r.get("cpu_s_per_step") else ""


def markdown(env: dict, rows: list[dict]) -> str:
    """The table docs/benchmarks.md shows, and one line per speed switch."""
    names = {"sd1": "SD 1.5", "sdxl": "SDXL", "sd3": "SD3.5 Medium"}
    out = ["| model | px | batch | precision | caching | base | s/step (wall) | images/s | peak GiB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("switch") or "error" in r:
            continue
        peak = f"{r['peak_allocated_gb']:.2f} alloc / {r['peak_reserved_gb']:.2f} reserved" \
            if r["device"] == "cuda" else f"{r['peak_rss_gb']:.2f} RSS"
        model = names.get(r["family"], r["family"]) + (" (tiny)" if r.get("tiny") else "")
        if r["family"] == "sd3" and not r.get("tiny") and (r["sd3_blocks"], r["t5_layers"]) != (24, 24):
            model += f" ({r['sd3_blocks']} of 24 blocks, T5 {r['t5_layers']} of 24 layers)"
        caching = ("on" if r["cached"] else "off") + (f", T5 {r['t5']}" if r.get("t5") else "")
        out.append(f"| {model} | "
                   f"{r['resolution']} | {r['batch']} | {r['precision']} | {caching} | "
                   f"{'NF4' if r['quantize'] == 'nf4' else 'full'} | {r['s_per_step']:.3f}{own(r)} | "
                   f"{r['images_per_s']:.2f} | {peak} |")
    pairs = {}
    for r in rows:
        if r.get("switch", "").endswith((": on", ": off")) and "error" not in r:
            label, side = r["switch"].rsplit(": ", 1)
            pairs.setdefault(label, {})[side] = r
    for label, p in pairs.items():
        if {"on", "off"} <= p.keys():
            a, b = step_time(p["on"]), step_time(p["off"])
            cpu = p["on"].get("cpu_s_per_step") and p["on"]["device"] == "cpu"
            wall = f"; wall {p['on']['s_per_step']:.3f} vs {p['off']['s_per_step']:.3f} s/step" if cpu else ""
            out.append(f"- {label}: {a:.3f} vs {b:.3f} {'s/step of CPU time' if cpu else 's/step'} ({b / a:.2f}x)"
                       f"{wall}")  # a prefetch thread overlaps work: it saves wall time, not CPU time
    for r in rows:
        if r.get("switch", "").startswith("optimizer ") and "error" not in r:
            out.append(f"- {r['switch']}: {step_time(r):.3f} s/step, state {r['state_mib']:.2f} MiB "
                       f"({r['state_mib'] * 2**20 / r['lora_params']:.2f} bytes per LoRA parameter, "
                       f"{r['lora_params']:,} parameters)")
    for r in rows:
        if r.get("switch", "").startswith("network ") and "error" not in r:
            peak = f"{r['peak_allocated_gb']:.2f} GiB allocated" if r["device"] == "cuda" else \
                f"{r['peak_rss_gb']:.2f} GiB RSS"
            out.append(f"- {r['switch']} on every layer: {step_time(r):.3f} s/step, peak {peak}, "
                       f"{r['lora_params']:,} parameters")
    failed = [r for r in rows if "error" in r]
    out += [f"- failed: {r['family']} {r.get('switch') or ''} {r['error']}" for r in failed]
    where = env["gpu"] or env["cpu"]
    out.append(f"\n{where}, torch {env['torch']}, {env['date']}{'; ' + env['note'] if env['note'] else ''}")
    return "\n".join(out)


def merged(old: list[dict], rows: list[dict]) -> list[dict]:
    """The rows of an earlier run of the same day and device, with this run's replacing the same configurations."""
    def key(r):
        return tuple(str(r.get(k)) for k in ("family", "resolution", "batch", "precision", "cached", "quantize",
                                             "switch", "tiny", "device", "t5", "sd3_blocks", "t5_layers"))

    new = {key(r) for r in rows}
    return [r for r in old if key(r) not in new] + rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", default=["sd1"], choices=("sd1", "sdxl", "sd3"))
    p.add_argument("--sd3-blocks", type=int, default=24, help="sd3: how many of SD3.5 Medium's 24 blocks.")
    p.add_argument("--t5-layers", type=int, default=24, help="sd3: how many of T5-XXL's 24 layers.")
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--modes", nargs="+", default=["cached", "uncached"],
                   choices=("cached", "uncached", "nf4", "t5-kept"), help="t5-kept: SD3 only.")
    p.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--switches", action="store_true", help="Add the speed-switch pairs.")
    p.add_argument("--only-switches", action="store_true", help="Only the speed-switch pairs.")
    p.add_argument("--profile", action="store_true", help="Add a profiled row (top kernels).")
    p.add_argument("--optimizers", action="store_true", help="Add one row per optimizer (s/step, state bytes).")
    p.add_argument("--networks", nargs="*", metavar="NETWORK",
                   help="Add one row per network type (all, or those named), an adapter on every layer.")
    p.add_argument("--only-networks", nargs="*", metavar="NETWORK", help="Only the network-type rows.")
    p.add_argument("--tiny", action="store_true", help="The test suite's tiny models (a dry run).")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="Folder for the JSON and markdown.")
    p.add_argument("--note", default="", help="A remark stored with the results (e.g. other load on the machine).")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    import torch

    cuda = torch.cuda.is_available()
    if "nf4" in args.modes:
        from sdlora.errors import SdloraError
        from sdlora.quantize import require_bitsandbytes

        try:
            require_bitsandbytes("nf4", "QLoRA")  # says what is missing before anything is built
        except SdloraError as e:
            sys.exit(f"error: {e}")
    env = environment(args.note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = ("tiny-" if args.tiny else "") + (env["gpu"] or "cpu").replace(" ", "-").replace("/", "-").lower()
    stem = out / f"{env['date']}-{device}"
    earlier = json.loads(stem.with_suffix(".json").read_text())["rows"] if stem.with_suffix(".json").is_file() else []

    def write(rows: list[dict]) -> str:
        profiles = [r["profile"] for r in rows if "profile" in r]
        rows = merged(earlier, [{k: v for k, v in r.items() if k != "profile"} for r in rows])
        env["load_average_end"] = os.getloadavg()
        stem.with_suffix(".json").write_text(json.dumps(dict(env, rows=rows), indent=1) + "\n")
        table = markdown(env, rows)
        stem.with_suffix(".md").write_text(table + "\n")
        if profiles:
            stem.with_name(stem.name + "-profile.txt").write_text(profiles[0] + "\n")
        return table

    rows = run(plan(args, cuda), isolate=not cuda and not args.tiny, done=write)
    print(write(rows))
    print(f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
