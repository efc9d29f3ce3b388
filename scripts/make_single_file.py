"""Write a diffusers Stable Diffusion folder as one original-layout .safetensors file, or a .ckpt as .safetensors.

    python scripts/make_single_file.py models/tiny-sd1 models/tiny-sd1.safetensors
    python scripts/make_single_file.py --from-ckpt v1-5-pruned.ckpt v1-5-pruned.safetensors
"""

import argparse
import sys

from sdlora.failures import describe
from sdlora.single_file import ckpt_to_safetensors, detect_checkpoint, save_single_file


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a diffusers pipeline folder (or, with --from-ckpt, a .ckpt file)")
    ap.add_argument("out", help="the .safetensors file to write")
    ap.add_argument("--from-ckpt", action="store_true",
                    help="rewrite a pickled .ckpt as .safetensors (tensors only; a file asking to run code is refused)")
    args = ap.parse_args(argv)
    try:
        out = ckpt_to_safetensors(args.source, args.out) if args.from_ckpt else save_single_file(args.source, args.out)
        info = detect_checkpoint(out)
    except Exception as e:  # noqa: BLE001 - one line (a bug's traceback goes to the log it names)
        print(f"error: {describe(e)[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {info.family}, {info.prediction_type} ({info.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
