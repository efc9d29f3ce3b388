"""Load a base model (local diffusers folder or hub id) into its parts, frozen, on a device and dtype."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelError
from .families import Family, detect_family


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training needs."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object      # DDPM-style scheduler for training
    sample_scheduler: object     # the model's own scheduler, for sampling
    family: Family
    source: str
    extra: dict = field(default_factory=dict)  # tokenizer_2 / text_encoder_2 for SDXL

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def name(self) -> str:
        return Path(self.source.rstrip("/")).name or self.source

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.extra["text_encoder_2"]] if "text_encoder_2" in self.extra else [])

    def pipeline(self, unet: torch.nn.Module | None = None, text_encoders: list | None = None):
        """A StableDiffusion(XL)Pipeline sharing these modules (no copies)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        encoders = text_encoders or self.text_encoders
        common = dict(vae=self.vae, text_encoder=encoders[0], tokenizer=self.tokenizer, unet=unet or self.unet,
                      scheduler=self.sample_scheduler)
        if self.family.name == "sdxl":
            return StableDiffusionXLPipeline(text_encoder_2=encoders[1], tokenizer_2=self.extra["tokenizer_2"],
                                             **common)
        return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **common)

    def model_hash(self) -> str:
        """sha256 of the UNet weights file (first 10 hex digits shown by A1111), or '' when unknown."""
        files = sorted(Path(self.source).glob("unet/*.safetensors")) if Path(self.source).is_dir() else []
        if Path(self.source).is_file():
            files = [Path(self.source)]
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        return h.hexdigest() if files else ""


def _from_pretrained(cls, source: str, subfolder: str, **kw):
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kw)
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise ModelError(f"{source} is not a diffusers model folder (no usable '{subfolder}/'): "
                             f"{str(e).splitlines()[0]}") from None
        raise ModelError(f"could not load '{source}' ({subfolder}): not a local folder, and the hub is not "
                         "reachable or has no such model; pass a local diffusers folder") from None


def load_components(source: str, prediction_type: str = "auto") -> Components:
    """Load tokenizer, text encoders, VAE, UNet and schedulers from a diffusers folder, a hub id or a single file."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = str(source)
    if Path(source).is_file():  # one original-layout checkpoint (.safetensors), loaded offline
        from .families import FAMILIES
        from .single_file import detect_checkpoint, load_single_file

        parts = load_single_file(source, prediction_type)
        extra = {k: parts[k] for k in ("tokenizer_2", "text_encoder_2") if k in parts}
        return freeze(Components(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                                 DDPMScheduler.from_config(parts["scheduler"].config), parts["scheduler"],
                                 FAMILIES[detect_checkpoint(source).family], source, extra))
    if Path(source).is_dir() and not (Path(source) / "unet").is_dir():
        raise ModelError(f"{source} is not a diffusers model folder (it has no unet/ subfolder)")
    tokenizer = _from_pretrained(CLIPTokenizer, source, "tokenizer")
    text_encoder = _from_pretrained(CLIPTextModel, source, "text_encoder")
    vae = _from_pretrained(AutoencoderKL, source, "vae")
    unet = _from_pretrained(UNet2DConditionModel, source, "unet")
    sample_scheduler = _load_scheduler(source)
    overrides = {} if prediction_type == "auto" else {"prediction_type": prediction_type}
    noise_scheduler = DDPMScheduler.from_config(sample_scheduler.config, **overrides)
    if overrides:
        sample_scheduler = type(sample_scheduler).from_config(sample_scheduler.config, **overrides)
    family = detect_family(dict(unet.config), has_second_text_encoder=(Path(source) / "text_encoder_2").is_dir())
    extra = {}
    if family.name == "sdxl":
        from transformers import CLIPTextModelWithProjection

        extra = {"tokenizer_2": _from_pretrained(CLIPTokenizer, source, "tokenizer_2"),
                 "text_encoder_2": _from_pretrained(CLIPTextModelWithProjection, source, "text_encoder_2")}
    return freeze(Components(tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler, family,
                             source, extra))


def freeze(c: Components) -> Components:
    """Base weights never train: no gradients, eval mode."""
    for module in (*c.text_encoders, c.vae, c.unet):
        module.requires_grad_(False)
        module.eval()
    return c


def _load_scheduler(source: str):
    import json

    from diffusers import DDIMScheduler
    import diffusers

    try:
        cfg_path = Path(source) / "scheduler" / "scheduler_config.json"
        if cfg_path.is_file():
            cls = getattr(diffusers, json.loads(cfg_path.read_text()).get("_class_name", "DDIMScheduler"), DDIMScheduler)
            return cls.from_pretrained(source, subfolder="scheduler")
        return _from_pretrained(DDIMScheduler, source, "scheduler")
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable scheduler config
        raise ModelError(f"{source}: cannot read scheduler config: {e}") from None
