"""The original LDM/SGM single-file layout that SD 1.x, 2.x and SDXL checkpoints share (A1111's and ComfyUI's
files): the UNet under `model.diffusion_model.` (input/middle/output blocks), the VAE under `first_stage_model.`, the
text encoders under each family's own prefix (`Encoder`). An `LdmFile` is one family's reading of it: which encoders
it has, and what the shapes cannot say. Configs come from the tensor shapes on top of the configs sdlora ships;
diffusers' `convert_ldm_*` functions rename the weights on loading, and `to_original` is their inverse.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from ..tokenizers import clip_tokenizer
from .checkpoint import CLIP_VOCAB, HOW, asset, blocks, build, own_configs, scheduler, tensors
from .naming import sgm_path

UNET, VAE = "model.diffusion_model.", "first_stage_model."


@dataclass(frozen=True)
class Encoder:
    """Where one text encoder sits in a single file, and how it is laid out."""

    name: str                 # diffusers part: text_encoder | text_encoder_2
    prefix: str               # key prefix of its weights in the file
    openclip: bool = False    # OpenCLIP layout (resblocks, fused in_proj) instead of HF CLIP's
    skip_last: bool = False   # SD2 runs OpenCLIP up to its penultimate layer: the file's last layer goes unused
    projection: bool = False  # CLIPTextModelWithProjection (SDXL's second encoder)


@dataclass(frozen=True)
class LdmFile:
    """One family's single files in the LDM/SGM layout: its text encoders (which also tell its files apart), how a
    file that does not say its prediction type is read, and what its sizes derive from each other."""

    family: str                       # the family's name: its shipped configs are assets/<family>/
    label: str                        # how an error names it and its text encoders' keys
    encoders: tuple[Encoder, ...]
    # (metadata, path) -> (prediction type, why) for a file without a v_pred key or modelspec.prediction_type
    prediction: Callable[[dict, Path], tuple[str, str]] | None = None
    derive: Callable[[dict], None] | None = None  # fills config values the shapes give only indirectly

    def claims(self, shapes: dict) -> bool:
        """A UNet with input blocks and every text encoder of this family."""
        return UNET + "input_blocks.0.0.weight" in shapes and all(_has(shapes, e.prefix) for e in self.encoders)

    def info(self, shapes: dict, meta: dict, path: Path) -> tuple[str, str, dict]:
        """(prediction type, where it came from, diffusers configs) of a file this family claims."""
        if not _has(shapes, VAE):
            raise ModelError(f"{path}: no VAE weights ('first_stage_model.*'); use a checkpoint with its VAE baked in")
        if shapes[UNET + "input_blocks.0.0.weight"][1] != 4:
            raise ModelError(f"{path}: the UNet takes {shapes[UNET + 'input_blocks.0.0.weight'][1]} input channels "
                             "(inpainting or instruct-pix2pix); only 4-channel text-to-image checkpoints train here")
        return (*self._prediction(shapes, meta, path), self._configs(shapes, meta, path))

    def _prediction(self, shapes: dict, meta: dict, path: Path) -> tuple[str, str]:
        if "v_pred" in shapes:
            return "v_prediction", "the file has a 'v_pred' key"
        said = meta.get("modelspec.prediction_type", "")
        if said in ("epsilon", "v", "v_prediction"):
            return ("epsilon" if said == "epsilon" else "v_prediction"), "the file's modelspec.prediction_type"
        if self.prediction is not None:
            return self.prediction(meta, path)
        return "epsilon", f"{self.family} models predict noise unless the file says otherwise"

    def _configs(self, shapes: dict, meta: dict, path: Path) -> dict:
        """Shipped family config < the file's own sdlora metadata (or the head rules) < what the shapes say."""
        own = own_configs(meta, path)
        derived = {"unet": _unet_shape_config(shapes), "vae": vae_shape_config(shapes)}
        derived.update({e.name: _text_shape_config(shapes, e) for e in self.encoders})
        if self.derive is not None:
            self.derive(derived)
        widths = sum(derived[e.name]["hidden_size"] for e in self.encoders)
        if widths != derived["unet"]["cross_attention_dim"]:
            raise ModelError(f"{path}: text encoder width {widths} does not match the UNet's context width "
                             f"{derived['unet']['cross_attention_dim']}; the file mixes parts of different models")
        rules = {"unet": _unet_heads, "text_encoder": _text_heads, "text_encoder_2": _text_heads}
        out = {}
        for part, cfg in derived.items():
            base = asset(self.family, part)
            fill = own.get(part) or (rules[part](base, cfg) if part in rules else {})
            out[part] = {**base, **fill, **cfg}
        return out

    def part_configs(self, configs: dict, text_encoders: str = "") -> dict:
        """Every part's config: an LDM file holds them all."""
        return configs

    def load(self, path: Path, info, allow_pickle: bool, *, prediction_type: str = "auto", **_) -> dict:
        """unet, vae, text_encoder(s), tokenizer(s) and scheduler, fp32. `prediction_type` 'auto' follows `info`.
        Tokenizers: a `<file stem>.tokenizer/` (`.tokenizer_2/`) folder next to the file when present (tiny or custom
        models, written by `save_single_file`); otherwise CLIP's tokenizer, rebuilt from shipped files."""
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders import single_file_utils as sfu
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        for part, part_cfg in info.configs.items():
            _check_standard(part, part_cfg, self.family, path)
        state, cfg = tensors(path, allow_pickle), info.configs
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(cfg["unet"])
            vae = AutoencoderKL.from_config(cfg["vae"])
            encoders = [(CLIPTextModelWithProjection if e.projection else CLIPTextModel)(
                CLIPTextConfig.from_dict(cfg[e.name])) for e in self.encoders]
        parts = {"unet": build(unet, sfu.convert_ldm_unet_checkpoint(state, cfg["unet"]), "UNet", path),
                 "vae": build(vae, sfu.convert_ldm_vae_checkpoint(state, cfg["vae"]), "VAE", path)}
        for e, model in zip(self.encoders, encoders):
            if e.openclip:
                sd = sfu.convert_open_clip_checkpoint(model, state, prefix=e.prefix)
            else:
                sd = {"text_model." + k[len(e.prefix):]: v for k, v in state.items() if k.startswith(e.prefix)}
            if not hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
            parts[e.name] = build(model, sd, e.name.replace("_", " "), path)
            tok = e.name.replace("text_encoder", "tokenizer")
            parts[tok] = _tokenizer(path, self.family, tok, cfg[e.name]["vocab_size"])
        kind = info.prediction_type if prediction_type == "auto" else prediction_type
        parts["scheduler"] = scheduler(self.family, prediction_type=kind)
        return parts

    def to_original(self, parts: dict) -> dict:
        """diffusers state dicts ({'unet': ..., 'vae': ..., 'text_encoder': ...}) -> one state dict in this
        family's single-file layout: the inverse of diffusers' `convert_ldm_*` functions."""
        out = {**_unet_to_ldm(parts["unet"]), **vae_to_ldm(parts["vae"])}
        for e in self.encoders:
            out.update(_text_to_ldm(parts[e.name], e))
        return out


