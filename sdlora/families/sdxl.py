"""SDXL: two CLIP encoders (penultimate layers concatenated), the pooled OpenCLIP-G embedding, and the size/crop
micro-conditioning of each image. Here too: its single files (the SGM layout, `ldm.py`) and random-weight models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ConfigError
from .ldm import Encoder, LdmFile
from .naming import sgm_namer
from .sd import CLIP_IDS, SD15, TINY, Conditioning, KohyaBlocks, build_components, tokenize


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


# ---------------------------------------------------------------- random-weight models

TINY_XL = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
              transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
              cross_attention_dim=64, norm_num_groups=8),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=77, projection_dim=32),
)


def save_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0,
                            words: tuple[str, ...] = ("a", "photo", "of", "dog", "cat", "sks", "red", "blue")) -> Path:
    """Save a tiny SDXL-shaped pipeline (two text encoders, size/crop conditioning) as a diffusers folder."""
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..tokenizers import write_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_XL["unet"])
    vae = build_components(TINY, seed)["vae"]
    text_cfg = CLIPTextConfig(vocab_size=600, bos_token_id=0, eos_token_id=2, pad_token_id=1, **TINY_XL["text"])
    te1, te2 = CLIPTextModel(text_cfg), CLIPTextModelWithProjection(text_cfg)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_tok", words))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    return folder


SDXL_BASE = dict(
    unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, projection_dim=768),
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"),
)


def build_sdxl_components(spec: dict = SDXL_BASE, seed: int = 0) -> dict:
    """Random-weight SDXL-shaped components (full size by default): unet, vae, text_encoder, text_encoder_2."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    parts = {"unet": UNet2DConditionModel(**spec["unet"]), "vae": build_components(SD15, seed)["vae"]}
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**CLIP_IDS, **spec["text"]))
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_IDS, **spec["text_2"]))
    parts["scheduler"] = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="leading", steps_offset=1)
    return parts


def full_size(seed: int = 0, **_) -> dict:
    """SDXL-base-sized random-weight parts (the benchmark's)."""
    return build_sdxl_components(seed=seed)


def full_size_configs(**_) -> dict:
    """The configs of `full_size`'s unet, vae and text encoders, as dicts (nothing is allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SDXL_BASE["unet"]), AutoencoderKL(**SD15["vae"])
    return {"unet": dict(unet.config), "vae": dict(vae.config),
            "text_encoder": CLIPTextConfig(**CLIP_IDS, **SDXL_BASE["text"]).to_dict(),
            "text_encoder_2": CLIPTextConfig(**CLIP_IDS, **SDXL_BASE["text_2"]).to_dict()}
