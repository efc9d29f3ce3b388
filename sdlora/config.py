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

from .block_args import BLOCK_KEYS, LR_WEIGHTS, PATTERNS, check_syntax
from .errors import ConfigError
from .paths import default_model_path

CONFIG_VERSION = 2
SIGN_FLIP = 2  # from version 2 on, train.timestep_mean has diffusers' --logit_mean sign (version 1: the opposite)

TARGET_PRESETS = ("auto", "cross_attn", "attn", "attn_ff", "all")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "adamw-schedulefree", "lion")
NETWORKS = ("lora", "dora", "loha", "lokr")
SCORERS = ("none", "shapes", "clip-dino")
SCORE_PARTS = ("likeness", "adherence", "preservation", "copying")
# each network's own knobs (`--network-args "factor=8,decompose_both=true"`): name -> type, or the allowed words
_SHARED_ARGS = {"conv_rank": int, "conv_alpha": float}
_LYCORIS_ARGS = {"use_tucker": bool, "rank_dropout": float, "module_dropout": float}
NETWORK_ARGS = {
    "lora": dict(_SHARED_ARGS),
    "dora": {**_SHARED_ARGS, "dora_axis": ("input", "output")},
    "loha": {**_SHARED_ARGS, **_LYCORIS_ARGS},
    "lokr": {**_SHARED_ARGS, **_LYCORIS_ARGS, "factor": int, "decompose_both": bool},
}
# sd-scripts' per-block and per-layer network_args, which sdlora takes as [lora] fields of their own
PER_LAYER_KEYS = (*BLOCK_KEYS, *PATTERNS)
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
                            "use_tucker, rank_dropout (as LyCORIS: kept rows not rescaled), module_dropout; lokr: "
                            "factor (-1 = balanced; split as LyCORIS splits it), decompose_both.")
    # per block and per layer, in sd-scripts' spelling (sdlora/training/run/blocks.py; the block tables: families/)
    block_dims: str = opt("", "sd-scripts' block_dims: the rank of each UNet block, comma-separated, 25 values on SD "
                          "1.x/2.x (IN00-IN11, MID, OUT00-OUT11; IN00 never has LoRA) or 23 on SDXL (BASE, IN00-IN08, "
                          "MID00-MID02, OUT00-OUT08, OUT); 0 = no LoRA in that block. Empty = rank everywhere.")
    block_alphas: str = opt("", "sd-scripts' block_alphas: the alpha of each block (as block_dims); empty = alpha "
                            "(0: each block's rank).")
    conv_block_dims: str = opt("", "sd-scripts' conv_block_dims: the rank of each block's k x k convs (targets all); "
                               "empty = conv_rank, or the block's rank.")
    conv_block_alphas: str = opt("", "sd-scripts' conv_block_alphas: the alpha of each block's k x k convs; empty = "
                                 "conv_alpha, or the alpha/rank ratio of alpha and rank.")
    down_lr_weight: str = opt("", "sd-scripts' down_lr_weight: the UNet lr multiplier of each input block (12 values "
                              "IN00-IN11 on SD 1.x/2.x, 9 on SDXL; a shorter list is filled with 1), or cosine, sine, "
                              "linear, reverse_linear, zeros, each optionally +BASE. 0 = no LoRA in that block.")
    mid_lr_weight: str = opt("", "sd-scripts' mid_lr_weight: the lr multiplier of the middle block (SDXL: 3 values).")
    up_lr_weight: str = opt("", "sd-scripts' up_lr_weight: the lr multiplier of each output block (12 values "
                            "OUT00-OUT11, 9 on SDXL), or a preset as down_lr_weight.")
    block_lr_zero_threshold: float = opt(0.0, "sd-scripts' block_lr_zero_threshold: lr weights at or below it "
                                         "become 0 (no LoRA in that block).", ge=0)
    network_reg_dims: str = opt("", "Rank by regular expression, every family (SD3's joint blocks too): "
                                "REGEX=RANK,... searched in each denoiser layer's diffusers path "
                                "(transformer_blocks.3.attn.to_q) and its kohya name (lora_unet_joint_blocks_3_x_block_"
                                "attn_qkv); the first match wins, over block_dims; 0 = no LoRA (sd-scripts' "
                                "network_reg_dims).")
    network_reg_alphas: str = opt("", "Alpha by regular expression (REGEX=ALPHA,...); a layer ranked by "
                                  "network_reg_dims without one gets alpha (0: its rank).")
    network_reg_lrs: str = opt("", "Learning rate by regular expression (REGEX=LR,...), over the lr and the block "
                               "weights; 0 = no LoRA (sd-scripts' network_reg_lrs).")


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
    masks: str = opt("", "Folder of loss masks, one per image with the same file stem: white = learn, black = "
                     "ignore, grey = partly (where the loss counts; an inpainting base's area to repaint is "
                     "inpaint_masks). Empty = no masks.")
    alpha_mask: bool = opt(False, "Use each image's own alpha channel as its mask (transparent = ignore).")
    unmasked_weight: float = opt(0.0, "Loss weight outside the mask (0: the masked-out area teaches nothing).",
                                 ge=0, le=1)
    inpaint_masks: str = opt("", "Inpainting bases (9-channel UNets): folder of inpainting masks, one per image with "
                             "the same file stem, white = the area the model repaints (the inpainting pipeline's "
                             "mask_image); the image trains with its own mask instead of a random one. Not the loss "
                             "masks (masks). Empty = random rectangles and brush strokes, new every step.",
                             flag="inpaint-masks")


