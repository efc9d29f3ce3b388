"""Does a recipe hold on concepts nobody tuned it for? One LoRA per shapes-world concept, one file picked, a table.

    python scripts/heldout_concepts.py                         # the demo job (sample_data/demo.toml), all concepts
    python scripts/heldout_concepts.py --concepts heart --selection eval --n 0 -- --max-steps 1000 --rank 16
                                                               # explore: any `sdlora train` flag after --

For each concept, 8 seeded generator images "a <colour> sks" replace the job's first [[data]] folder (the star in
the demo job; the other folders, e.g. the base world, stay), the job trains, and one file is picked:
``--selection best`` (default) takes the file the trainer chose (NAME_best.safetensors: the demo job validates by
images with the shapes scorer and keeps the best), ``last`` the final file, and ``eval`` scores every checkpoint
(``--save-every``) and the last file on validation images (``sdlora eval``'s prompts at seeds apart from the
report's; 16 concept and 36 world images) by the mean of concept fidelity, prompt fidelity and base-world accuracy,
the later step winning ties. The picked file and the last one are then scored exactly as ``sdlora eval --n N``
does (seed 0). Concepts are split into the ones the recipe was tuned on (``--tuned``) and the held-out ones; the
summary gives mean and worst of the held-out ones against the targets. ``--replay WEIGHTS`` (with ``best``) also
scores the file another weighting of the combined score would have picked from the same validations (replayed
through the trainer's ``Best``; the run then keeps a checkpoint at every validation). Each concept's figures, the
trainer's validation scores and the merged config are appended to ``--results`` (JSON lines); ``--report-only
--label L`` prints a table from it again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdlora.callbacks import Callbacks  # noqa: E402
from sdlora.cli.train import add_config_flags, apply_flags  # noqa: E402
from sdlora.config import load_toml, parse_score_weights  # noqa: E402
from sdlora.errors import ConfigError  # noqa: E402
from sdlora.loras.apply import load_lora_into  # noqa: E402
from sdlora.training.loop import train  # noqa: E402
from sdlora.training.periodic.selection import RECORD_KEYS, rescored  # noqa: E402
from sdlora.world import shapes  # noqa: E402
from sdlora.world.evaluate import evaluate, generate, load_pipeline, trigger_prompts, world_prompts  # noqa: E402
from sdlora.world.judge import load_judge  # noqa: E402

TUNED = ("heart", "arrow", "cross")  # cross: held out until the Q1 recipe (docs/shapes-world.md), tuned on since
HELD_OUT = ("diamond", "crescent", "hourglass")
TRIGGER = "sks"
TARGETS = {"concept_fidelity": 0.90, "prompt_fidelity": 0.85, "preservation_drop": 0.03}


class Quiet(Callbacks):
    """Progress every ``every`` steps; the trainer's validation scores kept (``history``) for the results file."""

    def __init__(self, every: int = 250):
        self.every, self.t0, self.history = every, time.time(), {}

    def on_step(self, step, stats):
        if step % self.every == 0:
            print(f"    step {step} loss {float(stats.get('loss', float('nan'))):.4f} "
                  f"({time.time() - self.t0:.0f}s)", flush=True)

    def on_validation(self, step, stats):
        kept = {k: float(v) for k, v in stats.items() if k in RECORD_KEYS and v is not None}
        self.history[step] = kept
        parts = " ".join(f"{k} {v:.3f}" for k, v in kept.items())
        print(f"    image validation step {step}: {parts}", flush=True)


def make_data(concept: str, folder: Path, n: int, seed: int) -> Path:
    """n seeded images of the concept in every colour, captioned with the trigger (the seed is per concept)."""
    shapes.write_folder(shapes.sample_world(n, seed + shapes.ALL_SHAPES.index(concept), [concept]), folder, TRIGGER)
    return folder


