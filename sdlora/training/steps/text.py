"""Text conditioning during training: the family's encoders, with a cache while nothing in the text path trains."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...families.sd import Conditioning
from ..run.parts import Part


class adapters_off:
    """Context: the given models run without their LoRA adapters."""

    def __init__(self, models):
        self.models = list(models)

    def __enter__(self):
        for m in self.models:
            m.disable_adapters()

    def __exit__(self, *exc):
        for m in self.models:
            m.enable_adapters()
        return False


@dataclass
class TextEncoding:
    """Captions -> the denoiser's text conditioning. Cached per caption while the text path is frozen
    (`trainable` False and `cache` allowed); `base=True` gives the base model's own conditioning (adapters off)."""

    conditioning: Conditioning
    tokenizers: list
    parts: list[Part]          # the text encoders (a `Part` says which form runs when)
    frozen: list               # the family's frozen encoders (SD3's T5), as the conditioning takes them
    adapted: list[bool]        # which encoders carry a LoRA
    device: torch.device
    cache_allowed: bool
    trainable: bool = False
    cache: dict = field(default_factory=dict)
    base_cache: dict = field(default_factory=dict)

    def encoders(self, wrapped: bool = False) -> list:
        """What the family's `Conditioning.encode` takes: the text encoders (as the step's forward runs them with
        `wrapped`, else the modules themselves), then the frozen ones."""
        return [p.wrapped if wrapped else p.module for p in self.parts] + self.frozen

    def __call__(self, captions: list[str], base: bool = False) -> dict[str, torch.Tensor]:
        encoders = self.encoders(wrapped=not base)
        if base or (not self.trainable and self.cache_allowed):
            cache = self.base_cache if base else self.cache
            missing = [c for c in dict.fromkeys(captions) if c not in cache]
            if missing:
                off = [p.module for p, a in zip(self.parts, self.adapted) if a] if base else []
                with torch.no_grad(), adapters_off(off):
                    out = self.conditioning.encode(self.tokenizers, encoders, missing, self.device)
                for i, c in enumerate(missing):
                    cache[c] = {k: v[i] for k, v in out.items()}
            return {k: torch.stack([cache[c][k] for c in captions]) for k in cache[captions[0]]}
        with torch.set_grad_enabled(self.trainable):
            return self.conditioning.encode(self.tokenizers, encoders, captions, self.device)

    def fill(self, captions: list[str], chunk: int = 64) -> None:
        """Encode these captions into the cache now (so no encoder runs during the steps)."""
        for start in range(0, len(captions), chunk):
            self(captions[start:start + chunk])

    def for_pipeline(self):
        """For families whose samples come from the training text path (SD3: its T5 is cached and released), the
        function giving a pipeline's embedding arguments for prompts and negative prompts; None for the others."""
        if not self.conditioning.samples_from_embeddings:
            return None

        def embeds(prompts: list[str], negatives: list[str]) -> dict:
            def encode(texts):
                return self.conditioning.encode(self.tokenizers, self.encoders(), texts, self.device)
            return self.conditioning.pipeline_embeds(encode(prompts), encode(negatives))
        return embeds