@dataclass
class PriorConfig:
    class_prompt: str = opt("", "Class prompt for prior preservation (e.g. 'a photo of a dog'); empty = off.")
    class_data: str = opt("", "Folder of class images; missing ones are generated by the base model. With "
                          "prior.mode model: optional images of what to preserve, with their .txt captions (else "
                          "the class prompt), noised and matched to the base model's prediction.")
    num_class_images: int = opt(0, "How many class images to use; generated when the folder has fewer.", ge=0)
    weight: float = opt(1.0, "Weight of the prior-preservation loss.", flag="prior-loss-weight", ge=0)
    mode: str = opt("images", "images: class images as targets (classic DreamBooth); model: the base model's own "
                    "prediction (adapters off) as the target, on the class prompt at the training images' noisy "
                    "latents, or on prior.class_data's images and captions when given; nothing is rendered.",
                    flag="prior-mode", choices=("images", "model"))
    blank_weight: float = opt(0.0, "Also match the base model's prediction on the empty prompt (the unconditional "
                              "branch classifier-free guidance steers from) at the training images' noisy latents, "
                              "with this weight, as ai-toolkit's blank-prompt preservation does; 0 = off. Guidance "
                              "then steers from the base model's own empty prompt.",
                              flag="blank-prompt-weight", ge=0)
    dop_class: str = opt("", "Differential output preservation, as ai-toolkit's: each training caption with the "
                         "trigger (output.trigger, or pivotal tuning's token) replaced by this class word (e.g. "
                         "'person') is also matched to the base model's prediction at the training image's noisy "
                         "latents, so the class and the words around the trigger keep what they draw; empty = off.",
                         flag="dop-class")
    dop_weight: float = opt(1.0, "Weight of differential output preservation (prior.dop_class).", flag="dop-weight",
                            ge=0)

    @property
    def has_images(self) -> bool:
        """Whether prior batches come from a folder: class images, or the model prior's images to preserve."""
        return bool(self.class_prompt) and (self.mode == "images" or bool(self.class_data))


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
    # the objective's recipe (sdlora/training/steps/objective.py): any family, whatever the model predicts
    timestep_sampling: str = opt("uniform", "How training timesteps are drawn: uniform; logit-normal "
                                 "(diffusers' --weighting_scheme logit_normal, its SD3 default: favours the middle); "
                                 "sigmoid (kohya's name for sigmoid(scale z)); mode (SD3's mode sampling, see "
                                 "mode_scale). On SD3 the draw is then shifted by the model's shift (3.0), as "
                                 "kohya's --training_shift 3.",
                                 choices=("uniform", "logit-normal", "sigmoid", "mode"))
    timestep_mean: float = opt(0.0, "logit-normal: the mean of the normal, as diffusers' --logit_mean: > 0 favours "
                               "less noisy timesteps (kohya's sd3 --logit_mean and the SD3 paper's m have the "
                               "opposite sign: give -m).")
    timestep_scale: float = opt(1.0, "logit-normal and sigmoid: the spread of the normal.", gt=0)
    mode_scale: float = opt(1.29, "mode sampling: how far the draw leans to the middle (SD3's paper and diffusers "
                            "use 1.29; 0 is uniform).", ge=0, le=1.5)
    flow_weighting: str = opt("none", "SD3 (flow matching): loss weights of diffusers' SD3 script "
                              "(compute_loss_weighting_for_sd3): none, sigma_sqrt (1/sigma^2) or cosmap (2/(pi(1 - "
                              "2 sigma + 2 sigma^2))), on the preconditioned loss unless --no-precondition-outputs.",
                              choices=("none", "sigma_sqrt", "cosmap"))
    precondition_outputs: bool = opt(True, "SD3 (flow matching): the loss compares the model's x0 = x_t - sigma v "
                                     "with the clean latents (the velocity loss times sigma^2), as diffusers' SD3 "
                                     "script (--precondition_outputs 1, its default) and kohya's sd3_train_network "
                                     "(always) do; --no-precondition-outputs: the plain velocity loss (diffusers' "
                                     "--precondition_outputs 0).")
    min_timestep: int = opt(0, "Train only on timesteps >= this (0..999); SD3: after the shift, as kohya.", ge=0)
    max_timestep: int = opt(1000, "Train only on timesteps < this (1..1000); SD3: after the shift, as kohya.",
                            le=1000)
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
    every: int = opt(0, "Validate (the held-out loss and/or the image scores) every N steps (and at the end); 0 = "
                     "only at the end.", flag="validate-every", ge=0)
    timesteps: int = opt(5, "Timesteps per validation image, evenly spaced quantiles of the training "
                         "distribution; noise is drawn once from the seed, so only the LoRA changes the loss.",
                         flag="validation-timesteps", ge=1)
    keep_best: bool = opt(False, "Write NAME_best.safetensors whenever the validation improves (its loss or its "
                          "image score: see select_by).")
    early_stop_patience: int = opt(0, "Stop after this many validations without improvement (keeps the best "
                                   "file and a resumable checkpoint); 0 = off.", ge=0)
    scorer: str = opt("none", "Image validation: render the validation prompts at fixed seeds with the weights a "
                      "file would get and score them: shapes (the shapes-world judge), clip-dino (CLIP or SigLIP "
                      "for prompt adherence, DINOv2 for likeness, preservation and copying); none = off.",
                      flag="scorer", choices=SCORERS)
    select_by: str = opt("auto", "What picks the best file (--keep-best) and drives early stopping: images (the "
                         "combined image score, higher is better), loss (the validation loss); auto = images with a "
                         "scorer, else loss.", flag="select-by", choices=("auto", "images", "loss"))
    prompts: list = opt([], "Validation prompts: strings, or in a job file [[validation.prompts]] tables with text, "
                        "kind (concept: carries the trigger, scored for likeness; preservation: scored against the "
                        "base model's image) and negative. Empty = up to 4 training captions with the trigger and 2 "
                        "without it (or the class prompt).", flag="validation-prompt")
    seeds: int = opt(2, "Images per validation prompt (seeds sample.seed + i, the same at every validation).",
                     flag="validation-seeds", gt=0)
    image_steps: int = opt(20, "Denoising steps per validation image (fewer is cheaper; the guidance is "
                           "sample.guidance).", flag="validation-steps", gt=0)
    image_size: int = opt(0, "Validation image size in pixels (multiple of 8); 0 = the training resolution.",
                          flag="validation-size", ge=0)
    score_weights: str = opt("likeness=1,adherence=0,preservation=1,copying=0", "The combined score: "
                             "(likeness x w + adherence x w + preservation x w - copying x w) / (sum of the first "
                             "three weights), over the parts that were measured. The default ranked the demo's "
                             "checkpoints most like `sdlora eval` (scripts/measure_selection.py).",
                             flag="score-weights")
    concept: str = opt("", "shapes scorer: the judge's class the trigger should draw (e.g. star); empty = the class "
                       "the judge sees in the training images with the trigger.", flag="judge-concept")
    clip_model: str = opt("openai/clip-vit-base-patch16", "clip-dino scorer: the CLIP or SigLIP model (a local "
                          "folder or a hub id) for prompt adherence.", flag="clip-model")
    dino_model: str = opt("facebook/dinov2-small", "clip-dino scorer: the image model (a local folder or a hub id) "
                          "for likeness, preservation and copying; 'clip' = the CLIP model's image embeddings.",
                          flag="dino-model")


