"""Files the web UI touches: uploaded images (with safe names), caption sidecars, and the LoRAs in the output folder.

Nothing here trusts a name that came from a browser: `safe_name` reduces it to one plain file name, `inside` refuses
any path that would land outside its folder, and `Allowed` confines every typed path to the folders the user allowed.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

from sdlora.errors import SdloraError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "file", max_len: int = 100) -> str:
    """One harmless file name from any string: no folders, no leading dots, only [A-Za-z0-9._-]."""
    name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    name = name.replace("\\", "/").split("/")[-1]  # drop any folder part, Windows or POSIX
    name = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", name)).strip("._-")
    if not name:
        return default
    if len(name) > max_len:
        stem, dot, ext = name.rpartition(".")
        name = stem[: max_len - len(ext) - 1] + "." + ext if dot and len(ext) <= 10 else name[:max_len]
    return name


def inside(folder: str | Path, name: str) -> Path:
    """`folder / safe_name(name)`, checked to be inside `folder`."""
    folder = Path(folder).resolve()
    path = (folder / safe_name(name)).resolve()
    if path.parent != folder:
        raise SdloraError(f"refusing to write outside {folder}: {name!r}")
    return path


class Allowed:
    """The folders the UI may read and write: the output folder, and the data roots the user allowed when starting
    it (`sdlora ui --data-root DIR`). Every path that comes from a browser is resolved (symlinks followed) and must
    lie inside one of them."""

    def __init__(self, output_dir: str | Path, data_roots: list[str | Path] = (), model: str = ""):
        self.output_dir = Path(output_dir).resolve()
        self.roots = [self.output_dir] + [Path(r).resolve() for r in data_roots]
        self.model = model  # the base model given at start is always allowed

    def _refuse(self, text: str, what: str):
        roots = ", ".join(str(r) for r in self.roots)
        raise SdloraError(f"{what} {text} is outside the folders this UI may use ({roots}); restart it with "
                          "`sdlora ui --data-root DIR` to allow another folder")

    def path(self, text: str | Path, what: str = "folder") -> Path:
        """`text` resolved, if it lies inside an allowed folder."""
        if not str(text).strip():
            raise SdloraError(f"no {what} given")
        path = Path(text).expanduser().resolve()
        if not any(path == r or path.is_relative_to(r) for r in self.roots):
            self._refuse(str(text), what)
        return path

    def output(self, text: str | Path, what: str = "LoRA") -> Path:
        """`text` resolved, if it lies inside the output folder."""
        path = Path(text).resolve()
        if not path.is_relative_to(self.output_dir):
            raise SdloraError(f"{what} {text} is not in the output folder {self.output_dir}")
        return path

    def model_path(self, text: str) -> str:
        """A base model: empty (the built-in one), the one given at start, a hub id, or a folder or file inside an
        allowed folder."""
        text = (text or "").strip()
        local = text.startswith((".", "/", "~")) or Path(text).exists() or text.count("/") != 1
        if not text or text == self.model or not local:
            return text
        return str(self.path(text, "base model"))


def import_uploads(files: list[str], folder: str | Path) -> list[Path]:
    """Copy uploaded images (and .txt captions) into `folder` under sanitized names; other files are ignored."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in files or []:
        src = Path(src)
        if src.suffix.lower() not in IMAGE_EXTS | {".txt"}:
            continue
        dst = inside(folder, src.name)
        shutil.copyfile(src, dst)
        copied.append(dst)
    return copied


def dataset_rows(folder: str | Path) -> list[list[str]]:
    """[[image file name, caption]] for the images of a folder (caption: its .txt sidecar, or empty)."""
    folder = Path(folder) if folder else None
    if folder is None or not folder.is_dir():
        return []
    rows = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")):
        side = path.with_suffix(".txt")
        rows.append([path.name, side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else ""])
    return rows


def write_captions(folder: str | Path, rows: list[list[str]]) -> list[str]:
    """Write each row's caption to its image's .txt sidecar where it differs from what is there (an empty caption
    removes the sidecar); the names of the images whose caption changed."""
    folder = Path(folder)
    written = []
    for name, caption in rows:
        image = inside(folder, name)
        if not image.is_file():
            continue
        side = image.with_suffix(".txt")
        caption = (caption or "").strip()
        old = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else None
        if caption and caption != old:
            side.write_text(caption + "\n", encoding="utf-8")
            written.append(image.name)
        elif not caption and old is not None:
            side.unlink()
            written.append(image.name)
    return written


def move_uploads(output_dir: str | Path, old: str, new: str, folder: str, masks: str) -> tuple[str, str]:
    """After the LoRA is renamed: the images and masks uploaded under the old name move to the new name's folder
    (only the page's own upload folders, and only where the new ones do not exist yet); the folders to use now."""
    out = []
    for current, sub in ((folder, "images"), (masks, "masks")):
        src, dst = Path(output_dir) / old / sub, Path(output_dir) / new / sub
        if current and Path(current) == src and src.is_dir() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            current = str(dst)
        out.append(current)
    return out[0], out[1]


def list_loras(output_dir: str | Path) -> list[Path]:
    """LoRA files under the output folder, newest first (intermediate checkpoints and the embedding files of pivotal
    tuning left out)."""
    from sdlora.loras.files import is_embedding_file

    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.safetensors")
             if not any(part.endswith("_checkpoints") or part.startswith(".") for part in p.relative_to(root).parts)
             and not is_embedding_file(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def samples_of(lora: str | Path) -> list[str]:
    """Sample images written while training this LoRA (the `<stem>_samples` folder beside it), last first."""
    lora = Path(lora)
    folder = lora.with_name(lora.stem + "_samples")
    return [str(p) for p in sorted(folder.glob("*.png"), reverse=True)] if folder.is_dir() else []


def relative(path: str | Path, root: str | Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
