"""Apply LoRA files at run time: onto a diffusers pipeline (`load_lora_into`, several at once with `apply_loras`),
and `sdlora generate` (text to image with LoRAs, or a labelled grid of LoRA scales)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraFileError, SdloraError
from ..families import Family, family_of_pipeline
from .checks import check_fits
from .files import check_weights, load_lora, read_lora
from .layout import model_layers, split_embeddings


def load_embeddings(pipe, family: Family, embeddings: dict[str, dict]) -> None:
    """Bundled embeddings {token: {clip_l: [n, d], clip_g: ...}} into the pipeline's tokenizers and encoders, each
    part into the encoder whose embeddings it holds."""
    slots = {s.embedding_key: s for s in family.text_encoders}
    for token, parts in embeddings.items():
        unknown = [p for p in parts if p not in slots]
        if unknown:
            raise LoraFileError(f"embedding {token!r} has a part {unknown[0]!r} for no text encoder of {family.title}")
        for part, vectors in parts.items():
            slot = slots[part]
            pipe.load_textual_inversion(vectors, token=token, text_encoder=getattr(pipe, slot.attr),
                                        tokenizer=getattr(pipe, slot.tokenizer_attr))


def load_lora_into(pipe, path: str | Path, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Apply one LoRA file to a diffusers pipeline at `scale`: LoRA keys through `load_lora_weights`, bundled
    embeddings (bundle_emb.*) through `load_textual_inversion`. A file that does not fit the pipeline's model (another
    family or size) is an error naming a layer. Returns the adapter name."""
    check_weights([(path, scale)])
    mods, embeddings, _ = load_lora(path)
    family = family_of_pipeline(pipe)
    layers = model_layers(family, getattr(pipe, family.denoiser_attr),
                          [getattr(pipe, s.attr) for s in family.text_encoders])
    check_fits(mods, {b: tuple(m.weight.shape) for b, m in layers.items()}, str(path))
    lora = split_embeddings(read_lora(path)[0])[0]
    name = adapter_name or Path(path).stem.replace(".", "_")
    pipe.load_lora_weights(lora, adapter_name=name)
    if scale != 1.0:
        pipe.set_adapters([name], adapter_weights=[scale])
    load_embeddings(pipe, family_of_pipeline(pipe), embeddings)
    return name


def apply_loras(pipe, loras: list[tuple[str, float]]) -> list[str]:
    """Load several LoRAs, each at its own scale, active together."""
    check_weights(loras)
    names = [load_lora_into(pipe, path, adapter_name=f"lora{i}") for i, (path, _) in enumerate(loras)]
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return names


SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
              "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler", "ddpm": "DDPMScheduler"}


def set_scheduler(pipe, name: str | None) -> str:
    """Swap the pipeline's scheduler by short name (euler_a, dpm++, ...) or class name; returns the class name."""
    import diffusers

    if name:
        cls = getattr(diffusers, SCHEDULERS.get(name.lower(), name), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise SdloraError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return type(pipe.scheduler).__name__


def generate(model: str | Path | None, loras: list[tuple[str, float]], prompt: str, *, negative_prompt: str = "",
             seed: int = 0, n: int = 1, steps: int = 20, guidance: float = 7.5, scheduler: str | None = None,
             width: int | None = None, height: int | None = None, output_dir: str | Path, grid: bool = False,
             scales: list[float] | None = None, allow_pickle: bool = False) -> list[Path]:
    """Text to image with LoRAs active together, each at its own scale; image i uses seed + i. PNGs carry the
    parameters (A1111's 'parameters' text). `grid`: one contact sheet, rows = seeds, columns = LoRA scale
    multipliers `scales` (default 0, 0.5, 1), each labelled."""
    from ..models import load_model
    from ..sampling import render

    scales = [0.0, 0.5, 1.0] if scales is None else list(scales)
    _check_generate(n, steps, guidance, width, height, seed, scales)
    check_weights(loras)
    c = load_model(model, allow_pickle)
    multiple = c.size_multiple
    if any(v is not None and v % multiple for v in (width, height)):
        raise SdloraError(f"--width/--height must be multiples of {multiple} for this model, got {width}x{height}")
    pipe = c.pipeline()
    pipe.set_progress_bar_config(disable=True)
    sched = set_scheduler(pipe, scheduler)
    size = c.denoiser.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size
    names = apply_loras(pipe, loras)
    out_dir = Path(output_dir)
    params = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
              "scheduler": sched, "width": width, "height": height, "model": c.name,
              "loras": [[Path(p).name, w] for p, w in loras]}  # names: shared images carry no local paths
    if not grid:
        images = render(pipe, [prompt] * n, seed, steps, guidance, width, height, negative_prompt)
        return [_save_image(img, out_dir, {**params, "seed": seed + i}) for i, img in enumerate(images)]
    rows = []
    for s in scales:
        if names:
            pipe.set_adapters(names, adapter_weights=[s * w for _, w in loras])
        rows.append(render(pipe, [prompt] * n, seed, steps, guidance, width, height, negative_prompt))
    sheet = contact_sheet(rows, [f"x{s:g}" for s in scales], [f"seed {seed + i}" for i in range(n)])
    return [_save_image(sheet, out_dir, {**params, "seed": seed, "n": n, "grid_scales": scales}, "grid")]


def _check_generate(n, steps, guidance, width, height, seed, scales) -> None:
    import math

    checks = [(n >= 1, f"--n must be at least 1, not {n}"), (steps >= 1, f"--steps must be at least 1, not {steps}"),
              (math.isfinite(guidance) and guidance >= 0, f"--guidance must be a number >= 0, not {guidance}"),
              (all(v is None or v >= 8 for v in (width, height)), f"--width/--height must be at least 8 pixels, "
                                                                  f"got {width}x{height}"),
              (0 <= seed < 2**63, f"--seed must be between 0 and 2**63, not {seed}"),
              (all(math.isfinite(s) for s in scales), f"--scales must be finite numbers, got {scales}")]
    for ok, message in checks:
        if not ok:
            raise SdloraError(message)


def _save_image(image, out_dir: Path, params: dict, stem: str = "img") -> Path:
    from ..sampling import save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    i = len(list(out_dir.glob("*.png")))
    while (out_dir / f"{stem}_{i:05d}.png").exists():
        i += 1
    loras = "".join(f" <lora:{Path(p).stem}:{w:g}>" for p, w in params["loras"])
    text = (f"{params['prompt']}{loras}\nNegative prompt: {params['negative_prompt']}\nSteps: {params['steps']}, "
            f"Sampler: {params['scheduler']}, CFG scale: {params['guidance']}, Seed: {params['seed']}, "
            f"Size: {params['width']}x{params['height']}, Model: {params['model']}")
    return save_png(image, out_dir / f"{stem}_{i:05d}.png", {"parameters": text, "sdlora": json.dumps(params)})


def contact_sheet(columns: list[list], col_labels: list[str], row_labels: list[str]):
    """Images laid out with columns[c][r] at column c, row r, and a label above each column / left of each row."""
    from PIL import Image, ImageDraw

    w, h = columns[0][0].size
    left, top = 70, 18
    sheet = Image.new("RGB", (left + w * len(columns), top + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (col, label) in enumerate(zip(columns, col_labels)):
        draw.text((left + c * w + 2, 3), label, fill="black")
        for r, img in enumerate(col):
            sheet.paste(img, (left + c * w, top + r * h))
    for r, label in enumerate(row_labels):
        draw.text((2, top + r * h + h // 2 - 5), label, fill="black")
    return sheet
