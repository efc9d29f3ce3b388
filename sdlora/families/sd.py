"""SD 1.x and 2.x: the UNet is conditioned on one CLIP encoder's last hidden states (SD1: OpenAI's CLIP-L, SD2:
OpenCLIP-H, which its single files keep in OpenCLIP's own layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from .ldm import Encoder, LdmFile


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


def sd2_prediction(meta: dict, path: Path) -> tuple[str, str]:
    """SD2 ships a 768 px v-prediction model and a 512 px epsilon one with the same layout: a file that does not say is
    read by its resolution hints (metadata, file name, the 512-base model's global_step)."""
    hint = " ".join([meta.get("modelspec.resolution", ""), meta.get("modelspec.architecture", ""), path.name])
    if "768" in hint:
        return "v_prediction", "SD2 at 768 px (the 768-v model)"
    if "512" in hint or meta.get("global_step") == "875000":
        return "epsilon", "SD2 at 512 px (the 512-base model)"
    return "v_prediction", ("SD2 without a resolution hint: assuming the 768-v model; "
                            "pass --prediction-type epsilon for a 512-base one")


SD1_FILE = LdmFile("sd1", "SD1 (cond_stage_model.transformer)",
                   (Encoder("text_encoder", "cond_stage_model.transformer.text_model."),))
SD2_FILE = LdmFile("sd2", "SD2 (cond_stage_model.model)",
                   (Encoder("text_encoder", "cond_stage_model.model.", openclip=True, skip_last=True),),
                   prediction=sd2_prediction)
