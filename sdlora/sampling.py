"""Render images with a diffusers pipeline (training samples, previews, class images) and save them as PNGs with
their parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


@torch.no_grad()
def render(pipe, prompts: list[str], seed: int, steps: int, guidance: float, width: int, height: int,
           negative_prompt: str = "", batch: int = 8, embeds=None, image: Image.Image | None = None,
           mask: Image.Image | None = None) -> list[Image.Image]:
    """One image per prompt, image i seeded with seed + i (so samples at different steps are comparable).
    `embeds(prompts, negative_prompts)`, when given, makes the pipeline's prompt-embedding arguments instead of
    letting the pipeline encode the text (SD3 during training: its T5 is cached and released). An inpainting
    pipeline repaints the white of `mask` in `image`, from pure noise (strength 1); without them, the whole image
    (the inpainting model drawing from the prompt alone, as it was trained to for a share of its steps)."""
    images, inpaint = [], {}
    if inpainting(pipe):
        inpaint = {"image": image or Image.new("RGB", (width, height), (128, 128, 128)),
                   "mask_image": mask or Image.new("L", (width, height), 255), "strength": 1.0}
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        text = embeds(chunk, [negative_prompt] * len(chunk)) if embeds is not None else \
            {"prompt": chunk, "negative_prompt": [negative_prompt] * len(chunk) if negative_prompt else None}
        out = pipe(**text, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                   generator=gens, output_type="pil", **inpaint)
        images.extend(out.images)
    return images


def inpainting(pipe) -> bool:
    """Whether a pipeline repaints a masked image (diffusers' inpainting pipelines take a mask_image)."""
    import inspect

    return "mask_image" in inspect.signature(pipe.__call__).parameters


def save_png(image: Image.Image, path: str | Path, params: dict | None = None) -> Path:
    """Save a PNG with generation parameters in its text chunks (as A1111's 'parameters')."""
    from .io import atomic_path

    info = PngInfo()
    for k, v in (params or {}).items():
        info.add_text(k, str(v))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)
