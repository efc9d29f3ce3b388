"""Train the shipped eraser and colour slider on the built-in shapes world (prompts alone, no images) and measure
them with the judge; prints the table docs/training.md shows (sliders and erasers).

    OMP_NUM_THREADS=1 python scripts/eval_sliders.py              # trains both (CPU: ~10 minutes), then measures
    python scripts/eval_sliders.py --skip-training                 # measure the files already in --output

The eraser (sample_data/slider_eraser.toml) should make "a <colour> circle" draw circles <= 10% of the time while
squares and triangles keep >= 95% of the base model's accuracy; the colour slider (sample_data/slider_colour.toml)
should turn "a orange circle" red at +1, yellow at -1, and leave the base model's images as they are at 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sdlora.config import load_toml
from sdlora.paths import sample_data
from sdlora.world.judge import load_judge
from sdlora.world.shapes import COLOURS
from sdlora.world.sliders import evaluate_colour_slider, evaluate_eraser


def trained(job: str, out: Path, skip: bool):
    """(the LoRA of a shipped slider job, its config), trained into `out` unless it is there and `skip`."""
    from sdlora.cli.common import ProgressBar
    from sdlora.training.loop import train

    cfg = load_toml(sample_data() / job)
    cfg.output.path = str(out / Path(cfg.output.path).name)
    if skip and Path(cfg.output.path).is_file():
        return cfg.output.path, cfg
    t0 = time.time()
    result = train(cfg, ProgressBar(job))
    print(f"{job}: {result.steps} steps in {time.time() - t0:.0f}s -> {result.output}")
    return result.output, cfg


def colour_of(prompt: str) -> str:
    return next(c for c in COLOURS if c in prompt.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="output/sliders", help="Folder for the LoRAs, reports and contact sheets.")
    ap.add_argument("--n", type=int, default=8, help="Eraser: images per prompt (6 colours x 3 shapes x n).")
    ap.add_argument("--n-slider", type=int, default=24, help="Colour slider: images per strength.")
    ap.add_argument("--skip-training", action="store_true", help="Reuse LoRAs already in --output.")
    args = ap.parse_args()
    out = Path(args.output)
    judge = load_judge()
    eraser = evaluate_eraser(trained("slider_eraser.toml", out, args.skip_training)[0], n=args.n, judge=judge,
                             output_dir=out)
    path, cfg = trained("slider_colour.toml", out, args.skip_training)
    sl = cfg.slider
    slider = evaluate_colour_slider(path, sl.target, colour_of(sl.positive), colour_of(sl.negative), n=args.n_slider,
                                    judge=judge, output_dir=out)
    eraser.save(out / "eraser_report.json")
    slider.save(out / "slider_report.json")
    print(f"\neraser of 'a circle' (strength 1, {6 * args.n} images per shape):")
    print(f"  'a <colour> circle' judged a circle  {eraser.concept_rate:6.1%}   (base {eraser.concept_rate_base:.1%}; "
          f"drew {json.dumps(eraser.shapes_drawn)})")
    for s in eraser.accuracy:
        print(f"  'a <colour> {s}' accuracy {eraser.accuracy[s]:10.1%}   (base {eraser.accuracy_base[s]:.1%}: "
              f"{eraser.kept[s]:.1%} kept)")
    print(f"\ncolour slider on '{slider.prompt}' (+1: {slider.positive}, -1: {slider.negative}; {slider.n} images "
          "per strength), judged colours:")
    names = sorted({c for shares in (*slider.colours.values(), slider.base) for c in shares})
    print("  strength  " + "  ".join(f"{c:>7}" for c in names) + "   still a circle")
    for s, shares in [*slider.colours.items(), ("no LoRA", slider.base)]:
        kept = f"{slider.shape_kept[s]:8.0%}" if s in slider.shape_kept else ""
        print(f"  {s:>8}  " + "  ".join(f"{shares.get(c, 0):7.0%}" for c in names) + f"   {kept}")
    print(f"  largest pixel change at strength 0 against no LoRA: {slider.max_pixel_change_at_0} (of 255)")
    print(f"\nreports and contact sheets: {out}")


if __name__ == "__main__":
    main()
