"""SD3 and SD3.5: CLIP-L and CLIP-G (penultimate layers, zero-padded to T5's width) followed by T5-XXL's last hidden
states along the sequence, the two pooled CLIP embeddings concatenated, and a transformer called with keywords, as
diffusers' StableDiffusion3Pipeline.encode_prompt builds them.

Single files (Stability's layout, as ComfyUI and Forge load them): the MMDiT sits under `model.diffusion_model.` (or
bare), the VAE under `first_stage_model.`, and the text encoders, where a file has them, under
`text_encoders.clip_l/clip_g/t5xxl.transformer.` in transformers' own naming. Configs come from the tensor shapes on
top of the shipped ones (`assets/sd3`): SD3 Medium (no qk-norm), SD3.5 Medium (qk-norm, dual attention in blocks 0-12,
384 positions) and SD3.5 Large (38 blocks) are told apart by them, as diffusers' and sd-scripts' loaders do.
diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` and `convert_ldm_vae_checkpoint` rename the weights;
`original_state` is their inverse. Text encoders a file lacks come from `text_encoders`: a diffusers SD3 folder, or a
folder of ComfyUI-style clip_l / clip_g / t5xxl files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..tokenizers import clip_tokenizer
from .checkpoint import CLIP_VOCAB, HOW, asset, blocks, build, header, own_configs, scheduler, tensors
from .ldm import vae_shape_config, vae_to_ldm
from .mmdit import original as original_path
from .mmdit import swap_halves, swapped
from .sd import CLIP_IDS, TINY, Conditioning, tokenize
from .sdxl import SDXL_BASE, TINY_XL

NAME = "sd3"


@dataclass
class T5Text:
    """T5-XXL's part of the conditioning: its last hidden states per caption, cached (T5 never trains), so the model
    can be released once every caption is in. Without a model (`--no-t5`, or a pipeline without text_encoder_3) the
    part is zeros of [length, width], as diffusers' pipeline makes it. `closed`: captions not yet cached are encoded
    but not kept (captions that change every step would otherwise fill memory without bound)."""

    tokenizer: object | None
    model: torch.nn.Module | None
    length: int = 256
    width: int = 4096
    cache: dict = field(default_factory=dict)
    released: bool = False
    closed: bool = False

    @property
    def present(self) -> bool:
        """A T5 takes part (held now, or released after caching)."""
        return self.model is not None or self.released

    def __call__(self, captions: list[str], device) -> torch.Tensor:
        if not self.present:
            return torch.zeros(len(captions), self.length, self.width, device=device)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            if self.model is None:
                raise ModelError(f"T5 was released after caching, and the caption {missing[0]!r} was not cached")
            ids = self.tokenizer(missing, padding="max_length", max_length=self.length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids
            with torch.no_grad():
                out = self.model(ids.to(self.model.device))[0]
            fresh = {caption: hidden.cpu() for caption, hidden in zip(missing, out)}
            if not self.closed:
                self.cache.update(fresh)
        else:
            fresh = {}
        return torch.stack([fresh[c] if c in fresh else self.cache[c] for c in captions]).to(device)

    def release(self) -> None:
        """Drop the model (every caption it will see is cached)."""
        self.model, self.released = None, True


class SD3Conditioning(Conditioning):
    # samples during training are rendered from these embeddings (T5 may be released by then)
    samples_from_embeddings = True

    def encode(self, tokenizers, encoders, captions, device):
        """{'hidden': [B, 77 + T5 length, T5 width], 'pooled': [B, P_L + P_G]}; `encoders` are CLIP-L, CLIP-G and a
        `T5Text`."""
        hidden, pooled = [], []
        for tok, enc in zip(tokenizers[:2], encoders[:2]):
            out = enc(tokenize(tok, captions, device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        t5 = encoders[2](captions, device).to(clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"hidden": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def frozen_text(self, model, tokenizer, denoiser_config, length):
        """T5's part: `length` tokens at the transformer's joint width."""
        return T5Text(tokenizer, model, length, denoiser_config["joint_attention_dim"])

    def caption_numel(self, configs, frozen_length=256):
        """77 CLIP tokens and `frozen_length` T5 tokens at the transformer's joint width, and the pooled CLIP-L +
        CLIP-G embedding (the same with or without T5: its part is zeros then)."""
        t = configs["transformer"]
        return (77 + frozen_length) * t["joint_attention_dim"] + t["pooled_projection_dim"]

    def denoiser_kwargs(self, cond, micro=None):
        return {"encoder_hidden_states": cond["hidden"], "pooled_projections": cond["pooled"]}

    def predict(self, denoiser, noisy, t, cond, micro=None):
        """SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep) with
        timestep = sigma * 1000."""
        return denoiser(hidden_states=noisy, timestep=t, **self.denoiser_kwargs(cond), return_dict=False)[0]

    def pipeline_embeds(self, cond: dict, negative: dict) -> dict:
        """The pipeline's keyword arguments for a prompt and a negative prompt given as conditionings."""
        return {"prompt_embeds": cond["hidden"], "pooled_prompt_embeds": cond["pooled"],
                "negative_prompt_embeds": negative["hidden"], "negative_pooled_prompt_embeds": negative["pooled"]}


