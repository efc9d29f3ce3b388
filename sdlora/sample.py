"""Render images: sample previews during training, and a pipeline with LoRA files applied."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .formats import detect_layout, read_lora, split_embeddings


@torch.no_grad()
def render(pipe, prompts: list[str], seed: int, steps: int, guidance: float, width: int, height: int,
           negative_prompt: str = "", batch: int = 8) -> list[Image.Image]:
    """One image per prompt, image i seeded with seed + i (so samples at different steps are comparable)."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                   num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
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


def load_lora_into(pipe, path: str | Path, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Apply one LoRA file to a diffusers pipeline: LoRA keys through `load_lora_weights`, bundled
    embeddings (bundle_emb.*) through `load_textual_inversion`. Returns the adapter name."""
    tensors, _ = read_lora(path)
    lora, embeddings = split_embeddings(tensors)
    name = adapter_name or Path(path).stem.replace(".", "_")
    if detect_layout(lora) == "unknown":
        from .errors import LoraFileError

        raise LoraFileError(f"{path}: not a LoRA in the kohya or diffusers layout")
    pipe.load_lora_weights(lora, adapter_name=name)
    for token, parts in embeddings.items():
        pipe.load_textual_inversion(parts["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        if "clip_g" in parts:  # SDXL: the same token in the second encoder
            pipe.load_textual_inversion(parts["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    return name


def apply_loras(pipe, loras: list[tuple[str, float]]) -> list[str]:
    """Load several LoRAs, each at its own scale, active together."""
    names = [load_lora_into(pipe, path, adapter_name=f"lora{i}") for i, (path, _) in enumerate(loras)]
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return names