def candidates(output: Path, max_steps: int) -> dict[int, Path]:
    """Step -> LoRA file: every checkpoint's file and the final one."""
    files = (output.parent / f"{output.stem}_checkpoints").glob("step_*.safetensors")
    return {**{int(p.stem.split("_")[1]): p for p in files}, max_steps: output}


@torch.no_grad()
def validation_score(pipe, judge, lora: Path | None, concept: str, n: int, seed: int, trigger: str = TRIGGER) -> dict:
    """The selection's stand-in for image validation: the judge on validation seeds (``sdlora eval``'s prompts,
    other seeds), with the LoRA only; without a LoRA only the base world's accuracy."""
    active = load_lora_into(pipe, lora, adapter_name="val") if lora else None
    try:
        trig, world = trigger_prompts(trigger, n), world_prompts(36)
        got = judge.classify(generate(pipe, [p for p, _ in trig], seed)) if lora else []
        base = judge.classify(generate(pipe, [p for p, _, _ in world], seed + 10_000))
    finally:
        if active is not None:
            active.remove()
    s = {"base_accuracy": sum(g == (sh, c) for g, (_, sh, c) in zip(base, world)) / len(world)}
    if lora:
        s["concept_fidelity"] = sum(g[0] == concept for g in got) / n
        s["prompt_fidelity"] = sum(g == (concept, c) for g, (_, c) in zip(got, trig)) / n
        s["score"] = (s["concept_fidelity"] + s["prompt_fidelity"] + s["base_accuracy"]) / 3
    return s


def replayed_step(history: dict[int, dict], weights: str) -> int:
    """The step the trainer would have kept under another weighting of the combined score, from its logged parts."""
    return rescored([{"step": step, **parts} for step, parts in sorted(history.items())],
                    parse_score_weights(weights))[1]


def from_validation(s: dict, base: float) -> dict:
    """Validation scores in the report's terms (exploration runs with --n 0 report these instead)."""
    return {"concept_fidelity": s["concept_fidelity"], "prompt_fidelity": s["prompt_fidelity"],
            "base_accuracy_with_lora": s["base_accuracy"], "base_accuracy_without_lora": base,
            "preservation_drop": base - s["base_accuracy"]}


def figures(report) -> dict:
    return {k: getattr(report, k) for k in ("concept_fidelity", "prompt_fidelity", "base_accuracy_with_lora",
                                            "base_accuracy_without_lora", "preservation_drop")}


def run_concept(concept: str, args, train_args, pipe, judge, base: float) -> dict:
    out = args.out / concept
    cfg = apply_flags(load_toml(args.job), train_args)
    cfg.data[0].path = str(make_data(concept, args.out / "data" / concept, args.images, args.data_seed))
    cfg.output.path = str(out / f"{concept}.safetensors")
    cfg.sample.prompts, cfg.sample.every = [], 0
    if args.selection == "eval":
        cfg.output.save_every = args.save_every
    if args.replay:  # the other weightings' picks must exist as files
        cfg.output.save_every = cfg.validation.every
    cfg.train.threads = args.threads
    trigger = cfg.pivotal.token if cfg.pivotal.trigger == TRIGGER else TRIGGER  # pivotal: prompts use the token
    t0 = time.time()
    last = Path(cfg.output.path)
    best, step = last.with_name(f"{concept}_best.safetensors"), None
    progress = Quiet()
    if not (args.reuse and last.is_file()):
        result = train(cfg, progress)
        best, step = Path(result.best or last), result.best_step or None
    seconds = time.time() - t0
    scores = {}
    if args.selection == "eval":
        files = candidates(last, cfg.train.max_steps)
        for step, path in sorted(files.items()):
            scores[step] = validation_score(pipe, judge, path, concept, args.select_n, args.select_seed, trigger)
            print(f"    validation step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in scores[step].items()),
                  flush=True)
        step = max(scores, key=lambda s: (scores[s]["score"], s))
        picked = files[step]
    elif args.selection == "best" and best.is_file():
        picked = best
    else:
        picked, step = last, None
    rows = {}
    for name, path in (("selected", picked), ("last", last)):
        if name == "last" and path == picked:
            rows["last"] = rows["selected"]
        elif args.n == 0:  # exploration: the validation figures stand in for the report
            rows[name] = {"file": str(path), "source": "validation",
                          **from_validation(scores[step if name == "selected" else cfg.train.max_steps], base)}
        else:
            rep = evaluate(path, trigger, concept, model=pipe, n=args.n, output_dir=out / f"eval_{name}",
                           judge=judge)
            rows[name] = {"file": str(path), "source": f"sdlora eval --n {args.n}", **figures(rep)}
    replays, done = {}, {step: rows["selected"], cfg.train.max_steps: rows["last"]}
    for weights in args.replay:
        at = replayed_step(progress.history, weights)
        if at not in done:
            path = last if at == cfg.train.max_steps else candidates(last, cfg.train.max_steps)[at]
            rep = evaluate(path, trigger, concept, model=pipe, n=args.n, output_dir=out / f"eval_step_{at}",
                           judge=judge)
            done[at] = {"file": str(path), "source": f"sdlora eval --n {args.n}", **figures(rep)}
        replays[weights] = {"step": at, **done[at]}
    return {"concept": concept, "role": "tuned" if concept in args.tuned else "held-out", "selected_step": step,
            "train_seconds": round(seconds, 1), "validation": scores,
            "trainer_validation": progress.history, "config": cfg.to_dict(), **rows,
            **({"replays": replays} if replays else {})}