CONDITIONING = SD3Conditioning()


# ---------------------------------------------------------------- single files

MMDIT, VAE = "model.diffusion_model.", "first_stage_model."
TEXT = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
        "text_encoder_3": "text_encoders.t5xxl.transformer."}
FILE_NAMES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"}  # ComfyUI's file names


def mmdit_prefix(shapes) -> str | None:
    """The key prefix of an MMDiT in a file ('model.diffusion_model.' or ''), None when it has none."""
    for prefix in (MMDIT, ""):
        if prefix + "joint_blocks.0.x_block.attn.qkv.weight" in shapes:
            return prefix
    return None


def _asset(part: str) -> dict:
    return asset(NAME, part)


def _indices(shapes, prefix: str, rx: str) -> list[int]:
    return sorted(blocks(shapes, prefix, rx))


def transformer_config(s: dict, p: str) -> dict:
    """SD3Transformer2DModel's config from an MMDiT's shapes (what diffusers' scripts/convert_sd3_to_diffusers.py
    reads; the head width is the qk-norm's, else 64 as in every released SD3)."""
    width, channels, patch = s[p + "x_embedder.proj.weight"][:3]
    head = s[p + "joint_blocks.0.x_block.attn.ln_q.weight"][0] if p + "joint_blocks.0.x_block.attn.ln_q.weight" in s \
        else 64
    return {**_asset("transformer"), "patch_size": patch, "in_channels": channels, "attention_head_dim": head,
            "num_layers": len(_indices(s, p, r"joint_blocks\.(\d+)\.")),
            "num_attention_heads": width // head,
            "out_channels": s[p + "final_layer.linear.weight"][0] // patch**2,
            "joint_attention_dim": s[p + "context_embedder.weight"][1], "caption_projection_dim": width,
            "pooled_projection_dim": s[p + "y_embedder.mlp.0.weight"][1],
            "pos_embed_max_size": round(math.sqrt(s[p + "pos_embed"][1])),
            "qk_norm": "rms_norm" if p + "joint_blocks.0.x_block.attn.ln_q.weight" in s else None,
            "dual_attention_layers": _indices(s, p, r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight")}


def clip_config(s: dict, p: str, part: str) -> dict:
    t = p + "text_model."
    tokens = s[t + "embeddings.token_embedding.weight"]
    cfg = {**_asset(part), "vocab_size": tokens[0], "hidden_size": tokens[1],
           "max_position_embeddings": s[t + "embeddings.position_embedding.weight"][0],
           "num_hidden_layers": len(_indices(s, t, r"encoder\.layers\.(\d+)\.")),
           "intermediate_size": s[t + "encoder.layers.0.mlp.fc1.weight"][0], "num_attention_heads": tokens[1] // 64}
    if p + "text_projection.weight" in s:
        cfg["projection_dim"] = s[p + "text_projection.weight"][0]
    else:
        cfg["projection_dim"] = tokens[1]
    return cfg


def t5_config(s: dict, p: str) -> dict:
    bias = s[p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    block = p + "encoder.block.0.layer."
    return {**_asset("text_encoder_3"), "vocab_size": s[p + "shared.weight"][0], "d_model": s[p + "shared.weight"][1],
            "num_layers": len(_indices(s, p, r"encoder\.block\.(\d+)\.")), "num_heads": bias[1],
            "relative_attention_num_buckets": bias[0], "d_ff": s[block + "1.DenseReluDense.wi_0.weight"][0],
            "d_kv": s[block + "0.SelfAttention.q.weight"][0] // bias[1]}


def configs(shapes: dict, meta: dict, path) -> dict:
    """diffusers configs of every part the file holds: shipped < the file's own sdlora header < the shapes."""
    own = own_configs(meta, path)
    p = mmdit_prefix(shapes)
    out = {"transformer": transformer_config(shapes, p)}
    if any(k.startswith(VAE) for k in shapes):
        out["vae"] = {**_asset("vae"), **vae_shape_config(shapes)}
    for part, prefix in TEXT.items():
        if any(k.startswith(prefix) for k in shapes):
            out[part] = t5_config(shapes, prefix) if part == "text_encoder_3" else clip_config(shapes, prefix, part)
    out = {part: {**cfg, **own.get(part, {})} for part, cfg in out.items()}  # sdlora's own files: exact sizes
    _check_heads(out, path)
    return out


def _check_heads(cfgs: dict, path) -> None:
    """Widths no standard head width divides (a tiny or custom model without sdlora's config header): one line."""
    for part, cfg in cfgs.items():
        width, heads = {"transformer": ("caption_projection_dim", "num_attention_heads"),
                        "text_encoder_3": ("d_model", "num_heads")}.get(part, ("hidden_size", "num_attention_heads"))
        if part != "vae" and (cfg[heads] < 1 or cfg[width] % cfg[heads]):
            raise ModelError(f"{path}: its {part.replace('_', ' ')} is {cfg[width]} wide, which no standard SD3 "
                             f"attention-head width divides; {HOW}")


# ---------------------------------------------------------------- loading


def _clip_state(state: dict, prefix: str, projection: bool) -> dict:
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if projection and "text_projection.weight" not in sd:  # SD3's CLIP-L has none: the pooled output as it is
        width = sd["text_model.embeddings.token_embedding.weight"].shape[1]
        sd["text_projection.weight"] = torch.eye(width)
    return sd


def _build(cls, config: dict, state: dict, what: str, path, dtype: torch.dtype | None = None):
    """A diffusers or transformers model of `config` built on the meta device, `state` loaded into it (in `dtype`,
    fp32 by default)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(cls.config_class.from_dict(config)) if hasattr(cls, "config_class") else cls.from_config(config)
    if "shared.weight" in state:  # T5's token embedding, tied to the encoder's
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    return build(model, state, what, Path(path), dtype or torch.float32)


def load(path, info, state: dict, text_encoders: str = "", t5: bool | None = True,
         dtype: torch.dtype | None = None) -> dict:
    """transformer, vae, text encoders, tokenizers and scheduler of an SD3 single file (missing parts from
    `text_encoders`); `t5` False leaves T5 out, None takes it where the file or folder has it. `dtype`: the
    transformer's and CLIPs' (T5 only in bf16; the VAE fp32)."""
    import diffusers
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    cfg, p = info.configs, mmdit_prefix(state)
    original = {k[len(p):]: v for k, v in state.items()
                if k.startswith(p) and (p or not k.startswith((VAE, "text_encoders.")))}
    parts = {"transformer": _build(diffusers.SD3Transformer2DModel, cfg["transformer"],
                                   sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(original)), "MMDiT", path,
                                   dtype)}
    extra = _TextEncoders(text_encoders, path)
    if "vae" in cfg:
        vae_state = {k: v for k, v in state.items() if k.startswith(VAE)}
        vae_sd = sfu.convert_ldm_vae_checkpoint(vae_state, cfg["vae"])
        parts["vae"] = _build(diffusers.AutoencoderKL, cfg["vae"], vae_sd, "VAE", path)
    else:
        parts["vae"] = extra.vae()
    if t5 is None:
        t5 = "text_encoder_3" in cfg or extra.has("text_encoder_3")
    for part in ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if t5 else ()):
        tok = part.replace("text_encoder", "tokenizer")
        if part in cfg:
            if part == "text_encoder_3":
                sd = {k[len(TEXT[part]):]: v for k, v in state.items() if k.startswith(TEXT[part])}
                parts[part] = _build(T5EncoderModel, cfg[part], sd, "T5", path,
                                     dtype if dtype == torch.bfloat16 else None)
            else:
                sd = _clip_state(state, TEXT[part], projection=True)
                parts[part] = _build(CLIPTextModelWithProjection, cfg[part], sd, part.replace("_", " "), path, dtype)
        else:
            parts[part] = extra.encoder(part)
        parts[tok] = _tokenizer(Path(path), part, tok, parts[part], extra)
    parts["scheduler"] = scheduler(NAME)
    return parts


class _TextEncoders:
    """Where an SD3 file's missing parts come from: a diffusers SD3 folder, or ComfyUI-style files."""

    def __init__(self, folder: str, path):
        self.folder, self.path = Path(folder) if folder else None, path

    def _missing(self, what: str, flag: str = "--text-encoders FOLDER") -> ModelError:
        t5 = " or --no-t5" if "T5" in what else ""
        return ModelError(f"{self.path} has no {what}: pass {flag} (a diffusers SD3 folder, or a folder of "
                          f"clip_l / clip_g / t5xxl .safetensors files){t5}")

    def has(self, part: str) -> bool:
        return self.folder is not None and ((self.folder / part).is_dir() or any(
            f.name.lower().startswith(FILE_NAMES[part]) for f in self.folder.glob("*.safetensors")))

    def vae(self):
        from diffusers import AutoencoderKL

        if self.folder is None or not (self.folder / "vae").is_dir():
            raise self._missing("VAE (first_stage_model.*)", "--text-encoders FOLDER with a vae/")
        return AutoencoderKL.from_pretrained(self.folder, subfolder="vae")

    def encoder(self, part: str):
        import transformers

        what = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5"}[part]
        if self.folder is None:
            raise self._missing(f"{what} text encoder")
        cls = transformers.T5EncoderModel if part == "text_encoder_3" else transformers.CLIPTextModelWithProjection
        if (self.folder / part).is_dir():
            return cls.from_pretrained(self.folder, subfolder=part)
        return self._file_encoder(part, cls, what)

    def _files(self, part: str) -> list[Path]:
        return sorted(f for f in self.folder.glob("*.safetensors") if f.name.lower().startswith(FILE_NAMES[part]))

    def _file_encoder(self, part: str, cls, what: str):
        from safetensors import safe_open

        files = self._files(part)
        if not files:
            raise ModelError(f"{self.folder} has no {part}/ folder and no {FILE_NAMES[part]}*.safetensors file for "
                             f"the {what} text encoder")
        with safe_open(str(files[0]), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = f.metadata() or {}
        prefix, cfg = _file_config(part, {k: tuple(v.shape) for k, v in state.items()}, meta, files[0])
        sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if part == "text_encoder_3" \
            else _clip_state(state, prefix, projection=True)
        return _build(cls, cfg, sd, f"{what} ({files[0].name})", files[0])

    def config(self, part: str) -> dict | None:
        """A part's config from the folder, no weights read (a subfolder's config.json, or a ComfyUI-style file's
        header); None where the folder has no such part."""
        if self.folder is None:
            return None
        if (self.folder / part / "config.json").is_file():
            return json.loads((self.folder / part / "config.json").read_text())
        files = self._files(part) if part in FILE_NAMES else []
        return _file_config(part, *header(files[0], False), files[0])[1] if files else None

    def tokenizer(self, tok: str):
        if self.folder is not None and (self.folder / tok).is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(self.folder / tok))
        return None


def _file_config(part: str, shapes: dict, meta: dict, path) -> tuple[str, dict]:
    """(key prefix, config) of a text encoder's own file (`path`), from its shapes and sdlora's config header."""
    prefix = next((p for p in (TEXT[part], "transformer.", "") if any(k.startswith(p) for k in shapes)), "")
    own = own_configs(meta, path).get(part, {})
    return prefix, {**(t5_config(shapes, prefix) if part == "text_encoder_3" else clip_config(shapes, prefix, part)),
                    **own}


def part_configs(configs: dict, text_encoders: str = "") -> dict:
    """Every part's config for an SD3 file, no weights read: the file's own (`configs`, from its detection), else
    the `text_encoders` folder's, else the shipped ones (SD3's VAE, CLIP-L, CLIP-G, T5-XXL), as loading takes them."""
    extra = _TextEncoders(text_encoders, "")
    return {**{part: extra.config(part) or _asset(part) for part in ("vae", *TEXT) if part not in configs}, **configs}


def _tokenizer(path: Path, part: str, tok: str, encoder, extra: _TextEncoders):
    """A `<file stem>.<tokenizer>/` folder beside the file, else the text-encoder folder's, else CLIP's own (shipped);
    T5's cannot be rebuilt offline: a one-line error saying where it can come from."""
    from transformers import AutoTokenizer

    sidecar = path.with_suffix(f".{tok}")
    if sidecar.is_dir():
        return AutoTokenizer.from_pretrained(str(sidecar))
    found = extra.tokenizer(tok)
    if found is not None:
        return found
    if part == "text_encoder_3":
        raise ModelError(f"{path}: T5 needs its tokenizer, which is not in the file and cannot be downloaded here: "
                         "pass --text-encoders FOLDER (a diffusers SD3 folder with tokenizer_3/) or --no-t5")
    if encoder.config.vocab_size != CLIP_VOCAB:
        raise ModelError(f"{path}: its {part} has {encoder.config.vocab_size} tokens, not CLIP's {CLIP_VOCAB}; put "
                         f"its tokenizer folder at {sidecar}/")
    cfg = _asset(tok)
    return clip_tokenizer(cfg["pad_token"], cfg["model_max_length"])


# ---------------------------------------------------------------- writing


def original_transformer(sd: dict) -> dict:
    """diffusers SD3Transformer2DModel weights -> the original MMDiT's (`model.diffusion_model.*`): q/k/v fused,
    the last context adaLN and the final adaLN back in (shift, scale) order; the inverse of
    convert_sd3_transformer_checkpoint_to_diffusers."""
    out, fused = {}, {}
    for key, v in sd.items():
        path, _, leaf = key.rpartition(".")
        if path == "pos_embed" and leaf == "pos_embed":
            out[MMDIT + "pos_embed"] = v
            continue
        try:
            orig, part = original_path(path)
        except KeyError:
            raise ModelError(f"cannot write transformer weight '{key}' in the original SD3 layout") from None
        if part is not None:
            fused.setdefault(f"{orig}.{leaf}", {})[part] = v
        else:
            width = sd[path + ".weight"].shape[-1]
            swap = orig.endswith("adaLN_modulation.1") and swapped(orig, v.shape[0], width)
            out[f"{MMDIT}{orig}.{leaf}"] = swap_halves(v) if swap else v
    for name, parts in fused.items():
        out[MMDIT + name] = torch.cat([parts[j] for j in range(3)])
    return out


def original_state(parts: dict) -> dict:
    """diffusers state dicts {'transformer', 'vae', 'text_encoder', 'text_encoder_2'[, 'text_encoder_3']} -> one
    state dict in the SD3 single-file layout."""
    out = {**original_transformer(parts["transformer"]), **vae_to_ldm(parts["vae"])}
    for part, prefix in TEXT.items():
        if parts.get(part) is not None:
            sd = parts[part]
            if part == "text_encoder_3":
                sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
            out.update({prefix + k: v for k, v in sd.items()})
    return out


class SD3File:
    """SD3's single files as the family table offers them (`sdlora.single_file` dispatches to it)."""

    def claims(self, shapes: dict) -> bool:
        return mmdit_prefix(shapes) is not None

    def info(self, shapes: dict, meta: dict, path) -> tuple[str, str, dict]:
        return "flow", "SD3 models train by flow matching", configs(shapes, meta, path)

    def part_configs(self, configs: dict, text_encoders: str = "") -> dict:
        return part_configs(configs, text_encoders)

    def load(self, path, info, allow_pickle: bool, *, text_encoders: str = "", t5: bool | None = True,
             dtype: torch.dtype | None = None, **_) -> dict:
        return load(path, info, tensors(Path(path), allow_pickle), text_encoders, t5, dtype)

    def to_original(self, parts: dict) -> dict:
        return original_state(parts)


SINGLE_FILE = SD3File()


# ---------------------------------------------------------------- random-weight models

# tiny SD3 transformers: SD3 Medium's structure (no qk-norm), SD3.5 Medium's (qk-norm, dual attention in block 0) and
# SD3.5 Large's (qk-norm); joint width 64 = CLIP-L 32 + CLIP-G 32 = T5's width, pooled 64 = 32 + 32
TINY_SD3 = dict(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                pos_embed_max_size=32)
SD3_VARIANTS = {"sd3": {}, "sd35m": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
                "sd35l": {"qk_norm": "rms_norm"}}
SD3_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3)
# SD3.5 Medium as diffusers configures it
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))


def sd35_medium(blocks: int = 24) -> dict:
    """SD3.5 Medium's transformer config with its first `blocks` blocks (dual attention in the first 13, as there)."""
    return {**SD35_MEDIUM, "num_layers": blocks, "dual_attention_layers": tuple(range(min(13, blocks)))}


# T5-XXL's encoder (the benchmark may take fewer of its 24 layers)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
              is_gated_act=True)


def build_sd3_components(variant: str = "sd3", seed: int = 0, t5: bool = True, full: bool = False,
                         t5_layers: int = 24, blocks: int = 24) -> dict:
    """Random-weight SD3 parts: tiny (by variant: sd3, sd35m, sd35l), or SD3.5 Medium at full size (`full`: `blocks`
    of its 24 blocks, and a T5-XXL-wide encoder of `t5_layers` layers); text_encoder_3 None without `t5`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    parts = {"transformer": SD3Transformer2DModel(**(sd35_medium(blocks) if full else
                                                     {**TINY_SD3, **SD3_VARIANTS[variant]}))}
    vae = SD3_VAE if full else {**TINY["vae"], "shift_factor": 0.0609, "scaling_factor": 1.5305,
                                "use_quant_conv": False, "use_post_quant_conv": False}
    parts["vae"] = AutoencoderKL(**vae)
    ids = {**CLIP_IDS, "vocab_size": 49408 if full else 600}
    texts = (SDXL_BASE["text"], SDXL_BASE["text_2"]) if full else (TINY_XL["text"],) * 2
    for name, text in zip(("text_encoder", "text_encoder_2"), texts):
        parts[name] = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **text))
    t5_cfg = {**T5_XXL, "num_layers": t5_layers} if full else \
        dict(vocab_size=120, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
             feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
    parts["text_encoder_3"] = T5EncoderModel(T5Config(**t5_cfg)) if t5 else None
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return parts


def save_tiny_sd3_pipeline(folder: str | Path, variant: str = "sd3", seed: int = 0, t5: bool = True,
                           words: tuple[str, ...] = ("a", "photo", "of", "dog", "cat", "sks", "red", "blue")) -> Path:
    """Save a tiny SD3-shaped StableDiffusion3Pipeline (random weights) as a diffusers folder, loadable offline:
    `variant` sd3 (SD3 Medium's structure), sd35m (dual attention, qk-norm) or sd35l (qk-norm); `t5` False saves it
    without text_encoder_3."""
    import shutil

    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTokenizer

    from ..tokenizers import write_t5_tokenizer, write_tokenizer

    folder = Path(folder)
    parts = build_sd3_components(variant, seed, t5)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_tok", words))
    t5_tok = AutoTokenizer.from_pretrained(write_t5_tokenizer(folder / "_tok3", words)) if t5 else None
    pipe = StableDiffusion3Pipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=t5_tok, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    if t5:
        shutil.rmtree(folder / "_tok3")
    return folder


def full_size(seed: int = 0, sd3_blocks: int = 24, t5_layers: int = 24, **_) -> dict:
    """SD3.5-Medium-sized random-weight parts with T5-XXL (`sd3_blocks` of its 24 blocks, `t5_layers` of T5's 24)."""
    return build_sd3_components(seed=seed, full=True, t5_layers=t5_layers, blocks=sd3_blocks)


def full_size_configs(sd3_blocks: int = 24, t5_layers: int = 24, **_) -> dict:
    """The configs of `full_size`'s transformer, vae and text encoders, as dicts (nothing is allocated)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, T5Config

    with torch.device("meta"):
        transformer, vae = SD3Transformer2DModel(**sd35_medium(sd3_blocks)), AutoencoderKL(**SD3_VAE)
    return {"transformer": dict(transformer.config), "vae": dict(vae.config),
            "text_encoder": CLIPTextConfig(**CLIP_IDS, **SDXL_BASE["text"]).to_dict(),
            "text_encoder_2": CLIPTextConfig(**CLIP_IDS, **SDXL_BASE["text_2"]).to_dict(),
            "text_encoder_3": T5Config(**{**T5_XXL, "num_layers": t5_layers}).to_dict()}

