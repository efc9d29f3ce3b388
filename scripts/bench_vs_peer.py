"""sdlora against diffusers' own DreamBooth LoRA trainer on the same model, timed as marginal seconds per step.

    python scripts/bench_vs_peer.py --script PATH/train_dreambooth_lora.py [--resolution 256] [--batch 1] [--rank 4]
                                    [--precision no|bf16|fp16] [--steps 2 6] [--model-dir DIR] [--json OUT]

diffusers' `examples/dreambooth/train_dreambooth_lora.py` is not in the pip package: give its path (a checkout of
huggingface/diffusers whose version the installed diffusers satisfies). Both trainers get the same random-weight SD 1.5-
shaped model (saved once as a diffusers folder), the same images, resolution, batch, LoRA rank (on to_q/k/v/out, the
peer's targets: sdlora --targets attn) and precision. Each runs twice, for the two step counts, in its own process;
(time of the longer run - time of the shorter) / (difference in steps) is the marginal time per step, so loading,
caching and saving cancel. On CUDA the time is wall time; on the CPU it is the processes' own CPU time (user + system,
one thread each), which other programs sharing the cores do not stretch; both are recorded. sdlora runs twice over:
uncached (like the peer, which encodes every image and caption each step) and with its default caching. When
torchvision cannot be imported (no CPU build of it for this torch), the peer's four image transforms (Resize,
Center/RandomCrop, ToTensor, Normalize) come from a small PIL stand-in; they cost well under 1% of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHIM = '''"""Stand-in for the four torchvision transforms diffusers' DreamBooth script uses (PIL and torch only)."""
import enum, random
import numpy as np, torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
        "box": Image.BOX, "hamming": Image.HAMMING}


class Compose:
    def __init__(self, ts): self.ts = ts
    def __call__(self, x):
        for t in self.ts:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.mode = size, _PIL[(interpolation or InterpolationMode.BILINEAR).value]
    def __call__(self, im):
        w, h = im.size
        s = self.size / min(w, h)
        return im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), self.mode)


class CenterCrop:
    def __init__(self, size): self.size = size
    def __call__(self, im):
        w, h = im.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return im.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, im):
        w, h = im.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return im.crop((left, top, left + self.size, top + self.size))


class ToTensor:
    def __call__(self, im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std): self.mean, self.std = mean[0], std[0]
    def __call__(self, x): return (x - self.mean) / self.std
'''


RUN_PEER = '''"""Run diffusers' script with the torchvision stand-in, installed only after transformers and diffusers
decided torchvision is absent (they would otherwise use it for their own image code)."""
import importlib.machinery, runpy, sys, types
import diffusers, transformers
from transformers.utils import import_utils
import_utils.is_torchvision_available()
import transforms_standin
tv = types.ModuleType("torchvision")
tv.transforms, tv.__spec__ = transforms_standin, importlib.machinery.ModuleSpec("torchvision", None)
sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, transforms_standin
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def peer_launcher(work: Path) -> list[str]:
    """How to start the peer script: plain Python, or through the stand-in when torchvision cannot be imported."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable]
    (work / "standin").mkdir(parents=True, exist_ok=True)
    (work / "standin" / "transforms_standin.py").write_text(SHIM)
    (work / "standin" / "run_peer.py").write_text(RUN_PEER)
    return [sys.executable, str(work / "standin" / "run_peer.py")]


def save_model(folder: Path, device: str | None, tiny: bool = False) -> Path:
    """The benchmark's random-weight SD 1.5-shaped model as a diffusers folder (made once); `tiny`: the test
    suite's tiny model."""
    if (folder / "model_index.json").is_file():
        return folder
    from sdlora.random_pipelines import full_size_components, save_tiny_pipeline

    if tiny:
        return save_tiny_pipeline(folder)

    c = full_size_components("sd1", folder.parent / "tok", device=device)
    c.pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def images(folder: Path, n: int, res: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (res, res), (37 * i % 255, 120, 200 - 20 * i)).save(folder / f"{i}.png")
    return folder


