"""Training data: image folders with caption sidecars, robust image loading, aspect-ratio buckets, and a
deterministic batch plan (step N's batch depends only on the seed and N, so resume is exact)."""

from __future__ import annotations

import codecs
import functools
import logging
import math
import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ...errors import DataError

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Example:
    path: str
    caption: str
    bucket: tuple[int, int]  # (width, height) in pixels
    is_prior: bool = False
    size: tuple[int, int] = (0, 0)  # original (width, height), EXIF rotation applied
    source: int = 0  # which of the run's data folders it came from
    mask: str = ""  # its mask: a file, ALPHA (the image's own alpha channel), or "" (none)
    inpaint_mask: str = ""  # an inpainting base's area to repaint: a file (data.inpaint_masks), or "" (random)


ALPHA = "<alpha>"

# ---------------------------------------------------------------- images

def load_image(path: str | Path) -> Image.Image:
    """Open any common image as 8-bit RGB: EXIF rotation applied, alpha composited on white,
    16-bit, grayscale, palette and CMYK converted."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, rgba)
        return im.convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image that decodes completely (EXIF rotation applied); raises ValueError saying why
    it cannot be used: not an image, truncated or corrupt data, or over PIL's decompression-bomb limit. Decoded once
    per file version: setup scans the training folders more than once (held-out images, training, validation)."""
    try:
        st = os.stat(path)
    except OSError:
        return _decoded_size(path)  # says why, as for any unreadable file
    return _cached_size(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=65536)
def _cached_size(path: str, mtime_ns: int, nbytes: int) -> tuple[int, int]:
    return _decoded_size(path)


def _decoded_size(path: str | Path) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                size = im.size[::-1] if _has_rotation(im) else im.size
                im.load()  # decode it all: verify() does not read JPEG data, so a truncated file would pass
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"over {Image.MAX_IMAGE_PIXELS // 10**6} MP, PIL's decompression-bomb limit; "
                             "downscale it") from None
        except UnidentifiedImageError:
            raise ValueError("not an image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"cannot be decoded: {str(e).splitlines()[0] or type(e).__name__}") from None
    return size


def missing_class_images(prior) -> str:
    """Why a run with class images (`PriorConfig`, mode images) would have none to train on, or "": the folder holds no
    usable image and none are to be rendered."""
    if not (prior.class_prompt and prior.mode == "images") or prior.num_class_images:
        return ""
    folder = Path(prior.class_data)
    if folder.is_dir() and scan_folder(folder)[0]:
        return ""
    return (f"no class images in {folder}: set prior.num_class_images to how many the base model renders from the "
            "class prompt (diffusers' DreamBooth script renders 100; a few per training image)")


def scan_folder(folder: str | Path, prompt: str = "",
                use_captions: bool = True) -> tuple[list[tuple[str, str, tuple[int, int]]], list[str]]:
    """(image path, caption, size) of every usable image of a folder, and the files skipped with the reason."""
    folder = Path(folder)
    items, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() == ".txt" or path.name.startswith("."):
            continue
        try:
            size = image_size(path)
        except ValueError as e:
            skipped.append(f"{path.name} ({'not an image' if path.suffix.lower() not in IMAGE_EXTS else e})")
            continue
        caption = prompt
        side = path.with_suffix(".txt")
        if use_captions and side.is_file():
            try:
                caption = read_caption(side)
            except ValueError as e:
                skipped.append(f"{path.name} (its caption {side.name} {e})")
                continue
        items.append((str(path), caption, size))
    return items, skipped


MAX_CAPTION = 10_000  # characters; CLIP reads 77 tokens and T5 at most 512, so a longer file is not a caption


def read_caption(path: Path) -> str:
    """A caption file's text, stripped: UTF-8 (a BOM allowed) or UTF-16 with its BOM (as Windows Notepad saves).
    Raises ValueError saying why the file is not a caption: not text (an image saved as .txt), control characters,
    an absurd length. Decoding with replacement would train on the bytes of whatever the file holds."""
    try:
        if path.stat().st_size > 4 * MAX_CAPTION:
            raise ValueError(f"is {path.stat().st_size:,} bytes, too long for a caption of at most {MAX_CAPTION:,} "
                             "characters")
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror or e}") from None
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"is not text: byte 0x{raw[e.start]:02x} at {e.start} is not UTF-8; save captions as UTF-8 "
                         "text") from None
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and not c.isspace()), None)
    if bad is not None:
        raise ValueError(f"is not text: control character U+{ord(bad):04X} at {text.index(bad)}")
    text = text.strip()
    if len(text) > MAX_CAPTION:
        raise ValueError(f"holds {len(text):,} characters, too long for a caption of at most {MAX_CAPTION:,}")
    return text


