"""`train(config, callbacks, commands)`: the training loop.

Progress, samples and checkpoints reach front ends through callbacks; stop / sample now / save now are commands the
loop polls after every step. The CLI and the UI differ only in what they register.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..callbacks import Callbacks, Commands
from ..config import Config, validate
from ..errors import ConfigError, TrainingError, WriteError
from ..hardware import follow_free_cores, pick_threads
from ..io import check_writable, remove_stale_temps
from .memory.fit_plan import warn_if_too_big
from .periodic import checkpoint as ckpt
from .periodic import runlog, selection
from .periodic.output import best_path, write_best, write_checkpoint, write_output, write_samples
from .run.adapters import started_at_zero, zero_update_modules
from .run.optimizers import check_packages
from .run.setup import check_bitsandbytes, make_accelerator, setup
from .run.state import TrainState
from .steps.step import seeded

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: str
    steps: int
    final_loss: float
    seconds: float
    stopped: bool = False
    samples: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    log: str = ""
    trigger: str = ""
    is_main: bool = True  # False on the other processes of a multi-process run
    early_stopped: bool = False  # stopped by --early-stop-patience (then `message` says why)
    message: str = ""
    best: str = ""  # NAME_best.safetensors, when keep_best or early stopping wrote one
    best_step: int = 0
    best_val_loss: float = float("nan")  # the best's validation loss, selecting by loss
    best_score: float = float("nan")     # the best's combined image score, selecting by images


def train(cfg: Config, callbacks: Callbacks | None = None, commands: Commands | None = None,
          resume: bool = False) -> TrainResult:
    """Train one LoRA as configured; returns where it went and how it went. Raises SdloraError on bad input."""
    validate(cfg)
    check_bitsandbytes(cfg)
    check_packages(cfg)
    prepare_output(cfg)
    callbacks, commands = callbacks or Callbacks(), commands or Commands()
    threads, why = pick_threads(cfg.speed.threads)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        callbacks.on_message(f"{threads} CPU thread(s) ({why})")
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    follow_load = follow_free_cores(cfg.speed.threads, cfg.speed.thread_check, acc.num_processes, callbacks.on_message)
    if main:
        warn_if_too_big(cfg, acc.device, callbacks.on_message)
    state = setup(cfg, acc, callbacks if main else Callbacks())
    runlog.start_trackers(acc, cfg)
    out = Path(cfg.output.path)
    state.start_step = step = resume_from_checkpoint(state, out, callbacks) if resume else 0
    result = TrainResult(output=str(out), steps=step, final_loss=float("nan"), seconds=0.0,
                         log=str(runlog.log_path(out)), is_main=main)
    _note_best(state, result)
    if main:
        runlog.trim(Path(result.log), step)
        callbacks.on_start(state)
    run_log = runlog.RunLog(acc, Path(result.log), main)
    if main and step == 0 and cfg.sample.prompts:
        result.samples += _samples(state, 0, callbacks, run_log)
    t0 = time.time()
    every = cfg.speed.log_every
    steps = StepLog(state, run_log, callbacks, result)
    try:
        while step < cfg.total_steps and not result.stopped:
            loss, stats = optimizer_step(state, step, read=every == 1)
            step += 1
            stats.update(loss=loss, lr=state.optim.lr_scheduler.get_last_lr()[0], step=step)
            steps.add(stats)
            if step % every == 0 or step == cfg.total_steps:
                steps.flush()
            _periodic(state, step, result, commands, callbacks, run_log, steps.flush)
            follow_load()
        steps.flush()
        result.steps, result.seconds = step, time.time() - t0
        _check_in_sync(state)
        if result.stopped:  # the checkpoint holds everything; the final file is written when the run completes
            result.output = result.best if result.early_stopped and result.best else \
                str(Path(result.checkpoints[-1]).with_suffix(".safetensors"))
        else:
            _finish(state, step, out, result, callbacks, run_log)
    finally:
        state.batches.close()  # the prefetch thread ends with the run, however it ends
        run_log.close()
    if main:
        from ..loras.metadata import trigger_words

        result.trigger = state.concept.token or trigger_words(cfg, state.captions_by_folder)
        callbacks.on_end(result)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _finish(state: TrainState, step: int, out: Path, result: TrainResult, callbacks, run_log) -> None:
    """The final LoRA file (the EMA's weights with EMA on; `save_ema both` adds the raw ones) and samples."""
    raw = state.lora_states()
    with state.optim.evaluation():
        states = state.lora_states()
    _check_update(state, states, step)
    if not state.acc.is_main_process:
        return
    if state.cfg.sample.prompts:
        result.samples += _samples(state, step, callbacks, run_log)
    _write_final(state, states, step, out, callbacks)
    if state.optim.ema is not None and state.cfg.optim.save_ema == "both":
        write_output(state, raw, step, out.with_name(out.stem + "_raw.safetensors"))


def _samples(state: TrainState, step: int, callbacks: Callbacks, run_log) -> list[str]:
    paths = write_samples(state, step, callbacks)
    run_log.images(step, paths)
    return paths


def optimizer_step(state: TrainState, step: int, read: bool = True) -> tuple[float, dict]:
    """Forward/backward over grad_accum micro-batches, clip, step what this phase trains. With `read`, the loss and
    stats come back as numbers and a non-finite loss raises before it is applied; without, they stay tensors on the
    device (no wait for the GPU inside the step) and `StepLog` checks them when it reads them."""
    cfg, acc = state.cfg, state.acc
    torch.manual_seed(cfg.train.seed * 1_000_003 + step)  # LoRA dropout: per-step too
    state.models.denoiser.module.train()
    phase = state.enter_phase(step)
    total, stats = torch.zeros((), dtype=torch.float64), {}
    for micro in range(cfg.train.grad_accum):
        gen, rng = seeded(cfg.train.seed, step, state.rank, micro)
        following = _following(state, step, micro) if state.batches.prefetcher is not None else None
        batch = state.batches.fetch(_index(state, step, micro), rng, following)
        sync = micro == cfg.train.grad_accum - 1
        with acc.no_sync(state.models.denoiser.wrapped) if not sync and state.world > 1 else contextlib.nullcontext(), \
                acc.autocast():
            loss, stats = state.objective(batch, state.models, cfg, gen)
        if read and not torch.isfinite(loss):
            raise _non_finite(state, loss.item(), step + 1)
        acc.backward(loss / cfg.train.grad_accum)
        total = total + loss.detach().double() / cfg.train.grad_accum  # as a float64 sum of .item()s, unread
    for p in phase.dropped:  # what trains in another phase (the LoRA during textual inversion)
        p.grad = None
    _clip(state, phase.params)
    phase.step()
    if state.world > 1:  # log the loss of the whole batch, not of this rank's share
        stats["loss"] = total.float().to(acc.device)
        stats = {k: acc.reduce(v.detach().reshape(1).float(), "mean")[0] for k, v in stats.items()}
        total = stats.pop("loss")
    if not read:
        return total, {k: v.detach() for k, v in stats.items()}
    return total.item(), {k: v.item() for k, v in stats.items()}


def _index(state: TrainState, step: int, micro: int) -> int:
    """The run's micro-batch number of (step, micro-batch) on this process."""
    return (step * state.cfg.train.grad_accum + micro) * state.world + state.rank


def _following(state: TrainState, step: int, micro: int) -> tuple[int, object] | None:
    """(index, rng) of the micro-batch after (step, micro) on this process, for the prefetcher to prepare while
    this one trains (its rng is only ever drawn from by `Batches.prepare`); None after the last step."""
    step, micro = (step, micro + 1) if micro + 1 < state.cfg.train.grad_accum else (step + 1, 0)
    if step >= state.cfg.total_steps:
        return None
    return _index(state, step, micro), seeded(state.cfg.train.seed, step, state.rank, micro)[1]


def _non_finite(state: TrainState, value: float, step: int) -> TrainingError:
    cfg = state.cfg
    last = ckpt.latest_checkpoint(cfg.output.path)
    return TrainingError(
        f"loss became {value} at step {step}: lower the learning rate (now {cfg.optim.lr})"
        + (" or use --mixed-precision bf16/no" if state.acc.mixed_precision == "fp16" else "")
        + (f"; last good checkpoint: {last}" if last else ""))


class StepLog:
    """Each step's loss and stats into the run's log and `on_step`, read from the device in one transfer per flush
    (every speed.log_every steps, at the end, and before a validation or a checkpoint): a non-finite loss raises
    then, before anything is written from the weights it touched."""

    def __init__(self, state: TrainState, run_log, callbacks: Callbacks, result: TrainResult):
        self.state, self.run_log, self.callbacks, self.result, self.pending = state, run_log, callbacks, result, []

    def add(self, stats: dict) -> None:
        self.pending.append(stats)

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        tensors = [v for s in pending for v in s.values() if isinstance(v, torch.Tensor)]
        device = tensors[0].device if tensors else None
        values = iter(torch.stack([t.double().reshape(()).to(device) for t in tensors]).cpu().tolist()
                      if tensors else ())
        rows = [{k: next(values) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in pending]
        bad = next((r for r in rows if not math.isfinite(r["loss"])), None)
        if bad is not None:
            raise _non_finite(self.state, bad["loss"], bad["step"])
        for row in rows:
            self.result.final_loss = row["loss"]
            self.run_log.write(row)
            if self.state.acc.is_main_process:
                self.callbacks.on_step(row["step"], row)


def _clip(state: TrainState, params) -> None:
    if state.cfg.optim.max_grad_norm:
        state.acc.clip_grad_norm_(list(params), state.cfg.optim.max_grad_norm)


def prepare_output(cfg: Config) -> None:
    """Before any model loads: the output can be written, is not the base model, and what killed runs left behind
    (hidden temp files) is cleared."""
    out = Path(cfg.output.path)
    if cfg.model.path and Path(cfg.model.path).is_file() and out.resolve() == Path(cfg.model.path).resolve():
        raise ConfigError(f"output {out} is the base model; choose another --output")
    check_writable(out)
    remove_stale_temps(out.parent, prefix=f".{out.stem}")
    for folder in (ckpt.checkpoint_dir(out), out.with_name(out.stem + "_samples")):
        remove_stale_temps(folder)


def _write_final(state: TrainState, states: dict, step: int, out: Path, callbacks: Callbacks) -> None:
    """The final LoRA file; if it cannot be written (a full disk), the run is kept in a checkpoint and the error
    says where, so `--resume` writes the file once there is room."""
    try:
        write_output(state, states, step, out)
    except WriteError as e:
        try:
            kept = f"the run is kept in {write_checkpoint(state, step, callbacks)}"
        except WriteError:
            last = ckpt.latest_checkpoint(out)
            kept = f"the last checkpoint is {last}" if last else "no checkpoint could be written either"
        raise TrainingError(f"{e}; {kept}; make room, then run the same command with --resume") from None


def resume_from_checkpoint(state: TrainState, out: Path, callbacks: Callbacks) -> int:
    """Load the newest readable checkpoint of this output (LoRA, embeddings, optimizers, schedule); its step, or 0."""
    found = ckpt.newest_readable(out, state.cfg.to_dict(), callbacks.on_message)
    if found is None:
        callbacks.on_message(f"no checkpoint in {ckpt.checkpoint_dir(out)}; starting from step 0")
        return 0
    path, saved = found
    state.load_lora_states(saved["lora"])
    state.concept.load_state_dict(saved)
    state.optim.main.load_state_dict(saved["optimizer"])
    state.optim.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if saved.get("scaler") and state.acc.scaler is not None:
        state.acc.scaler.load_state_dict(saved["scaler"])
    if state.optim.ema is not None:
        if "ema" not in saved:
            raise TrainingError(f"cannot resume from {path.name} with EMA: it was trained without; set "
                                "optim.ema_decay 0 or train into a new output")
        state.optim.ema.load_state_dict(saved["ema"])
        state.optim.ema.to(state.device)
    if state.validation is not None and "validation" in saved:
        state.validation.best.load_state_dict(saved["validation"])
    if state.image_validation is not None and "image_validation" in saved:
        state.image_validation.load_state_dict(saved["image_validation"])
    callbacks.on_message(f"resumed from {path} at step {saved['step']}")
    return saved["step"]


def _periodic(state: TrainState, step: int, result: TrainResult, commands: Commands, callbacks: Callbacks,
              run_log, flush=lambda: None) -> None:
    """Samples, validation and checkpoints when due or asked for; a stop request (or early stopping) ends the run
    after a checkpoint (`flush` reads and checks the unread losses before a validation or a checkpoint)."""
    cfg = state.cfg
    done = step == cfg.total_steps
    stop, save_now, sample_now = _synced(state, commands.stop, commands.save_now, commands.sample_now)
    if cfg.sample.prompts and state.acc.is_main_process and (
            (cfg.sample.every and step % cfg.sample.every == 0 and not done) or sample_now):
        result.samples += _samples(state, step, callbacks, run_log)
    every = cfg.validation.every
    if state.validates and ((every and step % every == 0) or done):
        flush()
        stop = _validate(state, step, result, callbacks, run_log, done) or stop
    if (cfg.output.save_every and step % cfg.output.save_every == 0 and not done) or save_now or stop:
        flush()
        result.checkpoints.append(write_checkpoint(state, step, callbacks))
    commands.sample_now = commands.save_now = False
    result.stopped = stop


def _validate(state: TrainState, step: int, result: TrainResult, callbacks, run_log, done: bool) -> bool:
    """The validation loss and/or image scores (one log line), the best file when what `select_by` follows improved;
    True when early stopping says stop (every process decides alike: the loss is averaged over them, the scores
    shared from the main one)."""
    cfg = state.cfg
    keep = cfg.validation.keep_best or cfg.validation.early_stop_patience > 0
    with state.optim.evaluation():
        improved, record, sheet = selection.validate(state, step)
        if improved and keep and state.acc.is_main_process:
            write_best(state, step, selection.best_metadata(state, record))
    _note_best(state, result)
    run_log.write(record)
    if sheet:
        run_log.images(step, [sheet], key="validation")
    if state.acc.is_main_process:
        callbacks.on_validation(step, selection.validation_stats(state, record, sheet))
    best, patience = selection.selected(state), cfg.validation.early_stop_patience
    if not patience or best is None or best.waited < patience or done:
        return False
    result.early_stopped = True
    what = "score" if cfg.select_by == "images" else "loss"
    result.message = (f"early stop at step {step}: the validation {what} has not improved in {patience} "
                      f"validations (best {selection.describe(state)} at step {best.step}: {result.best}); "
                      "--resume with a larger --early-stop-patience goes on")
    if state.acc.is_main_process:
        callbacks.on_message(result.message)
    return True


def _note_best(state: TrainState, result: TrainResult) -> None:
    """The best validation so far (by what `select_by` follows) into the result, and the best file's path once one
    is written."""
    best = selection.selected(state)
    if best is None or not best.step:
        return
    result.best_step = best.step
    if best.higher:
        result.best_score = best.value
    else:
        result.best_val_loss = best.value
    if state.cfg.validation.keep_best or state.cfg.validation.early_stop_patience:
        result.best = str(best_path(state.cfg.output.path))


def _synced(state: TrainState, *flags: bool) -> list[bool]:
    """Command flags as the main process sees them, on every process (so all stop or save together)."""
    if state.world == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=state.device)
    return [bool(v) for v in state.acc.reduce(t, "max").tolist()]


def _check_in_sync(state: TrainState) -> None:
    """Under several processes, every rank must hold the same LoRA weights (DDP kept them in sync)."""
    if state.world == 1:
        return
    params = state.optim.lora_params + state.concept.params
    sums = torch.stack([p.detach().double().sum() for p in params]).to(state.device)
    gathered = state.acc.gather(sums[None]).cpu()
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=0, atol=1e-9):
        raise TrainingError("LoRA weights differ between processes; gradients were not synchronised")


def _check_update(state: TrainState, states: dict, step: int) -> None:
    """A LoRA (or embedding) that never moved from its start would change nothing: an error, not a file."""
    state.concept.check_trained(step)
    if not states:
        return
    zero = [m for s in states.values() for m in zero_update_modules(s)]
    total = sum(len(started_at_zero(s)) for s in states.values())
    if zero and len(zero) == total:
        raise TrainingError(f"the LoRA is still zero after {step} steps, so it would change nothing; "
                            "raise the learning rate or train more steps")
    if zero:
        log.warning("%d of %d LoRA layers never changed (e.g. %s)", len(zero), total, zero[0])
