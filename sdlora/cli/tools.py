"""Subcommands registered on the `sdlora` parser: each parses its flags and calls one library function of
`sdlora.loras`, then prints its result."""

from __future__ import annotations

import json

from .common import parse_weighted


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _output_flags(p, what: str) -> None:
    p.add_argument("--output", "-o", required=True, help=f"Where to write the {what}.")
    p.add_argument("--overwrite", action="store_true", help="Replace the output if it exists (never an input).")


def _model_flags(p, flag: str = "--model", required: bool = False) -> None:
    p.add_argument(flag, required=required, default=None,
                   help="Base model: a diffusers folder (default: the built-in model) or a single-file checkpoint.")
    p.add_argument("--allow-pickle", action="store_true",
                   help="Read .ckpt/.pt checkpoints (pickles): tensors, numbers and PyTorch Lightning's records only, "
                        "as ComfyUI and A1111 do; a file that asks to run code is refused and nothing in it runs.")
    p.add_argument("--text-encoders", default="", metavar="FOLDER",
                   help="SD3 single files without text encoders: a diffusers SD3 folder, or a folder of ComfyUI-style "
                        "clip_l / clip_g / t5xxl .safetensors files (with tokenizer folders).")


def register(sub) -> None:
    """Add generate / inspect / convert / merge / mix / resize / extract to the `sdlora` subparsers."""
    g = sub.add_parser("generate", help="Text to image with one or more LoRAs, each at its own scale.")
    _model_flags(g)
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="A LoRA (repeatable).")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=0, help="Image i uses seed + i.")
    g.add_argument("--n", type=int, default=1, help="Images per prompt (grid: rows).")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--scheduler", default=None, help="euler, euler_a, dpm++, ddim, unipc, ... or a class name.")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--output", "-o", default="outputs", help="Folder for the PNGs.")
    g.add_argument("--grid", action="store_true", help="One labelled sheet: LoRA scales across, seeds down.")
    g.add_argument("--scales", type=_floats, default=None, help="Scale multipliers for --grid (default 0,0.5,1).")
    g.add_argument("--no-t5", action="store_true", help="SD3: render without T5 (zero T5 embeddings).")
    g.set_defaults(func=cmd_generate)

    cap = sub.add_parser("caption", help="Write a caption beside every image that has none, with an image-to-text "
                                         "model (BLIP, Florence-2, a small vision-language model).")
    cap.add_argument("folder")
    cap.add_argument("--captioner", required=True, metavar="MODEL",
                     help="A local model folder or a hub id (the hub needs a network).")
    cap.add_argument("--prefix", default="", help="Put in front of every caption, e.g. 'sks, '.")
    cap.add_argument("--overwrite", action="store_true", help="Replace existing captions too.")
    cap.add_argument("--batch-size", type=int, default=4)
    cap.add_argument("--prompt", default=None, help="The instruction or task prompt (default: the model's own).")
    cap.add_argument("--device", default="cpu", help="cpu or cuda.")
    cap.set_defaults(func=cmd_caption)

    i = sub.add_parser("inspect", help="Show what a LoRA file holds and check it loads everywhere.")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="Rewrite a LoRA in the kohya or diffusers layout (numerically identical).")
    c.add_argument("file")
    c.add_argument("--to", default=None, choices=("kohya", "diffusers"), help="Layout to write (default: keep it).")
    c.add_argument("--metadata", default=None, choices=("public", "none"),
                   help="Rewrite the header: public drops absolute paths and user names, none keeps only what loaders "
                        "read. The tensors are not touched.")
    c.add_argument("--model", default=None, help="Map layer names through this model (default: SD1/SD2 naming).")
    _output_flags(c, "converted LoRA")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("merge", help="Bake LoRAs into a model: a diffusers folder, or a .safetensors checkpoint.")
    _model_flags(m)
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]", help="A LoRA (repeatable).")
    _output_flags(m, "merged model (folder, or file ending in .safetensors)")
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser("mix", help="Weighted sum of LoRAs: exact (ranks stacked) or SVD to --rank; DoRA, LoHa and "
                       "LoKr inputs become a plain LoRA by SVD.")
    x.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]")
    x.add_argument("--rank", type=int, default=None, help="Target rank (SVD; errors reported). Default: exact.")
    x.add_argument("--model", default=None, help="Base model, for DoRA inputs (their update depends on its weights).")
    _output_flags(x, "mixed LoRA")
    x.set_defaults(func=cmd_mix)

    r = sub.add_parser("resize", help="Change a LoRA's rank by SVD, reporting the error per layer.")
    r.add_argument("file")
    size = r.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="Target rank of every layer.")
    size.add_argument("--keep-energy", type=float, metavar="X", help="Per layer, the smallest rank keeping share "
                      "X (0-1] of the squared singular values.")
    r.add_argument("--model", default=None, help="Base model, for a DoRA file (its update depends on its weights).")
    _output_flags(r, "resized LoRA")
    r.set_defaults(func=cmd_resize)

    e = sub.add_parser("extract", help="A LoRA from the difference between a tuned model and its base.")
    _model_flags(e, "--base")
    e.add_argument("--tuned", required=True, help="The fine-tuned model (folder or checkpoint).")
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("--conv-rank", type=int, default=None, help="Also extract 3x3 conv layers at this rank.")
    e.add_argument("--no-text-encoder", action="store_true", help="Leave the text encoder out.")
    _output_flags(e, "extracted LoRA")
    e.set_defaults(func=cmd_extract)


