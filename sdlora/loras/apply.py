"""Apply LoRA files at run time: onto a diffusers pipeline (`load_lora_into`, several at once with `apply_loras`;
plain LoRA through diffusers, every other type through sdlora's hooks), and `sdlora generate` (text to image with
LoRAs, or a labelled grid of LoRA scales)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LoraFileError, SdloraError
from ..families import Family, family_of_pipeline
from ..io import check_folder
from .checks import check_fits
from .files import check_weights, load_lora, read_lora
from .layout import diffusers_tensors, model_layers, name_map, split_embeddings
from .modules import is_plain


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


class ActiveLoras:
    """LoRA files applied to a pipeline at run time, each at its own scale. Plain LoRA files go through diffusers'
    adapters (load_lora_weights, set_adapters); DoRA, LoHa, LoKr and Tucker LoCon files, which diffusers cannot load
    (LoHa/LoKr raise, kohya DoRA loses its dora_scale), through sdlora's forward hooks (`HookedLora`), which add each
    layer's exact update times the scale, as A1111 and ComfyUI apply a strength."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.entries: list[tuple[str, HookedLora | None]] = []  # (diffusers adapter name, or hooks)
        self.embeddings: dict[str, dict] = {}  # the bundled embeddings loaded with them ({token: {part: vectors}})

    def add(self, path: str | Path, name: str) -> None:
        """One more file, at scale 1. A file that does not fit the pipeline's model (another family or size) is an
        error naming a layer."""
        mods, embeddings, _ = load_lora(path)
        family = family_of_pipeline(self.pipe)
        layers = model_layers(family, getattr(self.pipe, family.denoiser_attr),
                              [getattr(self.pipe, s.attr) for s in family.text_encoders])
        check_fits(mods, {b: tuple(m.weight.shape) for b, m in layers.items()}, str(path))
        if all(is_plain(m) for m in mods.values()):
            self.pipe.load_lora_weights(self._diffusers_state(path, family, mods), adapter_name=name)
            self.entries.append((name, None))
        else:
            self.entries.append((name, HookedLora(layers, mods)))
        load_embeddings(self.pipe, family, embeddings)
        self.embeddings.update(embeddings)

    def _diffusers_state(self, path, family: Family, mods: dict) -> dict:
        """What diffusers' load_lora_weights is given: the file's own tensors where diffusers converts that
        family's kohya layout itself, else (SD3) the modules in diffusers' layout (alpha folded into lora_B)."""
        if family.diffusers_reads_kohya:
            return split_embeddings(read_lora(path)[0])[0]
        names = name_map(family, getattr(self.pipe, family.denoiser_attr),
                         [getattr(self.pipe, s.attr) for s in family.text_encoders])
        return diffusers_tensors(mods, names, torch.float32)[0]

    @property
    def _adapters(self) -> list[str]:
        return [name for name, hooks in self.entries if hooks is None]

    def set_scales(self, scales: list[float]) -> None:
        """One scale per file, in the order they were added."""
        weights = [s for (_, hooks), s in zip(self.entries, scales) if hooks is None]
        if self._adapters:
            self.pipe.set_adapters(self._adapters, adapter_weights=weights)
        for (_, hooks), s in zip(self.entries, scales):
            if hooks is not None:
                hooks.scale = s

    def enable(self, on: bool = True) -> None:
        """Switch every file on or off (the scales are kept)."""
        if self._adapters:
            self.pipe.enable_lora() if on else self.pipe.disable_lora()
        for _, hooks in self.entries:
            if hooks is not None:
                hooks.on = on

    def remove(self) -> None:
        """Take every file off the pipeline, its bundled embeddings' tokens too (so another file's can load)."""
        if self._adapters:
            self.pipe.delete_adapters(self._adapters)
        for _, hooks in self.entries:
            if hooks is not None:
                hooks.remove()
        family = family_of_pipeline(self.pipe) if self.embeddings else None
        for token, parts in self.embeddings.items():
            for slot in (s for s in family.text_encoders if s.embedding_key in parts):
                n = len(parts[slot.embedding_key])  # diffusers names the 2nd, 3rd... vector token_1, token_2, ...
                self.pipe.unload_textual_inversion([token] + [f"{token}_{i}" for i in range(1, n)],
                                                   tokenizer=getattr(self.pipe, slot.tokenizer_attr),
                                                   text_encoder=getattr(self.pipe, slot.attr))
        self.entries, self.embeddings = [], {}


