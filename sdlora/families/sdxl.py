"""SDXL: two CLIP encoders (penultimate layers concatenated), the pooled OpenCLIP-G embedding, and the size/crop
micro-conditioning of each image."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import ConfigError
from .naming import sgm_namer
from .sd import Conditioning, KohyaBlocks, tokenize


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


_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_SGM_FIRST = {"input_blocks": (1, 9), "middle_block": (10, 3), "output_blocks": (13, 9)}  # first entry, how many
_OUTSIDE = {"time_embedding": 0, "add_embedding": 0, "conv_in": 1, "conv_norm_out": 22, "conv_out": 22}


def sdxl_block_index(path: str, config: Mapping) -> int | None:
    """sd-scripts' SDXL index from the original (SGM) name of the layer: the time and label embeddings are 0,
    input_blocks.N is 1 + N, middle_block.N is 10 + N, output_blocks.N is 13 + N, the output layers 22."""
    top = path.split(".")[0]
    if top in _OUTSIDE:
        return _OUTSIDE[top]
    m = _SGM_BLOCK.match(sgm_namer(config)(path))
    if not m:
        return None
    first, count = _SGM_FIRST[m[1]]
    if int(m[2]) >= count:
        raise ConfigError(f"{path} has no place in sd-scripts' SDXL block list ({m[1]} 0-{count - 1}); use "
                          "network_reg_dims / network_reg_lrs for this UNet")
    return first + int(m[2])


SDXL_BLOCKS = KohyaBlocks(("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("MID00", "MID01", "MID02")
                          + tuple(f"OUT{i:02d}" for i in range(9)) + ("OUT",), down=9, mid=3, up=9, ends=1,
                          index=sdxl_block_index)
