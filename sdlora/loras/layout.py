"""The key layouts of LoRA files, in one place: how layers are named (kohya, diffusers/PEFT, older diffusers), how
each layout's keys are read into modules and written back, and the one rule for embeddings bundled in a LoRA file.
They follow what AUTOMATIC1111, ComfyUI, kohya's sd-scripts and diffusers load (checked against their loaders in the
tests).

Inside sdlora a LoRA is `{kohya base name: module}`. A base name is what kohya's layout calls a layer
(`lora_unet_down_blocks_0_..._to_k`, `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`); files in other
layouts are read into the same form, and a `NameMap` ties base names to the modules of a model. SD3 is keyed by
diffusers module (`lora_unet_transformer_blocks_0_attn_to_q`), one per Linear; its kohya files' fused q/k/v layers
are split on reading and fused on writing (`mmdit`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import LoraFileError
from ..families import FAMILIES, Family
from . import mmdit
from .modules import AXES, DoraModule, LohaModule, LokrModule, LoraModule, is_plain, magnitude_shape
from .networks import NETWORKS, PEFT_TENSORS

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the adapter config
BUNDLE = "bundle_emb."                       # A1111's embeddings inside a LoRA file
DENOISER_PREFIX = "lora_unet"


# ---------------------------------------------------------------- names

def te_path(path: str) -> str:
    """CLIP module path with the 'text_model.' part that transformers 5 dropped (A1111/ComfyUI need it)."""
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_base(prefix: str, path: str) -> str:
    """kohya base name of a module: 'lora_unet_down_blocks_0_...' or 'lora_te_text_model_encoder_...'."""
    if prefix.startswith("lora_te"):
        path = te_path(path)
    return f"{prefix}_{path.replace('.', '_')}"


def denoiser_namer(family: Family, denoiser_config) -> Callable[[str], str]:
    """diffusers module path -> the path kohya names the layer after (SDXL: the original SGM names)."""
    return family.kohya_naming.path(denoiser_config)


@dataclass
class NameMap:
    """Which model module each kohya base name means, for one model (its family's spelling, plus the aliases other
    trainers write: diffusers UNet paths for SDXL, `lora_te_` for SDXL's first encoder)."""

    to_module: dict[str, tuple[str, str]] = field(default_factory=dict)  # base (or alias) -> (part, module path)
    to_base: dict[tuple[str, str], str] = field(default_factory=dict)    # (part, module path) -> canonical base

    def add(self, part: str, path: str, base: str, *aliases: str) -> None:
        self.to_base[(part, path)] = base
        for name in (*aliases, base):
            self.to_module[name] = (part, path)

    def canonical(self, mods: dict) -> dict:
        """`mods` keyed by the model's own spelling of each base (unknown bases are kept as they are)."""
        return {self.to_base.get(self.to_module.get(b, ("", "")), b): m for b, m in mods.items()}


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer itself, where an adapter (peft) wraps it."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def adaptable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, layer) of every Linear and Conv2d of a model: an adapter-wrapped layer under its own path, and nothing
    from inside an adapter."""
    wrappers = [path + "." for path, m in model.named_modules() if hasattr(m, "get_base_layer") and path]
    out = []
    for path, m in model.named_modules():
        if any(path.startswith(w) for w in wrappers):
            continue
        if isinstance(base_layer(m), (torch.nn.Linear, torch.nn.Conv2d)):
            out.append((path, base_layer(m)))
    return out


def name_map(family: Family, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> NameMap:
    """The NameMap of a model's Linear and Conv2d layers."""
    names, namer = NameMap(), denoiser_namer(family, denoiser.config)
    for path, _ in adaptable_layers(denoiser):
        names.add(family.denoiser_attr, path, kohya_base(DENOISER_PREFIX, namer(path)),
                  kohya_base(DENOISER_PREFIX, path))
    for slot, encoder in zip(family.text_encoders, text_encoders):
        for path, _ in adaptable_layers(encoder):
            names.add(slot.attr, path, kohya_base(slot.kohya_prefix, path),
                      *(kohya_base(a, path) for a in slot.kohya_aliases))
    return names


def model_layers(family: Family, denoiser: torch.nn.Module, text_encoders: list,
                 aliases: bool = True) -> dict[str, torch.nn.Module]:
    """kohya base name -> Linear/Conv2d module of the denoiser and text encoders; with `aliases`, every spelling
    other trainers use for the same layer too."""
    names = name_map(family, denoiser, text_encoders)
    parts = family.parts(denoiser, text_encoders)
    if aliases:
        return {b: base_layer(parts[part].get_submodule(path)) for b, (part, path) in names.to_module.items()}
    return {b: base_layer(parts[part].get_submodule(path)) for (part, path), b in names.to_base.items()}


def _reference_model(family: Family):
    """The family's standard denoiser (its shipped config with the family's reference overrides) and text encoders
    (named right, sized at CLIP's defaults), as meta-device models: no weights, no download."""
    import diffusers
    import transformers

    with torch.device("meta"):
        denoiser = getattr(diffusers, family.denoiser_class).from_config(family.reference_config())
        encoders = [getattr(transformers, s.model_class)(transformers.CLIPTextConfig(num_hidden_layers=32))
                    for s in family.text_encoders]
    return denoiser, encoders


def reference_name_map(family: Family) -> NameMap:
    """The NameMap of the family's standard architecture."""
    return name_map(family, *_reference_model(family))


def reference_weights(family: Family) -> dict[str, torch.Tensor]:
    """kohya base name -> meta-device weight of each denoiser layer of the family's standard architecture: the
    shapes that tell a flattened LoHa/LoKr conv update its kernel."""
    denoiser = _reference_model(family)[0]
    names = name_map(family, denoiser, [])
    return {b: denoiser.get_submodule(path).weight for b, (_, path) in names.to_module.items()}


# ---------------------------------------------------------------- bundled embeddings

def bundle_tensors(token: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A1111's LoRA-embedding bundle: SD1/SD2 `bundle_emb.<token>.string_to_param.*`, SDXL `bundle_emb.<token>.clip_l`
    and `.clip_g`."""
    if set(parts) == {"clip_l"}:
        return {f"{BUNDLE}{token}.string_to_param.*": parts["clip_l"]}
    return {f"{BUNDLE}{token}.{k}": v for k, v in parts.items()}


def split_embeddings(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Separate `bundle_emb.<token>.<part>` tensors from the LoRA tensors: (lora, {token: {part: tensor}})."""
    lora, emb = {}, defaultdict(dict)
    for k, v in tensors.items():
        if not k.startswith(BUNDLE):
            lora[k] = v
            continue
        rest = k[len(BUNDLE):]
        if ".string_to_param." in rest:  # SD1/SD2 A1111 layout
            emb[rest.split(".string_to_param.")[0]]["clip_l"] = v
        else:
            token, _, part = rest.rpartition(".")
            emb[token or rest][part if token else "clip_l"] = v
    return lora, dict(emb)


# ---------------------------------------------------------------- reading any layout

# the module types a file's layer can be: every network type's, but DoRA's, which wraps one of them; LyCORIS's first
# (their tensor names say them, where four layouts name a LoRA's). And each type's role of each of its kohya / LyCORIS
# tensors, what `assemble` reads: a LoRA's roles are its fields, a LoHa's and LoKr's their LyCORIS names (their fields
# clash), DoRA's magnitude its own
TYPES = tuple(sorted(dict.fromkeys(n.module for n in NETWORKS.values() if n.module is not DoraModule),
                     key=lambda cls: cls is LoraModule))
ROLES = {cls: {k: (f if cls is LoraModule else k) for k, f in cls.TENSORS.items()} for cls in (*TYPES, DoraModule)}
# tensor-name suffix -> role, for every layout diffusers, ComfyUI or A1111 load (LyCORIS's LoHa/LoKr/DoRA keys
# as A1111's network_hada/network_lokr/network.py and ComfyUI's comfy/weight_adapter read them)
SUFFIXES = {**{f".{k}": role for roles in ROLES.values() for k, role in roles.items()}, ".alpha": "alpha",
            ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
            ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
            ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"}
# older diffusers attention processors: <attention>.processor.to_q_lora.down.weight -> <attention>.to_q (UNet),
# text_encoder.<attention>.to_q_lora.down.weight -> <attention>.q_proj (text encoder)
PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_NAMES = {"unet": {"to_out": "to_out.0"},
                    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
FILE_PREFIXES = {"unet": DENOISER_PREFIX, "transformer": DENOISER_PREFIX, "text_encoder": "lora_te",
                 "text_encoder_2": "lora_te2"}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
UNPREFIXED_UNET = ("down_blocks.", "mid_block.", "up_blocks.")  # diffusers' oldest UNet-only files
REFUSED = {".lokr_t1": "LoKr lokr_t1 (no client reads it)", ".oft_": "OFT", ".diff": "LyCORIS full-weight (diff)",
           ".w_norm": "LyCORIS norm layers", ".b_norm": "LyCORIS norm layers", ".a1.weight": "GLoRA",
           ".on_input": "(IA)^3"}


def _split_key(key: str) -> tuple[str, str]:
    """(module stem, role) of one tensor name; raises naming the key when no layout has it."""
    if m := PROCESSOR.match(key):
        names = _PROCESSOR_NAMES["text" if key.startswith("text_encoder") else "unet"]
        return f"{m[1]}.{names.get(m[2], m[2])}", m[3]
    for suffix, role in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    for marker, what in REFUSED.items():
        if marker in key:
            raise LoraFileError(f"key {key}: {what} is not supported by this sdlora")
    raise LoraFileError(f"key {key} is in no LoRA layout sdlora reads (kohya lora_down/lora_up, LyCORIS "
                        "hada_*/lokr_*/dora_scale, PEFT lora_A/lora_B, diffusers lora.down/lora.up or processor keys)")


def _base_of(stem: str, key: str) -> tuple[str, str, str]:
    """(kohya base, file part, module path) of a module stem in any layout."""
    if stem.startswith(KOHYA_PREFIXES):
        return stem, "", ""
    if stem.startswith("lora_transformer_"):  # OneTrainer's SD3 names: diffusers paths (what sdlora keys SD3 by)
        return DENOISER_PREFIX + stem[len("lora_transformer"):], "", ""
    part, _, path = stem.partition(".")
    if stem.startswith(UNPREFIXED_UNET):
        part, path = "unet", stem
    if part not in FILE_PREFIXES or not path:
        raise LoraFileError(f"key {key}: expected a kohya name (lora_unet_..., lora_te_...) or a diffusers one "
                            "starting with unet., transformer., text_encoder. or text_encoder_2.")
    return kohya_base(FILE_PREFIXES[part], path), part, path


def _adapter_config(meta: dict[str, str]) -> dict:
    if LORA_METADATA_KEY not in meta:
        return {}
    try:
        cfg = json.loads(meta[LORA_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise LoraFileError(f"its {LORA_METADATA_KEY} header is not valid JSON ({e.msg}), so its alphas are "
                            "unknown") from None
    if not isinstance(cfg, dict):
        raise LoraFileError(f"its {LORA_METADATA_KEY} header is not a JSON object, so its alphas are unknown")
    return cfg


def _pattern_value(patterns: dict | None, path: str, default):
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key) or te_path(path).endswith(key):
            return value
    return default


def detect_layout(keys) -> str:
    """'kohya', 'diffusers' (PEFT or older diffusers keys) or 'unknown', from the key names."""
    keys = [k for k in keys if not k.startswith(BUNDLE)]
    if keys and all(k.startswith("lora_") for k in keys):
        return "kohya"
    if keys and any(k.startswith((*(p + "." for p in FILE_PREFIXES), *UNPREFIXED_UNET)) for k in keys):
        return "diffusers"
    return "unknown"


def parse_modules(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> dict:
    """The adapted layers of a file in any layout, keyed by kohya base name (embeddings left out): LoRA, LoHa, LoKr,
    each with DoRA's magnitude when it has one (`modules`).

    Alpha: kohya's `.alpha` tensors (none: scale 1, as A1111 and ComfyUI read it); for PEFT files
    `lora_adapter_metadata` (alpha_pattern included), else alpha = rank. Any key no layout explains is an error
    naming it: never a partial read. SD3 files in the original MMDiT layout come out keyed by diffusers module
    (q/k/v split, see `mmdit`)."""
    cfg = _adapter_config(meta or {})
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    keys: dict[str, dict[str, str]] = defaultdict(dict)
    where: dict[str, tuple[str, str]] = {}
    for key, value in split_embeddings(tensors)[0].items():
        stem, role = _split_key(key)
        base, part, path = _base_of(stem, key)
        if role in groups[base]:
            raise LoraFileError(f"key {key}: module {base} has two '{role}' tensors (mixed layouts)")
        groups[base][role], keys[base][role] = value, key
        where[base] = (part, path)
    mods = {}
    for base, g in groups.items():
        alpha = float(g.pop("alpha").item()) if "alpha" in g else None
        part, path = where[base]
        if part and f"{part}.lora_alpha" in cfg and "down" in g:
            alpha = float(_pattern_value(cfg.get(f"{part}.alpha_pattern"), path, cfg[f"{part}.lora_alpha"]))
        mods[base] = assemble(base, g, alpha, keys[base])
    return mmdit.from_file(mods) if mmdit.is_file_layout(mods) else mods


# tensors that come together (either one alone is a broken module), and what each type cannot lack
_PAIRS = (("down", "up"), ("w1a", "w1b"), ("w2a", "w2b"), ("t1", "t2"))
_NEEDED = {LohaModule: ("w1a", "w2a"), LokrModule: ("w1", "w2"), LoraModule: ("down", "up")}


def assemble(base: str, g: dict[str, torch.Tensor], alpha: float | None, keys: dict[str, str] | None = None):
    """One module from its tensors by role (`SUFFIXES`' roles); alpha None means scale 1 (alpha = rank), as A1111 and
    ComfyUI read a module without one. A tensor that does not belong with the others, or a missing one, is an error
    naming a key of the module (`keys`: role -> tensor name)."""
    g = dict(g)
    key = {r: (keys or {}).get(r, f"{base}.{r}") for r in g}
    magnitude = {r: g.pop(r) for r in ("dora_scale", "magnitude", "input_magnitude") if r in g}
    cls = next((c for c in TYPES if any(r in ROLES[c].values() for r in g)), None)
    if cls is None:
        raise LoraFileError(f"key {next(iter(key.values()))}: module {base} has no LoRA, LoHa or LoKr tensors")
    names = {ROLES[cls][k]: f for k, f in cls.TENSORS.items()}  # role -> field
    stray = [r for r in g if r not in names] + list(magnitude)[1:]
    if stray:
        raise LoraFileError(f"key {key[stray[0]]} does not go with the other tensors of {base} (mixed layouts)")
    kw = {names[r]: v for r, v in g.items()}
    some = key[next(iter(g))]
    if "mid" in kw and not ("down" in kw and "up" in kw):
        raise LoraFileError(f"key {key['mid']}: a Tucker lora_mid needs its module's lora_down and lora_up")
    for a, b in _PAIRS[: None if cls is LohaModule else -1]:  # LoKr has a Tucker core on its w2 side only
        if (a in kw) != (b in kw):
            raise LoraFileError(f"key {some}: module {base} lacks its {a if b in kw else b} tensor")
    for need in _NEEDED[cls]:
        if need not in kw and need + "a" not in kw:
            raise LoraFileError(f"key {some}: module {base} lacks its {need} tensor")
    if "mid" in kw and kw["down"].shape[2:] != (1, 1):
        raise LoraFileError(f"key {key['mid']}: a Tucker lora_mid needs a 1x1 lora_down")
    if "t2" in kw and cls is LokrModule and "w2a" not in kw:
        raise LoraFileError(f"key {key['lokr_t2']}: lokr_t2 needs lokr_w2_a and lokr_w2_b")
    module = cls(alpha=1.0, **kw)
    module = dataclasses.replace(module, alpha=float(alpha if alpha is not None else module.rank or 1.0))
    return _with_magnitude(key, module, magnitude)


def _with_magnitude(key: dict[str, str], module, magnitude: dict[str, torch.Tensor]):
    """DoRA around `module` when the file has a magnitude: kohya's dora_scale (its axis read from its shape, as
    ComfyUI does: first dim = out means the output axis), PEFT's lora_magnitude_vector (output axis, [out] or
    [1, out, 1, 1]) or sdlora's trainer's input-axis vector [in]."""
    if not magnitude:
        return module
    ((role, m),) = magnitude.items()
    out = module.weight_shape[0]
    if role in ("magnitude", "input_magnitude"):
        axis = "output" if role == "magnitude" else "input"
        shape = magnitude_shape(axis, module.weight_shape)
        if m.numel() != math.prod(shape):
            raise LoraFileError(f"key {key[role]}: a magnitude of {m.numel()} values for a layer of shape "
                                f"{tuple(module.weight_shape)} ({axis} axis)")
        return DoraModule(module, m.reshape(shape), axis)
    if m.dim() < 2:
        raise LoraFileError(f"key {key[role]}: dora_scale is 1-D {tuple(m.shape)}, which no client reads one way "
                            "(ComfyUI broadcasts it wrongly); expected [1, in] or [out, 1]")
    if m.shape[0] == out and m.numel() == out:
        return DoraModule(module, m, AXES[1])
    if m.shape[0] == 1 and m.numel() == m.shape[1]:
        return DoraModule(module, m, AXES[0])
    raise LoraFileError(f"key {key[role]}: dora_scale {tuple(m.shape)} fits neither axis of a layer with {out} "
                        "outputs")


# ---------------------------------------------------------------- writing

def common_alpha(mods: dict) -> float:
    return next(iter(mods.values())).alpha if mods else 0.0


def kohya_tensors(mods: dict, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """kohya tensors with one alpha value for the whole file (exact in every client): a module trained with another
    alpha/rank ratio keeps its update, its `up` (LoHa: w1_a, LoKr: w1) multiplied by alpha_m / A. DoRA's dora_scale
    stays fp32, as LyCORIS saves it: it scales the whole base weight, so fp16 rounding would move every output.
    SD3 layers are written in the original MMDiT layout (`mmdit.to_file`): a fused q/k/v layer's alpha is then the
    sum of its parts' (3 A), so alpha / rank stays A / rank everywhere. A LoKr Tucker conv (lokr_t2) is written
    without its core (`LokrModule.without_tucker`), the form ComfyUI can apply."""
    common, out = common_alpha(mods), {}
    mods = {b: _readable(m.with_alpha(common)) for b, m in mods.items()}
    if mmdit.is_internal(mods):
        mods = mmdit.to_file(mods)
    for base, m in mods.items():
        for suffix, t in m.tensors().items():
            out[f"{base}.{suffix}"] = t.float() if suffix == "dora_scale" else t.to(dtype)
        out[f"{base}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
    return out


def _readable(m):
    """A module in a form every client applies: a LoKr's Tucker core multiplied out (also under DoRA)."""
    if isinstance(m, DoraModule):
        return dataclasses.replace(m, inner=_readable(m.inner))
    return m.without_tucker() if isinstance(m, LokrModule) else m


def diffusers_tensors(mods: dict, names: NameMap, dtype=torch.float16) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, str]]:
    """diffusers/PEFT layout: each module's alpha/rank folded into lora_B (scale 1), ranks that differ from the most
    common one listed in rank_pattern/alpha_pattern of `lora_adapter_metadata` (what diffusers reads). DoRA on the
    output axis travels as PEFT's `lora_magnitude_vector` (with use_dora in the metadata); diffusers loads no other
    type (LoHa, LoKr, input-axis DoRA, Tucker mid): that is an error naming the layer."""
    unknown = [b for b in mods if b not in names.to_module]
    if unknown:
        raise LoraFileError(f"{len(unknown)} LoRA layers map to no module of the model (first: {unknown[0]}); "
                            "pass --model with the base model to map them")
    out, by_part, dora = {}, {}, {}
    for base, m in mods.items():
        lora = m.inner if isinstance(m, DoraModule) and m.axis == "output" else m
        if not is_plain(lora):
            raise LoraFileError(f"layer {base} is {m.kind}{' on the input axis' if isinstance(m, DoraModule) else ''}"
                                ", which diffusers cannot load: keep the kohya layout (A1111, ComfyUI)")
        part, path = names.to_module[base]
        key = f"{part}.{te_path(path) if part.startswith('text_encoder') else path}"
        out[f"{key}.lora_A.weight"] = lora.down.to(dtype)
        out[f"{key}.lora_B.weight"] = (lora.up.float() * lora.scale).to(dtype)
        if m is not lora:  # PEFT's shape: [out] for a Linear, [1, out, 1, 1] for a conv. With ".weight": without
            # it transformers 5 does not load a text encoder's magnitude (measured); the UNet loads either spelling
            shape = (m.weight_shape[0],) if len(m.weight_shape) == 2 else (1, m.weight_shape[0], 1, 1)
            out[f"{key}.lora_magnitude_vector.weight"] = m.magnitude.float().reshape(shape)
        dora.setdefault(part, set()).add(m is not lora)
        by_part.setdefault(part, {})[path.removeprefix("text_model.")] = lora.rank
    cfg = {}
    for part, ranks in by_part.items():
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {p: k for p, k in ranks.items() if k != r}
        cfg.update({f"{part}.r": r, f"{part}.lora_alpha": r, f"{part}.target_modules": sorted(ranks)})
        if pattern:
            cfg.update({f"{part}.rank_pattern": pattern, f"{part}.alpha_pattern": pattern})
        if len(dora[part]) > 1:
            raise LoraFileError(f"the {part} layers are partly DoRA, partly LoRA: diffusers loads one kind per model")
        if True in dora[part]:
            cfg[f"{part}.use_dora"] = True
    return out, {LORA_METADATA_KEY: json.dumps(cfg, sort_keys=True)} if cfg else {}


def peft_modules(states: dict[str, dict[str, torch.Tensor]], alpha: float, family: Family, denoiser_config,
                 ranks: dict[str, dict[str, tuple[int, float]]] | None = None) -> tuple[dict, NameMap]:
    """peft state dicts keyed by model part ('unet', 'text_encoder', ...) -> modules keyed by kohya base name, and
    the NameMap of those modules. `ranks`: {part: {path: (r, alpha)}} where a layer's differ from `alpha`.

    peft scales LoKr by alpha/r even when both its factors are full matrices, where A1111 and ComfyUI use 1: that
    scale is baked into lokr_w1 then."""
    prefixes = {s.attr: s.kohya_prefix for s in family.text_encoders}
    namer = denoiser_namer(family, denoiser_config)
    mods, names = {}, NameMap()
    for part, state in states.items():
        groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, value in state.items():
            suffix = next((s for s in PEFT_TENSORS if key.endswith(s)), None)
            if suffix is None:
                raise LoraFileError(f"adapter weight {key} of the {part} is of no type sdlora writes")
            groups[key[: -len(suffix)]][PEFT_TENSORS[suffix]] = value
        for path, g in groups.items():
            base = kohya_base(prefixes[part], path) if part in prefixes else kohya_base(DENOISER_PREFIX, namer(path))
            names.add(part, path, base)
            r, a = (ranks or {}).get(part, {}).get(path, (None, alpha))
            m = assemble(base, g, a)
            inner = m.inner if isinstance(m, DoraModule) else m
            if isinstance(inner, LokrModule) and inner.rank is None:
                inner = dataclasses.replace(inner, w1=inner.w1.float() * (a / (r or alpha)))
                m = dataclasses.replace(m, inner=inner) if isinstance(m, DoraModule) else inner
            mods[base] = m
    return mods, names


# ---------------------------------------------------------------- which family a file is for

def guess_family(mods: dict, meta: dict[str, str]) -> tuple[str, str]:
    """(family named by the metadata, family the layer names and shapes say); '' where unknown."""
    version = meta.get("sdlora_family") or meta.get("ss_base_model_version", "")
    from_meta = next((f.name for f in FAMILIES.values() if f.labelled(version)), "")
    return from_meta, _family_of_layers(mods, from_meta)


def _family_of_layers(mods: dict, from_meta: str) -> str:
    """The family a file's layers say, by the first rule that tells: layer names only one family has (SD3's); the
    text-encoder prefixes of the families with several encoders (SDXL's and SD3's lora_te1/lora_te2: the one the
    metadata names, else one whose layer names would have told); one context width (the key width of the UNet's
    cross-attention, or the text encoder's) that one family's UNet has; kohya names only one naming writes (SGM)."""
    families = list(FAMILIES.values())
    own = next((f for f in families if f.lora_names is not None and f.lora_names(mods)), None)
    if own is not None:
        return own.name
    several = [f for f in families if len(f.text_encoders) > 1]
    if any(b.startswith(f"{s.kohya_prefix}_") for f in several for s in f.text_encoders for b in mods):
        named = next((f for f in several if f.name == from_meta), None)
        return (named or next((f for f in several if f.lora_names is None), several[0])).name
    widths = {m.weight_shape[1] for b, m in mods.items() if b.endswith("attn2_to_k")}
    widths |= {m.weight_shape[1] for b, m in mods.items() if b.startswith("lora_te") and b.endswith("q_proj")}
    by_width = [f for f in families if len(widths) == 1 and f.context_width in widths]
    if len(by_width) == 1:
        return by_width[0].name
    return next((f.name for f in families if f.kohya_naming.written_in(mods)), "")
