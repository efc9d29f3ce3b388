"""What the UNet is conditioned on, per family: CLIP hidden states (SD1/SD2), plus the pooled OpenCLIP-G
embedding and the size/crop micro-conditioning (SDXL)."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode(family: str, tokenizers: list, encoders: list, captions: list[str], device) -> dict[str, torch.Tensor]:
    """{'hidden': [B, S, D]} for SD1/SD2; SDXL adds 'pooled': [B, P] and uses both encoders' penultimate layers."""
    if family != "sdxl":
        return {"hidden": encoders[0](tokenize(tokenizers[0], captions, device), return_dict=False)[0]}
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, encoders):
        out = enc(tokenize(tok, captions, device), output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}


def time_ids(original_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w)."""
    return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)


def unet_kwargs(cond: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments of UNet2DConditionModel.forward for a conditioning dict."""
    kw = {"encoder_hidden_states": cond["hidden"]}
    if "pooled" in cond:
        kw["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    return kw