def aggregate(rows: list[dict], which: str, role: str) -> dict | None:
    """Mean and worst of the targets' figures over one role's concepts (``which``: the selected or the last file),
    and whether the worst concept meets every target; None when no concept has that role."""
    got = [r[which] for r in rows if r["role"] == role]
    if not got:
        return None
    mean = {k: sum(g[k] for g in got) / len(got) for k in TARGETS}
    worst = {k: (max if k == "preservation_drop" else min)(g[k] for g in got) for k in TARGETS}
    ok = worst["concept_fidelity"] >= TARGETS["concept_fidelity"] and \
        worst["prompt_fidelity"] >= TARGETS["prompt_fidelity"] and \
        worst["preservation_drop"] <= TARGETS["preservation_drop"] + 1e-9
    return {"concepts": len(got), "mean": mean, "worst": worst, "targets_met": ok}


def summary(rows: list[dict], which: str) -> list[str]:
    """Mean and worst over the held-out concepts (and over the tuned ones), and whether the targets hold."""
    lines = []
    for role in ("held-out", "tuned"):
        agg = aggregate(rows, which, role)
        if agg is None:
            continue
        for kind in ("mean", "worst"):
            verdict = ("  (targets met)" if agg["targets_met"] else "  (targets NOT met)") \
                if kind == "worst" and role == "held-out" else ""
            lines.append(f"{which:8s} {role:8s} {kind:5s} " +
                         "  ".join(f"{k} {agg[kind][k]:6.1%}" for k in TARGETS) + verdict)
    return lines


def _line(r: dict, name: str, f: dict) -> str:
    return (f"| {r['concept']} | {r['role']} | {name} | {f['concept_fidelity']:.1%} | {f['prompt_fidelity']:.1%} | "
            f"{f['base_accuracy_with_lora']:.1%} / {f['base_accuracy_without_lora']:.1%} | "
            f"{f['preservation_drop']:+.1%} |")


