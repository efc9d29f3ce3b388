"""Load a base model (diffusers folder, hub id or single file) into its parts, frozen."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, ModelError
from .families import FAMILIES, Family, folder_family


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training and the tools need, as loaded (never wrapped)."""

    family: Family
    source: str                  # folder, hub id or file it came from
    denoiser: torch.nn.Module    # the UNet (SD1/SD2/SDXL) or the transformer (SD3)
    vae: torch.nn.Module
    tokenizers: list             # one per text encoder, in the family's order
    text_encoders: list[torch.nn.Module]
    noise_scheduler: object      # training's scheduler: DDPM-style, or FlowMatch (SD3)
    sample_scheduler: object     # the model's own scheduler, for sampling
    frozen_text: list = field(default_factory=list)  # the family's frozen_encoders as the conditioning takes them
    # (SD3: a T5Text, its model possibly None: --no-t5, or released once every caption is cached)

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction, or flow (SD3's flow matching)."""
        return self.noise_scheduler.config.get("prediction_type") or "flow"

    @property
    def conditioning_encoders(self) -> list:
        """What the family's Conditioning.encode takes: the text encoders, then the frozen parts."""
        return [*self.text_encoders, *self.frozen_text]

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE's down-sampling times the denoiser's (a UNet's levels, a
        transformer's patch)."""
        cfg = self.denoiser.config
        down = 2 ** (len(cfg.block_out_channels) - 1) if "block_out_channels" in cfg else cfg.patch_size
        return self.vae_factor * down

    @property
    def max_side(self) -> int | None:
        """The largest image side the denoiser takes: an SD3 transformer crops its position embedding from a grid of
        pos_embed_max_size patches a side (diffusers' PatchEmbed raises beyond it); None for UNets (any size)."""
        grid = self.denoiser.config.get("pos_embed_max_size")
        return grid * self.size_multiple if grid else None

    def check_size(self, width: int, height: int, what: str, fix: str) -> None:
        """A one-line ConfigError when an image of width x height is larger than the denoiser takes."""
        most = self.max_side
        if most and max(width, height) > most:
            raise ConfigError(f"{what} {width}x{height} is larger than {self.family.title} takes: at most {most} px "
                              f"a side (its position embedding); {fix}")

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
        for slot, frozen in zip(fam.frozen_encoders, self.frozen_text):
            parts[slot.attr], parts[slot.tokenizer_attr] = frozen.model, frozen.tokenizer if frozen.model else None
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


def _tokenizer(cls, source: str, subfolder: str, family: Family):
    """A folder's tokenizer, checked: transformers builds an empty tokenizer from a missing or empty folder without a
    word, which then fails deep inside tokenization (OverflowError: int too big to convert)."""
    folder = Path(source) / subfolder
    copy = (f"copy the {subfolder}/ folder of the {family.title} model it was made from into {folder} (the "
            "tokenizer does not change when a model is fine-tuned)")
    if Path(source).is_dir() and not (folder.is_dir() and any(folder.iterdir())):
        raise ModelError(f"{source} has no {subfolder}/ folder{' (it is empty)' if folder.is_dir() else ''}: {copy}")
    tok = _from_pretrained(cls, source, subfolder)
    if len(tok) < 2:
        raise ModelError(f"{folder} holds no vocabulary ({len(tok)} tokens): {copy}")
    if subfolder != "tokenizer_3" and not 0 < tok.model_max_length < 10**5:  # CLIP's is 77; T5's is passed along
        raise ModelError(f"{folder} does not say how many tokens a prompt has (model_max_length); add "
                         '"model_max_length": 77 to its tokenizer_config.json, or ' + copy)
    return tok


def load_components(source: str, prediction_type: str = "auto", *, text_encoders: str = "",
                    t5: bool | None = True, t5_length: int = 256, dtype: torch.dtype | None = None) -> Components:
    """Tokenizers, text encoders, VAE, denoiser and schedulers of a diffusers folder, a hub id or a single file.

    SD3: `text_encoders` is where a single file's missing encoders come from; `t5` False leaves T5 out (zero T5
    embeddings of `t5_length` tokens), True needs it (a model without T5 is an error saying --no-t5), None takes it
    where the model has it (the tools). `dtype` loads the denoiser and text encoders in the training precision (T5
    only in bf16, as fp16 overflows it; the VAE stays fp32), so an 8B model does not pass through fp32 in memory."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL

    source = str(source)
    if Path(source).is_file():  # one original-layout checkpoint (.safetensors), loaded offline
        from .single_file import detect_checkpoint, load_single_file

        parts = load_single_file(source, prediction_type, text_encoders=text_encoders, t5=t5, dtype=dtype)
        family = FAMILIES[detect_checkpoint(source).family]
        sample_scheduler = parts["scheduler"]
    else:
        family = folder_family(source)
        as_dtype = {"torch_dtype": dtype} if dtype is not None else {}
        parts = {"vae": _from_pretrained(AutoencoderKL, source, "vae"),
                 family.denoiser_attr: _from_pretrained(getattr(diffusers, family.denoiser_class), source,
                                                        family.denoiser_attr, **as_dtype)}
        for slot in family.text_encoders:
            parts[slot.tokenizer_attr] = _tokenizer(getattr(transformers, slot.tokenizer_class), source,
                                                    slot.tokenizer_attr, family)
            parts[slot.attr] = _from_pretrained(getattr(transformers, slot.model_class), source, slot.attr,
                                                **({"dtype": dtype} if dtype is not None else {}))
        for slot in family.frozen_encoders if t5 is not False else ():
            if not (Path(source) / slot.attr).is_dir() and Path(source).is_dir():
                if t5 is None:
                    continue
                raise ModelError(f"{source} has no {slot.attr}/ (T5): pass --no-t5 to train with zero T5 embeddings")
            parts[slot.tokenizer_attr] = _tokenizer(transformers.AutoTokenizer, source, slot.tokenizer_attr, family)
            parts[slot.attr] = _from_pretrained(getattr(transformers, slot.model_class), source, slot.attr,
                                                **({"dtype": dtype} if dtype == torch.bfloat16 else {}))
        sample_scheduler = _load_scheduler(source)
    noise_scheduler, sample_scheduler = training_scheduler(sample_scheduler, prediction_type, family)
    denoiser = parts[family.denoiser_attr]
    frozen = [frozen_text(family, parts.get(s.attr), parts.get(s.tokenizer_attr), denoiser.config, t5_length)
              for s in family.frozen_encoders]
    return freeze(Components(family, source, denoiser, parts["vae"],
                             [parts[s.tokenizer_attr] for s in family.text_encoders],
                             [parts[s.attr] for s in family.text_encoders], noise_scheduler, sample_scheduler, frozen))


def frozen_text(family: Family, model, tokenizer, denoiser_config, length: int):
    """The conditioning's frozen text part (SD3: a T5Text of `length` tokens at the transformer's joint width, from
    the denoiser's config); `model` None: none is loaded."""
    return family.conditioning.frozen_text(model, tokenizer, denoiser_config, length)


def training_scheduler(sample_scheduler, prediction_type: str, family: Family):
    """(training scheduler, sampling scheduler): a FlowMatch model trains on a copy of its own scheduler (flow
    matching, nothing to override); every other on a DDPMScheduler of the same betas, with `prediction_type`
    ('auto': the model's) applied to both."""
    from diffusers import DDPMScheduler

    if type(sample_scheduler).__name__.startswith("FlowMatch"):
        if prediction_type not in ("auto", "flow"):
            raise ConfigError(f"model.prediction_type {prediction_type}: {family.title} models train by flow "
                              "matching; leave it auto")
        return type(sample_scheduler).from_config(sample_scheduler.config), sample_scheduler
    if prediction_type != "auto":
        sample_scheduler = type(sample_scheduler).from_config(sample_scheduler.config, prediction_type=prediction_type)
    return DDPMScheduler.from_config(sample_scheduler.config), sample_scheduler


def freeze(c: Components) -> Components:
    """Base weights never train: no gradients, eval mode."""
    frozen = [f.model for f in c.frozen_text if f.model is not None]
    for module in (*c.text_encoders, *frozen, c.vae, c.denoiser):
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


def load_model(model: str | Path | None, allow_pickle: bool = False, text_encoders: str = "",
               t5: bool | None = None) -> Components:
    """Components of a base model for the tools: a diffusers folder (empty: the built-in model), a hub id, or a
    single-file checkpoint read offline (`.safetensors`; `.ckpt` only with allow_pickle, read by `pickles.read_pickle`).
    SD3: `text_encoders` for a single file without them; T5 where the model has it unless `t5` is False."""
    import tempfile

    from .paths import default_model_path
    from .single_file import PICKLES, ckpt_to_safetensors

    model = str(model or default_model_path())
    p = Path(model)
    if p.is_file() and p.suffix.lower() in PICKLES:
        if not allow_pickle:
            raise ModelError(f"{p} is a pickle checkpoint; pass --allow-pickle to read its weights (no code in it "
                             "runs) or use a .safetensors file")
        with tempfile.TemporaryDirectory() as tmp:
            c = load_components(str(ckpt_to_safetensors(p, Path(tmp) / f"{p.stem}.safetensors")),
                                text_encoders=text_encoders, t5=t5)
            c.source = str(p)
            return c
    return load_components(model, text_encoders=text_encoders, t5=t5)
