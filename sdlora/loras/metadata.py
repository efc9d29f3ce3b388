"""The metadata of LoRA files: the family labels every client reads, and what A1111, ComfyUI and kohya's tools
display about a training run."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__
from ..families import Family
from .networks import NETWORKS, conv_rank_alpha

# header keys that say which model a LoRA is for (carried over by tools that write a new file)
FAMILY_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture",
               "modelspec.prediction_type", "modelspec.resolution", "modelspec.trigger_phrase", "sdlora_family")


def family_labels(family: Family, prediction_type: str, denoiser_config=None) -> dict[str, str]:
    """kohya's and ModelSpec's labels of a LoRA for this family and prediction type (A1111 filters LoRAs by them);
    SD3's depend on the variant its denoiser config describes (sd-scripts' medium, 5-medium, 5-large)."""
    return {"ss_base_model_version": family.ss_base_model_version(prediction_type, denoiser_config),
            "ss_v2": str(family.is_v2), "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": family.modelspec_architecture(prediction_type, denoiser_config),
            "modelspec.prediction_type": prediction_type, "sdlora_family": family.name}


def family_meta(meta: dict[str, str]) -> dict[str, str]:
    """The family labels of an existing file's header."""
    return {k: v for k, v in meta.items() if k in FAMILY_KEYS}


def trigger_words(cfg, captions_by_folder: dict | None = None) -> str:
    """The trigger phrase, from where users put it: `output.trigger`; the pivotal token; the tags a folder keeps
    first (`keep_tags`) that all its captions share; else the instance prompt's words that the class prompt lacks."""
    if cfg.output.trigger:
        return cfg.output.trigger
    if cfg.pivotal.token:
        return cfg.pivotal.token
    kept = []
    for d in cfg.data:
        captions = (captions_by_folder or {}).get(d.path) or []
        if d.keep_tags and captions:
            firsts = [[t.strip() for t in c.split(d.tag_separator)[:d.keep_tags] if t.strip()] for c in captions]
            kept += [t for t in firsts[0] if all(t in f for f in firsts) and t not in kept]
    if kept:
        return ", ".join(kept)
    prompts = [d.prompt for d in cfg.data if d.prompt]
    if not prompts:
        return ""
    class_words = set(cfg.prior.class_prompt.lower().split())
    words = [w for w in prompts[0].split() if w.lower() not in class_words]
    return " ".join(words) if class_words else prompts[0]


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict:
    """kohya's ss_tag_frequency: per folder, how often each comma-separated tag occurs."""
    return {Path(folder).name: dict(Counter(t.strip() for c in caps for t in c.split(",") if t.strip()))
            for folder, caps in captions_by_folder.items()}


def recipe_metadata(cfg, flow: bool = False) -> dict[str, str]:
    """kohya's keys for the optimizer and the objective's options (flow matching: sd-scripts' SD3 keys too, in its
    terms: weighting_scheme sigma_sqrt or cosmap is uniform sampling with that loss weight, and logit_mean has the
    opposite sign to diffusers' and sdlora's timestep_mean)."""
    tr = cfg.train
    scheme = {"uniform": "uniform", "mode": "mode"}.get(tr.timestep_sampling, "logit_normal")
    if scheme == "uniform" and tr.flow_weighting != "none":
        scheme = tr.flow_weighting
    sd3 = {"ss_weighting_scheme": scheme, "ss_logit_mean": str(-tr.timestep_mean + 0.0),
           "ss_logit_std": str(tr.timestep_scale), "ss_mode_scale": str(tr.mode_scale),
           "sdlora_flow_weighting": tr.flow_weighting,
           "sdlora_precondition_outputs": str(tr.precondition_outputs)} if flow else {}
    return {**sd3, "ss_optimizer": cfg.optim.optimizer, "ss_loss_type": tr.loss.replace("-", "_"),
            "ss_huber_c": str(tr.huber_delta), "ss_huber_schedule": tr.huber_schedule,
            "ss_min_timestep": str(tr.min_timestep), "ss_max_timestep": str(tr.max_timestep),
            "ss_debiased_estimation": str(tr.debiased_estimation), "ss_ip_noise_gamma": str(tr.ip_noise_gamma),
            "ss_multires_noise_iterations": str(tr.multires_noise_iterations),
            "ss_multires_noise_discount": str(tr.multires_noise_discount),
            "ss_zero_terminal_snr": str(tr.zero_terminal_snr), "sdlora_timestep_sampling": tr.timestep_sampling}


