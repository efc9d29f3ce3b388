"""Load a base model (diffusers folder, hub id or single file) into its parts, frozen."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .families import FAMILIES, Family, detect_family


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training and the tools need, as loaded (never wrapped)."""

    family: Family
    source: str                  # folder, hub id or file it came from
    denoiser: torch.nn.Module    # the UNet
    vae: torch.nn.Module
    tokenizers: list             # one per text encoder, in the family's order
    text_encoders: list[torch.nn.Module]
    noise_scheduler: object      # training's DDPM-style scheduler
    sample_scheduler: object     # the model's own scheduler, for sampling

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE's down-sampling times the denoiser's."""
        return self.vae_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    @property
    def name(self) -> str:
        return Path(self.source.rstrip("/")).name or self.source

    def pipeline(self, denoiser: torch.nn.Module | None = None, text_encoders: list | None = None):
        """The family's diffusers pipeline sharing these modules (no copies); `denoiser` / `text_encoders`
        replace the loaded ones (e.g. the trainer's unwrapped models)."""
        import diffusers

        fam = self.family
        parts = {fam.denoiser_attr: denoiser or self.denoiser, "vae": self.vae, "scheduler": self.sample_scheduler,
                 **fam.pipeline_extra}
        for slot, tok, enc in zip(fam.text_encoders, self.tokenizers, text_encoders or self.text_encoders):
            parts[slot.attr], parts[slot.tokenizer_attr] = enc, tok
        return getattr(diffusers, fam.pipeline_class)(**parts)

    def model_hash(self) -> str:
        """sha256 of the denoiser's weights file(s) (A1111 shows the first 10 hex digits), or '' when unknown."""
        src = Path(self.source)
        files = [src] if src.is_file() else \
            sorted(src.glob(f"{self.family.denoiser_attr}/*.safetensors")) if src.is_dir() else []
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


def _folder_family(source: str) -> Family:
    """The family of a diffusers folder or hub id, from its model_index.json and denoiser config."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    if Path(source).is_dir() and not (Path(source) / "unet").is_dir():
        raise ModelError(f"{source} is not a diffusers model folder (it has no unet/ subfolder)")
    try:
        index = DiffusionPipeline.load_config(source)
        unet = UNet2DConditionModel.load_config(source, subfolder="unet")
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise ModelError(f"{source} is not a diffusers model folder: {str(e).splitlines()[0]}") from None
        raise ModelError(f"could not load '{source}': not a local folder, and the hub is not reachable or has "
                         "no such model; pass a local diffusers folder") from None
    return detect_family(unet, {k for k, v in index.items() if isinstance(v, (list, tuple)) and v[0]})


def load_components(source: str, prediction_type: str = "auto") -> Components:
    """Tokenizers, text encoders, VAE, denoiser and schedulers of a diffusers folder, a hub id or a single file."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler

    source = str(source)
    if Path(source).is_file():  # one original-layout checkpoint (.safetensors), loaded offline
        from .single_file import detect_checkpoint, load_single_file

        parts = load_single_file(source, prediction_type)
        family = FAMILIES[detect_checkpoint(source).family]
        sample_scheduler = parts["scheduler"]
    else:
        family = _folder_family(source)
        parts = {"vae": _from_pretrained(AutoencoderKL, source, "vae"),
                 family.denoiser_attr: _from_pretrained(getattr(diffusers, family.denoiser_class), source,
                                                        family.denoiser_attr)}
        for slot in family.text_encoders:
            parts[slot.tokenizer_attr] = _from_pretrained(transformers.CLIPTokenizer, source, slot.tokenizer_attr)
            parts[slot.attr] = _from_pretrained(getattr(transformers, slot.model_class), source, slot.attr)
        sample_scheduler = _load_scheduler(source)
        if prediction_type != "auto":
            sample_scheduler = type(sample_scheduler).from_config(sample_scheduler.config,
                                                                  prediction_type=prediction_type)
    noise_scheduler = DDPMScheduler.from_config(sample_scheduler.config)
    return freeze(Components(family, source, parts[family.denoiser_attr], parts["vae"],
                             [parts[s.tokenizer_attr] for s in family.text_encoders],
                             [parts[s.attr] for s in family.text_encoders], noise_scheduler, sample_scheduler))


def freeze(c: Components) -> Components:
    """Base weights never train: no gradients, eval mode."""
    for module in (*c.text_encoders, c.vae, c.denoiser):
        module.requires_grad_(False)
        module.eval()
    return c


def _load_scheduler(source: str):
    import diffusers
    from diffusers import DDIMScheduler

    try:
        cfg_path = Path(source) / "scheduler" / "scheduler_config.json"
        if cfg_path.is_file():
            name = json.loads(cfg_path.read_text()).get("_class_name", "DDIMScheduler")
            cls = getattr(diffusers, name, DDIMScheduler)
            return cls.from_pretrained(source, subfolder="scheduler")
        return _from_pretrained(DDIMScheduler, source, "scheduler")
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable scheduler config
        raise ModelError(f"{source}: cannot read scheduler config: {e}") from None


def load_model(model: str | Path | None, allow_pickle: bool = False) -> Components:
    """Components of a base model for the tools: a diffusers folder (empty: the built-in model), a hub id, or a
    single-file checkpoint read offline (`.safetensors`; `.ckpt` only with allow_pickle, read with weights_only)."""
    import tempfile

    from .paths import default_model_path
    from .single_file import PICKLES, ckpt_to_safetensors

    model = str(model or default_model_path())
    p = Path(model)
    if p.is_file() and p.suffix.lower() in PICKLES:
        if not allow_pickle:
            raise ModelError(f"{p} is a pickle checkpoint; pass --allow-pickle to read it (weights only) or "
                             "use a .safetensors file")
        with tempfile.TemporaryDirectory() as tmp:
            c = load_components(str(ckpt_to_safetensors(p, Path(tmp) / f"{p.stem}.safetensors")))
            c.source = str(p)
            return c
    return load_components(model)
