"""`sdlora train`: job files and flags (one flag per config field), batches of jobs, Ctrl-C as a clean stop."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..callbacks import Commands
from ..errors import SdloraError
from .common import ProgressBar


def register(sub) -> None:
    t = sub.add_parser("train", help="Train LoRAs from TOML configs and/or flags (flags override the TOML).")
    t.add_argument("configs", nargs="*", metavar="CONFIG.toml", help="Job files, trained one after another.")
    t.add_argument("--queue", metavar="FILE", help="A text file listing job files, one per line.")
    t.add_argument("--resume", action="store_true", help="Continue from the last checkpoint of each job's output.")
    t.add_argument("--print-config", action="store_true", help="Print each job's merged config as TOML and exit.")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """`--preset`, then one flag per config field, generated from the dataclasses (help text and default included)
    and grouped as the web UI groups them (sdlora.options)."""
    from ..options import by_key, groups
    from ..presets import list_presets

    names = ", ".join(x.name for x in list_presets())
    p.add_argument("--preset", metavar="NAME", help=f"Start from a preset's values (a job file and flags go on top); "
                   f"sample_data/presets/: {names}; or a preset file's path.")
    titles = {g.key: g.title for g in groups()}
    arg_groups = {}
    for opt in by_key().values():
        title = titles.get(opt.group, opt.group)
        group = arg_groups.get(title) or arg_groups.setdefault(title, p.add_argument_group(title))
        _add_flag(group, opt)


def _add_flag(group, opt) -> None:
    f = opt.field
    where = f"[[data]] {f.name}" if opt.section == "data" else f"[{opt.section}] {f.name}"
    help_text = f"{opt.label}: {opt.help} ({where}) (default: {opt.default!r})"
    kw = dict(dest=f"{opt.section}.{f.name}", default=None, help=help_text.replace("%", "%%"))
    if f.type != "bool":
        kw["metavar"] = {"int": "N", "float": "X"}.get(f.type, "TEXT")
    if f.type == "bool":
        group.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kw)
    elif f.type == "list":
        group.add_argument(opt.flag, action="append", **kw)
    else:
        typ = {"int": int, "float": float}.get(f.type, str)
        group.add_argument(opt.flag, type=typ, choices=f.metadata.get("choices"), **kw)


def apply_flags(cfg, args: argparse.Namespace):
    """Override a config with the flags that were given (flags win over the TOML)."""
    from ..config import DataFolder

    given = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    data_flags = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith("data.")}
    for key, value in given.items():
        section, name = key.split(".", 1)
        if section != "data":
            setattr(getattr(cfg, section), name, value)
    if "path" in data_flags:
        cfg.data = [DataFolder(**data_flags)]
    elif data_flags:
        for folder in cfg.data or []:
            for name, value in data_flags.items():
                setattr(folder, name, value)
    return cfg


def job_configs(args) -> list[tuple[str, object]]:
    """(label, Config) per job: each TOML (and each line of a queue file) over the preset, with the flags applied."""
    from ..config import from_dict, load_toml
    from ..presets import preset_values

    paths = list(args.configs)
    if getattr(args, "queue", None):
        q = Path(args.queue)
        if not q.is_file():
            raise SdloraError(f"queue file not found: {q}")
        try:
            lines = q.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise SdloraError(f"queue file {q} is not a text file (not UTF-8: byte {e.start}); list one job file "
                              "per line") from None
        for line in lines:
            if line.strip() and not line.strip().startswith("#"):
                p = Path(line.strip())
                paths.append(str(p if p.is_absolute() else q.parent / p))
    under = preset_values(args.preset) if getattr(args, "preset", None) else {}
    if not paths:
        return [("command line", apply_flags(from_dict(under), args))]
    return [(p, apply_flags(load_toml(p, under), args)) for p in paths]


def cmd_train(args) -> int:
    from ..config import validate
    from ..training.loop import train

    jobs = job_configs(args)
    if args.print_config:
        for label, cfg in jobs:
            print(f"# {label}\n{cfg.to_toml()}")
        return 0
    check_distinct_outputs(jobs)
    failures = 0
    for label, cfg in jobs:
        commands = Commands()
        previous = signal.signal(signal.SIGINT, _stop_handler(commands))
        try:
            validate(cfg)
            result = train(cfg, ProgressBar(label), commands, resume=args.resume)
            if not result.is_main:
                continue
            state = "early stopped" if result.early_stopped else \
                "stopped (resume with --resume)" if result.stopped else "done"
            print(f"{label}: {state}: {result.output} ({result.steps} steps, loss {result.final_loss:.4f}, "
                  f"{result.seconds:.1f}s)")
            if result.best:
                what = f"score {result.best_score:.4g}" if result.best_score == result.best_score else \
                    f"loss {result.best_val_loss:.6g}"
                print(f"{label}: best validation {what} at step {result.best_step}: {result.best}")
        except Exception as e:  # noqa: BLE001 - one job's failure is one line; the batch goes on
            from ..failures import describe

            failures += 1
            print(f"{label}: error: {describe(e, verbose=getattr(args, 'verbose', False))[0]}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)
        if commands.stop:
            break
    if len(jobs) > 1:
        print(f"{len(jobs) - failures} of {len(jobs)} jobs succeeded")
    return 1 if failures else 0


def check_distinct_outputs(jobs: list[tuple[str, object]]) -> None:
    """Two jobs of one batch writing the same file would silently replace each other's work: refuse first."""
    seen: dict[Path, str] = {}
    for label, cfg in jobs:
        out = Path(cfg.output.path).resolve()
        if out in seen:
            raise SdloraError(f"{seen[out]} and {label} both write {cfg.output.path}; give each job its own "
                              "output.path")
        seen[out] = label


def _stop_handler(commands):
    def handler(signum, frame):
        if commands.stop:
            raise KeyboardInterrupt
        commands.stop = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    return handler
