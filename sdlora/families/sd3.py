"""SD3 and SD3.5: CLIP-L and CLIP-G (penultimate layers, zero-padded to T5's width) followed by T5-XXL's last hidden
states along the sequence, the two pooled CLIP embeddings concatenated, and a transformer called with keywords, as
diffusers' StableDiffusion3Pipeline.encode_prompt builds them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .sd import Conditioning, tokenize


@dataclass
class T5Text:
    """T5-XXL's part of the conditioning: its last hidden states per caption, cached (T5 never trains), so the model
    can be released once every caption is in. Without a model (`--no-t5`, or a pipeline without text_encoder_3) the
    part is zeros of [length, width], as diffusers' pipeline makes it. `closed`: captions not yet cached are encoded
    but not kept (captions that change every step would otherwise fill memory without bound)."""

    tokenizer: object | None
    model: torch.nn.Module | None
    length: int = 256
    width: int = 4096
    cache: dict = field(default_factory=dict)
    released: bool = False
    closed: bool = False

    @property
    def present(self) -> bool:
        """A T5 takes part (held now, or released after caching)."""
        return self.model is not None or self.released

    def __call__(self, captions: list[str], device) -> torch.Tensor:
        if not self.present:
            return torch.zeros(len(captions), self.length, self.width, device=device)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            if self.model is None:
                from ..errors import ModelError

                raise ModelError(f"T5 was released after caching, and the caption {missing[0]!r} was not cached")
            ids = self.tokenizer(missing, padding="max_length", max_length=self.length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids
            with torch.no_grad():
                out = self.model(ids.to(self.model.device))[0]
            fresh = {caption: hidden.cpu() for caption, hidden in zip(missing, out)}
            if not self.closed:
                self.cache.update(fresh)
        else:
            fresh = {}
        return torch.stack([fresh[c] if c in fresh else self.cache[c] for c in captions]).to(device)

    def release(self) -> None:
        """Drop the model (every caption it will see is cached)."""
        self.model, self.released = None, True


class SD3Conditioning(Conditioning):
    # samples during training are rendered from these embeddings (T5 may be released by then)
    samples_from_embeddings = True

    def encode(self, tokenizers, encoders, captions, device):
        """{'hidden': [B, 77 + T5 length, T5 width], 'pooled': [B, P_L + P_G]}; `encoders` are CLIP-L, CLIP-G and a
        `T5Text`."""
        hidden, pooled = [], []
        for tok, enc in zip(tokenizers[:2], encoders[:2]):
            out = enc(tokenize(tok, captions, device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        t5 = encoders[2](captions, device).to(clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"hidden": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def caption_numel(self, configs, frozen_length=256):
        """77 CLIP tokens and `frozen_length` T5 tokens at the transformer's joint width, and the pooled CLIP-L +
        CLIP-G embedding (the same with or without T5: its part is zeros then)."""
        t = configs["transformer"]
        return (77 + frozen_length) * t["joint_attention_dim"] + t["pooled_projection_dim"]

    def denoiser_kwargs(self, cond, micro=None):
        return {"encoder_hidden_states": cond["hidden"], "pooled_projections": cond["pooled"]}

    def predict(self, denoiser, noisy, t, cond, micro=None):
        """SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep) with
        timestep = sigma * 1000."""
        return denoiser(hidden_states=noisy, timestep=t, **self.denoiser_kwargs(cond), return_dict=False)[0]

    def pipeline_embeds(self, cond: dict, negative: dict) -> dict:
        """The pipeline's keyword arguments for a prompt and a negative prompt given as conditionings."""
        return {"prompt_embeds": cond["hidden"], "pooled_prompt_embeds": cond["pooled"],
                "negative_prompt_embeds": negative["hidden"], "negative_pooled_prompt_embeds": negative["pooled"]}


CONDITIONING = SD3Conditioning()
