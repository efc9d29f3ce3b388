"""Tools over LoRA files: inspect, convert, merge into a checkpoint, mix, resize, extract, and generate images.

Every LoRA is read into `{kohya base name: LoraModule}` (whatever its layout), worked on with the plain math of
`lora_math`, and written back in the kohya layout with one alpha per file (`formats.modules_to_kohya`).
The CLI (`cli_tools`) and the web UI call these functions as they are.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import lora_math
from .errors import LoraFileError, ModelError, SdloraError
from .formats import (DTYPES, LORA_METADATA_KEY, LoraModule, check_fits, detect_layout, kohya_base,
                      kohya_modules, kohya_names, modules_to_kohya, read_lora, split_embeddings, te_path,
                      validate_kohya, write_lora)
from .io import check_output, save_safetensors
from .lora_math import ExtractReport, MixReport, ResizeReport  # noqa: F401 (public API)

log = logging.getLogger("sdlora")
COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
FAMILY_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture",
               "modelspec.prediction_type", "modelspec.resolution", "modelspec.trigger_phrase", "sdlora_family")


def parse_weighted(spec: str, default: float = 1.0) -> tuple[str, float]:
    """'file.safetensors:0.7' -> ('file.safetensors', 0.7); split on the last colon only when a number follows,
    so 'C:\\loras\\x.safetensors' stays one path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, default


# ---------------------------------------------------------------- reading any layout

