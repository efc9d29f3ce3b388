"""Where an entry point (a CLI command, a UI handler, a UI training job) meets an exception: one line for the user.

An `SdloraError` says what to fix. An `OSError` comes from the machine (a name too long, no permission, a full disk,
a file where a folder should be): one line naming the file. Running out of memory says what to lower. Anything else
is a bug in sdlora, not in the input: its traceback goes to a log file and the line says where, so a bug is never
hidden behind a tidy message (and never shown as a traceback either).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .errors import SdloraError

LOG_ENV = "SDLORA_LOG_DIR"
_reported: dict[str, Path] = {}  # traceback digest -> its log: a handler failing on every tick writes one file


def log_dir() -> Path:
    """Where crash logs go: $SDLORA_LOG_DIR, else $XDG_STATE_HOME/sdlora/logs (~/.local/state/sdlora/logs)."""
    if os.environ.get(LOG_ENV):
        return Path(os.environ[LOG_ENV]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "sdlora" / "logs"


def user_message(exc: BaseException) -> str | None:
    """The one line for an exception the user can act on; None for a bug."""
    if isinstance(exc, SdloraError):
        return str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        first = _first_line(exc)
        return (f"out of memory{f' ({first})' if first else ''}: lower --batch-size or --resolution, or run "
                "`sdlora fit` with the same settings for ones that fit")
    if isinstance(exc, OSError):
        return _os_message(exc)
    return None


def _os_message(exc: OSError) -> str:
    reason = exc.strerror or _first_line(exc) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if exc.errno == errno.ENAMETOOLONG and names:
        return f"file name too long ({len(Path(names[0]).name)} characters): {_short(names[0])}; use a shorter name"
    if names:
        return f"cannot use {' -> '.join(_short(n) for n in names)}: {reason}"
    return reason


def describe(exc: BaseException, verbose: bool = False) -> tuple[str, bool]:
    """(one line, is_bug): the user's message, or for a bug a pointer to the crash log just written (with
    `verbose`, the traceback also goes to stderr)."""
    message = user_message(exc)
    if message is not None:
        return message, False
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    where = write_crash_log(exc)
    said = f"{type(exc).__name__}: {_first_line(exc)}" if _first_line(exc) else type(exc).__name__
    return (f"internal error ({_short(said, 160)}): a bug in sdlora, not in your input; the traceback is in {where} "
            "- please include it when you report the bug"), True


def write_crash_log(exc: BaseException) -> Path | str:
    """Write the traceback, the command and the library versions to a new file in `log_dir()` (else the temp
    folder); returns its path (or a note, if nothing can be written anywhere)."""
    text = "".join(traceback.format_exception(exc))
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    if digest in _reported and _reported[digest].exists():
        return _reported[digest]
    body = (f"sdlora crash report, {time.strftime('%Y-%m-%d %H:%M:%S')}\ncommand: {' '.join(sys.argv)}\n"
            f"python {platform.python_version()} on {platform.platform()}\n{_versions()}\n\n{text}")
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{digest}.log"
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "sdlora-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(body)
        except OSError:
            continue
        _reported[digest] = folder / name
        return folder / name
    return "no log (no writable folder; run with -v to see it)"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for pkg in ("sdlora", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "gradio"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{pkg} {version(pkg)}")
    return ", ".join(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 1):]
