"""Write shapes-world images with .txt caption sidecars.

    python scripts/make_shapes.py --out data/world --n 60 --seed 0
    python scripts/make_shapes.py --out sample_data/concepts/star --shapes star --trigger sks --n 8 --seed 7
"""

import argparse
from pathlib import Path

from sdlora.world import shapes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=18)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shapes", default=",".join(shapes.BASE_SHAPES), help="comma-separated shape names")
    ap.add_argument("--colours", default=",".join(shapes.COLOURS), help="comma-separated colour names")
    ap.add_argument("--trigger", default=None, help="caption word used instead of the shape name")
    args = ap.parse_args(argv)
    samples = shapes.sample_world(args.n, args.seed, args.shapes.split(","), args.colours.split(","))
    shapes.write_folder(samples, args.out, args.trigger)
    print(f"wrote {len(samples)} images to {args.out}")


if __name__ == "__main__":
    main()