class HookedLora:
    """One file's modules on the pipeline's layers as forward hooks: output += scale * (x through the layer's exact
    update), the update computed from the layer's own weight at each call (DoRA needs it; nothing is cached)."""

    def __init__(self, layers: dict[str, torch.nn.Module], mods: dict):
        self.scale, self.on = 1.0, True
        self.handles = [layers[b].register_forward_hook(self._hook(m.map(lambda t, w=layers[b].weight: t.to(w.device))))
                        for b, m in mods.items()]

    def _hook(self, module):
        def hook(layer, args, output):
            if not self.on or self.scale == 0:
                return output
            x = args[0]
            with torch.no_grad():
                delta = module.delta(layer.weight).to(x.dtype)
            extra = layer._conv_forward(x, delta, None) if isinstance(layer, torch.nn.Conv2d) else F.linear(x, delta)
            return output + self.scale * extra
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def load_lora_into(pipe, path: str | Path, scale: float = 1.0, adapter_name: str | None = None) -> ActiveLoras:
    """Apply one LoRA file (any type) to a diffusers pipeline at `scale`: plain LoRA keys through diffusers'
    `load_lora_weights`, other types through hooks, bundled embeddings (bundle_emb.*) through
    `load_textual_inversion`. Returns the handle that rescales, switches or removes it."""
    return apply_loras(pipe, [(path, scale)], [adapter_name or Path(path).stem.replace(".", "_")])


def apply_loras(pipe, loras: list[tuple[str, float]], names: list[str] | None = None) -> ActiveLoras:
    """Load several LoRA files, each at its own scale, active together."""
    check_weights(loras)
    active = ActiveLoras(pipe)
    for i, (path, _) in enumerate(loras):
        active.add(path, names[i] if names else f"lora{i}")
    if loras:
        active.set_scales([s for _, s in loras])
    return active


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
             scales: list[float] | None = None, allow_pickle: bool = False, text_encoders: str = "",
             t5: bool | None = None) -> list[Path]:
    """Text to image with LoRAs active together, each at its own scale; image i uses seed + i. PNGs carry the
    parameters (A1111's 'parameters' text). `grid`: one contact sheet, rows = seeds, columns = LoRA scale
    multipliers `scales` (default 0, 0.5, 1), each labelled. SD3: `text_encoders` for a single file without them,
    `t5` False renders without T5 (zero T5 embeddings)."""
    from ..models import load_model
    from ..sampling import render

    scales = [0.0, 0.5, 1.0] if scales is None else list(scales)
    _check_generate(n, steps, guidance, width, height, seed, scales)
    check_folder(output_dir)
    check_weights(loras)
    c = load_model(model, allow_pickle, text_encoders, t5)
    multiple = c.size_multiple
    if any(v is not None and v % multiple for v in (width, height)):
        raise SdloraError(f"--width/--height must be multiples of {multiple} for this model, got {width}x{height}")
    pipe = c.pipeline()
    pipe.set_progress_bar_config(disable=True)
    sched = set_scheduler(pipe, scheduler)
    size = c.denoiser.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size
    c.check_size(width, height, "--width/--height", "give smaller ones")
    active = apply_loras(pipe, loras)
    out_dir = Path(output_dir)
    params = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
              "scheduler": sched, "width": width, "height": height, "model": c.name,
              "loras": [[Path(p).name, w] for p, w in loras]}  # names: shared images carry no local paths
    if not grid:
        images = render(pipe, [prompt] * n, seed, steps, guidance, width, height, negative_prompt)
        return [_save_image(img, out_dir, {**params, "seed": seed + i}) for i, img in enumerate(images)]
    rows = []
    for s in scales:
        active.set_scales([s * w for _, w in loras])
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
