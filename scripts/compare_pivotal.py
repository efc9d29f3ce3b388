"""Plain LoRA vs pivotal tuning on the shapes-world demo concept, at the same number of steps.

    python scripts/compare_pivotal.py [--steps N] [--ti-steps N] [--output output/compare]

Both runs start from sample_data/demo.toml. The pivotal run learns a new token <s1> (initialised from the word
"shape") for --ti-steps steps, then trains the LoRA with it, so its total is --steps as well. Each LoRA is scored
by `sdlora eval` (concept fidelity, prompt fidelity, preservation); the table goes to stdout and JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from sdlora import train
from sdlora.cli.world import run_eval
from sdlora.config import load_toml
from sdlora.paths import sample_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="Total steps of each run (default: the demo's).")
    p.add_argument("--ti-steps", type=int, default=0, help="Textual-inversion steps of the pivotal run "
                                                          "(default: a quarter of --steps).")
    p.add_argument("--n", type=int, default=32, help="Images per eval measurement.")
    p.add_argument("--output", default="output/compare")
    args = p.parse_args()

    demo = json.loads((sample_data() / "demo.json").read_text())
    plain = load_toml(sample_data() / "demo.toml")
    steps = args.steps or plain.train.max_steps
    ti = args.ti_steps or steps // 4
    plain.train.max_steps = steps
    pivotal = copy.deepcopy(plain)
    pivotal.pivotal.token, pivotal.pivotal.trigger, pivotal.pivotal.init_word = "<s1>", demo["trigger"], "shape"
    pivotal.pivotal.ti_steps, pivotal.pivotal.ti_lr = ti, 5e-3
    pivotal.train.max_steps = steps - ti
    out = Path(args.output)
    rows = {}
    for name, cfg, trigger in (("plain LoRA", plain, demo["trigger"]), ("pivotal", pivotal, "<s1>")):
        cfg.output.path = str(out / name.replace(" ", "_") / "lora.safetensors")
        t0 = time.time()
        train(cfg)
        seconds = time.time() - t0
        report = run_eval(cfg.output.path, trigger, demo["concept"], n=args.n,
                          output=str(Path(cfg.output.path).parent / "eval"))
        rows[name] = {"steps": steps, "train_seconds": round(seconds, 1),
                      "concept_fidelity": report.concept_fidelity, "prompt_fidelity": report.prompt_fidelity,
                      "preservation_with_lora": report.base_accuracy_with_lora,
                      "preservation_without_lora": report.base_accuracy_without_lora}
    print(f"\n{'run':<12}{'steps':>6}{'train s':>9}{'concept':>9}{'prompt':>8}{'preserv.':>10}{'base':>7}")
    for name, r in rows.items():
        print(f"{name:<12}{r['steps']:>6}{r['train_seconds']:>9.0f}{r['concept_fidelity']:>9.1%}"
              f"{r['prompt_fidelity']:>8.1%}{r['preservation_with_lora']:>10.1%}{r['preservation_without_lora']:>7.1%}")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
