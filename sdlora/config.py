"""The one training config: a dataclass tree filled from TOML, CLI flags or the UI, validated once.

Every field carries its help text in ``metadata["help"]``; the CLI flags and the UI tooltips are generated
from it, so the three front doors cannot drift. Unknown keys are an error (a misspelt key must never train
silently with the default).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import tomli_w

from .errors import ConfigError
from .paths import default_model_path

CONFIG_VERSION = 1

TARGET_PRESETS = ("auto", "cross_attn", "attn", "attn_ff", "all")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "adamw-schedulefree", "lion")
NETWORKS = ("lora", "dora", "loha", "lokr")
# each network's own knobs (`--network-args "factor=8,decompose_both=true"`): name -> type, or the allowed words
_SHARED_ARGS = {"conv_rank": int, "conv_alpha": float}
_LYCORIS_ARGS = {"use_tucker": bool, "rank_dropout": float, "module_dropout": float}
NETWORK_ARGS = {
    "lora": dict(_SHARED_ARGS),
    "dora": {**_SHARED_ARGS, "dora_axis": ("input", "output")},
    "loha": {**_SHARED_ARGS, **_LYCORIS_ARGS},
    "lokr": {**_SHARED_ARGS, **_LYCORIS_ARGS, "factor": int, "decompose_both": bool},
}
NETWORK_DEFAULTS = {"conv_rank": 0, "conv_alpha": 0.0, "dora_axis": "input", "use_tucker": False,
                    "rank_dropout": 0.0, "module_dropout": 0.0, "factor": -1, "decompose_both": False}


MAX_SEED = 2**32 - 1


def opt(default, help: str, flag: str | None = None, choices: tuple | None = None, *, ge=None, gt=None, le=None,
        lt=None, **kw):
    """A config field with its help text, optional CLI flag name and choices, and the bounds its value must keep
    (ge/gt/le/lt: >=, >, <=, <), which `validate` checks for every field."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "flag": flag, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    path: str = opt("", "Base model: a diffusers folder, a hub id, a single .safetensors file, or empty for the "
                    "built-in shapes-world model.", flag="model")
    prediction_type: str = opt("auto", "Training target; 'auto' reads it from the model's scheduler (SD3 models "
                               "always train by flow matching).", choices=("auto", "epsilon", "v_prediction"))
    text_encoders: str = opt("", "SD3 single files without text encoders: a diffusers SD3 folder (text_encoder, "
                             "text_encoder_2, text_encoder_3 and their tokenizers) or a folder of ComfyUI-style "
                             "clip_l / clip_g / t5xxl .safetensors files to take them from.", flag="text-encoders")
    t5: bool = opt(True, "SD3: use the T5-XXL text encoder; --no-t5 trains (and samples) with zero T5 embeddings, "
                   "as diffusers does without text_encoder_3 (recorded in the LoRA's metadata).")
    t5_max_length: int = opt(256, "SD3: T5 tokens per caption (diffusers' pipeline default 256; 77 is shorter and "
                             "cheaper).", ge=1, le=512)
    quantize: str = opt("none", "QLoRA: nf4 holds the frozen UNet and text encoders' Linear layers in 4-bit NF4 "
                        "through bitsandbytes (CUDA, or the CPU with bitsandbytes >= 0.47); the LoRA trains in "
                        "16/32-bit and loads into the full base.",
                        choices=("none", "nf4"))