@dataclass
class SpeedConfig:
    """Switches that change how fast a step runs and how much memory it takes, not what it learns."""

    threads: int = opt(0, "CPU threads; 0 = the cores not busy with other work (OpenMP threads waiting on a busy core "
                       "can make a step 10-30x slower), counted again every thread_check seconds, or OMP_NUM_THREADS "
                       "when set. A fixed count (N, or OMP_NUM_THREADS) is what makes --resume bit-exact: the thread "
                       "count changes a step's last bits.", ge=0)
    thread_check: int = opt(30, "With threads 0: count the free cores again every N seconds of training and follow "
                            "them (a program that started or ended). The last bits of the weights then follow the "
                            "machine's load (measured: up to 7e-6 apart after 5 demo steps at 1 vs 2 threads), so a "
                            "resumed run is not bit-identical to an uninterrupted one; 0 = count once at the start.",
                            ge=0)
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
VALIDATION_PROMPT_KEYS = {"text": str, "kind": str, "negative": str}
PROMPT_TABLES = {"sample.prompts": SAMPLE_PROMPT_KEYS, "validation.prompts": VALIDATION_PROMPT_KEYS}


@dataclass
class InpaintConfig:
    """Training on an inpainting base (a 9-channel UNet: SD 1.5 / 2 inpainting, SDXL inpainting; detected from the
    model): each step's images get a mask (random, or data.inpaint_masks), and the UNet sees the noisy latents, the
    mask and the latents of the image with the masked area blanked, as the inpainting pipeline runs it."""

    full_mask: float = opt(0.25, "Inpainting bases: the share of images whose whole area is masked (the model draws "
                           "from the prompt alone, as text-to-image; the SD inpainting models were trained with "
                           "a quarter).", flag="inpaint-full-mask", ge=0, le=1)
    sample_image: str = opt("", "Inpainting bases: the image that sample images repaint (resized to the sample "
                            "size); empty = the first training image.", flag="inpaint-sample-image")
    sample_mask: str = opt("", "Inpainting bases: the mask of the sample images (white = repaint); empty = the "
                           "sample image's own inpainting mask (data.inpaint_masks), else a centred rectangle of half "
                           "its width and height.", flag="inpaint-sample-mask")


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
    trigger: str = opt("", "Trigger word(s) stored in the file's metadata (modelspec.trigger_phrase); default: the "
                       "pivotal token, the kept first tags (keep_tags) all captions of a folder share, else the "
                       "instance prompt's words the class prompt lacks.")
    dtype: str = opt("fp16", "Tensor dtype in the saved file.", flag="save-dtype", choices=("fp16", "bf16", "fp32"))
    log_with: str = opt("none", "Also log loss, lr, validation loss and samples to tensorboard (folder "
                        "NAME_logs) or wandb, through accelerate (pip install 'sdlora[tensorboard]' / "
                        "'sdlora[wandb]').", choices=("none", "tensorboard", "wandb"))
    metadata: str = opt("public", "What the LoRA file tells about its training: public (settings, folder names, "
                        "image counts, tag frequencies; never a path or user name), full (also the local paths), "
                        "none (only what loaders need).", choices=("public", "full", "none"))


