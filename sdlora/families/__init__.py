"""The model families sdlora trains, as one table of facts; code outside the family modules asks the table.

A family row says which diffusers pipeline and denoiser it uses, its text encoders (with the key prefixes LoRA files
give them and the names their token embeddings travel under), how kohya names its denoiser's layers, the LoRA target
presets, the kohya/ModelSpec labels of its files and how a file's labels and layers tell it, how a diffusers folder
is recognised, its inpainting variant (a denoiser that also takes the mask and the masked image's latents), and what
it cannot train. What a family computes or reads differently (its text conditioning and how
its denoiser is called, its single-file checkpoints, its random-weight models) lives in the family's own module
(`sd`, `sdxl`, `sd3`); code outside this package asks the row, never a family's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, ModelError
from . import mmdit, sd, sd3, sdxl
from .checkpoint import SingleFileLayout, asset
from .naming import DIFFUSERS, SGM, KohyaNaming
from .sd import SD_BLOCKS, Conditioning, KohyaBlocks
from .sdxl import SDXL_BLOCKS


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family and the names it goes by."""

    attr: str             # pipeline attribute: text_encoder, text_encoder_2
    tokenizer_attr: str   # tokenizer, tokenizer_2
    model_class: str      # transformers class
    kohya_prefix: str     # lora_te (SD1/SD2), lora_te1 / lora_te2 (SDXL, SD3), lora_te3 (SD3's T5)
    embedding_key: str    # what its token embeddings are called in embedding files: clip_l, clip_g
    tokenizer_class: str = "CLIPTokenizer"
    kohya_aliases: tuple[str, ...] = ()  # prefixes other trainers give it (lora_te for the first of two encoders)


