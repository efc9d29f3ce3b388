"""The model families sdlora trains, as one table of facts; code outside the family modules asks the table.

A family row says which diffusers pipeline and denoiser it uses, its text encoders (with the key prefixes LoRA files
give them and the names their token embeddings travel under), how kohya names its denoiser's layers, the LoRA target
presets, the kohya/ModelSpec labels of its files, and how a diffusers folder is recognised. What a family computes
differently (its text conditioning) lives in the family's own module (`sd`, `sdxl`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import sd, sdxl
from .sd import Conditioning


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family and the names it goes by."""

    attr: str             # pipeline attribute: text_encoder, text_encoder_2
    tokenizer_attr: str   # tokenizer, tokenizer_2
    model_class: str      # transformers class
    kohya_prefix: str     # lora_te (SD1/SD2), lora_te1 / lora_te2 (SDXL)
    embedding_key: str    # what its token embeddings are called in embedding files: clip_l, clip_g


_ATTN = r"attn{n}\.(to_q|to_k|to_v|to_out\.0)"
UNET_TARGETS = {
    "cross_attn": (_ATTN.format(n="2"),),
    "attn": (_ATTN.format(n="[12]"),),
    "attn_ff": (_ATTN.format(n="[12]"), r"ff\.net\.(0\.proj|2)"),
    "all": (_ATTN.format(n="[12]"), r"ff\.net\.(0\.proj|2)", r"attentions\.\d+\.proj_(in|out)",
            r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)", r"(down|up)samplers\.0\.conv"),
}
CLIP_TARGETS = (r"self_attn\.(q|k|v|out)_proj", r"mlp\.fc[12]")


@dataclass(frozen=True)
class Family:
    name: str                        # sd1 | sd2 | sdxl
    title: str
    pipeline_class: str              # diffusers pipeline
    denoiser_class: str              # diffusers model of the denoiser
    text_encoders: tuple[TextEncoderSlot, ...]
    default_resolution: int
    ss_version: str                  # kohya's ss_base_model_version (epsilon)
    architecture: str                # modelspec.architecture of a LoRA (epsilon)
    conditioning: Conditioning       # the family's own text/size conditioning
    matches: Callable[[dict, set], bool]  # (denoiser config, parts of the folder) -> is this family
    v_architecture: str = ""         # modelspec.architecture for v-prediction, where it differs
    is_v2: bool = False              # kohya's ss_v2
    denoiser_attr: str = "unet"      # pipeline attribute and subfolder of the denoiser
    kohya_naming: str = "diffusers"  # how kohya names denoiser layers: diffusers paths, or sgm (original names)
    targets: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: UNET_TARGETS)
    text_targets: tuple[str, ...] = CLIP_TARGETS
    pipeline_extra: Mapping[str, object] = field(default_factory=dict)  # constructor arguments of the pipeline
    # the denoiser config that names every layer a LoRA for this family may have: a shipped config (assets/<name>)
    # with these overrides (SD1/SD2: 3 layers per block, a superset of their block names)
    reference_overrides: Mapping[str, object] = field(default_factory=dict)

    def ss_base_model_version(self, prediction_type: str) -> str:
        """kohya's label; SD1/SD2 v-prediction models add '_v'."""
        return self.ss_version + ("_v" if prediction_type == "v_prediction" and self.name in ("sd1", "sd2") else "")

    def modelspec_architecture(self, prediction_type: str) -> str:
        return self.v_architecture if prediction_type == "v_prediction" and self.v_architecture else \
            self.architecture


def _clip(attr: str, tokenizer: str, prefix: str, key: str, cls: str = "CLIPTextModel") -> TextEncoderSlot:
    return TextEncoderSlot(attr, tokenizer, cls, prefix, key)


_SD_EXTRA = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", "UNet2DConditionModel",
           (_clip("text_encoder", "tokenizer", "lora_te1", "clip_l"),
            _clip("text_encoder_2", "tokenizer_2", "lora_te2", "clip_g", "CLIPTextModelWithProjection")),
           1024, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", sdxl.CONDITIONING,
           matches=lambda cfg, parts: "text_encoder_2" in parts or cfg.get("addition_embed_type") == "text_time",
           kohya_naming="sgm"),
    Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", "UNet2DConditionModel",
           (_clip("text_encoder", "tokenizer", "lora_te", "clip_l"),),
           768, "sd_v2", "stable-diffusion-v2-512/lora", sd.CONDITIONING,
           matches=lambda cfg, parts: cfg.get("cross_attention_dim") == 1024,
           v_architecture="stable-diffusion-v2-768-v/lora", is_v2=True, pipeline_extra=_SD_EXTRA,
           reference_overrides={"layers_per_block": 3}),
    Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", "UNet2DConditionModel",
           (_clip("text_encoder", "tokenizer", "lora_te", "clip_l"),),
           512, "sd_v1", "stable-diffusion-v1/lora", sd.CONDITIONING,
           matches=lambda cfg, parts: True, pipeline_extra=_SD_EXTRA, reference_overrides={"layers_per_block": 3}),
)}


def detect_family(denoiser_config: dict, parts: set[str] | frozenset = frozenset()) -> Family:
    """The first family (in table order) whose rule accepts this denoiser config and set of pipeline parts."""
    return next(f for f in FAMILIES.values() if f.matches(dict(denoiser_config), set(parts)))


def family_of_pipeline(pipe) -> Family:
    """The family of a diffusers pipeline object (SD1 and SD2 share a pipeline and their text-encoder slots)."""
    name = type(pipe).__name__
    found = [f for f in FAMILIES.values() if f.pipeline_class == name]
    if not found:
        from ..errors import ModelError

        raise ModelError(f"{name} is not a pipeline of a family sdlora supports")
    return found[-1]