@dataclass
class SliderConfig:
    """A concept slider or eraser trained from prompts alone (`sdlora slider job.toml`;
    sdlora/training/steps/slider.py): no images, the LoRA learns from the frozen base model's own predictions on
    latents the base model partly denoises itself, as LECO, Concept Sliders and ai-toolkit train them."""

    target: str = opt("", "Slider / eraser: the prompt the LoRA acts on (e.g. 'a person', 'a circle'). Setting it "
                      "makes the job a slider (sdlora slider), trained from prompts alone: no [[data]].",
                      flag="slider-target")
    positive: str = opt("", "enhance: the prompt of the +1 direction (e.g. 'a person, very old'); erase: the concept "
                        "to remove (empty = the target).", flag="slider-positive")
    negative: str = opt("", "enhance: the prompt of the -1 direction (e.g. 'a person, very young'; empty = the target "
                        "itself); erase: what the target's prediction is pulled toward (empty = the empty prompt, as "
                        "ESD).", flag="slider-negative")
    guidance: float = opt(1.0, "eta: at +1 the LoRA moves the target's prediction by eta x (positive - negative) "
                          "(erase: away from the concept by eta x (positive - negative)). Concept Sliders use 4, "
                          "LECO and ESD 1.", flag="slider-guidance", gt=0)
    action: str = opt("enhance", "enhance: a slider, trained at strength +1 toward positive and at -1 toward negative "
                      "(ai-toolkit's two passes), used from -1 to +1; erase: an eraser (ESD, LECO), trained at +1 to "
                      "remove the concept from the target, used from 0 to 1.", choices=("enhance", "erase"),
                      flag="slider-action")
    attributes: list = opt([], "Words put in front of every slider prompt in turn, one per step (Concept Sliders' "
                           "--attributes, e.g. 'a red', 'a blue' before target 'circle'), so the LoRA learns the "
                           "direction across them, not for one phrasing.", flag="slider-attribute")
    anchors: list = opt([], "Prompts the LoRA must leave as the base model draws them (ai-toolkit's anchor class), one "
                        "per step in turn, at the same strength as the pass.", flag="slider-anchor")
    anchor_weight: float = opt(1.0, "Weight of the anchors' loss.", flag="slider-anchor-weight", ge=0)
    denoise_steps: int = opt(50, "Each step denoises fresh noise with the base model (no LoRA, guidance 3) for a "
                             "random 0 to N-1 of N sampler steps, and trains at the noise level reached (LECO's "
                             "max_denoising_steps); fewer = faster steps.", flag="slider-denoise-steps", ge=2)


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
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    slider: SliderConfig = field(default_factory=SliderConfig)
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
    def select_by(self) -> str:
        """What picks the best file and drives early stopping: 'images', 'loss', or '' (no validation at all)."""
        va = self.validation
        if va.select_by != "auto":
            return va.select_by
        return "images" if va.scorer != "none" else "loss" if va.split or va.data else ""

    @property
    def score_weights(self) -> dict[str, float]:
        """`validation.score_weights` parsed: a weight for every part of the combined score."""
        return parse_score_weights(self.validation.score_weights)

    @property
    def is_slider(self) -> bool:
        """A slider or eraser job: trained from prompts (slider.target), not from images."""
        return bool(self.slider.target.strip())

    @property
    def inpaint_settings(self) -> list[str]:
        """The inpainting settings that differ from their defaults (they need an inpainting base)."""
        changed = [f"inpaint.{f.name}" for f in fields(InpaintConfig)
                   if getattr(self.inpaint, f.name) != getattr(InpaintConfig(), f.name)]
        return changed + [f"data[{i}].inpaint_masks" for i, d in enumerate(self.data) if d.inpaint_masks]

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
        tables = where in PROMPT_TABLES  # the lists that also take tables
        bad = [v for v in value if not (isinstance(v, str) or (tables and isinstance(v, dict)))]
        if bad:
            raise ConfigError(f"{where} must be a list of strings{' or tables' if tables else ''}, got {bad[0]!r} "
                              "in it")
        return [_prompt_table(v, f"{where}[{i}]", PROMPT_TABLES[where]) if isinstance(v, dict) else v
                for i, v in enumerate(value)]
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}")
    return value