# ---------------------------------------------------------------- captions as tag lists

@dataclass(frozen=True)
class TagRule:
    """How a folder's captions vary from step to step when they are tag lists."""

    shuffle: bool = False
    keep: int = 0
    dropout: float = 0.0
    separator: str = ","

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0


def vary_tags(caption: str, rule: TagRule, rng: np.random.Generator) -> str:
    """This step's caption: the first `keep` tags in place, the others dropped with probability `dropout` and
    shuffled; a function of the caption and the micro-batch's rng alone, so a resumed run sees the same captions."""
    sep = rule.separator
    tags = [t.strip() for t in caption.split(sep) if t.strip()]
    kept, rest = tags[: rule.keep], tags[rule.keep:]
    if rule.dropout:
        draws = rng.random(len(rest))
        rest = [t for t, d in zip(rest, draws) if d >= rule.dropout]
    if rule.shuffle and len(rest) > 1:
        rest = [rest[j] for j in rng.permutation(len(rest))]
    return (", " if sep == "," else sep).join(kept + rest)


# ---------------------------------------------------------------- buckets

def make_buckets(resolution: int, step: int | None = None, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of `step`, with area <= resolution**2 and aspect ratio within max_ratio."""
    step = step or max(8, resolution // 64 * 8)  # 512 px -> 64 px steps, as kohya
    longest = int(resolution * math.sqrt(max_ratio))
    buckets = {(resolution, resolution)}
    for w in range(step, longest + 1, step):
        h = min(resolution * resolution // w, longest) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            buckets.add((w, h))
    return sorted(buckets)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger area)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(width, height) an image of `size` is resized to so that it covers the bucket, before the crop."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def fit_to_bucket(im: Image.Image, bucket: tuple[int, int], crop: str, rng: np.random.Generator | None,
                  flip: bool = False, mask: Image.Image | None = None):
    """Resize to cover the bucket, crop (center or random), optionally mirror.

    Returns pixels [3, h, w] in [-1, 1] and the crop's (top, left) in resized pixels (SDXL conditions on it); with a
    `mask` (mode L, the image's size), also the mask put through the same resize, crop and mirror, [1, h, w] in
    [0, 1]."""
    bw, bh = bucket
    nw, nh = cover_size(im.size, bucket)
    if crop == "random" and rng is not None:
        left, top = int(rng.integers(0, nw - bw + 1)), int(rng.integers(0, nh - bh + 1))
    else:
        left, top = (nw - bw) // 2, (nh - bh) // 2

    def place(img: Image.Image, resample) -> np.ndarray:
        img = img.resize((nw, nh), resample).crop((left, top, left + bw, top + bh))
        return np.asarray(ImageOps.mirror(img) if flip else img, dtype=np.float32).copy()

    pixels = torch.from_numpy(place(im, Image.Resampling.LANCZOS)).permute(2, 0, 1) / 127.5 - 1.0
    if mask is None:
        return pixels, (top, left)
    return pixels, (top, left), torch.from_numpy(place(mask, Image.Resampling.BILINEAR))[None] / 255.0


def load_mask(ex: Example) -> Image.Image | None:
    """An example's mask as an 8-bit grayscale image in the image's orientation; None when it has none."""
    if not ex.mask:
        return None
    with Image.open(ex.path if ex.mask == ALPHA else ex.mask) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if ex.mask == ALPHA:
            return im.convert("RGBA").getchannel("A")
        return im.getchannel("A") if im.mode in ("LA", "RGBA") and not _is_opaque(im) else im.convert("L")


def _is_opaque(im: Image.Image) -> bool:
    return im.getchannel("A").getextrema() == (255, 255)


def mask_file(image: str, folder: str | Path) -> Path | None:
    """An image's file in a mask folder (same stem, an image, not hidden); None when it has none."""
    found = sorted(p for p in Path(folder).glob(Path(image).stem + ".*")
                   if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    return found[0] if found else None


def find_mask(image: str, size: tuple[int, int], folder: str | Path | None, alpha: bool) -> str:
    """The mask an image (of `size`, as `image_size` read it) trains with: its file in the mask folder (same stem), its
    alpha channel, or none. A missing, mis-sized or all-black mask is a DataError naming the file; an all-white one
    (or an opaque alpha) is no mask."""
    if folder:
        found = mask_file(image, folder)
        if found is None:
            raise DataError(f"no mask for {Path(image).name} in {folder} (it needs a mask image named "
                            f"{Path(image).stem}.png or similar)")
        spec = str(found)
    elif alpha:
        spec = ALPHA
    else:
        return ""
    mask = load_mask(Example(image, "", (0, 0), mask=spec))
    where = Path(image).name + " (its alpha)" if spec == ALPHA else spec
    if mask.size != size:
        raise DataError(f"mask {where} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}")
    low, high = mask.getextrema()
    if high == 0:
        raise DataError(f"mask {where} is black everywhere: nothing of {Path(image).name} would be learned")
    return "" if low == 255 else spec


# ---------------------------------------------------------------- datasets

def build_examples(folders, resolution: int, bucketing: bool, step: int | None = None,
                   is_prior: bool = False, say=None, masks=None) -> list[Example]:
    """Examples from (folder, prompt, use_captions, repeats) tuples, with `masks` per folder ((mask folder, use the
    alpha channel) pairs; none for class images). Unreadable files are skipped and named; images far smaller than
    their bucket and images with no caption at all are reported (`say`, else the log)."""
    say = say or log.warning
    buckets = make_buckets(resolution, step) if bucketing else [(resolution, resolution)]
    examples, first_skip = [], ""
    for source, (folder, prompt, use_captions, repeats) in enumerate(folders):
        items, skipped = scan_folder(folder, prompt, use_captions)
        first_skip = first_skip or (f" (skipped {skipped[0]})" if skipped else "")
        for name in skipped:
            say(f"skipped {name} in {folder}")
        small, uncaptioned = [], []
        mask_folder, alpha = masks[source] if masks else ("", False)
        for path, caption, (w, h) in items:
            bucket = pick_bucket((w, h), buckets)
            mask = find_mask(path, (w, h), mask_folder, alpha)
            if min(w, h) * 4 < min(bucket):
                small.append(f"{Path(path).name} ({w}x{h})")
            if not caption:
                uncaptioned.append(Path(path).name)
            examples.extend([Example(path, caption, bucket, is_prior, (w, h), source, mask)] * repeats)
        if small:
            say(f"{len(small)} image(s) in {folder} are upscaled more than 4x to their bucket (blurry), "
                f"e.g. {small[0]}")
        if uncaptioned and not is_prior:
            say(f"{len(uncaptioned)} image(s) in {folder} have no caption and the folder no prompt: they train on "
                f"an empty caption, e.g. {uncaptioned[0]}; add .txt captions or an instance prompt")
    if not examples:
        where = ", ".join(str(f[0]) for f in folders)
        raise DataError(f"no readable images in {where}{first_skip}; add .png/.jpg images to train on")
    return examples


def _has_rotation(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - broken EXIF blocks are ignored
        return False


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches: indices shuffled within buckets, chunked, then the batches shuffled."""
    rng = np.random.default_rng([seed, epoch, 7])
    by_bucket: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        by_bucket.setdefault(ex.bucket, []).append(i)
    batches = []
    for key in sorted(by_bucket):
        idx = [by_bucket[key][j] for j in rng.permutation(len(by_bucket[key]))]
        batches.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
    return [batches[j] for j in rng.permutation(len(batches))]


class BatchPlan:
    """The k-th micro-batch of the whole run, computed from (seed, k) alone."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = len(epoch_batches(examples, batch_size, seed, 0))
        self._cache: tuple[int, list] | None = None

    def __call__(self, k: int) -> list[int]:
        epoch, cache = k // self.per_epoch, self._cache  # read once: the prefetch thread may replace it
        if cache is None or cache[0] != epoch:
            cache = self._cache = (epoch, epoch_batches(self.examples, self.batch_size, self.seed, epoch))
        return cache[1][k % self.per_epoch]