def commands(args, model: Path, data: Path, out: Path, steps: int, launcher: list[str]) -> dict[str, list[str]]:
    py, prompt = sys.executable, "a photo of sks"
    peer = [*launcher, str(args.script), "--pretrained_model_name_or_path", str(model), "--instance_data_dir",
            str(data), "--instance_prompt", prompt, "--output_dir", str(out / f"peer{steps}"), "--resolution",
            str(args.resolution), "--train_batch_size", str(args.batch), "--rank", str(args.rank),
            "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--mixed_precision", args.precision,
            "--seed", "0", "--checkpointing_steps", "1000000", "--center_crop"]
    ours = [py, "-m", "sdlora", "train", "--model", str(model), "--data", str(data), "--instance-prompt", prompt,
            "--resolution", str(args.resolution), "--batch-size", str(args.batch), "--rank", str(args.rank),
            "--targets", "attn", "--max-steps", str(steps), "--lr", "1e-4", "--mixed-precision", args.precision,
            "--seed", "0"]
    return {"diffusers": peer,
            "sdlora uncached": ours + ["--output", str(out / f"u{steps}.safetensors"), "--no-cache-latents",
                                       "--no-cache-text"],
            "sdlora": ours + ["--output", str(out / f"c{steps}.safetensors")]}


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a command: on a shared CPU the second is what other processes cannot stretch."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", type=Path, required=True, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--steps", nargs=2, type=int, default=[2, 6], metavar=("SHORT", "LONG"))
    p.add_argument("--model-dir", type=Path, help="Where the random model is (or is saved); default: a temp folder.")
    p.add_argument("--json", type=Path, help="Write the results here too.")
    p.add_argument("--tiny", action="store_true", help="The test suite's tiny model (a dry run of the plumbing).")
    args = p.parse_args()
    if not args.script.is_file():
        sys.exit(f"error: {args.script} not found: give diffusers' examples/dreambooth/train_dreambooth_lora.py")
    import torch

    work = Path(tempfile.mkdtemp(prefix="peer_"))
    cuda = torch.cuda.is_available()
    model = save_model(args.model_dir or work / "model", "cuda" if cuda else None, args.tiny)
    data = images(work / "data", max(4, args.batch), args.resolution)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    launcher = peer_launcher(work)
    shim = len(launcher) > 1
    short, long = args.steps
    results = {}
    for tool in commands(args, model, data, work, short, launcher):
        try:
            t = [timed(commands(args, model, data, work, n, launcher)[tool], env) for n in (short, long)]
            wall = (t[1][0] - t[0][0]) / (long - short)
            own = (t[1][1] - t[0][1]) / (long - short)
            results[tool] = {"wall_seconds": [x[0] for x in t], "cpu_seconds": [x[1] for x in t],
                             "wall_s_per_step": wall, "cpu_s_per_step": own,
                             "s_per_step": wall if cuda else own}  # on the CPU: its own time, not the others'

        except RuntimeError as e:
            results[tool] = {"error": str(e)}
        print(f"{tool}: {results[tool]}", flush=True)
    peer = results.get("diffusers", {}).get("s_per_step")
    for tool in ("sdlora uncached", "sdlora"):
        mine = results.get(tool, {}).get("s_per_step")
        if peer and mine:
            results[tool]["peer_over_sdlora"] = peer / mine
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
              "model": "tiny" if args.tiny else "SD 1.5-shaped, random weights",
              "torch": torch.__version__, "resolution": args.resolution, "batch": args.batch, "rank": args.rank,
              "precision": args.precision, "steps": args.steps, "threads": torch.get_num_threads(),
              "torchvision": "stand-in" if shim else "installed", "results": results}
    print(json.dumps(report, indent=1))
    for tool in ("sdlora uncached", "sdlora"):
        if "peer_over_sdlora" in results.get(tool, {}):
            print(f"diffusers {peer:.3f} s/step vs {tool} {results[tool]['s_per_step']:.3f}: "
                  f"{results[tool]['peer_over_sdlora']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