def table(rows: list[dict]) -> str:
    head = ("| concept | role | file | concept fidelity | prompt fidelity | preservation (with / without LoRA) "
            "| drop |\n|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        for which in ("selected", "last"):
            f = r[which]
            name = which + (f" (step {r['selected_step']})" if which == "selected" and r["selected_step"] else "")
            out.append(_line(r, name, f))
        for weights, f in r.get("replays", {}).items():
            out.append(_line(r, f"{weights} (step {f['step']})", f))
    return "\n".join(out + [""] + summary(rows, "selected") + summary(rows, "last"))


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", type=Path, default=ROOT / "sample_data" / "demo.toml", help="the recipe (a job file)")
    ap.add_argument("--concepts", default=",".join(TUNED + HELD_OUT), help="comma-separated concepts to run")
    ap.add_argument("--tuned", default=",".join(TUNED), help="concepts the recipe was tuned on (the rest: held out)")
    ap.add_argument("--out", type=Path, default=ROOT / "output" / "heldout")
    ap.add_argument("--n", type=int, default=32, help="images per measurement of the report (sdlora eval --n); "
                    "0: report the validation figures (exploration; needs --selection eval)")
    ap.add_argument("--selection", choices=("best", "last", "eval"), default="best",
                    help="best: the file the trainer chose (image validation); last: the final file; eval: this "
                         "script scores every checkpoint (see above)")
    ap.add_argument("--save-every", type=int, default=500, help="checkpoints to choose from (selection eval)")
    ap.add_argument("--select-n", type=int, default=16, help="trigger images per validation (selection eval)")
    ap.add_argument("--select-seed", type=int, default=1000, help="first seed of validation images")
    ap.add_argument("--replay", action="append", default=[], metavar="WEIGHTS",
                    help="with --selection best: also score the file this weighting of the combined score (as "
                         "--score-weights) would have picked; repeatable")
    ap.add_argument("--images", type=int, default=8, help="training images per concept")
    ap.add_argument("--data-seed", type=int, default=100, help="concept images use this seed + the shape's index")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="skip training where the output file exists")
    ap.add_argument("--results", type=Path, default=None, help="append each concept's figures here (JSON lines)")
    ap.add_argument("--label", default="", help="name of this configuration in --results")
    ap.add_argument("--report-only", action="store_true",
                    help="print the table of --label's rows in --results (default: the last row's label)")
    args = ap.parse_args(ours)
    args.tuned = args.tuned.split(",")
    if args.n == 0 and args.selection != "eval":
        ap.error("--n 0 reports the validation figures, which only --selection eval measures")
    if args.replay and (args.selection != "best" or args.reuse or args.n == 0):
        ap.error("--replay replays the trainer's validations: it needs --selection best, a fresh run (no --reuse) "
                 "and --n > 0")
    for weights in args.replay:
        try:
            parse_score_weights(weights)
        except ConfigError as e:
            ap.error(f"--replay {weights}: {e}")
    if args.report_only:
        if args.results is None or not args.results.is_file():
            ap.error("--report-only reads --results FILE (JSON lines written by an earlier run)")
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        label = args.label or (rows[-1]["label"] if rows else "")
        rows = [r for r in rows if r["label"] == label]
        if not rows:
            ap.error(f"no rows labelled {label!r} in {args.results}")
        print(f"{label}\n{table(rows)}")
        return
    tp = argparse.ArgumentParser(prog="-- (sdlora train flags)")
    add_config_flags(tp)
    train_args = tp.parse_args(train_argv)
    torch.set_num_threads(args.threads)
    pipe, judge = load_pipeline(), load_judge()
    base = validation_score(pipe, judge, None, "", args.select_n, args.select_seed)["base_accuracy"] \
        if args.selection == "eval" else 1.0
    rows = []
    for concept in args.concepts.split(","):
        if concept not in judge.config.shapes or concept in shapes.BASE_SHAPES:
            sys.exit(f"{concept!r} is not a new shape the judge knows; pick from "
                     f"{', '.join(s for s in judge.config.shapes if s not in shapes.BASE_SHAPES)}")
        print(f"{concept}: training with {args.job} {' '.join(train_argv)}", flush=True)
        row = run_concept(concept, args, train_args, pipe, judge, base)
        row.update(label=args.label, job=str(args.job), train_args=train_argv, selection=args.selection, n=args.n,
                   commit=_commit(), date=time.strftime("%Y-%m-%d"))
        rows.append(row)
        if args.results:
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(table(rows[-1:]).split("\n\n")[0], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
