"""Render images with a diffusers pipeline (training samples, previews, class images) and save them as PNGs with
their parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


@torch.no_grad()
def render(pipe, prompts: list[str], seed: int, steps: int, guidance: float, width: int, height: int,
           negative_prompt: str = "", batch: int = 8, embeds=None) -> list[Image.Image]:
    """One image per prompt, image i seeded with seed + i (so samples at different steps are comparable).
    `embeds(prompts, negative_prompts)`, when given, makes the pipeline's prompt-embedding arguments instead of
    letting the pipeline encode the text (SD3 during training: its T5 is cached and released)."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        text = embeds(chunk, [negative_prompt] * len(chunk)) if embeds is not None else \
            {"prompt": chunk, "negative_prompt": [negative_prompt] * len(chunk) if negative_prompt else None}
        out = pipe(**text, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                   generator=gens, output_type="pil")
        images.extend(out.images)
    return images


def save_png(image: Image.Image, path: str | Path, params: dict | None = None) -> Path:
    """Save a PNG with generation parameters in its text chunks (as A1111's 'parameters')."""
    from .io import atomic_path

    info = PngInfo()
    for k, v in (params or {}).items():
        info.add_text(k, str(v))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)