_ATTN = r"attn{n}\.(to_q|to_k|to_v|to_out\.0)"
UNET_TARGETS = {
    "cross_attn": (_ATTN.format(n="2"),),
    "attn": (_ATTN.format(n="[12]"),),
    "attn_ff": (_ATTN.format(n="[12]"), r"ff\.net\.(0\.proj|2)"),
    "all": (_ATTN.format(n="[12]"), r"ff\.net\.(0\.proj|2)", r"attentions\.\d+\.proj_(in|out)",
            r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)", r"(down|up)samplers\.0\.conv"),
}
CLIP_TARGETS = (r"self_attn\.(q|k|v|out)_proj", r"mlp\.fc[12]")
_JOINT = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DUAL = r"attn2\.(to_q|to_k|to_v|to_out\.0)"  # SD3.5 Medium's second (image-only) attention
_FF = r"ff(_context)?\.net\.(0\.proj|2)"
MMDIT_TARGETS = {
    "attn": (_JOINT, _DUAL),
    "attn_ff": (_JOINT, _DUAL, _FF),
    "all": (_JOINT, _DUAL, _FF, r"norm1(_context)?\.linear", r"context_embedder", r"pos_embed\.proj", r"proj_out",
            r"time_text_embed\.(timestep|text)_embedder\.linear_[12]", r"norm_out\.linear"),
}


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
    # how kohya names denoiser layers: after their diffusers paths, or SGM's (SDXL's original names). SD3's kohya files
    # use the original MMDiT names with q/k/v fused: a view of the file only (loras/mmdit), sdlora keys SD3's layers
    # by their diffusers paths
    kohya_naming: KohyaNaming = DIFFUSERS
    lora_names: Callable[[Iterable[str]], bool] | None = None  # layer names only this family's LoRAs have
    file_labels: tuple[str, ...] = ()    # prefixes of the ss_base_model_version / sdlora_family values naming it
    kohya_lora_module: str = ""          # sd-scripts' network module of a plain LoRA, where not networks.lora
    fused_file_layers: str = ""          # why its files fuse layers (it then trains plain LoRA only, which fuses)
    no_pivotal: str = ""                 # why it offers no pivotal tuning, where it does not
    targets: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: UNET_TARGETS)
    default_targets: str = "cross_attn"  # what lora.targets = auto means
    block_prefix: str = ""               # numbered blocks lora.blocks selects from (SD3: transformer_blocks)
    text_targets: tuple[str, ...] = CLIP_TARGETS
    # text encoders that never train and whose output is cached (SD3's T5), in pipeline order after text_encoders
    frozen_encoders: tuple[TextEncoderSlot, ...] = ()
    # (denoiser config) -> (ss_base_model_version, modelspec.architecture) where they depend on the model's variant
    variant: Callable[[dict], tuple[str, str]] | None = None
    diffusers_reads_kohya: bool = True   # diffusers' load_lora_weights converts this family's kohya files
    # which clients load this family's plain-LoRA files, per layout, where it is not the SD1/SDXL story (inspect)
    clients: Mapping[str, str] = field(default_factory=dict)
    # (denoiser config) -> layers a preset may match whose output the model discards (SD3: the last block's context
    # query, as that block keeps no context output): they never learn, so they get no LoRA
    unused_layers: Callable[[dict], set[str]] | None = None
    pipeline_extra: Mapping[str, object] = field(default_factory=dict)  # constructor arguments of the pipeline
    # the denoiser config that names every layer a LoRA for this family may have: a shipped config (assets/<name>)
    # with these overrides (SD1/SD2: 3 layers per block, a superset of their block names)
    reference_overrides: Mapping[str, object] = field(default_factory=dict)
    # sd-scripts' block list (block_dims, down/mid/up_lr_weight); None where sd-scripts has none (SD3)
    kohya_blocks: KohyaBlocks | None = None
    single_file: SingleFileLayout | None = None  # its single-file checkpoints (`sdlora.single_file` dispatches here)
    # random-weight models: a tiny one saved as a diffusers folder (the tests'), the full-size parts (the benchmark's:
    # (seed, **sizes) -> parts) and their configs without allocating anything ((**sizes) -> configs)
    save_tiny: Callable[..., object] | None = None
    full_size: Callable[..., dict] | None = None
    full_size_configs: Callable[..., dict] | None = None
    full_size_name: str = ""             # what a full-size random model is called (default random-<name>)
    # its inpainting variant (a UNet taking the mask and the masked image's latents beside the noisy latents): the
    # diffusers pipeline that runs it and the ModelSpec architecture of its LoRAs (OneTrainer's labels); "" for none
    inpaint_pipeline_class: str = ""
    inpaint_architecture: str = ""
    presets: str = ""                    # the `family` of its presets in sample_data/presets (SD 2.x takes SD 1.5's)
    hub_words: tuple[str, ...] = ()      # words in a hub id that name it, for a model not on this machine

    def ss_base_model_version(self, prediction_type: str, config=None) -> str:
        """kohya's label; SD1/SD2 v-prediction models add '_v'; SD3 names its variant (medium, 5-medium, 5-large)."""
        if self.variant is not None and config is not None:
            return self.variant(config)[0]
        return self.ss_version + ("_v" if prediction_type == "v_prediction" and self.name in ("sd1", "sd2") else "")

    def modelspec_architecture(self, prediction_type: str, config=None) -> str:
        if self.variant is not None and config is not None:
            return self.variant(config)[1]
        if config is not None and self.inpainting(config):
            return self.inpaint_architecture
        return self.v_architecture if prediction_type == "v_prediction" and self.v_architecture else \
            self.architecture

    def inpainting(self, config) -> bool:
        """Whether a denoiser of this config is the family's inpainting variant: besides the noisy latents it takes
        the mask and the masked image's latents (2 x latent + 1 input channels: SD's 9)."""
        inputs, latent = config.get("in_channels"), config.get("out_channels") or config.get("in_channels")
        return bool(self.inpaint_pipeline_class) and inputs == 2 * latent + 1

    def pipeline_name(self, config) -> str:
        """The diffusers pipeline that runs a model of this denoiser config (the inpainting one for that variant)."""
        return self.inpaint_pipeline_class if self.inpainting(config) else self.pipeline_class

    def check_channels(self, config, source: str) -> None:
        """A one-line ModelError for a denoiser that is neither text-to-image (as many input channels as output) nor
        the family's inpainting variant (instruct-pix2pix's 8, depth-to-image's 5, ...)."""
        inputs, latent = config.get("in_channels"), config.get("out_channels") or config.get("in_channels")
        if inputs == latent or self.inpainting(config):
            return
        inpainting = f" and {2 * latent + 1}-channel inpainting" if self.inpaint_pipeline_class else ""
        raise ModelError(f"{source}: its {self.denoiser_attr} takes {inputs} input channels (an instruct-pix2pix, "
                         f"depth or other image-conditioned model); sdlora trains {latent}-channel text-to-image"
                         f"{inpainting} {self.title} models")

    def target_patterns(self, name: str) -> tuple[str, ...]:
        """The layer patterns of a target preset (auto: the family's default); a preset the family has not is a
        one-line ConfigError."""
        name = self.resolved_targets(name)
        if name not in self.targets:
            why = " (its text and image meet in the joint attention: attn)" if name == "cross_attn" else ""
            raise ConfigError(f"lora.targets {name} is not a preset of {self.title}{why}; choose auto, "
                              f"{', '.join(self.targets)}")
        return self.targets[name]

    def resolved_targets(self, name: str) -> str:
        return self.default_targets if name == "auto" else name

    def reference_config(self) -> dict:
        """The denoiser config naming every layer a LoRA for this family may have: the shipped one with the
        reference overrides."""
        return {**asset(self.name, self.denoiser_attr), **self.reference_overrides}

    @property
    def context_width(self) -> int | None:
        """The width of the text its UNet attends to (the shipped config's cross_attention_dim); None for a joint
        transformer."""
        return asset(self.name, self.denoiser_attr).get("cross_attention_dim")

    def parts(self, denoiser, text_encoders, vae=None, frozen=()) -> dict:
        """{pipeline attribute: model} of a model's parts: the denoiser, the VAE where given, the text encoders, and
        the frozen encoders where given (in pipeline order)."""
        out = {self.denoiser_attr: denoiser, **({"vae": vae} if vae is not None else {})}
        out.update(zip([s.attr for s in self.text_encoders], text_encoders))
        out.update(zip([s.attr for s in self.frozen_encoders], frozen))
        return out

    def labelled(self, version: str) -> bool:
        """Whether a file's ss_base_model_version (or sdlora_family) names this family."""
        return version.startswith(self.file_labels)