def _prompt_table(table: dict, where: str, keys: dict) -> dict:
    """One [[sample.prompts]] or [[validation.prompts]] table: known keys of the right types, a text."""
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (known: {', '.join(keys)})")
    if not isinstance(table.get("text"), str) or not table["text"].strip():
        raise ConfigError(f"{where} needs a text")
    return {k: _coerce(v, keys[k], f"{where}.{k}") for k, v in table.items()}


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
            mean = values.get("train", {}).get("timestep_mean", 0) if isinstance(values.get("train"), dict) else 0
            if value < SIGN_FLIP and mean:
                raise ConfigError(f"train.timestep_mean = {mean} in a config_version {value} job meant the opposite "
                                  f"sign (it now follows diffusers' --logit_mean): write {-mean} and config_version = "
                                  f"{CONFIG_VERSION}")
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
        values = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a TOML job file (not UTF-8 text: byte {e.start}); give a .toml file") from None
    cfg = from_dict(merge_values(under or {}, values))
    base = path.parent
    for folder in cfg.data:
        folder.path = _rel(folder.path, base)
        folder.masks = _rel(folder.masks, base)
        folder.inpaint_masks = _rel(folder.inpaint_masks, base)
    cfg.inpaint.sample_image = _rel(cfg.inpaint.sample_image, base)
    cfg.inpaint.sample_mask = _rel(cfg.inpaint.sample_mask, base)
    cfg.prior.class_data = _rel(cfg.prior.class_data, base)
    cfg.validation.data = _rel(cfg.validation.data, base)
    cfg.output.path = _rel(cfg.output.path, base)
    if cfg.model.path and (base / cfg.model.path).exists():
        cfg.model.path = str(base / cfg.model.path)
    for name in ("clip_model", "dino_model"):  # a local folder beside the job, else a hub id
        value = getattr(cfg.validation, name)
        if value and value != "clip" and (base / value).exists():
            setattr(cfg.validation, name, str(base / value))
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
        if key in PER_LAYER_KEYS:
            raise ConfigError(f"lora.network_args: {key} has an option of its own, which keeps its comma list whole: "
                              f"--{key.replace('_', '-')} \"...\" (job file: [lora] {key} = \"...\")")
        if key not in known:
            raise ConfigError(f"lora.network_args: unknown key {key!r} for network {network} (known: "
                              f"{', '.join(known)})")
        if not sep or not value:
            raise ConfigError(f"lora.network_args: {key} needs a value, like {key}={NETWORK_DEFAULTS[key]}")
        out[key] = _arg_value(key, value, known[key])
    return out