def _adapter_config(meta: dict[str, str]) -> dict:
    try:
        return json.loads(meta.get(LORA_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        return {}


def _pattern_value(patterns: dict, path: str, default):
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key) or te_path(path).endswith(key):
            return value
    return default


def diffusers_modules(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, LoraModule]:
    """`<unet|text_encoder>.<path>.lora_A/B.weight` tensors -> modules by kohya base name, with the alpha from
    `lora_adapter_metadata` (alpha_pattern included), else an `.alpha` tensor, else alpha = rank."""
    cfg, prefixes = _adapter_config(meta), {v: k for k, v in COMPONENT.items() if k != "lora_te1"}
    mods = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        full = key[: -len(".lora_A.weight")]
        comp, _, path = full.partition(".")
        if comp not in prefixes:
            raise LoraFileError(f"key {key}: expected it to start with unet. or text_encoder.")
        up = tensors.get(f"{full}.lora_B.weight")
        if up is None:
            raise LoraFileError(f"module {full} has lora_A but no lora_B")
        alpha = float(tensors[f"{full}.alpha"].item()) if f"{full}.alpha" in tensors else float(down.shape[0])
        if f"{comp}.lora_alpha" in cfg:
            alpha = float(_pattern_value(cfg.get(f"{comp}.alpha_pattern"), path, cfg[f"{comp}.lora_alpha"]))
        mods[kohya_base(prefixes[comp], path)] = LoraModule(down, up, alpha)
    return mods


def lora_modules(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> dict[str, LoraModule]:
    """The LoRA modules of a file of either layout, keyed by kohya base name (embeddings left out)."""
    lora, _ = split_embeddings(tensors)
    layout = detect_layout(lora)
    if layout == "kohya":
        return kohya_modules(lora)
    if layout == "diffusers":
        return diffusers_modules(lora, meta or {})
    raise LoraFileError("not a LoRA in the kohya or diffusers layout (no lora_down/lora_up or lora_A/lora_B keys)")


def load(path: str | Path) -> tuple[dict[str, LoraModule], dict, dict[str, str]]:
    """(modules by kohya base, bundled embeddings {token: {part: tensor}}, metadata) of a LoRA file."""
    tensors, meta = read_lora(path)
    try:
        mods = lora_modules(tensors, meta)
    except LoraFileError as e:
        raise LoraFileError(f"{path}: {e}") from None
    return mods, split_embeddings(tensors)[1], meta


def _embedding_tensors(embeddings: dict) -> dict[str, torch.Tensor]:
    out = {}
    for token, parts in embeddings.items():
        for part, t in parts.items():
            out[f"bundle_emb.{token}.string_to_param.*" if part == "clip_l" else f"bundle_emb.{token}.{part}"] = t
    return out


def save_kohya(path, mods: dict[str, LoraModule], meta: dict, embeddings: dict | None = None,
               dtype=torch.float16) -> Path:
    """Write modules in the kohya layout (one alpha per file) with refreshed ss_network_dim/alpha."""
    tensors = modules_to_kohya(mods, dtype)
    ranks = sorted({m.rank for m in mods.values()})
    alpha = next(iter(mods.values())).alpha if mods else 0
    meta = {k: v for k, v in meta.items() if k not in (LORA_METADATA_KEY, "sdlora_format", "sshs_model_hash")}
    meta.update({"ss_network_module": meta.get("ss_network_module", "networks.lora"),
                 "ss_network_dim": str(ranks[-1] if ranks else 0), "ss_network_alpha": f"{alpha:g}"})
    return write_lora(path, {**tensors, **_embedding_tensors(embeddings or {})}, meta)


def _family_meta(meta: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k in FAMILY_KEYS}


# ---------------------------------------------------------------- names: kohya base -> (component, module path)

def default_names() -> dict[str, tuple[str, str]]:
    """kohya base name -> (component, module path) for SD1/SD2-shaped models, derived from diffusers' and
    transformers' own module naming (models built on the meta device: no weights, no download)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(layers_per_block=3)  # a superset of SD1/SD2 block names
        te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=32))
    return model_names(unet, te)


def model_names(unet, text_encoder) -> dict[str, tuple[str, str]]:
    names = {b: ("unet", p) for b, p in kohya_names(unet, "lora_unet").items()}
    names.update({b: ("text_encoder", p) for b, p in kohya_names(text_encoder, "lora_te").items()})
    return names


def _names_for(model: str | None) -> dict[str, tuple[str, str]]:
    if not model:
        return default_names()
    c = load_model(model)
    return model_names(c.unet, c.text_encoder)


def modules_to_diffusers(mods: dict[str, LoraModule], names: dict[str, tuple[str, str]],
                         dtype=torch.float16) -> tuple[dict[str, torch.Tensor], dict]:
    """diffusers/PEFT layout: each module's alpha/rank folded into lora_B (scale 1), ranks that differ from the
    most common one listed in rank_pattern/alpha_pattern of `lora_adapter_metadata` (what diffusers reads)."""
    unknown = [b for b in mods if b not in names]
    if unknown:
        raise LoraFileError(f"{len(unknown)} LoRA layers have names that map to no SD1/SD2 module "
                            f"(first: {unknown[0]}); pass --model with the base model to map them")
    out, by_comp = {}, {}
    for base, m in mods.items():
        comp, path = names[base]
        key = f"{comp}.{te_path(path) if comp.startswith('text_encoder') else path}"
        out[f"{key}.lora_A.weight"] = m.down.to(dtype)
        out[f"{key}.lora_B.weight"] = (m.up.float() * m.scale).to(dtype)
        by_comp.setdefault(comp, {})[path.removeprefix("text_model.")] = m.rank
    cfg = {}
    for comp, ranks in by_comp.items():
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {p: k for p, k in ranks.items() if k != r}
        cfg.update({f"{comp}.r": r, f"{comp}.lora_alpha": r, f"{comp}.target_modules": sorted(ranks)})
        if pattern:
            cfg.update({f"{comp}.rank_pattern": pattern, f"{comp}.alpha_pattern": pattern})
    return out, {LORA_METADATA_KEY: json.dumps(cfg, sort_keys=True)} if cfg else {}


# ---------------------------------------------------------------- inspect

@dataclass
class LoraInfo:
    """What a LoRA file holds, and the problems that would make it load wrongly somewhere."""

    path: str
    size_bytes: int
    layout: str
    family: str
    unet_modules: int
    te_modules: int
    kinds: dict[str, int]
    ranks: list[int]
    alphas: list[float]
    embeddings: dict[str, dict[str, list[int]]]
    metadata: dict[str, str]
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.kinds.items())
        lines = [f"{self.path} ({self.size_bytes / 1e6:.2f} MB)",
                 f"  layout: {self.layout}   family: {self.family}",
                 f"  modules: UNet {self.unet_modules}, text encoder {self.te_modules} ({kinds})",
                 f"  rank: {_ranges(self.ranks)}   alpha: {_ranges(self.alphas)}"]
        for token, parts in self.embeddings.items():
            lines.append(f"  embedding <{token}>: " + ", ".join(f"{p} {s}" for p, s in parts.items()))
        for k, v in sorted(self.metadata.items()):
            if k in ("sdlora_config", "ss_tag_frequency", LORA_METADATA_KEY) or len(v) > 100:
                v = v[:97] + "..." if len(v) > 100 else v
            lines.append(f"  {k}: {v}")
        lines.append("  problems: none" if not self.problems else "  problems:")
        lines += [f"    - {p}" for p in self.problems]
        return "\n".join(lines)


def _ranges(values) -> str:
    return ", ".join(f"{v:g}" for v in values) if values else "-"


def module_kind(base: str) -> str:
    """attn1 / attn2 / ff / proj / conv / te / other, from a kohya base name."""
    if base.startswith("lora_te"):
        return "te"
    for kind, rx in (("attn1", r"_attn1_"), ("attn2", r"_attn2_"), ("ff", r"_ff_net_"), ("proj", r"_proj_(in|out)$"),
                     ("conv", r"(conv\d?|conv_shortcut|conv_in|conv_out|_op)$")):
        if re.search(rx, base):
            return kind
    return "other"


def family_of(mods: dict[str, LoraModule], meta: dict[str, str]) -> tuple[str, str]:
    """(family from the metadata, family from the tensor shapes); '' where unknown."""
    version = meta.get("sdlora_family") or meta.get("ss_base_model_version", "")
    from_meta = next((f for p, f in (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd1", "sd1"), ("sd_v2", "sd2"),
                                     ("sd2", "sd2")) if version.startswith(p)), "")
    if any(b.startswith(("lora_te1_", "lora_te2_")) for b in mods):
        return from_meta, "sdxl"
    widths = {m.down.shape[1] for b, m in mods.items() if b.endswith("attn2_to_k")}
    widths |= {m.down.shape[1] for b, m in mods.items() if b.startswith("lora_te") and b.endswith("q_proj")}
    from_shape = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(next(iter(widths), 0), "") if len(widths) == 1 else ""
    return from_meta, from_shape


def inspect_lora(path: str | Path) -> LoraInfo:
    """Read a LoRA file (ours, kohya's, A1111's or diffusers') and run the structural validator over it."""
    path = Path(path)
    tensors, meta = read_lora(path)
    lora, emb = split_embeddings(tensors)
    layout = detect_layout(lora)
    problems = []
    try:
        mods = lora_modules(tensors, meta)
    except LoraFileError as e:
        mods, problems = {}, [str(e)]
    from_meta, from_shape = family_of(mods, meta)
    family = from_meta or from_shape or "unknown"
    if from_meta and from_shape and from_meta != from_shape:
        problems.append(f"metadata says {from_meta} but the layer shapes are {from_shape}")
    if layout == "kohya":
        problems += validate_kohya(tensors, family)
        missing = [k for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version")
                   if k not in meta]
        if missing:
            problems.append(f"metadata lacks {', '.join(missing)} (A1111 uses it to label and filter LoRAs)")
        te = [b for b in mods if b.startswith("lora_te")]
        if any(re.search(r"_self_attn_[qkv]_proj$", b) for b in te) and not any(b.endswith("_out_proj") for b in te):
            problems.append("text-encoder attention without any out_proj: diffusers 0.42 drops its q/k/v layers")
    elif layout == "diffusers":
        problems.append("diffusers layout: A1111 and ComfyUI do not load it; `sdlora convert --to kohya` fixes that")
    kinds = Counter(module_kind(b) for b in mods)
    return LoraInfo(
        path=str(path), size_bytes=path.stat().st_size, layout=layout, family=family,
        unet_modules=sum(not b.startswith("lora_te") for b in mods),
        te_modules=sum(b.startswith("lora_te") for b in mods),
        kinds=dict(sorted(kinds.items())), ranks=sorted({m.rank for m in mods.values()}),
        alphas=sorted({m.alpha for m in mods.values()}),
        embeddings={t: {p: list(v.shape) for p, v in parts.items()} for t, parts in emb.items()},
        metadata={k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec.", "sdlora_", "sshs_"))
                  or k == LORA_METADATA_KEY},
        problems=problems)


# ---------------------------------------------------------------- convert

def convert_lora(path: str | Path, to: str, output: str | Path, overwrite: bool = False,
                 model: str | None = None) -> Path:
    """Rewrite a LoRA in the kohya or diffusers layout, metadata kept, numerically identical.

    kohya -> diffusers maps names through the SD1/SD2 module naming (or through `model`'s live modules) and
    writes bundled embeddings beside it as `<name>_emb.safetensors` (`clip_l`, for load_textual_inversion);
    diffusers -> kohya restores the file's `ss_network_alpha` when it has one, so a round trip is lossless.
    """
    if to not in ("kohya", "diffusers"):
        raise SdloraError(f"--to must be kohya or diffusers, not {to!r}")
    check_output(output, [path], overwrite)
    tensors, meta = read_lora(path)
    mods, emb = lora_modules(tensors, meta), split_embeddings(tensors)[1]
    dtype = _dtype_of(mods)  # the LoRA tensors' dtype (an A1111 alpha may be int64)
    if to == "kohya":
        return save_kohya(output, _with_alpha(mods, meta.get("ss_network_alpha")), meta, emb, dtype)
    for token, parts in emb.items():  # diffusers rejects bundle_emb keys: a sidecar file per token instead
        name = f"{Path(output).stem}_emb" if len(emb) == 1 else f"{Path(output).stem}_{token}_emb"
        side = check_output(Path(output).with_name(name + ".safetensors"), [path], overwrite)
        save_safetensors(parts, side, {"token": token})
    out, adapter_meta = modules_to_diffusers(mods, _names_for(model), dtype)
    meta = {k: v for k, v in meta.items() if k != "sshs_model_hash"}
    return write_lora(output, out, {**meta, **adapter_meta, "sdlora_format": "diffusers"})


def _with_alpha(mods: dict[str, LoraModule], alpha: str | None) -> dict[str, LoraModule]:
    """Re-express every module with the given alpha (up rescaled so each delta is unchanged)."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        return mods
    if not a > 0:
        return mods
    return {b: LoraModule(m.down, m.up.float() * (m.scale * m.rank / a), a) for b, m in mods.items()}


# ---------------------------------------------------------------- models

def load_model(model: str | Path | None, allow_pickle: bool = False):
    """Components of a base model: a diffusers folder (empty: the built-in model), a hub id, or a single-file
    checkpoint read offline (`.safetensors`; `.ckpt` only with allow_pickle, read with weights_only)."""
    from .models import load_components
    from .paths import default_model_path

    model = str(model or default_model_path())
    p = Path(model)
    if p.is_file() and p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        if not allow_pickle:
            raise ModelError(f"{p} is a pickle checkpoint; pass --allow-pickle to read it (weights only) or "
                             "use a .safetensors file")
        from .single_file import ckpt_to_safetensors

        with tempfile.TemporaryDirectory() as tmp:
            c = load_components(str(ckpt_to_safetensors(p, Path(tmp) / f"{p.stem}.safetensors")))
            c.source = str(p)
            return c
    return load_components(model)


def model_layers(c) -> dict[str, torch.nn.Module]:
    """kohya base name -> Linear/Conv2d module of the UNet and text encoder(s); SDXL UNets by SGM names."""
    from .formats import sgm_namer

    unet_name = sgm_namer(c.unet.config) if c.family.name == "sdxl" else (lambda name: name)
    layers = {}
    for name, m in c.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            layers[kohya_base("lora_unet", unet_name(name))] = m
    for prefix, model in zip(c.family.te_prefixes, c.text_encoders):
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                layers[kohya_base(prefix, name)] = m
    return layers


def check_lora_fits(mods: dict[str, LoraModule], layers: dict[str, torch.nn.Module], path) -> None:
    """Raise when any LoRA layer has no layer in the model (with the count) or another shape (naming it)."""
    missing = [b for b in mods if b not in layers]
    if missing:
        raise LoraFileError(f"{path}: {len(missing)} of {len(mods)} LoRA layers match no layer of the model "
                            f"(first: {missing[0]}); was it made for another model family?")
    try:
        check_fits(mods, {b: tuple(layers[b].weight.shape) for b in mods})
    except LoraFileError as e:
        raise LoraFileError(f"{path}: {e}") from None


# ---------------------------------------------------------------- merge

@torch.no_grad()
def merge_into_model(model: str | Path | None, loras: list[tuple[str, float]], output: str | Path,
                     overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Bake LoRAs (each at its weight) into the base weights: W += weight * alpha / rank * up @ down.

    `output` ending in `.safetensors` is a single-file checkpoint in the original SD (LDM) key layout, as
    A1111 and ComfyUI load it (SD1, SD2, SDXL); anything else is a diffusers folder. Bundled embeddings go into
    the tokenizer of a folder output.
    """
    output = Path(output)
    check_output(output, [p for p in (model, *[p for p, _ in loras]) if p], overwrite)
    c = load_model(model, allow_pickle)
    layers = model_layers(c)
    loaded = [(path, w, *load(path)[:2]) for path, w in loras]
    for path, _, mods, _ in loaded:
        check_lora_fits(mods, layers, path)
    for _, weight, mods, _ in loaded:
        for base, m in mods.items():
            w = layers[base].weight
            w.copy_((w.float() + weight * m.delta()).to(w.dtype))
    if output.suffix == ".safetensors":
        if any(emb for *_, emb in loaded):
            log.warning("bundled embeddings cannot go into a single-file checkpoint; load them separately")
        from .single_file import save_tokenizers

        state, header = ldm_file(c)
        save_safetensors(state, output, {**header, "sdlora_merged": json.dumps([[str(p), w] for p, w in loras])})
        save_tokenizers(output, [c.tokenizer, *([c.extra["tokenizer_2"]] if "tokenizer_2" in c.extra else [])],
                        c.text_encoders)
        return output
    pipe = c.pipeline()
    for _, _, _, emb in loaded:
        for token, parts in emb.items():
            pipe.load_textual_inversion(parts["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
    return _save_folder(pipe, output)


def _save_folder(pipe, output: Path) -> Path:
    """save_pretrained into a temp folder beside `output`, then swap it in (never half a model)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output


def ldm_file(c) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The whole model in the original single-file layout (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.* / conditioner.*), which A1111, ComfyUI and diffusers' from_single_file read."""
    from .single_file import ldm_contents

    models = {"unet": c.unet, "vae": c.vae}
    models.update(zip(("text_encoder", "text_encoder_2"), c.text_encoders))
    return ldm_contents(c.family.name, models, c.prediction_type)


# ---------------------------------------------------------------- mix / resize

def mix_loras(loras: list[tuple[str, float]], output: str | Path, rank: int | None = None,
              overwrite: bool = False) -> MixReport:
    """Weighted sum of LoRAs as one file: exact by stacking ranks (rank None), or the best rank-`rank`
    approximation of each layer's summed delta (SVD), with its error. A layer missing from an input counts
    as zero there. Bundled embeddings are carried over (the first file wins a token clash)."""
    if not loras:
        raise SdloraError("mix needs at least one LoRA file")
    check_output(output, [p for p, _ in loras], overwrite)
    inputs = [(load(p), w) for p, w in loras]
    report = MixReport(str(output), exact=rank is None, sources=[[str(p), w] for p, w in loras])
    mixed = lora_math.mix_modules([(mods, w) for (mods, _, _), w in inputs], rank, report)
    embeddings = {}
    for (_, emb, _), _ in reversed(inputs):
        embeddings.update(emb)
    meta = {**_family_meta(inputs[0][0][2]), "sdlora_mix": json.dumps(report.sources)}
    save_kohya(output, mixed, meta, embeddings, _dtype_of(inputs[0][0][0]))
    return report


def _dtype_of(mods: dict[str, LoraModule]):
    return next(iter(mods.values())).up.dtype if mods else torch.float16


def resize_lora(path: str | Path, output: str | Path, rank: int | None = None, keep_energy: float | None = None,
                overwrite: bool = False) -> ResizeReport:
    """Each layer brought to `rank` (never above its own) or to the smallest rank keeping share `keep_energy`
    of its squared singular values, by SVD of the delta; per-layer and overall relative errors reported."""
    if (rank is None) == (keep_energy is None):
        raise SdloraError("resize needs exactly one of --rank or --keep-energy")
    if rank is not None and rank < 1:
        raise SdloraError(f"--rank must be at least 1, not {rank}")
    if keep_energy is not None and not 0 < keep_energy <= 1:
        raise SdloraError(f"--keep-energy must be in (0, 1], not {keep_energy}")
    check_output(output, [path], overwrite)
    mods, emb, meta = load(path)
    report = ResizeReport(str(output))
    out = lora_math.resize_modules(mods, rank, keep_energy, report)
    meta = {**meta, "sdlora_resized_from": str(Path(path).name)}
    save_kohya(output, out, meta, emb, _dtype_of(mods))
    return report


# ---------------------------------------------------------------- extract

def _extractable(module: torch.nn.Module, conv_rank: int | None) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    if isinstance(module, torch.nn.Conv2d):
        return module.kernel_size == (1, 1) or conv_rank is not None
    return False


@torch.no_grad()
def extract_lora(base: str | Path | None, tuned: str | Path, rank: int, output: str | Path, overwrite: bool = False,
                 conv_rank: int | None = None, text_encoder: bool = True, min_diff: float = 1e-6,
                 allow_pickle: bool = False, dtype: str = "fp16") -> ExtractReport:
    """A LoRA of rank `rank` from the difference of two models: every UNet Linear and 1x1 conv layer (3x3 convs
    too at `conv_rank`) and the text encoder's, by truncated SVD of tuned - base. Layers whose difference is
    below `min_diff` of the base weight's norm are skipped. `dtype`: fp16 (default), bf16 or fp32 tensors."""
    if rank < 1:
        raise SdloraError(f"--rank must be at least 1, not {rank}")
    check_output(output, [p for p in (base, tuned) if p], overwrite)
    a, b = load_model(base, allow_pickle), load_model(tuned, allow_pickle)
    layers_a, layers_b = model_layers(a), model_layers(b)
    report, mods, norms = ExtractReport(str(output)), {}, {}
    for name, ma in layers_a.items():
        if name.startswith("lora_te") and not text_encoder or not _extractable(ma, conv_rank):
            continue
        mb = layers_b.get(name)
        if mb is None or mb.weight.shape != ma.weight.shape:
            raise ModelError(f"layer {name} differs in shape between the two models: not the same architecture")
        diff = mb.weight.float() - ma.weight.float()
        if diff.norm() <= min_diff * ma.weight.float().norm():
            report.skipped.append(name)
            continue
        r = conv_rank if ma.weight.dim() == 4 and ma.weight.shape[-1] > 1 else rank
        mods[name], err = lora_math.low_rank(diff, r)
        norms[name] = float(diff.norm())
        report.add(name, mods[name].rank, err)
    if not mods:
        raise SdloraError("the two models have the same weights in every extractable layer: nothing to extract")
    fam = a.family
    meta = {"ss_network_module": "networks.lora",
            "ss_base_model_version": fam.ss_base_model_version(a.prediction_type), "ss_v2": str(fam.is_v2),
            "ss_network_args": json.dumps({"conv_dim": str(conv_rank or 0)}),
            "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": fam.architecture,
            "modelspec.prediction_type": a.prediction_type, "sdlora_family": fam.name,
            "sdlora_extract": json.dumps({"base": a.name, "tuned": b.name, "rank": rank, "conv_rank": conv_rank})}
    save_kohya(output, mods, meta, dtype=DTYPES[dtype])
    return report.finish(norms)


# ---------------------------------------------------------------- generate

SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
              "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler", "ddpm": "DDPMScheduler"}


def set_scheduler(pipe, name: str | None) -> str:
    """Swap the pipeline's scheduler by short name (euler_a, dpm++, ...) or class name; returns the class name."""
    import diffusers

    if name:
        cls = getattr(diffusers, SCHEDULERS.get(name.lower(), name), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise SdloraError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return type(pipe.scheduler).__name__


def generate(model: str | Path | None, loras: list[tuple[str, float]], prompt: str, *, negative_prompt: str = "",
             seed: int = 0, n: int = 1, steps: int = 20, guidance: float = 7.5, scheduler: str | None = None,
             width: int | None = None, height: int | None = None, output_dir: str | Path, grid: bool = False,
             scales: list[float] | None = None, allow_pickle: bool = False) -> list[Path]:
    """Text to image with LoRAs active together, each at its own scale; image i uses seed + i. PNGs carry the
    parameters (A1111's 'parameters' text). `grid`: one contact sheet, rows = seeds, columns = LoRA scale
    multipliers `scales` (default 0, 0.5, 1), each labelled."""
    from .sample import apply_loras, render

    c = load_model(model, allow_pickle)
    pipe = c.pipeline()
    pipe.set_progress_bar_config(disable=True)
    sched = set_scheduler(pipe, scheduler)
    size = c.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size
    names = apply_loras(pipe, loras)
    out_dir = Path(output_dir)
    params = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
              "scheduler": sched, "width": width, "height": height, "model": c.name,
              "loras": [[str(p), w] for p, w in loras]}
    if not grid:
        images = render(pipe, [prompt] * n, seed, steps, guidance, width, height, negative_prompt)
        return [_save_image(img, out_dir, {**params, "seed": seed + i}) for i, img in enumerate(images)]
    scales = [0.0, 0.5, 1.0] if scales is None else list(scales)
    rows = []
    for s in scales:
        if names:
            pipe.set_adapters(names, adapter_weights=[s * w for _, w in loras])
        rows.append(render(pipe, [prompt] * n, seed, steps, guidance, width, height, negative_prompt))
    sheet = contact_sheet(rows, [f"x{s:g}" for s in scales], [f"seed {seed + i}" for i in range(n)])
    return [_save_image(sheet, out_dir, {**params, "seed": seed, "n": n, "grid_scales": scales}, "grid")]


def _save_image(image, out_dir: Path, params: dict, stem: str = "img") -> Path:
    from .sample import save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    i = len(list(out_dir.glob("*.png")))
    while (out_dir / f"{stem}_{i:05d}.png").exists():
        i += 1
    loras = "".join(f" <lora:{Path(p).stem}:{w:g}>" for p, w in params["loras"])
    text = (f"{params['prompt']}{loras}\nNegative prompt: {params['negative_prompt']}\nSteps: {params['steps']}, "
            f"Sampler: {params['scheduler']}, CFG scale: {params['guidance']}, Seed: {params['seed']}, "
            f"Size: {params['width']}x{params['height']}, Model: {params['model']}")
    return save_png(image, out_dir / f"{stem}_{i:05d}.png", {"parameters": text, "sdlora": json.dumps(params)})


def contact_sheet(columns: list[list], col_labels: list[str], row_labels: list[str]):
    """Images laid out with columns[c][r] at column c, row r, and a label above each column / left of each row."""
    from PIL import Image, ImageDraw

    w, h = columns[0][0].size
    left, top = 70, 18
    sheet = Image.new("RGB", (left + w * len(columns), top + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (col, label) in enumerate(zip(columns, col_labels)):
        draw.text((left + c * w + 2, 3), label, fill="black")
        for r, img in enumerate(col):
            sheet.paste(img, (left + c * w, top + r * h))
    for r, label in enumerate(row_labels):
        draw.text((2, top + r * h + h // 2 - 5), label, fill="black")
    return sheet
