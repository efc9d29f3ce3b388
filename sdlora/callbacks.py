"""How front ends watch and steer a training run: callbacks it calls, commands it polls."""

from __future__ import annotations

from dataclasses import dataclass


class Callbacks:
    """Override what you need; every hook is called on the main process only."""

    def on_start(self, run) -> None: ...
    def on_step(self, step: int, stats: dict) -> None: ...
    def on_sample(self, step: int, paths: list[str]) -> None: ...
    def on_checkpoint(self, step: int, path: str) -> None: ...
    def on_validation(self, step: int, stats: dict) -> None: ...  # val_loss, best_val_loss, best_step
    def on_message(self, text: str) -> None: ...
    def on_end(self, result) -> None: ...


@dataclass
class Commands:
    """Flags the loop polls after every step (set them from another thread or a signal handler)."""

    stop: bool = False
    sample_now: bool = False
    save_now: bool = False
