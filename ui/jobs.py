"""The training queue behind the web UI: jobs run one at a time on a single worker thread.

State lives here, not in a browser session: a job keeps running when its tab is closed, and a reloaded page
reads the same `JobManager` again. The worker calls the same `sdlora.train` as the CLI; only the
callbacks differ (they record progress into the `Job`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.callbacks import Callbacks, Commands
from sdlora.errors import SdloraError
from sdlora.failures import describe

from .files import Allowed

QUEUED, RUNNING, DONE, STOPPED, FAILED, CANCELLED = "queued", "running", "done", "stopped", "failed", "cancelled"
FINISHED = (DONE, STOPPED, FAILED, CANCELLED)


@dataclass
class Job:
    """One training run and everything the page shows about it."""

    id: int
    name: str
    cfg: object  # sdlora.config.Config
    resume: bool = False
    state: str = QUEUED
    step: int = 0
    total: int = 0
    start_step: int = 0
    started: float = 0.0
    ended: float = 0.0
    losses: list = field(default_factory=list)  # [(step, loss)]
    val_losses: list = field(default_factory=list)  # [(step, validation loss)]
    scores: list = field(default_factory=list)  # [(step, {score, likeness, adherence, preservation, copying})]
    validation_images: list = field(default_factory=list)  # [(step, path of the validation's sheet)]
    best_step: int = 0  # the step of the best validation so far (by what select_by follows)
    samples: list = field(default_factory=list)  # [(step, path)]
    messages: list = field(default_factory=list)
    error: str = ""
    output: str = ""
    version: int = 0  # bumped on every change, so a poller can skip unchanged updates
    commands: Commands = field(default_factory=Commands)
    begun: bool = False  # the model is loaded and the steps have begun (before that: loading, caching)

    @property
    def rate(self) -> float:
        """Optimizer steps per second since this run started (resumed steps excluded)."""
        done = self.step - self.start_step
        elapsed = (self.ended or time.time()) - self.started
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None before the first step."""
        return (self.total - self.step) / self.rate if self.rate and self.state == RUNNING else None

    def touch(self) -> None:
        self.version += 1


class JobCallbacks(Callbacks):
    """Records a run's progress into its Job (called on the worker thread)."""

    def __init__(self, job: Job):
        self.job = job

    def on_start(self, run):
        j = self.job
        j.total, j.start_step, j.step, j.started = run.cfg.total_steps, run.start_step, run.start_step, time.time()
        j.begun = True
        # a resumed run goes on from its checkpoint: what the stopped run showed after it is redone
        j.losses = [x for x in j.losses if x[0] <= run.start_step]
        j.val_losses = [x for x in j.val_losses if x[0] <= run.start_step]
        j.touch()

    def on_step(self, step, stats):
        self.job.step = step
        self.job.losses.append((step, float(stats["loss"])))
        self.job.touch()

    def on_validation(self, step, stats):
        j = self.job
        if "val_loss" in stats:
            j.val_losses.append((step, float(stats["val_loss"])))
        parts = {k: float(stats[k]) for k in ("score", "likeness", "adherence", "preservation", "copying")
                 if k in stats}
        if parts:
            j.scores.append((step, parts))
        j.validation_images.extend((step, p) for p in stats.get("images", []))
        j.best_step = stats.get("best_step", j.best_step)
        j.touch()

    def on_sample(self, step, paths):
        self.job.samples.extend((step, p) for p in paths)
        self.job.touch()

    def on_checkpoint(self, step, path):
        self.on_message(f"checkpoint at step {step}: {Path(path).name}")

    def on_message(self, text):
        self.job.messages.append(text)
        self.job.touch()

    def on_end(self, result):
        self.job.output = result.output
        self.job.touch()


