"""SDXL: two CLIP encoders (penultimate layers concatenated), the pooled OpenCLIP-G embedding, and the size/crop
micro-conditioning of each image."""

from __future__ import annotations

import torch

from .ldm import Encoder, LdmFile
from .sd import Conditioning, tokenize


class SDXLConditioning(Conditioning):
    def encode(self, tokenizers, encoders, captions, device):
        """{'hidden': [B, S, D1 + D2], 'pooled': [B, P]}."""
        hidden, pooled = [], None
        for tok, enc in zip(tokenizers, encoders):
            out = enc(tokenize(tok, captions, device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def caption_numel(self, configs, frozen_length=256):
        """77 tokens of both encoders' widths, and CLIP-G's pooled projection."""
        te1, te2 = configs["text_encoder"], configs["text_encoder_2"]
        return 77 * (te1["hidden_size"] + te2["hidden_size"]) + te2["projection_dim"]

    def micro(self, original_hw, crop_tl, target_hw):
        """(original h, w, crop top, left, target h, w)."""
        return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)

    def denoiser_kwargs(self, cond, micro=None):
        time_ids = micro.to(cond["pooled"].device, cond["pooled"].dtype)
        return {"encoder_hidden_states": cond["hidden"],
                "added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": time_ids}}


CONDITIONING = SDXLConditioning()


def _time_embed_dim(configs: dict) -> None:
    """The size/crop embedding's input is the pooled text (CLIP-G's projection width) and 6 time embeddings."""
    te2 = configs["text_encoder_2"]
    pooled = te2.get("projection_dim", te2["hidden_size"])
    configs["unet"]["addition_time_embed_dim"] = (configs["unet"]["projection_class_embeddings_input_dim"]
                                                  - pooled) // 6


SINGLE_FILE = LdmFile("sdxl", "SDXL (conditioner.embedders.0/1)",
                      (Encoder("text_encoder", "conditioner.embedders.0.transformer.text_model."),
                       Encoder("text_encoder_2", "conditioner.embedders.1.model.", openclip=True, projection=True)),
                      derive=_time_embed_dim)
