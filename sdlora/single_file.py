"""Single-file Stable Diffusion checkpoints (the original LDM/SGM layout): detect, load offline, write.

Nothing is downloaded. The diffusers configs are read from the checkpoint's tensor shapes on top of the configs sdlora
ships for SD 1.5, SD 2.1 and SDXL base (`sdlora/assets/<family>/`), and the CLIP tokenizer is rebuilt from CLIP's
BPE merges (`sdlora/assets/clip/`). diffusers' own `convert_ldm_*` functions rename the weights.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .pickles import PICKLES, read_pickle
from .tokenizers import clip_tokenizer

ASSETS = Path(__file__).parent / "assets"
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_VOCAB = 49408


@dataclass(frozen=True)
class Encoder:
    """Where one text encoder sits in a single file, and how it is laid out."""

    name: str                 # diffusers part: text_encoder | text_encoder_2
    prefix: str               # key prefix of its weights in the file
    openclip: bool = False    # OpenCLIP layout (resblocks, fused in_proj) instead of HF CLIP's
    skip_last: bool = False   # SD2 runs OpenCLIP up to its penultimate layer: the file's last layer goes unused
    projection: bool = False  # CLIPTextModelWithProjection (SDXL's second encoder)


ENCODERS = {
    "sd1": (Encoder("text_encoder", "cond_stage_model.transformer.text_model."),),
    "sd2": (Encoder("text_encoder", "cond_stage_model.model.", openclip=True, skip_last=True),),
    "sdxl": (Encoder("text_encoder", "conditioner.embedders.0.transformer.text_model."),
             Encoder("text_encoder_2", "conditioner.embedders.1.model.", openclip=True, projection=True)),
}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file holds, read from its header: family, prediction type and the diffusers configs."""

    path: str
    family: str           # sd1 | sd2 | sdxl
    prediction_type: str  # epsilon | v_prediction
    reason: str           # where prediction_type came from
    configs: dict         # diffusers config per part: unet, vae, text_encoder[, text_encoder_2]

    @property
    def model_channels(self) -> int:
        return self.configs["unet"]["block_out_channels"][0]

    @property
    def context_dim(self) -> int:
        return self.configs["unet"]["cross_attention_dim"]


# ---------------------------------------------------------------- reading