def parse_score_weights(text: str) -> dict[str, float]:
    """'likeness=1,copying=0.5' -> a weight for each of SCORE_PARTS (those not named: 0); one-line ConfigError on an
    unknown part, a bad number, or no positive weight among likeness, adherence and preservation."""
    out = dict.fromkeys(SCORE_PARTS, 0.0)
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, _, value = (p.strip() for p in item.partition("="))
        if key not in out:
            raise ConfigError(f"validation.score_weights: unknown part {key!r} (known: {', '.join(SCORE_PARTS)})")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = math.nan
        if not math.isfinite(out[key]) or out[key] < 0:
            raise ConfigError(f"validation.score_weights: {key} needs a number >= 0, like {key}=1, got {value!r}")
    if not any(out[k] for k in SCORE_PARTS[:3]):
        raise ConfigError("validation.score_weights: give likeness, adherence or preservation a weight > 0")
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


def _check_per_layer(cfg: Config) -> None:
    """The per-block and per-layer settings parse (their lengths are checked against the model when it loads)."""
    check_syntax(cfg.lora)
    used = [k for k in (*LR_WEIGHTS, "network_reg_lrs") if getattr(cfg.lora, k).strip()]
    _rule(not used or cfg.optim.optimizer != "prodigy", f"prodigy takes one learning rate for everything it trains; "
          f"lora.{used[0] if used else ''} gives layers their own rates: use adamw, or leave it empty")


