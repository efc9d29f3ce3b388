"""What the machine offers: whether the CPU computes bf16 natively, and how many cores are free to train on."""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """AVX512-BF16 or AMX: bf16 matrix work runs natively (about 1.6x fp32's speed for a UNet step measured on this
    project's Zen 4 machines); without them bf16 is emulated and slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """cpu index -> (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(x) for x in values]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def free_cores(sample: float = 0.25) -> int:
    """How many of this process's cores are not busy with other work right now (at least 1): OpenMP threads on a busy
    core wait on it, which made a small model's step 10-30x slower on a 2-core machine with one core taken."""
    cpus = usable_cpus()
    try:
        before = _cpu_times()
        time.sleep(sample)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return len(cpus)
    free = 0
    for c in cpus:
        if c in before and c in after:
            busy, total = (after[c][0] - before[c][0]), (after[c][1] - before[c][1])
            free += total == 0 or busy / total < 0.5
    return max(1, free)


def pick_threads(requested: int) -> tuple[int, str]:
    """(threads to use, why): `requested` when > 0; else OMP_NUM_THREADS when the user set it; else the free
    cores."""
    if requested > 0:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cpus, free = len(usable_cpus()), free_cores()
    return free, f"{free} of {cpus} cores free"


class FreeCores:
    """The cores other programs leave free, measured over the time between two calls while this process works:
    the busy time of this process's cores (/proc/stat) minus this process's own CPU time."""

    def __init__(self):
        self.cpus = usable_cpus()
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._mark()

    def _mark(self) -> None:
        self.at, self.own = time.monotonic(), _own_cpu_seconds()
        try:
            self.times = _cpu_times()
        except (OSError, ValueError, IndexError):
            self.times = {}

    def since_last(self) -> int | None:
        """Free cores since the last call (at least 1; None where /proc/stat cannot tell)."""
        before, own = self.times, self.own
        self._mark()
        cpus = [c for c in self.cpus if c in before and c in self.times]
        total = sum(self.times[c][1] - before[c][1] for c in cpus) / self.hz
        if not cpus or total <= 0:
            return None
        busy = sum(self.times[c][0] - before[c][0] for c in cpus) / self.hz
        others = max(0.0, busy - (self.own - own)) / (total / len(cpus))  # cores' worth of other programs' work
        return max(1, min(len(self.cpus), round(len(self.cpus) - others)))


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadFollower:
    """Called after every training step: every `every` seconds, set torch's CPU threads to the free cores and say
    so when the count changes."""

    def __init__(self, every: float, say):
        self.every, self.say, self.cores = every, say, FreeCores()

    def __call__(self) -> None:
        if time.monotonic() - self.cores.at < self.every:
            return
        import torch

        free = self.cores.since_last()
        if free is not None and free != torch.get_num_threads():
            torch.set_num_threads(free)
            self.say(f"{free} CPU thread(s) from now on ({free} of {len(self.cores.cpus)} cores free)")


def follow_free_cores(requested: int, every: int, processes: int, say):
    """A ThreadFollower when the thread count is automatic (no --threads, no OMP_NUM_THREADS), `every` > 0 and this
    is the only training process; else a no-op."""
    if requested > 0 or os.environ.get("OMP_NUM_THREADS", "").isdigit() or every <= 0 or processes > 1:
        return lambda: None
    return ThreadFollower(every, say)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps freed blocks under
    its mmap threshold (up to 32 MiB each) in the process: after a full-precision base is quantized on the CPU, that
    kept several GiB of discarded fp32 weights resident (SDXL)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
