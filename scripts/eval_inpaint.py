"""The shapes world's inpainting check: a concept LoRA trained for the inpainting model draws the concept inside the
mask (the judge) and leaves the outside as it was (pixel difference); prints the table docs/training.md shows
(inpainting models).

    OMP_NUM_THREADS=1 python scripts/eval_inpaint.py            # builds the inpainting model if it is missing
                                                                # (scripts/build_shapes_inpaint.py), trains
                                                                # sample_data/inpaint_demo.toml, then measures
    python scripts/eval_inpaint.py --skip-training              # measure the LoRA already in --output

The check repaints the box around the shape of base-world images ("a blue circle" in its box) with "a <colour> sks",
with the LoRA and without it, and with the image's own caption (the inpainting model alone).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sdlora.config import load_toml
from sdlora.paths import sample_data
from sdlora.world.inpaint import InpaintBuildConfig, build_inpainting, evaluate_inpainting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="output/shapes-sd-inpaint", help="The inpainting model (built if missing).")
    ap.add_argument("--output", default="output/inpaint_demo", help="Folder for the LoRA, report and contact sheet.")
    ap.add_argument("--n", type=int, default=48, help="Check images.")
    ap.add_argument("--steps", type=int, default=None, help="LoRA training steps (default: the job's).")
    ap.add_argument("--skip-training", action="store_true", help="Reuse the LoRA already in --output.")
    args = ap.parse_args()
    model, out = Path(args.model), Path(args.output)
    t0 = time.time()
    if not (model / "model_index.json").is_file():
        build_inpainting(model, InpaintBuildConfig(), log=lambda m: print(f"[{time.time() - t0:6.0f}s] {m}"))
    cfg = load_toml(sample_data() / "inpaint_demo.toml")
    cfg.model.path, cfg.output.path = str(model), str(out / Path(cfg.output.path).name)
    if args.steps is not None:
        cfg.train.max_steps = args.steps
    if not (args.skip_training and Path(cfg.output.path).is_file()):
        from sdlora.cli.common import ProgressBar
        from sdlora.training.loop import train

        t1 = time.time()
        result = train(cfg, ProgressBar("inpaint_demo"))
        print(f"trained {result.steps} steps in {time.time() - t1:.0f}s -> {result.output}")
    r = evaluate_inpainting(model, cfg.output.path, "sks", "star", n=args.n, output_dir=out)
    print(f"\nconcept LoRA '{cfg.output.path}' on {model}: {r.n} base-world images, the box around their shape "
          f"repainted ({r.steps} steps, guidance {r.guidance_scale:g})")
    print("                                     star in mask   + colour   drawn inside   outside change (of 255)")
    for name, m in (("'a <colour> sks' + LoRA", r.with_lora), ("'a <colour> sks', no LoRA", r.without_lora)):
        print(f"  {name:32} {m['concept_in_mask']:10.0%} {m['colour_right']:10.0%} {m['inside_share']:12.0%} "
              f"{m['outside_change']:14.2f}")
    b = r.base_prompts
    print(f"  {'its own caption, no LoRA':32} {'-':>10} {b['right_shape_and_colour']:10.0%} "
          f"{b['inside_share']:12.0%} {b['outside_change']:14.2f}   (shape and colour right)")
    print(f"  the VAE's own round trip changes the outside by {r.vae_round_trip_outside:.2f}; judged with the LoRA: "
          f"{r.with_lora['judged']}, without: {r.without_lora['judged']}")
    print(f"report and contact sheet: {out}  ({r.seconds:.0f}s)")


if __name__ == "__main__":
    main()
