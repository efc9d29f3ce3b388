"""`sdlora compare`: LoRA files side by side, as a labelled grid and a score table (best first)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SdloraError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdloraError(f"--strengths must be numbers like 0.6,0.8,1, got {text!r}") from None


def register(sub) -> None:
    c = sub.add_parser("compare", help="Render LoRA files (checkpoints of a run, a folder, a glob) at several "
                       "strengths on the same prompts and seeds: a labelled grid and a score table, best first.")
    c.add_argument("files", nargs="+", metavar="FILE|FOLDER|GLOB",
                   help="LoRA files, a run's FILE_checkpoints folder, or a quoted glob like 'out/*.safetensors'.")
    c.add_argument("--output", "-o", required=True, help="Folder for grid.png and scores.md / .csv / .json.")
    c.add_argument("--strengths", default="1", help="LoRA strengths, comma-separated (default: 1).")
    c.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable); with the trigger it is "
                   "scored for likeness, without it against the base model. Default: the run's validation prompts.")
    c.add_argument("--prompts", metavar="FILE", help="A text file of prompts, one per line.")
    c.add_argument("--seeds", type=int, default=None, help="Images per prompt (default: the run's, else 2).")
    c.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the run's, else 20).")
    c.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the run's samples').")
    c.add_argument("--size", type=int, default=None, help="Image size in pixels (default: the training size).")
    c.add_argument("--scorer", default=None, choices=("shapes", "clip-dino", "none"),
                   help="Default: the run's; else shapes on the built-in model, clip-dino on others.")
    c.add_argument("--trigger", default=None, help="The trigger phrase (default: from the run).")
    c.add_argument("--data", default=None, metavar="DIR", help="Training images for likeness and copying "
                   "(default: the run's data folders).")
    c.add_argument("--concept", default=None, help="shapes scorer: the judge class (default: read off --data).")
    c.add_argument("--clip-model", default=None, help="clip-dino: CLIP or SigLIP model (folder or hub id).")
    c.add_argument("--dino-model", default=None, help="clip-dino: image model (folder or hub id), or 'clip'.")
    c.add_argument("--weights", default=None, help="Combined score weights, e.g. likeness=1,adherence=1,"
                   "preservation=1,copying=0.")
    c.add_argument("--model", default=None, help="Base model (default: the run's, else the built-in model).")
    c.add_argument("--allow-pickle", action="store_true", help="Allow a .ckpt base model (weights only).")
    c.add_argument("--text-encoders", default="", metavar="FOLDER", help="SD3 single files without text encoders.")
    c.set_defaults(func=cmd_compare)


def prompts_of(args) -> list[str] | None:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SdloraError(f"--prompts {path}: no such file")
        prompts += [x.strip() for x in path.read_text(encoding="utf-8").splitlines()
                    if x.strip() and not x.strip().startswith("#")]
    return prompts or None


def cmd_compare(args) -> int:
    from ..loras.compare import CompareSettings, compare

    settings = CompareSettings(model=args.model, strengths=_floats(args.strengths), prompts=prompts_of(args),
                               seeds=args.seeds, steps=args.steps, guidance=args.guidance, size=args.size,
                               scorer=args.scorer, trigger=args.trigger, data=args.data, concept=args.concept,
                               clip_model=args.clip_model, dino_model=args.dino_model, weights=args.weights,
                               allow_pickle=args.allow_pickle, text_encoders=args.text_encoders)

    def progress(done, total):
        print(f"\rrendered {done}/{total} rows", end="", file=sys.stderr, flush=True)

    report = compare(args.files, args.output, settings, progress)
    print(file=sys.stderr)
    print(report.markdown())
    print(f"grid: {report.grid}\nscores: {', '.join(report.tables.values())}")
    return 0
