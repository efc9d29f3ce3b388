"""SD 1.x and 2.x: the UNet is conditioned on one CLIP encoder's last hidden states (SD1: OpenAI's CLIP-L, SD2:
OpenCLIP-H, which its single files keep in OpenCLIP's own layout). Here too: how their single files (the LDM layout,
`ldm.py`) differ, and their random-weight models (SD2's full-size one is SD 1.5-shaped)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
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

    def frozen_text(self, model, tokenizer, denoiser_config: dict, length: int):
        """The part of the conditioning a frozen encoder makes (the family's frozen_encoders): none here."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen text encoder")

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


# ---------------------------------------------------------------- random-weight models

CLIP_IDS = dict(vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # CLIP's vocabulary, as configs

TINY = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
              norm_num_groups=8),
    vae=dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
             up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=77),
)

SD15 = dict(
    unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, norm_num_groups=32, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             layers_per_block=2),
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77),
)


def build_components(spec: dict = TINY, seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Random-weight SD-1-shaped components (unet, vae, text_encoder, tokenizer-less) from a size spec."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_cfg = CLIPTextConfig(vocab_size=49408 if spec is SD15 else 600, bos_token_id=0, eos_token_id=2,
                              pad_token_id=1, projection_dim=spec["text"]["hidden_size"], **spec["text"])
    text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def save_tiny_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                       words: tuple[str, ...] = ("a", "photo", "of", "dog", "cat", "sks", "red", "blue")) -> Path:
    """Save a tiny SD-1-shaped pipeline (random weights) as a diffusers folder, loadable offline."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..tokenizers import write_tokenizer

    folder = Path(folder)
    parts = build_components(TINY, seed, prediction_type)
    tok_dir = write_tokenizer(folder / "_tok", words)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tokenizer) <= parts["text_encoder"].config.vocab_size
    pipe = StableDiffusionPipeline(tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return folder


def full_size(seed: int = 0, **_) -> dict:
    """SD 1.5-sized random-weight parts (the benchmark's)."""
    return build_components(SD15, seed)


def full_size_configs(**_) -> dict:
    """The configs of `full_size`'s unet, vae and text encoder, as dicts (nothing is allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15["unet"]), AutoencoderKL(**SD15["vae"])
    text = CLIPTextConfig(**CLIP_IDS, projection_dim=SD15["text"]["hidden_size"], **SD15["text"])
    return {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": text.to_dict()}
