"""`sdlora eval` (concept fidelity, prompt fidelity and preservation on the shapes world) and `sdlora demo`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def register(sub) -> None:
    e = sub.add_parser("eval", help="Score a LoRA of a shapes-world concept with the shipped judge.")
    e.add_argument("lora", metavar="LORA", help="LoRA file (.safetensors).")
    e.add_argument("--trigger", required=True, help="Trigger word(s) of the concept, e.g. 'sks' or '<s1>'.")
    e.add_argument("--concept", required=True, help="The judge's class the trigger should produce (e.g. star).")
    e.add_argument("--model", default=None, help="Base model (default: the built-in shapes-world model).")
    e.add_argument("--n", type=int, default=16, help="Images per measurement (default: 16).")
    e.add_argument("--output", default="eval", help="Folder for report.json and contact_sheet.png.")
    e.add_argument("--seed", type=int, default=0, help="Seed of the first image (default: 0).")
    e.add_argument("--steps", type=int, default=25, help="Denoising steps (default: 25).")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="Train the demo LoRA on the built-in shapes model (the file kept is chosen by "
                       "its images), then evaluate it.")
    d.add_argument("--output", default="output/demo", help="Folder for the LoRA, samples and eval (default: "
                                                           "output/demo).")
    d.add_argument("--max-steps", type=int, default=None, help="Override the demo's training steps.")
    d.add_argument("--n", type=int, default=32, help="Images per eval measurement (default: 32).")
    d.set_defaults(func=cmd_demo)


def run_eval(lora, trigger, concept, model=None, n=16, output="eval", seed=0, steps=25):
    from ..world.evaluate import evaluate

    report = evaluate(lora, trigger, concept, model=model, n=n, output_dir=output, seed=seed, steps=steps)
    print(f"concept fidelity   {report.concept_fidelity:6.1%}  (trigger images the judge calls '{concept}'; "
          f"{report.concept_fidelity_without_lora:.1%} without the LoRA)")
    print(f"prompt fidelity    {report.prompt_fidelity:6.1%}  (also the prompted colour)")
    print(f"preservation       {report.base_accuracy_with_lora:6.1%}  on the base world with the LoRA, "
          f"{report.base_accuracy_without_lora:.1%} without ({-report.preservation_drop:+.1%} points)")
    print(f"report: {Path(output) / 'report.json'}\ncontact sheet: {Path(output) / 'contact_sheet.png'}")
    return report


def cmd_eval(args) -> int:
    run_eval(args.lora, args.trigger, args.concept, args.model, args.n, args.output, args.seed, args.steps)
    return 0


def cmd_demo(args) -> int:
    from ..config import load_toml
    from ..paths import sample_data
    from ..training.loop import train
    from ..training.periodic.selection import score_curve, validation_history
    from ..world.evaluate import check_eval_settings
    from .common import ProgressBar

    demo = json.loads((sample_data() / "demo.json").read_text())
    check_eval_settings(demo["trigger"], args.n, 25)  # before the minutes of training, not after
    job = sample_data() / "demo.toml"
    cfg = load_toml(job)
    out = Path(args.output)
    cfg.output.path = str(out / "demo.safetensors")
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    print(f"training the demo LoRA: {cfg.data[0].path} -> {cfg.output.path}", file=sys.stderr)
    t0 = time.time()
    result = train(cfg, ProgressBar("demo"))
    print(f"trained {result.steps} steps in {time.time() - t0:.0f}s: {result.output}")
    print(f"samples during training: {Path(result.output).with_name('demo_samples')}")
    chosen = result.best or result.output
    history = validation_history(result.log)
    if history:
        print(f"validation by images ({cfg.validation.scorer} scorer; sheets in "
              f"{out / 'demo_validation'}):\n{score_curve(history, result.best_step)}")
        print(f"chosen by images: {chosen} (step {result.best_step}, score {result.best_score:.4f}); "
              f"the last file: {out / 'demo.safetensors'}")
    run_eval(chosen, demo["trigger"], demo["concept"], n=args.n, output=str(out / "eval"))
    return 0