class JobManager:
    """A FIFO of training jobs and one worker thread that runs them, one at a time.

    `train_fn(cfg, callbacks, commands, resume=...)` is `sdlora.train` unless a test passes another.
    The worker starts with the first job (nothing runs at import or construction).
    """

    def __init__(self, output_dir: str | Path, train_fn: Callable | None = None, model: str = "",
                 data_roots: list[str | Path] | None = None):
        self.output_dir = Path(output_dir)
        self.model = model  # the base model the pages pre-fill ("" = the built-in one)
        # the folders browser-given paths must stay in: the output folder and these (default: the working folder)
        self.allowed = Allowed(self.output_dir, [Path.cwd()] if data_roots is None else data_roots, model)
        self._train_fn = train_fn
        self._jobs: list[Job] = []
        self._queue: deque[Job] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False

    # -- commands from the page --
    def submit(self, cfg, name: str, resume: bool = False) -> Job:
        """Queue a training run; it starts when the jobs before it have finished."""
        with self._lock:
            job = Job(id=next(self._ids), name=name, cfg=cfg, resume=resume, total=cfg.total_steps)
            self._jobs.append(job)
            self._queue.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="sdlora-ui-worker", daemon=True)
                self._worker.start()
            self._lock.notify_all()
        return job

    def resume(self, job: Job, cfg) -> Job:
        """Queue a finished job again, resuming from its last checkpoint with `cfg` (its own config, or the page's
        when the page shows that job): the same job goes on, its curve and samples kept."""
        with self._lock:
            if job.state not in FINISHED:
                raise SdloraError(f"job #{job.id} '{job.name}' is {job.state}: stop it before resuming")
            job.cfg, job.resume, job.state, job.total = cfg, True, QUEUED, cfg.total_steps
            job.error, job.output, job.ended, job.begun, job.commands = "", "", 0.0, False, Commands()
            job.messages.append("resuming from the last checkpoint…")
            job.touch()
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def stop(self, job_id: int | None = None) -> Job | None:
        """Stop the running job after its current step (it saves a resumable checkpoint), or cancel a queued one."""
        with self._lock:
            job = self.get(job_id) if job_id is not None else self.running()
            if job is None:
                return None
            if job.state == QUEUED:
                self._queue.remove(job)
                job.state, job.ended = CANCELLED, time.time()
            elif job.state == RUNNING:
                job.commands.stop = True
                job.messages.append("stopping after this step…")
            job.touch()
            return job

    def request(self, command: str) -> Job | None:
        """Ask the running job for a sample (`sample_now`) or a resumable checkpoint (`save_now`) after its current
        step; None when nothing runs."""
        with self._lock:
            job = self.running()
            if job is None:
                return None
            setattr(job.commands, command, True)
            job.messages.append({"sample_now": "a sample after this step…",
                                 "save_now": "a checkpoint after this step…"}[command])
            job.touch()
            return job

    def close(self, timeout: float = 30.0) -> None:
        """Stop the running job, drop the queue and end the worker."""
        with self._lock:
            self._closing = True
            for job in list(self._queue):
                job.state = CANCELLED
            self._queue.clear()
            self._lock.notify_all()
        self.stop()
        if self._worker is not None:
            self._worker.join(timeout)

    # -- queries --
    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: int) -> Job | None:
        return next((j for j in self._jobs if j.id == job_id), None)

    def running(self) -> Job | None:
        return next((j for j in self._jobs if j.state == RUNNING), None)

    def queued(self) -> list[Job]:
        with self._lock:
            return list(self._queue)

    def current(self) -> Job | None:
        """The job a page shows by default: the running one, else the newest."""
        return self.running() or (self._jobs[-1] if self._jobs else None)

    def busy_names(self) -> set[str]:
        return {j.name for j in self._jobs if j.state in (QUEUED, RUNNING)}

    def wait(self, job: Job, timeout: float = 60.0) -> Job:
        """Block until `job` has finished (for tests and scripts)."""
        deadline = time.time() + timeout
        with self._lock:
            while job.state not in FINISHED and time.time() < deadline:
                self._lock.wait(0.1)
        return job

    # -- the worker --
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                job.state, job.started = RUNNING, time.time()
                job.touch()
            self._run(job)
            with self._lock:
                self._lock.notify_all()

    def _run(self, job: Job) -> None:
        train = self._train_fn
        if train is None:
            from sdlora import train
        try:
            result = train(job.cfg, JobCallbacks(job), job.commands, resume=job.resume)
            job.output = str(result.output)
            early = getattr(result, "early_stopped", False)  # finished by its own rule: the output is the best file
            job.state = STOPPED if result.stopped and not early else DONE
        except Exception as e:  # noqa: BLE001 - one line in the page; a bug's traceback goes to the crash log named
            job.error, job.state = describe(e)[0], FAILED
        job.ended = time.time()
        job.touch()