# what training on images uses and a slider does not: set, it would do nothing
SLIDER_UNUSED = (("train", "timestep_sampling"), ("train", "timestep_mean"), ("train", "timestep_scale"),
                 ("train", "mode_scale"), ("train", "flow_weighting"), ("train", "min_timestep"),
                 ("train", "max_timestep"), ("train", "loss"), ("train", "huber_delta"), ("train", "huber_schedule"),
                 ("train", "min_snr_gamma"), ("train", "noise_offset"), ("train", "debiased_estimation"),
                 ("train", "multires_noise_iterations"), ("train", "multires_noise_discount"),
                 ("train", "ip_noise_gamma"), ("augment", "crop"), ("augment", "random_flip"),
                 ("augment", "caption_dropout"), ("lora", "train_text_encoder"), ("pivotal", "token"),
                 ("prior", "class_prompt"), ("prior", "blank_weight"), ("prior", "dop_class"), ("validation", "data"),
                 ("validation", "split"),
                 ("validation", "scorer"))  # image scores read training images; a slider has none


def check_slider(cfg: Config) -> None:
    """A slider job's settings: the prompts make a direction, and nothing that only training on images uses is set;
    without slider.target, no other slider setting may be."""
    sl, default = cfg.slider, SliderConfig()
    if not cfg.is_slider:
        changed = [f.name for f in fields(sl) if getattr(sl, f.name) != getattr(default, f.name)]
        _rule(not changed, f"slider.{changed[0] if changed else ''} is set but slider.target is empty: give the "
              "prompt the slider acts on (--slider-target)")
        return
    _rule(not cfg.data, "a slider trains from prompts alone: remove the [[data]] folders (sdlora has no image-pair "
          "sliders)")
    _rule(sl.action == "erase" or bool(sl.positive.strip()), "slider.action enhance needs slider.positive, the prompt "
          "of the +1 direction (--slider-positive)")
    positive = sl.positive or sl.target
    negative = sl.negative or (sl.target if sl.action == "enhance" else "")
    _rule(positive.strip() != negative.strip(), f"slider.positive and negative are both {positive!r}: the LoRA would "
          "learn no direction")
    _rule(bool(sl.anchors) or sl.anchor_weight == default.anchor_weight, "slider.anchor_weight needs slider.anchors")
    _rule(cfg.lora.network != "dora", "a slider is used at negative strengths, where a DoRA's update is not the "
          "mirror of +1: use lora, loha or lokr")
    defaults = Config()
    for section, name in SLIDER_UNUSED:
        _rule(getattr(getattr(cfg, section), name) == getattr(getattr(defaults, section), name),
              f"{section}.{name} is for training on images; a slider (prompts alone, denoiser LoRA) does not use it: "
              "leave it at its default")


