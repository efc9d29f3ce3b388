"""Build the shapes world's tiny Stable Diffusion pipeline from scratch, on CPU, in minutes.

Four parts, trained in order on ``shapes.sample_world`` images of the base shapes only:
a small ``AutoencoderKL`` (64 px -> 16x16x4 latents), a local byte-level ``CLIPTokenizer``, a small
``CLIPTextModel`` and an SD1-shaped ``UNet2DConditionModel``; the last two learn jointly on epsilon
prediction. ``build`` saves a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads
offline. ``scripts/build_shapes_model.py`` is the command line over it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..tokenizers import byte_unicode
from . import shapes
from .judge import pixels as to_pixels

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class BuildConfig:
    """Sizes and step counts of one build; ``quick()`` shrinks it to a seconds-long smoke run."""

    seed: int = 0
    n_images: int = 12000
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 3500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    snr_gamma: float = 5.0
    max_length: int = 77
    judge_steps: int = 1200

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        return cls(seed=seed, n_images=64, vae_steps=3, vae_batch=4, unet_steps=3, batch=4, warmup=1,
                   judge_steps=3)


def _bpe(parts: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Apply BPE merges to a symbol list: always the best-ranked adjacent pair first."""
    ranks = {m: i for i, m in enumerate(merges)}
    while len(parts) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_tokenizer(out_dir: str | Path, words=None, max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json + merges.txt for a byte-level CLIP BPE: every byte symbol (plain and ``</w>``)
    plus merges that make each world word one token, so any other word falls back to characters."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = byte_unicode()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    for word in words or shapes.world_words():
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(parts) > 1:  # new merges rank last, so words already merged keep their tokens
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = _bpe(parts, merges)
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(out, model_max_length=max_length)
    for word in words or shapes.world_words():
        if len(tok(word, add_special_tokens=False).input_ids) != 1:
            raise RuntimeError(f"tokenizer merges do not make {word!r} one token")
    return tok


def make_text_encoder(tok: CLIPTokenizer, max_length: int = 77) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_length, projection_dim=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return CLIPTextModel(cfg)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=shapes.SIZE,
                         mid_block_add_attention=False)


def make_unet(cross_attention_dim: int = 64) -> UNet2DConditionModel:
    """SD1-shaped: cross-attention at 16x16, 8x8 and in the middle, ResNets only at 4x4.

    Attention at the full latent resolution matters: an attention-only LoRA cannot change fine detail
    in a level that has none (a new shape's edges stay unlearnt)."""
    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), cross_attention_dim=cross_attention_dim, attention_head_dim=2,
        norm_num_groups=16)


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` crop per image, on the latent grid (multiples of 4 pixels)."""
    if size >= x.shape[-1]:
        return x
    offs = torch.randint(0, (x.shape[-1] - size) // 4 + 1, (len(x), 2), generator=gen) * 4
    return torch.stack([im[:, i:i + size, j:j + size] for im, (i, j) in zip(x, offs.tolist())])


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, cfg: BuildConfig, log: Callable) -> None:
    """Reconstruction (L1 + MSE) with a small KL term on random crops (the VAE is fully convolutional)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae.train()
    for step in range(cfg.vae_steps):
        x = _random_crops(pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=gen)], cfg.vae_crop, gen)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled latent means of ``pixels``."""
    return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train_denoiser(unet, text_encoder, tok, latents: torch.Tensor, prompt_ids: torch.Tensor,
                   prompts: list[str], cfg: BuildConfig, log: Callable):
    """Train UNet + text encoder jointly on epsilon prediction (min-SNR weighted); return EMA copies.

    ``prompt_ids[i]`` indexes ``prompts`` for latent i; the text encoder runs once per step on the
    distinct prompts only (plus the empty prompt used for classifier-free guidance dropout).
    """
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=cfg.snr_gamma) / snr
    ids = tok(prompts + [""], padding="max_length", max_length=cfg.max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = len(prompts)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)

    def lr_at(s):
        return min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.unet_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    unet.train(), text_encoder.train()
    t0, running = time.time(), 0.0
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        cond = prompt_ids[idx].clone()
        cond[torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob] = empty
        emb = text_encoder(ids).last_hidden_state[cond]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, emb).sample
        loss = (weights[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, text_encoder, decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}/{cfg.unet_steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(time.time() - t0) / (step + 1) * 1000:.0f} ms/step")
    return ema_unet, ema_te


def sampling_scheduler() -> DDIMScheduler:
    """DDIM with the training betas: deterministic and good in ~25 steps."""
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build(out_dir: str | Path, cfg: BuildConfig, log: Callable = print) -> StableDiffusionPipeline:
    """Train every part on the base world and save a diffusers folder at ``out_dir``."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(out_dir)
    t0 = time.time()
    samples = shapes.sample_world(cfg.n_images, seed=cfg.seed)
    pixels = to_pixels([s.image for s in samples])
    prompts = [p for p, _, _ in shapes.base_prompts()]
    prompt_ids = torch.tensor([prompts.index(s.caption) for s in samples])
    log(f"rendered {len(samples)} images in {time.time() - t0:.0f}s")

    vae = make_vae()
    train_vae(vae, pixels, cfg, log)
    latents = encode(vae, pixels)
    std = latents.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    latents = latents / std
    log(f"vae done at {time.time() - t0:.0f}s; latent std {std:.4f} -> scaling_factor {1 / std:.4f}")

    tok = build_tokenizer(out / "tokenizer", max_length=cfg.max_length)
    unet, te = train_denoiser(make_unet(), make_text_encoder(tok, cfg.max_length), tok, latents, prompt_ids,
                              prompts, cfg, log)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out / "tokenizer", max_length=cfg.max_length)  # keep vocab.json/merges.txt beside tokenizer.json
    (out / "build_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log(f"pipeline saved to {out} at {time.time() - t0:.0f}s")
    return pipe
