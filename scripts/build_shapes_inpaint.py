"""Build the inpainting variant of the shapes-world model, as the SD inpainting models were made from theirs: the
shipped UNet with a 9-channel conv_in (the new mask and masked-image channels zero-initialised), fine-tuned on masked
reconstruction of base-world images; the VAE and text encoder are the shipped ones.

    OMP_NUM_THREADS=1 python scripts/build_shapes_inpaint.py     # minutes on one core -> output/shapes-sd-inpaint
    python scripts/build_shapes_inpaint.py --quick --out /tmp/x  # seconds-long smoke run (not a usable model)
"""

import argparse
import time
from pathlib import Path

import torch

from sdlora.world.inpaint import InpaintBuildConfig, build_inpainting

DEFAULT_OUT = Path("output/shapes-sd-inpaint")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the diffusers folder to write")
    ap.add_argument("--base", default=None, help="the text-to-image model to start from (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 800)")
    ap.add_argument("--quick", action="store_true", help="a few steps (tests; not a usable model)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = InpaintBuildConfig.quick() if args.quick else InpaintBuildConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    t0 = time.time()
    build_inpainting(args.out, cfg, args.base, log=lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True))


if __name__ == "__main__":
    main()