def _header(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(key -> shape, string metadata) without reading the tensor data of a .safetensors file."""
    if path.suffix.lower() in PICKLES:
        state = _pickle_state(path, allow_pickle)
        meta = {"global_step": str(state.pop("global_step"))} if "global_step" in state else {}
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}, meta
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ModelError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def _pickle_state(path: Path, allow_pickle: bool) -> dict:
    if not allow_pickle:
        raise ModelError(f"{path}: {path.suffix} checkpoints are pickles that can run code; convert it with "
                         f"`python scripts/make_single_file.py --from-ckpt {path} OUT.safetensors` "
                         "or pass allow_pickle=True")
    obj = read_pickle(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict", obj), dict):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a checkpoint's dictionary of weights")
    state = dict(obj.get("state_dict", obj))
    if "global_step" in obj:
        state["global_step"] = obj["global_step"]
    return state


def _tensors(path: Path, allow_pickle: bool) -> dict:
    if path.suffix.lower() in PICKLES:
        return {k: v for k, v in _pickle_state(path, allow_pickle).items() if isinstance(v, torch.Tensor)}
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------- detection


def _family(shapes: dict, path: Path) -> str:
    def has(prefix):
        return any(k.startswith(prefix) for k in shapes)

    if not has(UNET):
        top = Counter(k.split(".")[0] + "." for k in shapes).most_common(1)
        what = f"found {top[0][1]} keys starting with '{top[0][0]}'" if top else "found no tensors"
        kind = (" (a LoRA, not a base model)" if has("lora_") else
                " (a diffusers UNet file: pass its pipeline folder)" if has("down_blocks.") else "")
        raise ModelError(f"{path}: {what}{kind} — not a Stable Diffusion 1/2/XL checkpoint "
                         "(expected 'model.diffusion_model.*')")
    if UNET + "input_blocks.0.0.weight" not in shapes:
        first = next(k for k in shapes if k.startswith(UNET))
        raise ModelError(f"{path}: its diffusion model has no input_blocks or joint_blocks (found '{first}') — not a "
                         "Stable Diffusion 1/2/XL UNet or SD3 MMDiT (Flux and other transformers are not supported)")
    family = next((f for f, encoders in ENCODERS.items() if all(has(e.prefix) for e in encoders)), None)
    if family is None:
        found = sorted({".".join(k.split(".")[:3]) for k in shapes if k.startswith(("cond", "conditioner"))})
        raise ModelError(f"{path}: no SD1 (cond_stage_model.transformer), SD2 (cond_stage_model.model) or SDXL "
                         f"(conditioner.embedders.0/1) text encoder; found {found[:4] or 'none'} "
                         "(UNet-only files and SDXL refiners are not supported)")
    if not has(VAE):
        raise ModelError(f"{path}: no VAE weights ('first_stage_model.*'); use a checkpoint with its VAE baked in")
    if shapes[UNET + "input_blocks.0.0.weight"][1] != 4:
        raise ModelError(f"{path}: the UNet takes {shapes[UNET + 'input_blocks.0.0.weight'][1]} input channels "
                         "(inpainting or instruct-pix2pix); only 4-channel text-to-image checkpoints train here")
    return family


def _blocks(shapes: dict, prefix: str, pattern: str) -> set[int]:
    rx = re.compile(re.escape(prefix) + pattern)
    return {int(m[1]) for k in shapes if (m := rx.match(k))}


def _unet_shape_config(s: dict) -> dict:
    """The UNet's structure from its shapes: channels, levels, attention, context width, depth."""
    levels = 1 + len(_blocks(s, UNET, r"input_blocks\.(\d+)\.0\.op\.weight"))
    per = len(_blocks(s, UNET, r"input_blocks\.(\d+)\.")) // levels - 1  # resnets per down level
    first = [1 + i * (per + 1) for i in range(levels)]                    # first input block of each level
    depth = [len(_blocks(s, UNET + f"input_blocks.{b}.1.", r"transformer_blocks\.(\d+)\.")) for b in first]
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


def _vae_shape_config(s: dict) -> dict:
    levels = len(_blocks(s, VAE, r"encoder\.down\.(\d+)\."))
    return dict(in_channels=s[VAE + "encoder.conv_in.weight"][1], out_channels=s[VAE + "decoder.conv_out.weight"][0],
                latent_channels=s[VAE + "decoder.conv_in.weight"][1],
                block_out_channels=[s[VAE + f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
                layers_per_block=len(_blocks(s, VAE, r"encoder\.down\.0\.block\.(\d+)\.")),
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)


def _text_shape_config(s: dict, e: Encoder) -> dict:
    p = e.prefix
    if e.openclip:
        tokens, positions, fc1 = "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc"
        layers = len(_blocks(s, p, r"transformer\.resblocks\.(\d+)\.")) - e.skip_last
    else:
        tokens, positions = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"
        fc1, layers = "encoder.layers.0.mlp.fc1", len(_blocks(s, p, r"encoder\.layers\.(\d+)\."))
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


def _asset(family: str, part: str) -> dict:
    name = "scheduler_config.json" if part == "scheduler" else \
        "tokenizer_config.json" if part.startswith("tokenizer") else "config.json"
    return json.loads((ASSETS / family / part / name).read_text())


def own_configs(meta: dict, path) -> dict:
    """The diffusers configs a file made by sdlora carries in its header (none: {}); a broken header is one line."""
    try:
        return json.loads(meta.get("sdlora.diffusers_configs", "{}"))
    except json.JSONDecodeError:
        raise ModelError(f"{path}: its sdlora.diffusers_configs header is not valid JSON") from None


def _configs(shapes: dict, meta: dict, family: str, path: Path) -> dict:
    """Shipped family config < the file's own sdlora metadata (or the head rules) < what the shapes say."""
    own = own_configs(meta, path)
    derived = {"unet": _unet_shape_config(shapes), "vae": _vae_shape_config(shapes)}
    derived.update({e.name: _text_shape_config(shapes, e) for e in ENCODERS[family]})
    if family == "sdxl":  # size/crop embedding = pooled text (projection width) + 6 time embeddings
        pooled = derived["text_encoder_2"].get("projection_dim", derived["text_encoder_2"]["hidden_size"])
        derived["unet"]["addition_time_embed_dim"] = (derived["unet"]["projection_class_embeddings_input_dim"]
                                                      - pooled) // 6
    widths = sum(derived[e.name]["hidden_size"] for e in ENCODERS[family])
    if widths != derived["unet"]["cross_attention_dim"]:
        raise ModelError(f"{path}: text encoder width {widths} does not match the UNet's context width "
                         f"{derived['unet']['cross_attention_dim']}; the file mixes parts of different models")
    rules = {"unet": _unet_heads, "text_encoder": _text_heads, "text_encoder_2": _text_heads}
    out = {}
    for part, cfg in derived.items():
        base = _asset(family, part)
        fill = own.get(part) or (rules[part](base, cfg) if part in rules else {})
        out[part] = {**base, **fill, **cfg}
    return out


_HOW = ("its configs are not in the file; load its diffusers folder instead, or write the file with "
        "`python scripts/make_single_file.py FOLDER FILE`, which records them")


def _check_standard(part: str, cfg: dict, family: str, path: Path) -> None:
    """Sizes the shapes gave that no standard config of the family can build (a narrow CLIP, other GroupNorm
    groups): a one-line error saying which, instead of a failure deep inside the model constructors."""
    if part.startswith("text_encoder"):
        heads = cfg["num_attention_heads"]
        if heads < 1 or cfg["hidden_size"] % heads:
            raise ModelError(f"{path}: its {part.replace('_', ' ')} is {cfg['hidden_size']} wide, which no standard "
                             f"{family} attention-head width divides; {_HOW}")
        return
    groups = cfg.get("norm_num_groups", 32)
    odd = [c for c in cfg["block_out_channels"] if c % groups]
    if odd:
        raise ModelError(f"{path}: its {part.upper()} has {odd[0]} channels, not divisible by the {groups} "
                         f"normalisation groups of a standard {family} {part}; {_HOW}")
    heads = cfg.get("attention_head_dim")
    if part == "unet" and isinstance(heads, list) and any(h < 1 for h in heads):
        raise ModelError(f"{path}: its UNet channels {cfg['block_out_channels']} are narrower than one standard "
                         f"{family} attention head; {_HOW}")


def _prediction(family: str, shapes: dict, meta: dict, path: Path) -> tuple[str, str]:
    if "v_pred" in shapes:
        return "v_prediction", "the file has a 'v_pred' key"
    said = meta.get("modelspec.prediction_type", "")
    if said in ("epsilon", "v", "v_prediction"):
        return ("epsilon" if said == "epsilon" else "v_prediction"), "the file's modelspec.prediction_type"
    if family != "sd2":
        return "epsilon", f"{family} models predict noise unless the file says otherwise"
    hint = " ".join([meta.get("modelspec.resolution", ""), meta.get("modelspec.architecture", ""), path.name])
    if "768" in hint:
        return "v_prediction", "SD2 at 768 px (the 768-v model)"
    if "512" in hint or meta.get("global_step") == "875000":
        return "epsilon", "SD2 at 512 px (the 512-base model)"
    return "v_prediction", ("SD2 without a resolution hint: assuming the 768-v model; "
                            "pass --prediction-type epsilon for a 512-base one")


def detect_checkpoint(path: str | Path, allow_pickle: bool = False) -> CheckpointInfo:
    """Read family, sizes and prediction type from a single file's header (no tensor data is read).

    Family comes from the text encoders' key layout: `cond_stage_model.transformer.*` (SD1, CLIP-L),
    `cond_stage_model.model.*` (SD2, OpenCLIP-H), `conditioner.embedders.0/1.*` (SDXL). Prediction type: a `v_pred`
    key or `modelspec.prediction_type` metadata wins; otherwise SD1/SDXL are epsilon, and SD2 is v_prediction unless
    its metadata or file name says 512 (the 512-base model); `reason` says which rule decided. `configs`: the shapes
    decide every size; what shapes cannot tell (head counts, norm groups, activation) comes from the file's
    `sdlora.diffusers_configs` header (written by `save_single_file`), else from the shipped family configs and the
    family's head width (SD2/XL) or head count (SD1). A `.ckpt` is only opened with `allow_pickle=True` (through
    `pickles.read_pickle`, which runs no code from it). Raises ModelError naming what was found when the file is not
    an SD1/SD2/SDXL checkpoint.
    """
    from . import single_file_sd3 as sd3

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    shapes, meta = _header(path, allow_pickle)
    if sd3.mmdit_prefix(shapes) is not None:
        return CheckpointInfo(str(path), "sd3", "flow", "SD3 models train by flow matching",
                              sd3.configs(shapes, meta, path))
    family = _family(shapes, path)
    prediction, reason = _prediction(family, shapes, meta, path)
    return CheckpointInfo(str(path), family, prediction, reason, _configs(shapes, meta, family, path))


# ---------------------------------------------------------------- loading


def _tokenizer(path: Path, family: str, name: str, vocab_size: int):
    """A `<file stem>.<name>/` folder next to the file wins; else CLIP's own tokenizer when the vocabulary fits."""
    from transformers import CLIPTokenizer

    sidecar = path.with_suffix(f".{name}")
    if sidecar.is_dir():
        return CLIPTokenizer.from_pretrained(str(sidecar))
    if vocab_size != CLIP_VOCAB:
        raise ModelError(f"{path}: its text encoder has {vocab_size} tokens, not CLIP's {CLIP_VOCAB}; put its "
                         f"tokenizer folder at {sidecar}/")
    cfg = _asset(family, name)
    return clip_tokenizer(cfg["pad_token"], cfg["model_max_length"])


def _build(model, state: dict, what: str, path: Path, dtype: torch.dtype = torch.float32):
    """Load `state` into a model built on the meta device (in `dtype`); every weight must be there with its
    shape."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    if missing:
        raise ModelError(f"{path}: {what} weights are incomplete ({len(missing)} missing, e.g. '{missing[0]}'); "
                         "the file is truncated or not a standard checkpoint")
    try:
        model.load_state_dict({k: state[k].to(dtype) for k in want}, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: {what} weights do not fit the detected config: "
                         f"{str(e).splitlines()[-1].strip()}") from None
    return model.eval()


def load_single_file(path: str | Path, prediction_type: str = "auto", allow_pickle: bool = False, *,
                     text_encoders: str = "", t5: bool | None = True, dtype: torch.dtype | None = None) -> dict:
    """Build unet, vae, text_encoder(s), tokenizer(s) and scheduler from one checkpoint file, offline (fp32).

    `prediction_type` 'auto' follows `detect_checkpoint`; 'epsilon' or 'v_prediction' overrides it. Tokenizers:
    a folder named `<file stem>.tokenizer/` (`.tokenizer_2/` for SDXL) next to the file is used when present (tiny
    or custom models, written by `save_single_file`); otherwise CLIP's tokenizer, rebuilt from shipped files.
    """
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    info = detect_checkpoint(path, allow_pickle)
    if info.family == "sd3":
        from . import single_file_sd3

        return single_file_sd3.load(path, info, _tensors(path, allow_pickle), text_encoders, t5, dtype)
    for part, part_cfg in info.configs.items():
        _check_standard(part, part_cfg, info.family, path)
    state, cfg = _tensors(path, allow_pickle), info.configs
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        encoders = [(CLIPTextModelWithProjection if e.projection else CLIPTextModel)(
            CLIPTextConfig.from_dict(cfg[e.name])) for e in ENCODERS[info.family]]
    parts = {"unet": _build(unet, sfu.convert_ldm_unet_checkpoint(state, cfg["unet"]), "UNet", path),
             "vae": _build(vae, sfu.convert_ldm_vae_checkpoint(state, cfg["vae"]), "VAE", path)}
    for e, model in zip(ENCODERS[info.family], encoders):
        if e.openclip:
            sd = sfu.convert_open_clip_checkpoint(model, state, prefix=e.prefix)
        else:
            sd = {"text_model." + k[len(e.prefix):]: v for k, v in state.items() if k.startswith(e.prefix)}
        if not hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        parts[e.name] = _build(model, sd, e.name.replace("_", " "), path)
        tok = e.name.replace("text_encoder", "tokenizer")
        parts[tok] = _tokenizer(path, info.family, tok, cfg[e.name]["vocab_size"])
    sched = _asset(info.family, "scheduler")
    kind = info.prediction_type if prediction_type == "auto" else prediction_type
    parts["scheduler"] = getattr(diffusers, sched["_class_name"]).from_config({**sched, "prediction_type": kind})
    return parts


# ---------------------------------------------------------------- writing


_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_to_ldm(sd: dict) -> dict:
    """diffusers UNet keys -> `model.diffusion_model.*` (input/middle/output blocks, as kohya names SDXL layers)."""
    from .families.naming import sgm_path

    per = len(_blocks(sd, "down_blocks.0.resnets.", r"(\d+)\."))  # resnets per down block
    up_attn = tuple(bool(_blocks(sd, f"up_blocks.{i}.attentions.", r"(\d+)\."))
                    for i in range(len(_blocks(sd, "up_blocks.", r"(\d+)\."))))
    out = {}
    for key, v in sd.items():
        head, _, leaf = key.rpartition(".")
        new = f"{_UNET_FIXED[head]}.{leaf}" if head in _UNET_FIXED else sgm_path(key, per, up_attn)
        if new == key:
            raise ModelError(f"cannot write UNet weight '{key}' in the original layout (unknown block)")
        out[UNET + new] = v
    return out


def _vae_to_ldm(sd: dict) -> dict:
    """diffusers VAE keys -> `first_stage_model.*` (down/up levels numbered from the top, 1x1-conv attention)."""
    n_up = len(_blocks(sd, "decoder.up_blocks.", r"(\d+)\."))
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
        n = len(_blocks(sd, "encoder.layers.", r"(\d+)\."))
        last = f"{e.prefix}transformer.resblocks.{n - 1}."
        out.update({k.replace(last, f"{e.prefix}transformer.resblocks.{n}."): torch.zeros_like(v)
                    for k, v in list(out.items()) if k.startswith(last)})
        width = out[e.prefix + "token_embedding.weight"].shape[1]
        out[e.prefix + "text_projection"] = torch.eye(width, dtype=out[e.prefix + "token_embedding.weight"].dtype)
    return out


def to_ldm(family: str, parts: dict) -> dict:
    """diffusers state dicts ({'unet': ..., 'vae': ..., 'text_encoder': ...}) -> one state dict in the original
    single-file layout of `family`: the inverse of diffusers' `convert_ldm_*` functions."""
    out = {**_unet_to_ldm(parts["unet"]), **_vae_to_ldm(parts["vae"])}
    for e in ENCODERS[family]:
        out.update(_text_to_ldm(parts[e.name], e))
    return out


def ldm_contents(family: str, models: dict, prediction: str) -> tuple[dict, dict[str, str]]:
    """(state dict, header) of a single file for diffusers models {'unet', 'vae', 'text_encoder'(, '_2')} (SD3:
    {'transformer', 'vae', 'text_encoder', 'text_encoder_2'(, 'text_encoder_3')}).

    A v-prediction model gets an empty `v_pred` key; the header records the diffusers configs
    (`sdlora.diffusers_configs`) so that non-standard sizes reload exactly."""
    if family == "sd3":  # Stability's SD3 layout (single_file_sd3)
        from .single_file_sd3 import original_state

        models = {k: m for k, m in models.items() if m is not None}
        state = original_state(models)
    else:
        state = to_ldm(family, {k: m.state_dict() for k, m in models.items()})
    if prediction == "v_prediction":
        state["v_pred"] = torch.zeros(0)
    configs = {k: {n: v for n, v in (m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)).items()
                   if not n.startswith("_")} for k, m in models.items()}
    return state, {"sdlora.diffusers_configs": json.dumps(configs), "modelspec.prediction_type": prediction}


def save_single_file(pipeline_folder: str | Path, out_path: str | Path) -> Path:
    """Write a diffusers SD1/SD2/SDXL folder as one `.safetensors` file in the original LDM/SGM layout (fp32).

    A v-prediction model gets an empty `v_pred` key. The header records the folder's diffusers configs
    (`sdlora.diffusers_configs`) so that non-standard sizes reload exactly; a tokenizer that is not CLIP's is copied
    next to the file as `<stem>.tokenizer/` (and `.tokenizer_2/`), where `load_single_file` looks for it.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .families import detect_family

    folder, out = Path(pipeline_folder), Path(out_path)
    if (folder / "transformer").is_dir():
        return _save_sd3_file(folder, out)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    family = detect_family(dict(unet.config), {p.name for p in folder.iterdir() if p.is_dir()}).name
    models = {"unet": unet, "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae")}
    for e in ENCODERS[family]:
        cls = CLIPTextModelWithProjection if e.projection else CLIPTextModel
        models[e.name] = cls.from_pretrained(folder, subfolder=e.name)
    prediction = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type",
                                                                                                "epsilon")
    state, meta = ldm_contents(family, models, prediction)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    for e in ENCODERS[family]:
        tok = e.name.replace("text_encoder", "tokenizer")
        if models[e.name].config.vocab_size != CLIP_VOCAB:
            shutil.copytree(folder / tok, out.with_suffix(f".{tok}"), dirs_exist_ok=True)
    return out


def _save_sd3_file(folder: Path, out: Path) -> Path:
    """An SD3 diffusers folder as one file in Stability's layout (T5 included when the folder has it), with the
    tokenizers that cannot be rebuilt (not CLIP's, and T5's) beside it."""
    from safetensors.torch import save_file

    from .models import load_components

    c = load_components(str(folder), t5=(folder / "text_encoder_3").is_dir())
    models = {"transformer": c.denoiser, "vae": c.vae, "text_encoder": c.text_encoders[0],
              "text_encoder_2": c.text_encoders[1], "text_encoder_3": c.frozen_text[0].model}
    state, meta = ldm_contents("sd3", models, "flow")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    save_tokenizers(out, c.tokenizers, c.text_encoders, c.frozen_text)
    return out


def save_tokenizers(out_path: str | Path, tokenizers: list, encoders: list, frozen: list = ()) -> None:
    """Beside a single file, the tokenizers that are not CLIP's (`<stem>.tokenizer/`, `.tokenizer_2/`) and a frozen
    encoder's (SD3's T5: `.tokenizer_3/`), where `load_single_file` looks for them."""
    for name, tok, enc in zip(("tokenizer", "tokenizer_2"), tokenizers, encoders):
        if enc.config.vocab_size != CLIP_VOCAB:
            tok.save_pretrained(Path(out_path).with_suffix(f".{name}"))
    for f in frozen:
        if f.tokenizer is not None and f.present:
            f.tokenizer.save_pretrained(Path(out_path).with_suffix(".tokenizer_3"))


def ckpt_to_safetensors(ckpt: str | Path, out_path: str | Path) -> Path:
    """Rewrite a pickled `.ckpt` as `.safetensors` (tensors only, read by `pickles.read_pickle`: no code from the
    file runs)."""
    from .io import save_safetensors

    state = _tensors(Path(ckpt), allow_pickle=True)
    seen, unique = set(), {}
    for k, v in state.items():  # safetensors refuses tensors sharing memory: copy the repeats
        unique[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v.contiguous()
        seen.add(v.untyped_storage().data_ptr())
    save_safetensors(unique, out_path)
    return Path(out_path)
