"""`sdlora caption`: write a caption beside every image that has none, with an image-to-text model from transformers
(BLIP, Florence-2, or a small vision-language model), from a local folder or a hub id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, ModelError, SdloraError
from .io import atomic_write_text

# task prompts of models that caption from a prompt rather than from the image alone
TASK_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}
CHAT_PROMPT = "Describe this image in one short sentence."


@dataclass
class CaptionReport:
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)      # had a caption already (no --overwrite)
    skipped: list[str] = field(default_factory=list)   # unreadable, with the reason

    def summary(self) -> str:
        return (f"wrote {len(self.written)} caption(s), kept {len(self.kept)} existing, "
                f"skipped {len(self.skipped)} unreadable file(s)")


class Captioner:
    """An image-to-text model and its processor; `__call__` captions a batch of PIL images."""

    def __init__(self, source: str, device: str = "cpu", max_new_tokens: int = 40, prompt: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source).to(device).eval()
        except (OSError, ValueError) as e:
            where = "a local folder" if Path(source).exists() else "not a local folder, and the hub is not reachable"
            raise ModelError(f"could not load the captioner '{source}' ({where}): "
                             f"{str(e).splitlines()[0]}") from None
        self.device, self.max_new_tokens = device, max_new_tokens
        kind = self.model.config.model_type
        self.prompt = prompt if prompt is not None else TASK_PROMPTS.get(kind, "")
        self.chat = kind not in TASK_PROMPTS and kind != "blip" and hasattr(self.processor, "apply_chat_template")

    def _inputs(self, images: list):
        if self.chat:
            ask = [{"type": "image"}, {"type": "text", "text": self.prompt or CHAT_PROMPT}]
            text = self.processor.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True)
            return self.processor(images=images, text=[text] * len(images), return_tensors="pt")
        if self.prompt:
            return self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
        return self.processor(images=images, return_tensors="pt")

    def __call__(self, images: list) -> list[str]:
        import torch

        inputs = self._inputs(images).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        if self.chat:  # decoder-only models return the prompt too: keep the new tokens
            out = out[:, inputs["input_ids"].shape[1]:]
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def caption_folder(folder: str | Path, captioner: str | Captioner, prefix: str = "", overwrite: bool = False,
                   batch_size: int = 4, progress: Callable[[int, int], None] | None = None, device: str = "cpu",
                   prompt: str | None = None) -> CaptionReport:
    """A `.txt` caption (with `prefix` in front, e.g. "sks, ") beside each image of `folder` that has none (every
    image with `overwrite`). Existing captions are never replaced without `overwrite`; an image the model gives an
    empty caption is an error naming it, not an empty file. A model named by folder or hub id is loaded (on
    `device`, with `prompt`) only once the folder has images to caption."""
    from .training.inputs.data import load_image, scan_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"caption: {folder} is not a folder")
    if batch_size < 1:
        raise SdloraError(f"--batch-size must be at least 1, not {batch_size}")
    items, skipped = scan_folder(folder, use_captions=False)
    if not items:
        raise DataError(f"no images in {folder} to caption (png, jpg, webp, ...)")
    report = CaptionReport(skipped=skipped)
    todo = []
    for path, _, _ in items:
        side = Path(path).with_suffix(".txt")
        (todo.append(path) if overwrite or not side.is_file() else report.kept.append(Path(path).name))
    model = captioner if isinstance(captioner, Captioner) else Captioner(captioner, device, prompt=prompt) \
        if todo else None
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for path, text in zip(chunk, model([load_image(p) for p in chunk])):
            if not text:
                raise SdloraError(f"the captioner gave {Path(path).name} an empty caption; try another model")
            atomic_write_text(Path(path).with_suffix(".txt"), prefix + text + "\n")
            report.written.append(Path(path).name)
        if progress:
            progress(min(start + batch_size, len(todo)), len(todo))
    return report
