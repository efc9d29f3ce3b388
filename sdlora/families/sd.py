"""SD 1.x and 2.x: the UNet is conditioned on one CLIP encoder's last hidden states."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


class Conditioning:
    """How text becomes the denoiser's keyword arguments (the SD 1/2 case; other families override parts)."""

    samples_from_embeddings = False  # training samples from the pipeline's own prompt encoding

    def encode(self, tokenizers: list, encoders: list, captions: list[str], device) -> dict[str, torch.Tensor]:
        """{'hidden': [B, S, D]}: the text encoder's last hidden states."""
        return {"hidden": encoders[0](tokenize(tokenizers[0], captions, device), return_dict=False)[0]}

    def caption_numel(self, configs: dict, frozen_length: int = 256) -> int:
        """Values of one caption's conditioning as the text cache holds it, from the parts' configs (keyed by
        pipeline attribute); `frozen_length`: the tokens of a frozen encoder's part (SD3's T5)."""
        return 77 * configs["text_encoder"]["hidden_size"]

    def micro(self, original_hw: tuple[int, int], crop_tl: tuple[int, int],
              target_hw: tuple[int, int]) -> torch.Tensor | None:
        """Per-image size/crop conditioning; None where the family has none."""
        return None

    def denoiser_kwargs(self, cond: dict[str, torch.Tensor], micro: torch.Tensor | None = None) -> dict:
        """Keyword arguments of the denoiser's forward for a conditioning dict (and the batch's micro-conditioning)."""
        return {"encoder_hidden_states": cond["hidden"]}

    def predict(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                micro: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's prediction for noisy latents at timesteps `t` under this conditioning."""
        return denoiser(noisy, t, **self.denoiser_kwargs(cond, micro), return_dict=False)[0]


CONDITIONING = Conditioning()