def _clip(attr: str, tokenizer: str, prefix: str, key: str, cls: str = "CLIPTextModel",
          aliases: tuple[str, ...] = ()) -> TextEncoderSlot:
    return TextEncoderSlot(attr, tokenizer, cls, prefix, key, kohya_aliases=aliases)


_SD_EXTRA = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd3", "Stable Diffusion 3 / 3.5", "StableDiffusion3Pipeline", "SD3Transformer2DModel",
           (_clip("text_encoder", "tokenizer", "lora_te1", "clip_l", "CLIPTextModelWithProjection", ("lora_te",)),
            _clip("text_encoder_2", "tokenizer_2", "lora_te2", "clip_g", "CLIPTextModelWithProjection")),
           1024, "medium", "stable-diffusion-3-medium/lora", sd3.CONDITIONING,
           matches=lambda cfg, parts: cfg.get("_class_name") == "SD3Transformer2DModel" or "joint_attention_dim" in cfg,
           denoiser_attr="transformer", targets=MMDIT_TARGETS, default_targets="attn",
           block_prefix="transformer_blocks", variant=mmdit.variant, diffusers_reads_kohya=False,
           lora_names=mmdit.is_internal, kohya_lora_module="networks.lora_sd3",
           file_labels=("sd3", "medium", "5-medium", "5-large", "stable-diffusion-3"),
           fused_file_layers="its q/k/v are one fused layer in the files ComfyUI and Forge load",
           no_pivotal="T5 has no token to add",
           clients={"diffusers": "diffusers, ComfyUI; not Forge (sdlora convert --to kohya)",
                    "kohya": "ComfyUI, Forge, kohya sd-scripts; not diffusers, which loads no kohya SD3 file "
                             "(sdlora convert --to diffusers)"},
           unused_layers=mmdit.unused_layers,
           single_file=sd3.SINGLE_FILE, save_tiny=sd3.save_tiny_sd3_pipeline, full_size=sd3.full_size,
           full_size_configs=sd3.full_size_configs, full_size_name="random-sd3.5-medium",
           frozen_encoders=(TextEncoderSlot("text_encoder_3", "tokenizer_3", "T5EncoderModel", "lora_te3", "t5",
                                            "T5TokenizerFast"),),
           # every layer any SD3 variant has: 38 blocks (3.5 Large), attn2 in each (3.5 Medium has it in 0-12)
           reference_overrides={"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                                "dual_attention_layers": list(range(38)), "qk_norm": "rms_norm"},
           presets="sd3", hub_words=("diffusion-3", "sd3", "sd35")),
    Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", "UNet2DConditionModel",
           (_clip("text_encoder", "tokenizer", "lora_te1", "clip_l", aliases=("lora_te",)),
            _clip("text_encoder_2", "tokenizer_2", "lora_te2", "clip_g", "CLIPTextModelWithProjection")),
           1024, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", sdxl.CONDITIONING,
           matches=lambda cfg, parts: "text_encoder_2" in parts or cfg.get("addition_embed_type") == "text_time",
           kohya_naming=SGM, kohya_blocks=SDXL_BLOCKS, file_labels=("sdxl",), single_file=sdxl.SINGLE_FILE,
           inpaint_pipeline_class="StableDiffusionXLInpaintPipeline",
           inpaint_architecture="stable-diffusion-xl-v1-base-inpainting/lora",
           save_tiny=sdxl.save_tiny_sdxl_pipeline, full_size=sdxl.full_size, full_size_configs=sdxl.full_size_configs,
           presets="sdxl", hub_words=("xl",)),
    Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", "UNet2DConditionModel",
           (_clip("text_encoder", "tokenizer", "lora_te", "clip_l"),),
           768, "sd_v2", "stable-diffusion-v2-512/lora", sd.CONDITIONING,
           matches=lambda cfg, parts: cfg.get("cross_attention_dim") == 1024,
           v_architecture="stable-diffusion-v2-768-v/lora", is_v2=True, pipeline_extra=_SD_EXTRA,
           file_labels=("sd_v2", "sd2"), kohya_blocks=SD_BLOCKS,
           reference_overrides={"layers_per_block": 3}, single_file=sd.SD2_FILE,
           inpaint_pipeline_class="StableDiffusionInpaintPipeline",
           inpaint_architecture="stable-diffusion-v2-inpainting/lora",
           full_size=sd.full_size, full_size_configs=sd.full_size_configs, presets="sd1"),
    Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", "UNet2DConditionModel",
           (_clip("text_encoder", "tokenizer", "lora_te", "clip_l"),),
           512, "sd_v1", "stable-diffusion-v1/lora", sd.CONDITIONING,
           matches=lambda cfg, parts: True, pipeline_extra=_SD_EXTRA, reference_overrides={"layers_per_block": 3},
           file_labels=("sd_v1", "sd1"), kohya_blocks=SD_BLOCKS,
           single_file=sd.SD1_FILE, save_tiny=sd.save_tiny_pipeline, full_size=sd.full_size,
           inpaint_pipeline_class="StableDiffusionInpaintPipeline",
           inpaint_architecture="stable-diffusion-v1-inpainting/lora",
           full_size_configs=sd.full_size_configs, presets="sd1"),
)}


