"""Write a diffusers Stable Diffusion folder as one original-layout .safetensors file, or a .ckpt as .safetensors.

    python scripts/make_single_file.py models/tiny-sd1 models/tiny-sd1.safetensors
    python scripts/make_single_file.py --from-ckpt v1-5-pruned.ckpt v1-5-pruned.safetensors
"""

import argparse

from sdlora.single_file import ckpt_to_safetensors, detect_checkpoint, save_single_file


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a diffusers pipeline folder (or, with --from-ckpt, a .ckpt file)")
    ap.add_argument("out", help="the .safetensors file to write")
    ap.add_argument("--from-ckpt", action="store_true",
                    help="rewrite a pickled .ckpt as .safetensors (read with torch.load(weights_only=True))")
    args = ap.parse_args(argv)
    out = ckpt_to_safetensors(args.source, args.out) if args.from_ckpt else save_single_file(args.source, args.out)
    info = detect_checkpoint(out)
    print(f"wrote {out}: {info.family}, {info.prediction_type} ({info.reason})")


if __name__ == "__main__":
    main()
