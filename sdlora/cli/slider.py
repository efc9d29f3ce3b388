"""`sdlora slider`: a concept slider or an eraser trained from prompts alone (a job file's [slider] table)."""

from __future__ import annotations

from ..errors import SdloraError


def register(sub) -> None:
    from .train import add_config_flags

    s = sub.add_parser("slider", help="Train a concept slider or eraser from prompts alone ([slider] in the job file).",
                       description="Train a LoRA from prompts alone, no images: a concept slider (action enhance, "
                       "used at strengths -1 to +1) or an eraser (action erase). Each step the frozen base model "
                       "partly denoises fresh noise toward the target prompt and predicts the positive and negative "
                       "prompts there; the LoRA learns to move the target's prediction along that direction (LECO, "
                       "Concept Sliders, ai-toolkit). Default model: the built-in shapes world. Job file: [slider] "
                       "target, positive, negative, guidance, action, anchors, with the usual [lora], [optim], "
                       "[train], [output]; any flag overrides it.")
    s.add_argument("configs", nargs="*", metavar="CONFIG.toml", help="Job files with a [slider] table, one after "
                   "another.")
    s.add_argument("--resume", action="store_true", help="Continue from the last checkpoint of each job's output.")
    s.add_argument("--print-config", action="store_true", help="Print each job's merged config as TOML and exit.")
    add_config_flags(s)
    s.set_defaults(func=cmd_slider)


def cmd_slider(args) -> int:
    from .train import cmd_train, job_configs

    for label, cfg in job_configs(args):
        if not cfg.is_slider:
            raise SdloraError(f"{label}: no slider target; give [slider] target = \"...\" (or --slider-target); "
                              "a LoRA from images trains with sdlora train")
    return cmd_train(args)
