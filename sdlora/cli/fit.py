"""`sdlora fit`: will a job fit in memory, and if not, the cheapest settings that do."""

from __future__ import annotations


def register(sub) -> None:
    from .train import add_config_flags

    f = sub.add_parser("fit", help="Estimate a job's peak memory; propose the cheapest settings that fit.",
                       description="Estimate the peak memory of training a job (weights, LoRA state, cached latents, "
                       "the step's activations measured from the model's architecture, overhead) and, when it does "
                       "not fit, the cheapest settings that do: caching, SDPA, 8-bit AdamW, gradient checkpointing, "
                       "a smaller batch with gradient accumulation, an NF4 base, SD3 without T5 (--no-t5), a lower "
                       "resolution. SD3's T5 counts before the steps (it encodes every caption, then is released), "
                       "or in the step's peak when shuffled or dropped tags keep it.")
    f.add_argument("configs", nargs="*", metavar="CONFIG.toml", help="Job files (flags override them).")
    f.add_argument("--vram", metavar="SIZE", help="Memory of the GPU to plan for (e.g. 12GB, 8192MB; GPU makers' "
                   "GB are GiB); implies --device cuda. Default: this machine's free GPU or CPU memory.")
    f.add_argument("--device", choices=("cuda", "cpu"), help="Device to plan for (default: CUDA when a GPU is here, "
                   "else the CPU).")
    add_config_flags(f)
    f.set_defaults(func=cmd_fit)


def cmd_fit(args) -> int:
    from ..training.memory.fit_plan import check_fit, parse_size
    from .train import job_configs

    vram = parse_size(args.vram) if args.vram else None
    worst = 0
    for label, cfg in job_configs(args):
        fit = check_fit(cfg, args.device, vram)
        print(report(label, cfg, fit.model, fit.estimate))
        budget, est = fit.budget, fit.estimate
        if fit.fits:
            print(f"fits: {fit.where} has {budget / 2**30:.2f} GiB ({(budget - est.total) / 2**30:.2f} to spare)\n")
            continue
        worst = 1
        print(f"does not fit: {fit.where} has {budget / 2**30:.2f} GiB")
        if fit.plan is None:
            print("nothing sdlora can change makes it fit (an NF4 base, batch 1, checkpointing, no T5 and a "
                  "lower resolution included)\n")
        else:
            print(f"cheapest settings that fit: {' '.join(fit.flags)} "
                  f"(about {fit.plan_estimate.total / 2**30:.2f} GiB)\n")
    return worst


def report(label: str, cfg, model, est) -> str:
    """The estimate, part by part, in GiB."""
    g = 2**30
    weights = "  ".join(f"{k} {v / g:.2f}" for k, v in est.weights.items())
    what = "CUDA context and allocator slack" if est.device == "cuda" else "the process (Python and libraries)"
    rows = [
        (f"weights ({weights}{', NF4' if cfg.model.quantize == 'nf4' else ''})", sum(est.weights.values())),
        (f"LoRA: {est.lora_params:,} parameters with gradients and {cfg.optim.optimizer} state", est.trainable),
        ("cached latents and text embeddings", est.cache),
        (f"activations at their peak ({est.saved / g:.2f} saved for backward)", est.activations),
        (what, est.overhead),
        *([("peak before the steps (loading the model, caching its text)", est.load)] if est.load else []),
        ("total", est.total),
    ]
    head = (f"{label}: {model.family.name}, {est.resolution} px, batch {cfg.train.batch_size}, {est.precision} on "
            f"{est.device}{', gradient checkpointing' if cfg.train.gradient_checkpointing else ''}")
    return "\n".join([head] + [f"  {name:<78}{v / g:>7.2f} GiB" for name, v in rows] + [f"  note: {n}" for n in
                                                                                        est.notes])