# the family a LoRA file is read as when neither its labels nor its layers say which it is for (SD1's naming)
FALLBACK = FAMILIES["sd1"]


def detect_family(denoiser_config: dict, parts: set[str] | frozenset = frozenset()) -> Family:
    """The first family (in table order) whose rule accepts this denoiser config and set of pipeline parts."""
    return next(f for f in FAMILIES.values() if f.matches(dict(denoiser_config), set(parts)))


def family_of_pipeline(pipe) -> Family:
    """The family of a diffusers pipeline object (SD1 and SD2 share a pipeline and their text-encoder slots)."""
    name = type(pipe).__name__
    found = [f for f in FAMILIES.values() if name in (f.pipeline_class, f.inpaint_pipeline_class)]
    if not found:
        raise ModelError(f"{name} is not a pipeline of a family sdlora supports")
    return found[-1]


def folder_family(source: str) -> Family:
    """The family of a diffusers folder or hub id, from its model_index.json and denoiser config."""
    import diffusers
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise ModelError(f"{source} is not a diffusers model folder: {str(e).splitlines()[0]}") from None
        raise ModelError(f"could not load '{source}': not a local folder, and the hub is not reachable or has "
                         "no such model; pass a local diffusers folder") from None
    parts = {k: v for k, v in index.items() if isinstance(v, (list, tuple)) and v[0]}
    attrs = list(dict.fromkeys(f.denoiser_attr for f in FAMILIES.values()))
    sub = next((a for a in attrs if a in parts), attrs[-1])
    cls = parts.get(sub, [None, "?"])[1]
    if sub not in parts or cls not in {f.denoiser_class for f in FAMILIES.values()}:
        what = f"a {cls} ({index.get('_class_name', 'unknown pipeline')})" if sub in parts else \
            f"no {'/ or '.join(attrs)}/"
        titles = [f.title for f in reversed(FAMILIES.values())]
        raise ModelError(f"{source} has {what}: not supported; sdlora trains {', '.join(titles[:-1])} and "
                         f"{titles[-1]} models")
    try:
        config = getattr(diffusers, cls).load_config(source, subfolder=sub)
    except (OSError, ValueError) as e:
        raise ModelError(f"{source} is not a diffusers model folder (no usable '{sub}/'): "
                         f"{str(e).splitlines()[0]}") from None
    return detect_family(config, set(parts))
