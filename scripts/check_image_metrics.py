"""Check the real-photo metrics (clip-dino: DINOv2 likeness, CLIP/SigLIP adherence, DINO preservation) against the
shapes world's judge on the same images, before trusting them (as reference/quality.md asks).

    python scripts/check_image_metrics.py RUN_checkpoints/ --clip-model DIR_OR_ID --dino-model DIR_OR_ID \\
        [--output output/metrics] [--seeds 2]

Both scorers rank the same files (a shapes-world run's checkpoints) on the same rendered prompts and seeds through
`sdlora compare`; the table gives, for each part and the combined score, the rank correlation (Spearman) of the
clip-dino value with the judge's over the files. Needs the CLIP/SigLIP and DINOv2 weights (a folder or the hub
cache): nothing is downloaded unless the hub is reachable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdlora.config import SCORE_PARTS
from sdlora.loras.compare import CompareSettings, compare

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ also when imported from elsewhere (the docs test)
from measure_selection import spearman


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="A shapes-world run's checkpoints folder, files or a glob.")
    p.add_argument("--clip-model", required=True)
    p.add_argument("--dino-model", required=True)
    p.add_argument("--output", default="output/metrics")
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    out = Path(args.output)
    runs = {}
    for scorer in ("shapes", "clip-dino"):
        s = CompareSettings(scorer=scorer, seeds=args.seeds, clip_model=args.clip_model, dino_model=args.dino_model)
        report = compare(args.files, out / scorer, s)
        runs[scorer] = {(Path(r.file).name, r.strength): {"score": r.score, **r.parts} for r in report.rows}
    keys = sorted(runs["shapes"])
    print(f"{len(keys)} files; Spearman of clip-dino's value with the judge's, over the files:")
    for part in ("score", *SCORE_PARTS):
        a = [runs["clip-dino"][k].get(part) for k in keys]
        b = [runs["shapes"][k].get(part) for k in keys]
        if None in a or None in b:
            print(f"  {part:13s} (not measured)")
            continue
        print(f"  {part:13s} {spearman(a, b):+.2f}")


if __name__ == "__main__":
    main()