@dataclass
class LoraConfig:
    rank: int = opt(4, "LoRA rank r: bigger learns more and makes a bigger file.", gt=0)
    alpha: float = opt(0.0, "LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank.", ge=0)
    dropout: float = opt(0.0, "Dropout on the LoRA input during training.", flag="lora-dropout", ge=0, lt=1)
    targets: str = opt("auto", "Which denoiser layers get LoRA: auto (the family's default: cross_attn on SD1/2/XL, "
                       "attn on SD3); UNets: cross_attn (attn2 q/k/v/out), attn (all attention), attn_ff (attention + "
                       "feed-forward), all (also proj and conv layers); SD3: attn (the joint attention of every block, "
                       "both streams, and SD3.5 Medium's attn2), attn_ff (+ feed-forward), all (+ adaLN, embedders and "
                       "final layer).", choices=TARGET_PRESETS)
    blocks: str = opt("", "SD3: only these transformer blocks get LoRA, e.g. '0-11' or '12-23,30' (layers outside "
                      "the blocks, from targets all, stay); empty = every block.")
    train_text_encoder: bool = opt(False, "Also put LoRA on the CLIP text encoder (q/k/v/out and MLP).")
    text_encoder_lr: float = opt(0.0, "Learning rate of the text-encoder LoRA; 0 means the UNet's lr.", ge=0)
    train_text_encoder_2: bool = opt(True, "SDXL/SD3: with train_text_encoder, also the second (OpenCLIP-G) encoder.")
    text_encoder_2_lr: float = opt(0.0, "SDXL/SD3: learning rate of the second encoder's LoRA; 0 = text_encoder_lr.",
                                   ge=0)
    network: str = opt("lora", "Adapter type: lora; dora (weight-decomposed LoRA); loha (Hadamard product of two "
                       "low-rank pairs) or lokr (Kronecker product), as LyCORIS makes them. A1111 and ComfyUI load "
                       "all four; diffusers loads lora and dora (dora_axis=output), not loha or lokr.",
                       choices=NETWORKS)
    network_args: str = opt("", "The network's own knobs, comma-separated key=value: conv_rank, conv_alpha (k x k "
                            "convs; 0 = rank, and alpha at the same alpha/rank ratio); dora: dora_axis=input (exact "
                            "in A1111 and ComfyUI) or output (peft's; needed for --format diffusers); loha/lokr: "
                            "use_tucker, rank_dropout, module_dropout; lokr: factor (-1 = balanced), decompose_both.")


@dataclass
class DataFolder:
    path: str = opt("", "Folder of images, with optional .txt caption sidecars.", flag="data")
    prompt: str = opt("", "Instance prompt (e.g. 'a photo of sks dog'), used for images without a caption "
                      "(and for all images when use_captions is false).", flag="instance-prompt")
    use_captions: bool = opt(True, "Read .txt sidecar captions when present.")
    repeats: int = opt(1, "How many times each image is seen per epoch.", ge=1)
    shuffle_tags: bool = opt(False, "Captions are tag lists: shuffle their order every step (after the kept ones).")
    keep_tags: int = opt(0, "The first N tags stay in place and are never dropped (e.g. the trigger word).", ge=0)
    tag_dropout: float = opt(0.0, "Drop each tag that is not kept with this probability, every step.", ge=0, lt=1)
    tag_separator: str = opt(",", "What separates the tags of a caption.")
    masks: str = opt("", "Folder of masks, one per image with the same file stem: white = learn, black = ignore, grey "
                     "= partly. Empty = no masks.")
    alpha_mask: bool = opt(False, "Use each image's own alpha channel as its mask (transparent = ignore).")
    unmasked_weight: float = opt(0.0, "Loss weight outside the mask (0: the masked-out area teaches nothing).",
                                 ge=0, le=1)


@dataclass
class PriorConfig:
    class_prompt: str = opt("", "Class prompt for prior preservation (e.g. 'a photo of a dog'); empty = off.")
    class_data: str = opt("", "Folder of class images; missing ones are generated by the base model.")
    num_class_images: int = opt(0, "How many class images to use; generated when the folder has fewer.", ge=0)
    weight: float = opt(1.0, "Weight of the prior-preservation loss.", flag="prior-loss-weight", ge=0)
    mode: str = opt("images", "images: class images as targets (classic DreamBooth); model: the base model's own "
                    "prediction on the class prompt (adapter disabled), no class images needed.",
                    flag="prior-mode", choices=("images", "model"))


@dataclass
class PivotalConfig:
    token: str = opt("", "Pivotal tuning: the new token to learn (e.g. '<s1>'); empty = off.", flag="pivotal-token")
    trigger: str = opt("", "Word in captions, prompts and samples replaced by the new token (e.g. 'sks'); "
                       "empty = the captions already use the token.", flag="pivotal-trigger")
    num_vectors: int = opt(1, "Embedding vectors for the token (more vectors hold more detail).", ge=1)
    init_word: str = opt("", "Start the new embedding from this word's (e.g. the class noun); empty = random.")
    ti_steps: int = opt(200, "Phase 1: textual-inversion steps before the LoRA trains (0 = skip phase 1). "
                        "With train.max_steps = 0 this is plain textual inversion.", ge=0)
    ti_lr: float = opt(5e-4, "Learning rate of the new embedding in phase 1.", gt=0)
    continue_lr: float = opt(0.0, "Phase 2: keep training the embedding at this rate with the LoRA; 0 = frozen.", ge=0)