def network_labels(cfg, family: Family | None = None) -> dict[str, str]:
    """ss_network_module / ss_network_args as kohya's sd-scripts write them: networks.lora for a plain LoRA
    (networks.lora_sd3 on SD3); for DoRA, LoHa and LoKr what sd-scripts writes when LyCORIS makes the network
    (`lycoris.kohya`, its arguments as strings, naming the algorithm, DoRA as dora_wd with the axis in wd_on_output);
    and sdlora's own record of both. `targets` is the preset `auto` resolves to for `family`."""
    import dataclasses

    from ..config import PER_LAYER_KEYS

    lo, args, net = cfg.lora, cfg.network_args, NETWORKS[cfg.lora.network]
    if family is not None:
        lo = dataclasses.replace(lo, targets=family.resolved_targets(lo.targets))
    own = {"sdlora_network": lo.network, "sdlora_network_args": json.dumps(args, sort_keys=True)}
    # sd-scripts' per-block / per-layer network_args, as typed (its --network_args values are strings)
    per_layer = {k: str(getattr(lo, k)) for k in PER_LAYER_KEYS if getattr(lo, k) not in ("", 0.0)}
    conv_rank, conv_alpha = conv_rank_alpha(lo.rank, cfg.lora_alpha, args)
    conv = {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}
    if net.algo is None:  # kohya's own network (networks.lora; the family's own where it has one)
        extra = conv if args["conv_rank"] or args["conv_alpha"] else {}
        module = (family.kohya_lora_module if family is not None else "") or net.kohya_module
        blocks = {"train_block_indices": lo.blocks} if lo.blocks.strip() else {}
        return {"ss_network_module": module,
                "ss_network_args": json.dumps({"targets": lo.targets, **blocks, **extra, **per_layer}), **own}
    lycoris = {"algo": net.algo(lo.targets), **conv, **net.lycoris_args(args), "targets": lo.targets, **per_layer}
    return {"ss_network_module": net.kohya_module, "ss_network_args": json.dumps(lycoris), **own}


def slider_labels(cfg) -> dict[str, str]:
    """A slider's or eraser's header: sdlora_slider (its prompts, eta and the strengths it is meant for), and
    ModelSpec's usage hint and tags, which model sites and UIs show; nothing for other LoRAs."""
    sl = cfg.slider
    if not cfg.is_slider:
        return {}
    low, high = (-1, 1) if sl.action == "enhance" else (0, 1)
    record = {"action": sl.action, "target": sl.target, "positive": sl.positive or sl.target,
              "negative": sl.negative or (sl.target if sl.action == "enhance" else ""), "guidance": sl.guidance,
              "attributes": list(sl.attributes), "anchors": list(sl.anchors), "strength_range": [low, high]}
    if sl.action == "enhance":
        hint = (f"concept slider on '{sl.target}': strength +1 toward '{record['positive']}', -1 toward "
                f"'{record['negative']}', 0 leaves the model unchanged")
    else:
        hint = f"eraser: removes '{record['positive']}' from '{sl.target}' at strength 1 (use 0 to 1)"
    return {"sdlora_slider": json.dumps(record), "modelspec.usage_hint": hint,
            "modelspec.tags": "slider" if sl.action == "enhance" else "eraser"}


def dataset_dirs(cfg, captions_by_folder: dict) -> dict:
    """kohya's ss_dataset_dirs: per folder name, its repeats and image count."""
    return {Path(d.path).name: {"n_repeats": d.repeats, "img_count": len(captions_by_folder.get(d.path, []))}
            for d in cfg.data}