def _has(shapes: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def unclaimed(shapes: dict, path: Path, formats) -> ModelError:
    """The error for a file no family claims, saying what was found (`formats`: the families' LdmFiles)."""
    if not _has(shapes, UNET):
        top = Counter(k.split(".")[0] + "." for k in shapes).most_common(1)
        what = f"found {top[0][1]} keys starting with '{top[0][0]}'" if top else "found no tensors"
        kind = (" (a LoRA, not a base model)" if _has(shapes, "lora_") else
                " (a diffusers UNet file: pass its pipeline folder)" if _has(shapes, "down_blocks.") else "")
        return ModelError(f"{path}: {what}{kind} — not a Stable Diffusion 1/2/XL checkpoint "
                          "(expected 'model.diffusion_model.*')")
    if UNET + "input_blocks.0.0.weight" not in shapes:
        first = next(k for k in shapes if k.startswith(UNET))
        return ModelError(f"{path}: its diffusion model has no input_blocks or joint_blocks (found '{first}') — not "
                          "a Stable Diffusion 1/2/XL UNet or SD3 MMDiT (Flux and other transformers are not supported)")
    found = sorted({".".join(k.split(".")[:3]) for k in shapes if k.startswith(("cond", "conditioner"))})
    labels = sorted(f.label for f in formats if isinstance(f, LdmFile))
    return ModelError(f"{path}: no {', '.join(labels[:-1])} or {labels[-1]} text encoder; found {found[:4] or 'none'} "
                      "(UNet-only files and SDXL refiners are not supported)")


# ---------------------------------------------------------------- reading the sizes


def _unet_shape_config(s: dict) -> dict:
    """The UNet's structure from its shapes: channels, levels, attention, context width, depth."""
    levels = 1 + len(blocks(s, UNET, r"input_blocks\.(\d+)\.0\.op\.weight"))
    per = len(blocks(s, UNET, r"input_blocks\.(\d+)\.")) // levels - 1  # resnets per down level
    first = [1 + i * (per + 1) for i in range(levels)]                    # first input block of each level
    depth = [len(blocks(s, UNET + f"input_blocks.{b}.1.", r"transformer_blocks\.(\d+)\.")) for b in first]
    up_attn = [UNET + f"output_blocks.{i * (per + 1)}.1.proj_in.weight" in s for i in range(levels)]
    to_k = next((v for k, v in s.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in s.items() if k.startswith(UNET) and k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise ModelError("the UNet has no cross-attention layers: not a text-to-image Stable Diffusion UNet")
    cfg = dict(
        in_channels=s[UNET + "input_blocks.0.0.weight"][1], out_channels=s[UNET + "out.2.weight"][0],
        block_out_channels=[s[UNET + f"input_blocks.{b}.0.out_layers.3.weight"][0] for b in first],
        layers_per_block=per, cross_attention_dim=to_k[1], use_linear_projection=len(proj_in) == 2,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        transformer_layers_per_block=1 if set(depth) <= {0, 1} else [max(d, 1) for d in depth])
    if UNET + "label_emb.0.0.weight" in s:  # SDXL's size/crop conditioning
        cfg["projection_class_embeddings_input_dim"] = s[UNET + "label_emb.0.0.weight"][1]
    return cfg


def vae_shape_config(s: dict) -> dict:
    levels = len(blocks(s, VAE, r"encoder\.down\.(\d+)\."))
    return dict(in_channels=s[VAE + "encoder.conv_in.weight"][1], out_channels=s[VAE + "decoder.conv_out.weight"][0],
                latent_channels=s[VAE + "decoder.conv_in.weight"][1],
                block_out_channels=[s[VAE + f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
                layers_per_block=len(blocks(s, VAE, r"encoder\.down\.0\.block\.(\d+)\.")),
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)


def _text_shape_config(s: dict, e: Encoder) -> dict:
    p = e.prefix
    if e.openclip:
        tokens, positions, fc1 = "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc"
        layers = len(blocks(s, p, r"transformer\.resblocks\.(\d+)\.")) - e.skip_last
    else:
        tokens, positions = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"
        fc1, layers = "encoder.layers.0.mlp.fc1", len(blocks(s, p, r"encoder\.layers\.(\d+)\."))
    cfg = dict(vocab_size=s[p + tokens][0], hidden_size=s[p + tokens][1], max_position_embeddings=s[p + positions][0],
               num_hidden_layers=layers, intermediate_size=s[p + fc1 + ".weight"][0])
    if e.projection and p + "text_projection" in s:
        cfg["projection_dim"] = s[p + "text_projection"][1]
    return cfg


def _unet_heads(base: dict, cfg: dict) -> dict:
    """Head counts are not in the weights: keep the family's head width (SD2/XL: 64) or head count (SD1: 8)."""
    heads = base["attention_head_dim"]
    if isinstance(heads, list):
        width = base["block_out_channels"][0] // heads[0]
        return {"attention_head_dim": [c // width for c in cfg["block_out_channels"]]}
    return {"attention_head_dim": heads}


def _text_heads(base: dict, cfg: dict) -> dict:
    return {"num_attention_heads": cfg["hidden_size"] // (base["hidden_size"] // base["num_attention_heads"])}


def _check_standard(part: str, cfg: dict, family: str, path: Path) -> None:
    """Sizes the shapes gave that no standard config of the family can build (a narrow CLIP, other GroupNorm
    groups): a one-line error saying which, instead of a failure deep inside the model constructors."""
    if part.startswith("text_encoder"):
        heads = cfg["num_attention_heads"]
        if heads < 1 or cfg["hidden_size"] % heads:
            raise ModelError(f"{path}: its {part.replace('_', ' ')} is {cfg['hidden_size']} wide, which no standard "
                             f"{family} attention-head width divides; {HOW}")
        return
    groups = cfg.get("norm_num_groups", 32)
    odd = [c for c in cfg["block_out_channels"] if c % groups]
    if odd:
        raise ModelError(f"{path}: its {part.upper()} has {odd[0]} channels, not divisible by the {groups} "
                         f"normalisation groups of a standard {family} {part}; {HOW}")
    heads = cfg.get("attention_head_dim")
    if part == "unet" and isinstance(heads, list) and any(h < 1 for h in heads):
        raise ModelError(f"{path}: its UNet channels {cfg['block_out_channels']} are narrower than one standard "
                         f"{family} attention head; {HOW}")


def _tokenizer(path: Path, family: str, name: str, vocab_size: int):
    """A `<file stem>.<name>/` folder next to the file wins; else CLIP's own tokenizer when the vocabulary fits."""
    from transformers import CLIPTokenizer

    sidecar = path.with_suffix(f".{name}")
    if sidecar.is_dir():
        return CLIPTokenizer.from_pretrained(str(sidecar))
    if vocab_size != CLIP_VOCAB:
        raise ModelError(f"{path}: its text encoder has {vocab_size} tokens, not CLIP's {CLIP_VOCAB}; put its "
                         f"tokenizer folder at {sidecar}/")
    cfg = asset(family, name)
    return clip_tokenizer(cfg["pad_token"], cfg["model_max_length"])


# ---------------------------------------------------------------- writing


_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_to_ldm(sd: dict) -> dict:
    """diffusers UNet keys -> `model.diffusion_model.*` (input/middle/output blocks, as kohya names SDXL layers)."""
    per = len(blocks(sd, "down_blocks.0.resnets.", r"(\d+)\."))  # resnets per down block
    up_attn = tuple(bool(blocks(sd, f"up_blocks.{i}.attentions.", r"(\d+)\."))
                    for i in range(len(blocks(sd, "up_blocks.", r"(\d+)\."))))
    out = {}
    for key, v in sd.items():
        head, _, leaf = key.rpartition(".")
        new = f"{_UNET_FIXED[head]}.{leaf}" if head in _UNET_FIXED else sgm_path(key, per, up_attn)
        if new == key:
            raise ModelError(f"cannot write UNet weight '{key}' in the original layout (unknown block)")
        out[UNET + new] = v
    return out


def vae_to_ldm(sd: dict) -> dict:
    """diffusers VAE keys -> `first_stage_model.*` (down/up levels numbered from the top, 1x1-conv attention)."""
    n_up = len(blocks(sd, "decoder.up_blocks.", r"(\d+)\."))
    subs = ((r"\.conv_norm_out\.", ".norm_out."), (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
            (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
            (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m[1])}.block."),
            (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample."),
            (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
            (r"mid_block\.attentions\.0\.", "mid.attn_1."), (r"conv_shortcut", "nin_shortcut"),
            (r"attn_1\.group_norm\.", "attn_1.norm."), (r"attn_1\.to_([qkv])\.", r"attn_1.\1."),
            (r"attn_1\.to_out\.0\.", "attn_1.proj_out."))
    out = {}
    for key, v in sd.items():
        for rx, to in subs:
            key = re.sub(rx, to, key)
        if ".attn_1." in key and key.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE + key] = v
    return out


_OPENCLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _text_to_ldm(sd: dict, e: Encoder) -> dict:
    """HF CLIP keys -> the file's text-encoder layout (HF CLIP as is, or OpenCLIP with fused q/k/v)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    if not e.openclip:
        return {e.prefix + k: v for k, v in sd.items() if k != "text_projection.weight"}
    out = {}
    for key, v in sd.items():
        if key in _OPENCLIP:
            out[e.prefix + _OPENCLIP[key]] = v
        elif key == "text_projection.weight":
            out[e.prefix + "text_projection"] = v.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            qkv = [sd[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[2]}"] for p in "qkv"]
            out[f"{e.prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"] = torch.cat(qkv)
        elif (m := re.match(r"encoder\.layers\.(\d+)\.(.*)", key)) and not re.match(r"self_attn\.[kv]_proj", m[2]):
                rest = next((m[2].replace(a, b, 1) for a, b in _OPENCLIP_LAYER if m[2].startswith(a)), m[2])
                out[f"{e.prefix}transformer.resblocks.{m[1]}.{rest}"] = v
    if e.skip_last:  # the unused last OpenCLIP layer (zeros) and projection, so the file has SD2's layout
        n = len(blocks(sd, "encoder.layers.", r"(\d+)\."))
        last = f"{e.prefix}transformer.resblocks.{n - 1}."
        out.update({k.replace(last, f"{e.prefix}transformer.resblocks.{n}."): torch.zeros_like(v)
                    for k, v in list(out.items()) if k.startswith(last)})
        width = out[e.prefix + "token_embedding.weight"].shape[1]
        out[e.prefix + "text_projection"] = torch.eye(width, dtype=out[e.prefix + "token_embedding.weight"].dtype)
    return out
