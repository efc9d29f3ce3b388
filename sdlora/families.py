"""The Stable Diffusion family facts, as data: one table, one code path."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str                 # sd1 | sd2 | sdxl
    ss_version: str           # kohya's ss_base_model_version (epsilon)
    architecture: str         # modelspec.architecture of a LoRA (epsilon)
    default_resolution: int
    te_prefixes: tuple[str, ...]  # kohya prefixes, one per text encoder
    te_attrs: tuple[str, ...]     # pipeline attribute of each text encoder
    is_v2: bool = False

    def ss_base_model_version(self, prediction_type: str) -> str:
        if prediction_type == "v_prediction" and self.name in ("sd1", "sd2"):
            return self.ss_version + "_v"
        return self.ss_version

    def modelspec_architecture(self, prediction_type: str, resolution: int) -> str:
        if self.name == "sd2":
            return "stable-diffusion-v2-768-v/lora" if prediction_type == "v_prediction" else \
                "stable-diffusion-v2-512/lora"
        return self.architecture


FAMILIES = {
    "sd1": Family("sd1", "sd_v1", "stable-diffusion-v1/lora", 512, ("lora_te",), ("text_encoder",)),
    "sd2": Family("sd2", "sd_v2", "stable-diffusion-v2-512/lora", 768, ("lora_te",), ("text_encoder",), True),
    "sdxl": Family("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", 1024, ("lora_te1", "lora_te2"),
                   ("text_encoder", "text_encoder_2")),
}


def detect_family(unet_config: dict, has_second_text_encoder: bool) -> Family:
    """Tell SD1 / SD2 / SDXL apart from the UNet config (cross-attention width) and the text encoders."""
    if has_second_text_encoder or unet_config.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    if unet_config.get("cross_attention_dim") == 1024:
        return FAMILIES["sd2"]
    return FAMILIES["sd1"]
