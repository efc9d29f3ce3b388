"""Pickled checkpoints (`.ckpt`, `.pt`): their tensors, read without running any code from the file.

A pickle can name any function to call while it loads, so `--allow-pickle` never means a full unpickle. It reads with
torch's weights-only unpickler (tensors, numbers, strings, containers), which also allows what legitimate Stable
Diffusion 1.x checkpoints hold besides tensors: PyTorch Lightning's ModelCheckpoint callback record (an inert
placeholder here; Lightning need not be installed) and NumPy scalars. ComfyUI and AUTOMATIC1111 allow the same list.
A file that asks for anything else is refused in one line naming what it asked for; nothing from it has run.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import torch

from .errors import ModelError

PICKLES = (".ckpt", ".pt", ".pth", ".bin")
LIGHTNING = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
             "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")


class LightningRecord:
    """What a PyTorch Lightning object in a checkpoint becomes: its saved attributes, inert."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass


def _allowed() -> list:
    """(object, name in the pickle) pairs torch's weights-only unpickler accepts on top of its own list."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    extra = [(LightningRecord, name) for name in LIGHTNING]
    extra += [(core.multiarray.scalar, f"{prefix}.multiarray.scalar") for prefix in ("numpy.core", "numpy._core")]
    extra.append((np.dtype, "numpy.dtype"))
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        if dtypes is not None and hasattr(dtypes, name):
            extra.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return extra


def read_pickle(path: str | Path):
    """The object a pickled checkpoint holds, read without running code from it; ModelError on a file that asks
    to run code (naming what it asked for) or that is no readable checkpoint."""
    path = Path(path)
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older ones refuse Lightning files
    try:
        with allow(_allowed()) if allow else contextlib.nullcontext():
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        text = str(e)
        wants = _wants(text)
        if wants is None:  # not a request to run something: a damaged or foreign file
            reason = text.split("WeightsUnpickler error:")[-1]
            raise ModelError(f"{path}: not a readable PyTorch checkpoint ({_first(reason)})") from None
        raise ModelError(f"{path}: refused: loading it would {wants}, which model weights never need (the file is "
                         "damaged or made to run code); nothing from it ran. Use a .safetensors copy of the model "
                         "from its source") from None
    except OSError as e:
        if e.filename is not None:  # the file itself cannot be read: the boundary names it
            raise
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({e.strerror or e})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError, IndexError, ArithmeticError,
            MemoryError) as e:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first(str(e))})") \
            from None


def _wants(text: str) -> str | None:
    """What a refused pickle asked for (to import or call something), from the weights-only unpickler's message;
    None when the refusal is about something else (garbage bytes)."""
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    for pattern, say in ((r"GLOBAL ([\w.]+)", "import {}"), (r"unrecognized function (.+?)(?: which|$)", "call {}"),
                         (r"(?:got|but got) (<class '[\w.]+'>)", "build {}")):
        found = re.search(pattern, text, re.IGNORECASE | re.MULTILINE)
        if found:
            return say.format(found.group(1).strip())
    return None


def _first(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[0][:200] if lines else "empty"