def validate(cfg: Config, check_paths: bool = True) -> Config:
    """Fail fast, in one line, on anything that would otherwise fail (or silently misbehave) later."""
    checks = [
        (cfg.augment.resolution % 8 == 0, f"augment.resolution must be a multiple of 8, got {cfg.augment.resolution}"),
        (cfg.total_steps > 0, "train.max_steps must be > 0 (0 is only for plain textual inversion: pivotal.token "
                              "with pivotal.ti_steps > 0)"),
        (not cfg.pivotal.token or " " not in cfg.pivotal.token.strip(),
         f"pivotal.token must be one word like '<s1>', got {cfg.pivotal.token!r}"),
        (cfg.output.path.endswith(".safetensors"), f"output.path must end in .safetensors, got {cfg.output.path!r}"),
        (bool(cfg.data) or cfg.is_slider, "no training data: give --data DIR or a [[data]] table in the config"),
    ]
    for section, i, obj in _objects(cfg):
        for f in fields(obj):
            _check_field(f"{section}[{i}]" if i is not None else section, f, getattr(obj, f.name))
    check_slider(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_network(cfg)
    _check_per_layer(cfg)
    for i, folder in enumerate(cfg.data):
        if not folder.path.strip():
            raise ConfigError(f"data[{i}].path is empty; give the folder of training images (--data DIR)")
        if check_paths and not Path(folder.path).is_dir():
            raise ConfigError(f"data folder not found: {folder.path}; pass an existing folder of images")
        if check_paths and folder.inpaint_masks and not Path(folder.inpaint_masks).is_dir():
            raise ConfigError(f"data[{i}].inpaint_masks folder not found: {folder.inpaint_masks}")
    for name in ("sample_image", "sample_mask"):
        value = getattr(cfg.inpaint, name)
        _rule(not (check_paths and value and not Path(value).is_file()), f"inpaint.{name} not found: {value}")
    for i, p in enumerate(cfg.sample.prompts):
        if isinstance(p, dict):
            _check_sample_table(p, f"sample.prompts[{i}]")
    pr = cfg.prior
    if pr.class_prompt and pr.mode == "images" and not pr.class_data:
        raise ConfigError("prior preservation with class images needs prior.class_data (--class-data DIR), "
                          "or use --prior-mode model")
    if pr.class_data and not pr.class_prompt:
        raise ConfigError("prior.class_data is set but prior.class_prompt is empty; give --class-prompt")
    if check_paths and pr.has_images and pr.mode == "model" and not Path(pr.class_data).is_dir():
        raise ConfigError(f"prior.class_data folder not found: {pr.class_data}; give a folder of images to "
                          "preserve, or leave it empty to match the base model at the training images")
    _rule(not pr.dop_class or cfg.output.trigger or cfg.pivotal.token, "prior.dop_class replaces the trigger word "
          "in the training captions: give the word they use with --trigger (e.g. --trigger sks)")
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
    has_validation = bool(va.split or va.data or va.scorer != "none")
    _rule(has_validation or not (va.every or va.keep_best or va.early_stop_patience),
          "validate_every, keep_best and early_stop_patience need validation images or a scorer: give "
          "--validation-data DIR, --validation-split F or --scorer shapes|clip-dino")
    _rule(va.select_by != "images" or va.scorer != "none", "select_by images needs image validation: set "
          "--scorer shapes (shapes world) or clip-dino")
    _rule(va.select_by != "loss" or bool(va.split or va.data), "select_by loss needs held-out images: give "
          "--validation-data DIR or --validation-split F")
    _rule(va.image_size % 8 == 0, f"validation.image_size must be a multiple of 8, got {va.image_size}")
    if va.scorer == "none":
        va_defaults = ValidationConfig()
        for name in ("prompts", "seeds", "image_steps", "image_size", "score_weights", "concept", "clip_model",
                     "dino_model"):
            _rule(getattr(va, name) == getattr(va_defaults, name), f"validation.{name} is for image validation: "
                  "set validation.scorer (--scorer shapes|clip-dino) or leave it at its default")
    cfg.score_weights  # noqa: B018 - parses, raising on a bad weight
    for i, p in enumerate(va.prompts):
        kind = p.get("kind", "concept") if isinstance(p, dict) else "concept"
        _rule(kind in ("concept", "preservation"), f"validation.prompts[{i}].kind must be concept or "
              f"preservation, got {kind!r}")
    _rule(not va.early_stop_patience or va.every > 0, "early_stop_patience needs validation during training: "
          "set validation.every (--validate-every N)")
    if check_paths and va.data:
        _rule(Path(va.data).is_dir(), f"validation folder not found: {va.data}; pass an existing folder of images")