@dataclass
class AugmentConfig:
    resolution: int = opt(0, "Training resolution in pixels (multiple of 8); 0 = the model's default.", ge=0)
    crop: str = opt("center", "How images are cropped to their bucket.", choices=("center", "random"))
    random_flip: bool = opt(False, "Randomly mirror images left-right (caching keeps both versions).")
    caption_dropout: float = opt(0.0, "Share of steps trained with an empty caption.", ge=0, lt=1)
    bucketing: bool = opt(True, "Aspect-ratio buckets so non-square images are not squashed.")


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "Learning rate of the UNet LoRA.", gt=0)
    optimizer: str = opt("adamw", "adamw (torch); adamw8bit (bitsandbytes: CUDA, or the CPU from 0.50); prodigy "
                         "(prodigyopt: estimates the step size itself, give lr = 1); adafactor (transformers, at the "
                         "given lr and schedule: relative_step off); adamw-schedulefree (schedulefree: needs "
                         "lr_scheduler constant, does its own warm-up); lion (lion-pytorch: lr 3-10x below AdamW's). "
                         "All but adamw and adamw8bit come with pip install 'sdlora[optimizers]'.",
                         choices=OPTIMIZERS)
    weight_decay: float = opt(1e-2, "Weight decay (decoupled, as AdamW's).", ge=0)
    loraplus_ratio: float = opt(0.0, "LoRA+: the B (up) matrices learn at lr x this ratio (16 is the paper's "
                                "advice); 0 = off, A and B at the same lr.", flag="loraplus-ratio", ge=0)
    ema_decay: float = opt(0.0, "EMA of the LoRA weights with this decay (e.g. 0.999); samples, validation and the "
                           "saved files use the averaged weights. 0 = off.", ge=0, lt=1)
    ema_warmup: bool = opt(False, "EMA decay warms up as 1-(1+n)^(-2/3) (diffusers' EMA warm-up) instead of "
                           "(1+n)/(10+n); either way it is capped at ema_decay.")
    save_ema: str = opt("ema", "With EMA: ema writes the averaged LoRA; both also writes the raw weights as "
                        "NAME_raw.safetensors.", choices=("ema", "both"))
    lr_scheduler: str = opt("constant", "diffusers scheduler name (constant, linear, cosine, ...).",
                            choices=("constant", "constant_with_warmup", "linear", "cosine",
                                     "cosine_with_restarts", "polynomial"))
    warmup_steps: int = opt(0, "Learning-rate warm-up steps.", ge=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 = off.", ge=0)


@dataclass
class TrainConfig:
    max_steps: int = opt(500, "Optimizer steps to train.", ge=0)
    batch_size: int = opt(1, "Images per step per process.", gt=0)
    grad_accum: int = opt(1, "Gradient accumulation steps (effective batch = batch_size x grad_accum x GPUs).", gt=0)
    gradient_checkpointing: bool = opt(False, "Trade compute for memory in the UNet.")
    mixed_precision: str = opt("auto", "auto: bf16 (fp16 on GPUs without bf16) on CUDA; on the CPU bf16 where it is "
                               "native (AVX512-BF16/AMX), else fp32. Or no, fp16, bf16.",
                               choices=("auto", "no", "fp16", "bf16"))
    seed: int = opt(0, "Seed of everything; step N's noise depends only on (seed, N, rank).", ge=0, le=MAX_SEED)
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (5 is typical); 0 = off.", ge=0)
    noise_offset: float = opt(0.0, "Noise offset (e.g. 0.05) for darker/brighter images; 0 = off.", ge=0)
    cache_latents: bool = opt(True, "Encode images once; the VAE does no per-step work (off with random crop).")
    cache_text: bool = opt(True, "Encode captions once when the text encoder is frozen.")
    # the objective's recipe (sdlora/training/objective.py): any family, whatever the model predicts
    timestep_sampling: str = opt("uniform", "How training timesteps are drawn: uniform; logit-normal "
                                 "(sigmoid(mean + scale z), favours the middle; diffusers' SD3 default); sigmoid "
                                 "(kohya's name for sigmoid(scale z)); mode (SD3's mode sampling, see mode_scale). On "
                                 "SD3 the draw is then shifted by the model's shift (3.0).",
                                 choices=("uniform", "logit-normal", "sigmoid", "mode"))
    timestep_mean: float = opt(0.0, "logit-normal: the mean of the normal (> 0 favours noisier timesteps).")
    timestep_scale: float = opt(1.0, "logit-normal and sigmoid: the spread of the normal.", gt=0)
    mode_scale: float = opt(1.29, "mode sampling: how far the draw leans to the middle (SD3's paper and diffusers "
                            "use 1.29; 0 is uniform).", ge=0, le=1.5)
    flow_weighting: str = opt("none", "SD3 (flow matching): loss weights of diffusers' SD3 script: none, sigma_sqrt "
                              "(1/sigma^2) or cosmap (2/(pi(1 - 2 sigma + 2 sigma^2))).",
                              choices=("none", "sigma_sqrt", "cosmap"))
    min_timestep: int = opt(0, "Train only on timesteps >= this (0..999).", ge=0)
    max_timestep: int = opt(1000, "Train only on timesteps < this (1..1000).", le=1000)
    loss: str = opt("l2", "l2 (MSE); huber or smooth-l1 (the pseudo-Huber losses of kohya's scheduled Huber "
                    "loss: robust to outliers in the data).", choices=("l2", "huber", "smooth-l1"))
    huber_delta: float = opt(0.1, "huber / smooth-l1: the delta (kohya's huber_c) where the loss turns linear.",
                              gt=0)
    huber_schedule: str = opt("snr", "huber / smooth-l1: delta over the timesteps: constant, exponential (from 1 "
                              "at t = 0 to delta at the end) or snr (from 1 at high SNR to delta at low SNR).",
                              choices=("constant", "exponential", "snr"))
    debiased_estimation: bool = opt(False, "Weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), the "
                                    "debiased estimation of Yu et al. 2024.")
    multires_noise_iterations: int = opt(0, "Multi-resolution (pyramid) noise levels added to the noise (6-10 is "
                                         "typical); 0 = off.", ge=0)
    multires_noise_discount: float = opt(0.3, "Multi-resolution noise: each coarser level's weight factor.",
                                          gt=0, le=1)
    ip_noise_gamma: float = opt(0.0, "Input perturbation (Ning et al. 2023): the noised input gets gamma x extra "
                                "noise that the target does not (0.1 is typical); 0 = off.", ge=0)
    zero_terminal_snr: bool = opt(False, "Rescale the noise schedule so the last timestep is pure noise (Lin et "
                                  "al. 2023), as v-prediction fine-tunes like NoobAI-XL need; v-prediction only.")


@dataclass
class ValidationConfig:
    data: str = opt("", "Folder of held-out validation images (captions as for training data; without one, the "
                    "first data folder's prompt).", flag="validation-data")
    split: float = opt(0.0, "Hold out this share of the training images (chosen per image by the seed, never "
                       "trained on) as the validation set; 0 = off.", flag="validation-split", ge=0,
                       lt=1)
    every: int = opt(0, "Compute the validation loss every N steps (and at the end); 0 = only at the end.",
                     flag="validate-every", ge=0)
    timesteps: int = opt(5, "Timesteps per validation image, evenly spaced quantiles of the training "
                         "distribution; noise is drawn once from the seed, so only the LoRA changes the loss.",
                         flag="validation-timesteps", ge=1)
    keep_best: bool = opt(False, "Write NAME_best.safetensors whenever the validation loss improves.")
    early_stop_patience: int = opt(0, "Stop after this many validations without improvement (keeps the best "
                                   "file and a resumable checkpoint); 0 = off.", ge=0)


@dataclass
class SpeedConfig:
    """Switches that change how fast a step runs and how much memory it takes, not what it learns."""

    threads: int = opt(0, "CPU threads; 0 = the cores not busy with other work (OpenMP threads waiting on a busy core "
                       "can make a step 10-30x slower), or OMP_NUM_THREADS when set.", ge=0)
    attention: str = opt("sdpa", "Attention kernel: sdpa (PyTorch's fused/flash attention), math (plain, for "
                         "comparison), xformers (needs the xformers package).", choices=("sdpa", "math", "xformers"))
    channels_last: bool = opt(False, "Convolutions in channels-last memory layout (often faster on CUDA).")
    tf32: bool = opt(True, "TF32 matrix math on Ampere and newer GPUs (no effect on the CPU).")
    compile: str = opt("none", "torch.compile the denoiser: regional (each repeated transformer block, compiles fast) "
                       "or full; the first steps are slower while it compiles.", choices=("none", "regional", "full"))
    fused_optimizer: bool = opt(True, "The fused AdamW kernel on CUDA.")
    log_every: int = opt(1, "Read the loss back from the device every N steps (each read waits for the GPU to "
                         "finish; every step is still logged, in bursts); NaN checks happen then and before "
                         "checkpoints. 1 = every step, checked before it is applied.", ge=1)
    prefetch: bool = opt(True, "Prepare the next micro-batch's images (decode, crop, flip, caption tags) on a "
                         "background thread while this one trains, into pinned memory on CUDA; matters when latents "
                         "are not cached (random crop). The batches are the same either way.")


SAMPLE_PROMPT_KEYS = {"text": str, "negative": str, "seed": int, "width": int, "height": int, "steps": int,
                      "guidance": float, "lora_scale": float}


@dataclass
class SampleConfig:
    prompts: list = opt([], "Prompts rendered as sample images during training: strings, or in a job file "
                        "[[sample.prompts]] tables with text, negative, seed, width, height, steps, guidance and "
                        "lora_scale of their own.", flag="sample-prompt")
    every: int = opt(0, "Render samples every N steps (and at step 0 and the end); 0 = only at the end if "
                     "prompts are given.", flag="sample-every", ge=0)
    steps: int = opt(20, "Denoising steps per sample image.", flag="sample-steps", gt=0)
    guidance: float = opt(7.5, "Classifier-free guidance scale of samples.", flag="sample-guidance", ge=0)
    seed: int = opt(0, "Seed of sample images (same seed at every step, so they are comparable).",
                    flag="sample-seed", ge=0, le=MAX_SEED)


@dataclass
class OutputConfig:
    path: str = opt("output/lora.safetensors", "Output LoRA file.", flag="output")
    format: str = opt("kohya", "kohya: loads in AUTOMATIC1111, ComfyUI, kohya and diffusers; diffusers: the "
                      "diffusers/PEFT layout (A1111 and ComfyUI cannot load its UNet keys).",
                      choices=("kohya", "diffusers"))
    save_every: int = opt(0, "Write a resumable checkpoint every N steps; 0 = only at the end.", ge=0)
    name: str = opt("", "Name shown in A1111 (ss_output_name); default: the file name.")
    trigger: str = opt("", "Trigger word(s) stored in the file's metadata; default: taken from the prompts.")
    dtype: str = opt("fp16", "Tensor dtype in the saved file.", flag="save-dtype", choices=("fp16", "bf16", "fp32"))
    log_with: str = opt("none", "Also log loss, lr, validation loss and samples to tensorboard (folder "
                        "NAME_logs) or wandb, through accelerate (pip install 'sdlora[tensorboard]' / "
                        "'sdlora[wandb]').", choices=("none", "tensorboard", "wandb"))
    metadata: str = opt("public", "What the LoRA file tells about its training: public (settings, folder names, "
                        "image counts, tag frequencies; never a path or user name), full (also the local paths), "
                        "none (only what loaders need).", choices=("public", "full", "none"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: list = field(default_factory=list)  # list[DataFolder]
    prior: PriorConfig = field(default_factory=PriorConfig)
    pivotal: PivotalConfig = field(default_factory=PivotalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    config_version: int = CONFIG_VERSION

    # -- derived values (defaults resolved in one place) --
    @property
    def model_path(self) -> str:
        return self.model.path or str(default_model_path())

    @property
    def ti_steps(self) -> int:
        """Phase-1 (textual inversion) steps; 0 without pivotal tuning."""
        return self.pivotal.ti_steps if self.pivotal.token else 0

    @property
    def total_steps(self) -> int:
        return self.ti_steps + self.train.max_steps

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha or float(self.lora.rank)

    @property
    def network_args(self) -> dict:
        """`lora.network_args` parsed and typed, every knob of the network present (defaults filled in)."""
        return parse_network_args(self.lora.network, self.lora.network_args)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


SECTIONS = {f.name: f.default_factory for f in fields(Config) if f.name not in ("data", "config_version")}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check a TOML value against a field type (ints are accepted for floats)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is list or get_origin(typ) is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        tables = where == "sample.prompts"  # the one list that also takes tables
        bad = [v for v in value if not (isinstance(v, str) or (tables and isinstance(v, dict)))]
        if bad:
            raise ConfigError(f"{where} must be a list of strings{' or tables' if tables else ''}, got {bad[0]!r} "
                              "in it")
        return [_sample_table(v, f"{where}[{i}]") if isinstance(v, dict) else v for i, v in enumerate(value)]
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}")
    return value


def _sample_table(table: dict, where: str) -> dict:
    """One [[sample.prompts]] table: known keys of the right types, a text."""
    unknown = sorted(set(table) - set(SAMPLE_PROMPT_KEYS))
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (known: {', '.join(SAMPLE_PROMPT_KEYS)})")
    if not isinstance(table.get("text"), str) or not table["text"].strip():
        raise ConfigError(f"{where} needs a text")
    return {k: _coerce(v, SAMPLE_PROMPT_KEYS[k], f"{where}.{k}") for k, v in table.items()}


def _fill(obj: Any, values: dict, where: str) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}' (known: {', '.join(sorted(names))})")
        setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def from_dict(values: dict) -> Config:
    """Build a Config from a nested dict (as read from TOML); unknown keys raise ConfigError."""
    cfg = Config()
    for key, value in values.items():
        if key == "config_version":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"config_version must be a whole number like {CONFIG_VERSION}, got {value!r}")
            if value > CONFIG_VERSION:
                raise ConfigError(f"config_version {value} is newer than this sdlora ({CONFIG_VERSION}); "
                                  "upgrade sdlora")
        elif key == "data":
            items = value if isinstance(value, list) else [value]
            cfg.data = []
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ConfigError(f"data[{i}] must be a table with a 'path'")
                folder = DataFolder()
                _fill(folder, item, f"data[{i}]")
                cfg.data.append(folder)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            _fill(getattr(cfg, key), value, key)
        else:
            raise ConfigError(f"unknown section '{key}' (known: data, {', '.join(SECTIONS)})")
    return cfg


def load_toml(path: str | Path, under: dict | None = None) -> Config:
    """Read a config file; relative data/output paths are resolved against the file's folder. `under`: values the
    file's own go on top of (a preset's, `sdlora train --preset`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    cfg = from_dict(merge_values(under or {}, values))
    base = path.parent
    for folder in cfg.data:
        folder.path = _rel(folder.path, base)
        folder.masks = _rel(folder.masks, base)
    cfg.prior.class_data = _rel(cfg.prior.class_data, base)
    cfg.validation.data = _rel(cfg.validation.data, base)
    cfg.output.path = _rel(cfg.output.path, base)
    if cfg.model.path and (base / cfg.model.path).exists():
        cfg.model.path = str(base / cfg.model.path)
    return cfg


def merge_values(under: dict, over: dict) -> dict:
    """`over`'s values on top of `under`'s, table by table (a list or value in `over` replaces `under`'s)."""
    out = dict(under)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_values(out[key], value) if both else value
    return out


def _rel(value: str, base: Path) -> str:
    return str(base / value) if value and not Path(value).is_absolute() else value


def iter_options():
    """Yield (section, field) for every scalar option, in order; the CLI and UI build their inputs from these."""
    for section in SECTIONS:
        for f in fields(SECTIONS[section]()):
            yield section, f
    for f in fields(DataFolder):
        yield "data", f


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f.name.replace("_", "-")


def parse_network_args(network: str, text: str) -> dict:
    """'factor=8,decompose_both=true' -> {'factor': 8, 'decompose_both': True, ...} with every knob of `network`
    (defaults filled in); an unknown key or a bad value is a one-line ConfigError."""
    known = NETWORK_ARGS.get(network)
    if known is None:
        raise ConfigError(f"lora.network must be one of {', '.join(NETWORKS)}, got {network!r}")
    out = {k: NETWORK_DEFAULTS[k] for k in known}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, value = (p.strip() for p in item.partition("="))
        if key not in known:
            raise ConfigError(f"lora.network_args: unknown key {key!r} for network {network} (known: "
                              f"{', '.join(known)})")
        if not sep or not value:
            raise ConfigError(f"lora.network_args: {key} needs a value, like {key}={NETWORK_DEFAULTS[key]}")
        out[key] = _arg_value(key, value, known[key])
    return out


def _arg_value(key: str, value: str, kind):
    if isinstance(kind, tuple):
        if value not in kind:
            raise ConfigError(f"lora.network_args: {key} must be one of {', '.join(kind)}, got {value!r}")
        return value
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"lora.network_args: {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise ConfigError(f"lora.network_args: {key} must be a finite {kind.__name__}, got {value!r}")
    return number


def _check_network(cfg: Config) -> None:
    """The network's knobs, and the combinations no client or library can serve."""
    lo, args = cfg.lora, cfg.network_args
    if args.get("conv_rank", 0) < 0 or args.get("conv_alpha", 0) < 0:
        raise ConfigError("lora.network_args: conv_rank and conv_alpha must be >= 0")
    if not 0 <= args.get("rank_dropout", 0) < 1 or not 0 <= args.get("module_dropout", 0) < 1:
        raise ConfigError("lora.network_args: rank_dropout and module_dropout must be in [0, 1)")
    if args.get("factor", -1) == 0 or args.get("factor", -1) < -1:
        raise ConfigError(f"lora.network_args: factor must be -1 (balanced) or > 0, got {args['factor']}")
    if lo.network in ("loha", "lokr"):
        if cfg.output.format == "diffusers":
            raise ConfigError(f"output.format diffusers cannot hold {lo.network}: diffusers loads no LoHa/LoKr "
                              "file; use --format kohya (A1111, ComfyUI)")
        if lo.dropout:
            raise ConfigError(f"lora.dropout is LoRA's input dropout, which peft's {lo.network} has not; use "
                              "--network-args rank_dropout=... or module_dropout=...")
        if cfg.model.quantize != "none":  # peft 0.21's LoHa/LoKr reshape their update to base_layer.weight.shape,
            # which for a bitsandbytes Linear4bit is the packed 4-bit storage: the first forward fails (measured)
            raise ConfigError(f"QLoRA (quantize {cfg.model.quantize}) with network {lo.network} is unsupported: "
                              "peft's LoHa/LoKr layers cannot wrap a 4-bit layer; use lora or dora")
    if lo.network == "dora" and args["dora_axis"] == "input" and cfg.output.format == "diffusers":
        raise ConfigError("output.format diffusers needs dora_axis=output (peft's lora_magnitude_vector, the only "
                          "DoRA diffusers loads): --network-args dora_axis=output, or --format kohya")


def validate(cfg: Config, check_paths: bool = True) -> Config:
    """Fail fast, in one line, on anything that would otherwise fail (or silently misbehave) later."""
    checks = [
        (cfg.augment.resolution % 8 == 0, f"augment.resolution must be a multiple of 8, got {cfg.augment.resolution}"),
        (cfg.total_steps > 0, "train.max_steps must be > 0 (0 is only for plain textual inversion: pivotal.token "
                              "with pivotal.ti_steps > 0)"),
        (not cfg.pivotal.token or " " not in cfg.pivotal.token.strip(),
         f"pivotal.token must be one word like '<s1>', got {cfg.pivotal.token!r}"),
        (cfg.output.path.endswith(".safetensors"), f"output.path must end in .safetensors, got {cfg.output.path!r}"),
        (bool(cfg.data), "no training data: give --data DIR or a [[data]] table in the config"),
    ]
    for section, i, obj in _objects(cfg):
        for f in fields(obj):
            _check_field(f"{section}[{i}]" if i is not None else section, f, getattr(obj, f.name))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_network(cfg)
    for i, folder in enumerate(cfg.data):
        if not folder.path.strip():
            raise ConfigError(f"data[{i}].path is empty; give the folder of training images (--data DIR)")
        if check_paths and not Path(folder.path).is_dir():
            raise ConfigError(f"data folder not found: {folder.path}; pass an existing folder of images")
    for i, p in enumerate(cfg.sample.prompts):
        if isinstance(p, dict):
            _check_sample_table(p, f"sample.prompts[{i}]")
    pr = cfg.prior
    if pr.class_prompt and pr.mode == "images" and not pr.class_data:
        raise ConfigError("prior preservation with class images needs prior.class_data (--class-data DIR), "
                          "or use --prior-mode model")
    if pr.class_data and not pr.class_prompt:
        raise ConfigError("prior.class_data is set but prior.class_prompt is empty; give --class-prompt")
    validate_training_options(cfg, check_paths)
    if check_paths and cfg.model.path and _looks_local(cfg.model.path) and not Path(cfg.model.path).exists():
        raise ConfigError(f"model not found: {cfg.model.path}")
    return cfg


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
             "lt": lambda v, b: v < b}


def _objects(cfg: Config):
    """(section, data index or None, dataclass object) of every section and data folder."""
    for section in SECTIONS:
        yield section, None, getattr(cfg, section)
    for i, folder in enumerate(cfg.data):
        yield "data", i, folder


def _check_field(where: str, f: dataclasses.Field, value) -> None:
    """A field's choices, bounds and finiteness, with its name and value in the message."""
    name = f"{where}.{f.name}"
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    bounds = f.metadata.get("bounds") or {}
    broken = [f"{_BOUND_TEXT[k]} {b}" for k, b in bounds.items() if not _BOUND_OK[k](value, b)]
    if broken:
        raise ConfigError(f"{name} must be {' and '.join(broken)}, got {value!r}")


def _check_sample_table(p: dict, where: str) -> None:
    rules = {"seed": (lambda v: 0 <= v <= MAX_SEED, f">= 0 and <= {MAX_SEED}"),
             "width": (lambda v: v == 0 or (v >= 8 and v % 8 == 0), "0 (the training size) or a multiple of 8"),
             "height": (lambda v: v == 0 or (v >= 8 and v % 8 == 0), "0 (the training size) or a multiple of 8"),
             "steps": (lambda v: v >= 0, ">= 0 (0: sample.steps)"), "guidance": (lambda v: v >= 0, ">= 0"),
             "lora_scale": (lambda v: True, "a number")}
    for key, value in p.items():
        if key in rules and ((isinstance(value, float) and not math.isfinite(value)) or not rules[key][0](value)):
            raise ConfigError(f"{where}.{key} must be {rules[key][1]}, got {value!r}")


def block_indices(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; a bad item is a one-line ConfigError."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        lo, sep, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            first = last = -1
        if first < 0 or last < first:
            raise ConfigError(f"lora.blocks: {item!r} is not a block number or range like 0-11")
        out.extend(range(first, last + 1))
    return sorted(set(out))


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith((".safetensors", ".ckpt")) or path.count("/") != 1


def _rule(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_training_options(cfg: Config, check_paths: bool = True) -> None:
    """The optimizer, EMA, objective and validation options: ranges, and settings that would do nothing."""
    op, tr, va = cfg.optim, cfg.train, cfg.validation
    _rule(not op.loraplus_ratio or cfg.lora.network in ("lora", "dora"), "optim.loraplus_ratio needs LoRA's B "
          f"matrices and lora.network {cfg.lora.network} has none: use lora or dora, or set the ratio to 0")
    _rule(op.ema_decay > 0 or (not op.ema_warmup and op.save_ema == "ema"),
          "optim.ema_warmup and save_ema = both need EMA: set optim.ema_decay (e.g. 0.999)")
    if op.optimizer == "adamw-schedulefree":
        _rule(op.lr_scheduler == "constant", "adamw-schedulefree replaces the learning-rate schedule: set "
              f"optim.lr_scheduler constant (its warm-up is optim.warmup_steps), got {op.lr_scheduler!r}")
        _rule(op.ema_decay == 0, "adamw-schedulefree averages the weights itself: set optim.ema_decay 0")
    if op.optimizer == "prodigy":
        lrs = {op.lr, cfg.lora.text_encoder_lr or op.lr, cfg.lora.text_encoder_2_lr or op.lr}
        if cfg.pivotal.token and cfg.pivotal.continue_lr:
            lrs.add(cfg.pivotal.continue_lr)
        _rule(len(lrs) == 1 and not op.loraplus_ratio, "prodigy takes one learning rate for everything it "
              "trains: leave lora.text_encoder_lr, text_encoder_2_lr, pivotal.continue_lr and optim.loraplus_ratio "
              "at 0 (or equal to optim.lr)")
    _rule(tr.min_timestep < tr.max_timestep, "train.min_timestep and max_timestep must satisfy "
          f"0 <= min < max <= 1000, got {tr.min_timestep} and {tr.max_timestep}")
    _rule(tr.timestep_sampling == "logit-normal" or tr.timestep_mean == 0,
          "train.timestep_mean applies to timestep_sampling logit-normal only")
    _rule(tr.timestep_sampling not in ("uniform", "mode") or tr.timestep_scale == 1,
          "train.timestep_scale applies to timestep_sampling logit-normal or sigmoid only")
    _rule(tr.timestep_sampling == "mode" or tr.mode_scale == 1.29, "train.mode_scale applies to timestep_sampling "
          "mode only")
    _rule(not cfg.lora.blocks.strip() or bool(block_indices(cfg.lora.blocks)), "lora.blocks names no block")
    _rule(tr.loss != "l2" or (tr.huber_delta == 0.1 and tr.huber_schedule == "snr"),
          "train.huber_delta and huber_schedule apply to loss huber or smooth-l1 only")
    _rule(tr.multires_noise_iterations > 0 or tr.multires_noise_discount == 0.3,
          "train.multires_noise_discount needs train.multires_noise_iterations > 0")
    _rule(not (tr.zero_terminal_snr and cfg.model.prediction_type == "epsilon"),
          "train.zero_terminal_snr needs v-prediction (an epsilon model cannot learn pure noise at the last "
          "timestep): set model.prediction_type v_prediction")
    _rule(not (va.split and va.data), "give validation.data or validation.split, not both")
    has_validation = bool(va.split or va.data)
    _rule(has_validation or not (va.every or va.keep_best or va.early_stop_patience),
          "validate_every, keep_best and early_stop_patience need validation images: give --validation-data DIR "
          "or --validation-split F")
    _rule(not va.early_stop_patience or va.every > 0, "early_stop_patience needs validation during training: "
          "set validation.every (--validate-every N)")
    if check_paths and va.data:
        _rule(Path(va.data).is_dir(), f"validation folder not found: {va.data}; pass an existing folder of images")
