"""Random-weight Stable Diffusion pipelines built from configs: the test suite's fixtures and the benchmark's
full-size models. Each family's module builds its own (`Family.save_tiny`, `full_size`, `full_size_configs`); nothing
is downloaded: the tokenizers are written locally (`sdlora.tokenizers`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .families import FAMILIES

# the builders by their names, for the tests and scripts
from .families.sd import SD15, TINY, build_components, save_tiny_pipeline  # noqa: F401
from .families.sd3 import (  # noqa: F401
    SD3_VAE,
    SD3_VARIANTS,
    SD35_MEDIUM,
    T5_XXL,
    TINY_SD3,
    build_sd3_components,
    save_tiny_sd3_pipeline,
    sd35_medium,
)
from .families.sdxl import SDXL_BASE, TINY_XL, build_sdxl_components, save_tiny_sdxl_pipeline  # noqa: F401
from .tokenizers import write_t5_tokenizer, write_tokenizer


def full_size_configs(family: str, sd3_blocks: int = 24, t5_layers: int = 24) -> dict:
    """The configs of `full_size_components`' denoiser, vae and text encoder(s), as dicts (nothing is allocated);
    SD3: SD3.5 Medium's (`sd3_blocks` of its blocks) with T5-XXL (`t5_layers` of its layers) as text_encoder_3."""
    return FAMILIES[family].full_size_configs(sd3_blocks=sd3_blocks, t5_layers=t5_layers)


def full_size_components(family: str, tokenizer_dir: str | Path, seed: int = 0, device: str | None = None,
                         sd3_blocks: int = 24, t5_layers: int = 24):
    """`Components` of a full-size SD 1.5-, SDXL- or SD3.5-Medium-shaped model with random weights (for benchmarks),
    with local tokenizers written to `tokenizer_dir`. With `device` (e.g. 'cuda') the weights are made and
    initialised there: seconds on a GPU instead of a minute of CPU initialisation; the schedulers stay on the CPU.
    SD3: `sd3_blocks` of SD3.5 Medium's 24 blocks (the first 13 with dual attention, as there) and `t5_layers` of
    T5-XXL's 24, for machines that cannot hold all of them."""
    import contextlib

    from transformers import AutoTokenizer, CLIPTokenizer

    from .models import Components, freeze, frozen_text, training_scheduler

    fam = FAMILIES[family]
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tokenizer_dir, ("a", "photo", "of", "sks")))
    with torch.device(device) if device else contextlib.nullcontext():
        parts = fam.full_size(seed=seed, sd3_blocks=sd3_blocks, t5_layers=t5_layers)
    parts["scheduler"] = type(parts["scheduler"]).from_config(parts["scheduler"].config)  # made on the CPU
    denoiser, encoders = parts[fam.denoiser_attr], [parts[s.attr] for s in fam.text_encoders]
    words = ("a", "photo", "of", "sks")
    t5_tok = AutoTokenizer.from_pretrained(write_t5_tokenizer(Path(tokenizer_dir) / "t5", words)) \
        if fam.frozen_encoders else None
    frozen = [frozen_text(fam, parts[s.attr], t5_tok, denoiser.config, 256) for s in fam.frozen_encoders]
    return freeze(Components(fam, fam.full_size_name or f"random-{family}", denoiser, parts["vae"],
                             [tokenizer] * len(encoders), encoders,
                             *training_scheduler(parts["scheduler"], "auto", fam), frozen))
