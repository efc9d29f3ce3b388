"""SD 1.x and 2.x: the UNet is conditioned on one CLIP encoder's last hidden states."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..errors import ConfigError


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


# ---------------------------------------------------------------- kohya's UNet blocks

@dataclass(frozen=True)
class KohyaBlocks:
    """sd-scripts' numbering of a UNet's blocks (networks/lora.py `get_block_index`), which `block_dims`,
    `block_alphas`, `conv_block_dims` and `conv_block_alphas` list entry by entry, and whose learning-rate weights
    come as `down_lr_weight` (`down` entries), `mid_lr_weight` (`mid`) and `up_lr_weight` (`up`), with `ends` entries
    of weight 1 before and after them (SDXL's time embedding and output, which never carry LoRA)."""

    names: tuple[str, ...]             # one per entry, as users call the blocks (IN00 ... OUT11)
    down: int
    mid: int
    up: int
    ends: int
    index: Callable[[str, Mapping], int | None]  # (diffusers module path, UNet config) -> entry; None: no block


def _names(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(n))


_UPDOWN = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def sd_block_index(path: str, config: Mapping) -> int | None:
    """sd-scripts' SD 1.x/2.x index from the diffusers path: down_blocks.i's j-th resnet or attention is IN(3i + j + 1)
    (its down-sampler IN(3i + 3)), the mid block is 12, up_blocks.i's j-th is 13 + 3i + j (its up-sampler
    13 + 3i + 2). The 25 entries are IN00-IN11 (IN00, the input conv, never has LoRA), MID, OUT00-OUT11."""
    if path.startswith("mid_block."):
        return 12
    m = _UPDOWN.match(path)
    if not m:
        return None
    i, j = int(m[2]), 2 if m[3].endswith("samplers") else int(m[4])
    if i > 3 or j > 2:
        raise ConfigError(f"{path} has no place in sd-scripts' block list (4 levels of up to 3 layers: SD 1.x/2.x); "
                          "use network_reg_dims / network_reg_lrs for this UNet")
    return (1 if m[1] == "down" else 13) + 3 * i + j


SD_BLOCKS = KohyaBlocks(_names("IN", 12) + ("MID",) + _names("OUT", 12), down=12, mid=1, up=12, ends=0,
                        index=sd_block_index)
