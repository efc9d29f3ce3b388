"""Judge accuracy of the base shapes model (no LoRA) on the world's prompts.

    python scripts/eval_base.py                      # sample_data/shapes-sd, 72 images
    python scripts/eval_base.py --model DIR --n 180 --json out.json
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from sdlora.world.evaluate import evaluate_base
from sdlora.world.judge import load_judge


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: sample_data/shapes-sd)")
    ap.add_argument("--judge", default=None, help="judge folder (default: sample_data/judge)")
    ap.add_argument("--n", type=int, default=72, help="images, cycling the 18 world prompts")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = evaluate_base(args.model, n=args.n, seed=args.seed, judge=load_judge(args.judge), steps=args.steps,
                           guidance_scale=args.guidance)
    print(f"shape {report.shape_accuracy:.3f}  colour {report.colour_accuracy:.3f}  both {report.accuracy:.3f}"
          f"  ({report.n} images, {report.seconds:.0f}s)")
    for prompt, acc in sorted(report.per_prompt.items(), key=lambda kv: kv[1])[:5]:
        print(f"  {acc:.2f}  {prompt}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