def training_metadata(cfg, family: Family, prediction_type: str, *, model_name: str, model_hash: str, steps: int,
                      resolution: int, targets: list[str], started: float, captions_by_folder: dict,
                      extra: dict | None = None, denoiser_config=None) -> dict[str, str]:
    """The header of a trained LoRA: kohya's ss_* keys, ModelSpec, and sdlora's own, under the configured
    `output.metadata` policy (public by default: folder names, never paths)."""
    name = cfg.output.name or Path(cfg.output.path).stem
    now = datetime.now(UTC)
    meta = {
        "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(cfg.lora_alpha),
        **network_labels(cfg, family),
        **slider_labels(cfg),
        "ss_output_name": name,
        "ss_sd_model_name": model_name,
        "ss_sd_model_hash": model_hash[:10],
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(cfg.train.max_steps),
        "ss_learning_rate": str(cfg.optim.lr),
        "ss_unet_lr": str(cfg.optim.lr),
        "ss_text_encoder_lr": str(cfg.lora.text_encoder_lr or cfg.optim.lr) if cfg.lora.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not cfg.lora.train_text_encoder),
        "ss_seed": str(cfg.train.seed),
        "ss_batch_size_per_device": str(cfg.train.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.train.grad_accum),
        "ss_lr_scheduler": cfg.optim.lr_scheduler,
        "ss_min_snr_gamma": str(cfg.train.min_snr_gamma),
        "ss_noise_offset": str(cfg.train.noise_offset),
        "ss_prior_loss_weight": str(cfg.prior.weight),
        **recipe_metadata(cfg, prediction_type == "flow"),
        "ss_tag_frequency": json.dumps(tag_frequency(captions_by_folder)),
        "ss_dataset_dirs": json.dumps(dataset_dirs(cfg, captions_by_folder)),
        "ss_num_train_images": str(sum(len(v) for v in captions_by_folder.values())),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(now.timestamp()),
        **family_labels(family, prediction_type, denoiser_config),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.trigger_phrase": trigger_words(cfg, captions_by_folder),
        "sdlora_version": __version__,
        "sdlora_targets": json.dumps(targets),
        "sdlora_config": json.dumps(cfg.to_dict() if cfg.output.metadata == "full" else public_config(cfg)),
    }
    meta.update(extra or {})
    return apply_policy(meta, cfg.output.metadata)


# ---------------------------------------------------------------- what a shared file may carry

# what loaders read (family labels, network kind, dim and alpha, diffusers' adapter config, A1111's hash)
LOADER_KEYS = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
               "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.prediction_type",
               "lora_adapter_metadata", "sshs_model_hash", "sdlora_family", "sdlora_format"}
_ABS_PATH = re.compile(r"""(?:(?<![\w.:/\\-])(?:~|/)[^\s"',;:*?<>|]+|\b[A-Za-z]:\\[^\s"',;*?<>|]+)""")
_HOME = re.compile(r"(?:^|[/\\])(?:home|Users|users)[/\\]+([^/\\\s\"',]+)")


def public_name(value: str) -> str:
    """A path reduced to its last part (a hub id like 'org/model' stays as it is)."""
    if not value or (value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()):
        return value
    return re.split(r"[/\\]+", value.rstrip("/\\"))[-1]


def public_config(cfg) -> dict:
    """The training config as a shared file may carry it: every folder, model and output path reduced to its name."""
    d = cfg.to_dict()
    d["model"]["path"] = public_name(d["model"]["path"])
    d["prior"]["class_data"] = public_name(d["prior"]["class_data"])
    d["output"]["path"] = public_name(d["output"]["path"])
    for key in ("data", "clip_model", "dino_model"):  # the scorer's models may be local folders too
        d["validation"][key] = public_name(d["validation"][key])
    for folder in d["data"]:
        folder["path"] = public_name(folder["path"])
    return d


def private_paths(meta: dict[str, str]) -> list[str]:
    """The absolute paths and home-folder (user) names found in a file's metadata: what would leak from the
    machine that made it."""
    found = []
    for key, value in meta.items():
        for path in _ABS_PATH.findall(str(value)):
            users = _HOME.findall(path)
            found.append(f"{key}: absolute path {path}" + (f" (user name {users[0]!r})" if users else ""))
    return found


def redact(meta: dict[str, str]) -> dict[str, str]:
    """Every absolute path left in the values replaced by its last part."""
    return {k: _ABS_PATH.sub(lambda m: public_name(m.group(0)), v) if isinstance(v, str) else v
            for k, v in meta.items()}


def apply_policy(meta: dict[str, str], mode: str) -> dict[str, str]:
    """`full`: as it is; `public`: no absolute path or home-folder name anywhere; `none`: only what loaders read."""
    if mode == "full":
        return dict(meta)
    if mode == "none":
        return {k: v for k, v in meta.items() if k in LOADER_KEYS}
    return redact(meta)
