"""Atomic file writes: a temp file in the same folder, then a rename, so a crash never leaves half a file.

Files get the permissions the user's umask gives new files (tempfile would make them private), a failed write is a
one-line `WriteError`, and `remove_stale_temps` clears the temp files a killed process left behind."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import SdloraError, WriteError

TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_path names its temp files


def umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(e: BaseException) -> str:
    """One line saying why a write failed."""
    return getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success it replaces `path` in one rename. Any failure to write raises
    WriteError naming the file, and the temp file is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise WriteError(f"cannot write {path}: a folder of that name exists")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {_in_the_way(path.parent) or _reason(e)}") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise WriteError(f"cannot write {path}: {_reason(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_private_dir_public(folder: str | Path) -> None:
    """Give a folder made by tempfile.mkdtemp (mode 0700) the permissions the umask gives new folders."""
    os.chmod(folder, 0o777 & ~umask())


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Write a safetensors file atomically (contiguous CPU tensors, string metadata)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def torch_save(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def remove_stale_temps(folder: str | Path, prefix: str = ".") -> list[Path]:
    """Delete the temp files an interrupted write left in `folder` (those whose name starts with `prefix`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(prefix) and TEMP_NAME.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable(path: str | Path) -> Path:
    """Make sure a file can be written at `path` before hours of work go into it: its folder exists (or can be made)
    and takes new files, and `path` is not a folder. Raises WriteError saying what is in the way."""
    path = Path(path)
    try:
        if path.is_dir():
            raise WriteError(f"cannot write {path}: a folder of that name exists; choose another output name")
        if _in_the_way(path.parent):
            raise WriteError(f"cannot write {path}: {_in_the_way(path.parent)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {_reason(e)}") from None
    return path


def check_folder(folder: str | Path, flag: str = "--output") -> Path:
    """Make sure files can be written into `folder` (made when missing) before any work goes into them, without
    making it yet: a refused input must leave nothing behind. Raises WriteError saying what is in the way."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise WriteError(f"{flag} {folder} is a file, not a folder: give a folder to write into (it is made if "
                             "missing)")
        if _in_the_way(folder):
            raise WriteError(f"{flag} {folder} cannot be made: {_in_the_way(folder)}")
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        fd, probe = tempfile.mkstemp(prefix=".sdlora-probe.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WriteError(f"{flag} {folder}: cannot write there: {_reason(e)}") from None
    return folder


def _in_the_way(folder: Path) -> str:
    """'X is a file, not a folder' when a file stands where `folder` or one of its parents should be; else ''."""
    for p in (folder, *folder.parents):
        if p.exists():
            return "" if p.is_dir() else f"{p} is a file, not a folder"
    return ""


def check_output(path: str | Path, inputs: list[str | Path] = (), overwrite: bool = True) -> Path:
    """Refuse to write over an input file (or an existing file when overwrite is False)."""
    path = Path(path)
    for src in inputs:
        if Path(src).exists() and path.exists() and path.resolve() == Path(src).resolve():
            raise SdloraError(f"output {path} is also an input; choose another --output")
    if path.exists() and not overwrite:
        raise SdloraError(f"{path} exists; pass --overwrite to replace it")
    return path
