"""Train the shapes-world Stable Diffusion pipeline and its judge from scratch, on CPU.

    python scripts/build_shapes_model.py                 # ~30 min on one core -> sample_data/
    python scripts/build_shapes_model.py --quick --out /tmp/x   # seconds-long smoke run
    python scripts/build_shapes_model.py --judge-only    # retrain only the judge on <out>/shapes-sd's VAE

Writes <out>/shapes-sd (a diffusers folder), <out>/judge and <out>/base_eval.json.
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sdlora import paths
from sdlora.world.builder import BuildConfig, build
from sdlora.world.evaluate import evaluate_base
from sdlora.world.judge import train_judge


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=paths.sample_data(), help="folder for shapes-sd/ and judge/")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (tests; not a usable model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--unet-steps", type=int, default=None, help="override the UNet step count")
    ap.add_argument("--eval-n", type=int, default=72, help="images for the base accuracy check")
    ap.add_argument("--judge-only", action="store_true",
                    help="keep <out>/shapes-sd; retrain the judge (e.g. after adding shapes) and re-measure the base")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = BuildConfig.quick(args.seed) if args.quick else BuildConfig(seed=args.seed)
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    if args.judge_only:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(args.out / "shapes-sd", safety_checker=None)
    else:
        pipe = build(args.out / "shapes-sd", cfg, log)
    vae = pipe.vae

    def roundtrip(x):
        return vae.decode(vae.encode(x).latent_dist.mean).sample

    judge = train_judge(steps=cfg.judge_steps, seed=args.seed, n_images=64 if args.quick else None,
                        roundtrip=roundtrip, log=log)
    judge.save(args.out / "judge")
    log("judge saved; measuring base accuracy")
    pipe.set_progress_bar_config(disable=True)
    report = evaluate_base(pipe, n=6 if args.quick else args.eval_n, seed=12345, judge=judge,
                           steps=2 if args.quick else 25)
    report.model = str(args.out / "shapes-sd")
    (args.out / "base_eval.json").write_text(json.dumps(asdict(report), indent=2))
    log(f"base accuracy: shape {report.shape_accuracy:.3f} colour {report.colour_accuracy:.3f} "
        f"both {report.accuracy:.3f}")
    log(f"total {time.time() - t0:.0f}s with {args.threads} thread(s)")


if __name__ == "__main__":
    main()
