"""Which file does image validation pick on the demo, what does it cost, and which score weights pick best?

    python scripts/measure_selection.py [--output output/selection] [--max-steps N] [--skip-loss] [--n 32]

1. Trains the demo job as shipped (image validation: shapes scorer, every 250 steps, select by images) with a
   checkpoint at every validation, timing the validations against the rest of training.
2. Trains the same job selecting by the validation loss instead (`--validation-split 0.1 --select-by loss`), as
   docs/shapes-world.md's earlier measurement did (skip with --skip-loss).
3. Scores run 1's best and last files and run 2's best file with `sdlora eval --n 32`, and every checkpoint of
   run 1 with `sdlora eval` at --n-checkpoints trigger and world images (concept fidelity, prompt fidelity,
   preservation; cached in evals.json, so a rerun only adds what is missing).
4. Prints the three figures (chosen by images, last, chosen by loss), the cost, and for every weighting of the
   combined score the checkpoint it would have chosen from run 1's logged validation scores, that checkpoint's
   eval target (mean of concept fidelity, prompt fidelity and preservation, n = 32) and the rank correlation of
   score and target over the checkpoints (the last file stands for the last step).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from sdlora import train
from sdlora.config import Config, load_toml, parse_score_weights
from sdlora.paths import sample_data
from sdlora.training.periodic import selection

DEFAULT = ",".join(f"{v:g}" for v in Config().score_weights.values())  # as the weightings below are written


def timed_run(cfg) -> dict:
    """Train, timing every call of `selection.validate` (rendering and scoring included)."""
    spent = []
    validate = selection.validate

    def timing(state, step):
        t0 = time.perf_counter()
        try:
            return validate(state, step)
        finally:
            spent.append((step, time.perf_counter() - t0))

    selection.validate = timing
    try:
        t0 = time.perf_counter()
        result = train(cfg)
        total = time.perf_counter() - t0
    finally:
        selection.validate = validate
    val = sum(s for _, s in spent)
    return {"output": result.output, "best": result.best, "best_step": result.best_step, "log": result.log,
            "seconds_total": total, "seconds_validation": val, "validations": len(spent),
            "share": val / max(total - val, 1e-9), "per_validation": spent}


def demo_cfg(out: Path, max_steps: int | None):
    cfg = load_toml(sample_data() / "demo.toml")
    cfg.output.path = str(out / "demo.safetensors")
    if max_steps:
        cfg.train.max_steps = max_steps
    return cfg


def evaluate_all(files: dict[str, str], cache: Path, n: int, n_steps: int) -> dict:
    """`sdlora eval` of every file: the named ones at n images (and its 36 world images), each checkpoint ("step
    N") at n_steps images and as many world images (cheaper: they only rank the checkpoints)."""
    from sdlora.world.evaluate import evaluate

    demo = json.loads((sample_data() / "demo.json").read_text())
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, path in files.items():
        same = next((k for k, v in done.items() if not k.startswith("step ") and not name.startswith("step ")
                     and same_weights(v["file"], path)), None)
        if name in done or same:  # the best file is the last one when the last validation scored best
            done.setdefault(name, {**done[same], "file": path} if same else done[name])
            continue
        k = {"n": n_steps, "n_base": n_steps} if name.startswith("step ") else {"n": n}
        r = evaluate(path, demo["trigger"], demo["concept"], output_dir=cache.parent / "eval" / name, **k)
        done[name] = {"file": path, "concept_fidelity": r.concept_fidelity, "prompt_fidelity": r.prompt_fidelity,
                      "preservation": r.base_accuracy_with_lora, "preservation_drop": r.preservation_drop}
        cache.write_text(json.dumps(done, indent=2))
        print(f"eval {name}: {done[name]}", flush=True)
    return done


def same_weights(a: str, b: str) -> bool:
    from sdlora.loras.files import read_lora

    ta, tb = read_lora(a)[0], read_lora(b)[0]
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def target(e: dict) -> float:
    return (e["concept_fidelity"] + e["prompt_fidelity"] + e["preservation"]) / 3


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def weightings(history: list[dict], evals: dict[int, dict]) -> list[dict]:
    """For every weighting: the step it picks (replayed through the trainer's `Best`), that step's target, regret
    and the rank correlation of its score with the target over the evaluated steps."""
    steps = [r for r in history if r["step"] in evals]
    grid = [0, 0.5, 1, 2]
    out = []
    for wl, wa, wp, wc in itertools.product(grid, grid, grid, [0, 0.5, 1]):
        if not (wl or wa or wp):
            continue
        w = parse_score_weights(f"likeness={wl},adherence={wa},preservation={wp},copying={wc}")
        scores, step = selection.rescored(steps, w)
        pick = [r["step"] for r in steps].index(step)
        targets = [target(evals[r["step"]]) for r in steps]
        out.append({"weights": f"{wl:g},{wa:g},{wp:g},{wc:g}", "step": steps[pick]["step"],
                    "target": targets[pick], "regret": max(targets) - targets[pick],
                    "rho": spearman(scores, targets)})
    out.sort(key=lambda r: (r["regret"], -(r["rho"] if r["rho"] == r["rho"] else -2),
                            r["weights"] != DEFAULT))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/selection")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--n", type=int, default=32, help="Images per eval of the three files (default: 32).")
    p.add_argument("--n-checkpoints", type=int, default=8, help="Trigger and world images per eval of each "
                   "checkpoint, for the weights (default: 8).")
    p.add_argument("--skip-loss", action="store_true", help="Leave out run 2 (selection by the validation loss).")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    if "images" not in runs:
        cfg = demo_cfg(out / "images", args.max_steps)
        cfg.output.save_every = cfg.validation.every
        runs["images"] = timed_run(cfg)
        runs_file.write_text(json.dumps(runs, indent=2))
    if "loss" not in runs and not args.skip_loss:
        cfg = demo_cfg(out / "loss", args.max_steps)
        cfg.validation = type(cfg.validation)()  # by loss alone: none of the demo's image-validation settings
        cfg.validation.select_by, cfg.validation.split, cfg.validation.every = "loss", 0.1, 100
        cfg.validation.keep_best = True
        runs["loss"] = timed_run(cfg)
        runs_file.write_text(json.dumps(runs, indent=2))
    img = runs["images"]
    ckpts = sorted(Path(img["output"]).parent.glob("demo_checkpoints/step_*.safetensors"))
    files = {f"step {int(c.stem.split('_')[1])}": str(c) for c in ckpts}
    files["last"] = img["output"]
    if img["best"]:
        files["best by images"] = img["best"]
    if "loss" in runs and runs["loss"]["best"]:
        files["best by loss"] = runs["loss"]["best"]
    named = {k: v for k, v in files.items() if not k.startswith("step ")}
    evals = evaluate_all({**named, **files}, out / "evals.json", args.n, args.n_checkpoints)
    history = selection.validation_history(img["log"])
    last_step = history[-1]["step"]
    by_step = {int(k.split()[1]): v for k, v in evals.items() if k.startswith("step ")} | {last_step: evals["last"]}
    print("\nrun 1 (select by images):\n" + selection.score_curve(history, img["best_step"]))
    print("\n  step  concept  prompt  preserv  target")
    for s in sorted(by_step):
        e = by_step[s]
        print(f"{s:6d}  {e['concept_fidelity']:7.1%}  {e['prompt_fidelity']:6.1%}  {e['preservation']:7.1%}  "
              f"{target(e):6.3f}")
    print(f"\nthe three files (sdlora eval --n {args.n}):")
    for name in ("best by images", "last", "best by loss"):
        if name in evals:
            e = evals[name]
            print(f"  {name:15s} concept {e['concept_fidelity']:6.1%}  prompt {e['prompt_fidelity']:6.1%}  "
                  f"preservation {e['preservation']:6.1%}  ({Path(e['file']).name})")
    print(f"\ncost: {img['validations']} image validations took {img['seconds_validation']:.0f} s of "
          f"{img['seconds_total']:.0f} s: +{img['share']:.1%} on the rest of training")
    table = weightings(history, by_step)
    print("\nweights (likeness,adherence,preservation,copying): the step each picks, its target, regret, rho")
    default = next(r for r in table if r["weights"] == DEFAULT)
    for r in [*table[:10], default]:
        print(f"  {r['weights']:14s} step {r['step']:5d}  target {r['target']:.3f}  regret {r['regret']:.3f}  "
              f"rho {r['rho']:+.2f}")
    (out / "weights.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