def cmd_generate(args) -> int:
    from ..loras.apply import generate

    paths = generate(args.model, [parse_weighted(s) for s in args.lora], args.prompt,
                     negative_prompt=args.negative_prompt,
                     seed=args.seed, n=args.n, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                     width=args.width, height=args.height, output_dir=args.output, grid=args.grid,
                     scales=args.scales, allow_pickle=args.allow_pickle, text_encoders=args.text_encoders,
                     t5=False if args.no_t5 else None)
    for p in paths:
        print(p)
    return 0


def cmd_caption(args) -> int:
    from tqdm import tqdm

    from ..captioning import caption_folder

    bar = None

    def progress(done, total):
        nonlocal bar
        bar = bar or tqdm(total=total, unit="image", desc="captioning")
        bar.update(done - bar.n)

    report = caption_folder(args.folder, args.captioner, args.prefix, args.overwrite, args.batch_size, progress,
                            args.device, args.prompt)
    if bar:
        bar.close()
    print(report.summary())
    return 0


def cmd_inspect(args) -> int:
    from ..loras.inspect import inspect_lora

    info = inspect_lora(args.file)
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.summary())
    return 0


def cmd_convert(args) -> int:
    from ..loras.convert import convert_lora

    print(convert_lora(args.file, args.to, args.output, overwrite=args.overwrite, model=args.model,
                       metadata=args.metadata))
    return 0


def cmd_merge(args) -> int:
    from ..loras.merge import merge_into_model

    out = merge_into_model(args.model, [parse_weighted(s) for s in args.lora], args.output, overwrite=args.overwrite,
                           allow_pickle=args.allow_pickle, text_encoders=args.text_encoders)
    print(out)
    return 0


def cmd_mix(args) -> int:
    from ..loras.mix import mix_loras

    report = mix_loras([parse_weighted(s) for s in args.loras], args.output, rank=args.rank, overwrite=args.overwrite,
                       model=args.model)
    print(report.table())
    return 0


def cmd_resize(args) -> int:
    from ..loras.mix import resize_lora

    print(resize_lora(args.file, args.output, rank=args.rank, keep_energy=args.keep_energy,
                      overwrite=args.overwrite, model=args.model).table())
    return 0


def cmd_extract(args) -> int:
    from ..loras.merge import extract_lora

    report = extract_lora(args.base, args.tuned, args.rank, args.output, overwrite=args.overwrite,
                          conv_rank=args.conv_rank, text_encoder=not args.no_text_encoder,
                          allow_pickle=args.allow_pickle, text_encoders=args.text_encoders)
    print(report.table())
    if report.skipped:
        print(f"skipped {len(report.skipped)} layers whose difference is ~0")
    return 0
