"""The shapes world's inpainting model, and the check that a concept LoRA for it draws the concept inside the mask
and leaves the outside as it was.

``build_inpainting`` makes the model as the SD inpainting models were made from their text-to-image parents: the
shipped shapes UNet with a 9-channel ``conv_in`` (the 5 new input channels, the mask and the masked image's latents,
start at zero, so the model starts as the text-to-image one), fine-tuned on masked reconstruction of base-world images
(random rectangles and brush strokes, a quarter of them masked whole; captions dropped 10% of the time for
classifier-free guidance); VAE and text encoder stay frozen. ``evaluate_inpainting`` puts a box around the shape of
base-world images and asks for the concept inside it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .. import paths
from ..training.inputs.inpaint_masks import random_mask
from . import shapes
from .builder import SCHEDULE
from .judge import Judge, load_judge
from .judge import pixels as to_pixels


@dataclass
class InpaintBuildConfig:
    """Step counts and rates of the fine-tune; ``quick()`` shrinks it to a seconds-long smoke run."""

    seed: int = 0
    n_images: int = 2000
    steps: int = 500
    batch: int = 16
    lr: float = 3e-4
    warmup: int = 50
    ema_decay: float = 0.995
    full_mask: float = 0.25
    uncond_prob: float = 0.1
    snr_gamma: float = 5.0

    @classmethod
    def quick(cls, seed: int = 0) -> InpaintBuildConfig:
        return cls(seed=seed, n_images=32, steps=3, batch=4, warmup=1)


def widen_conv_in(unet):
    """The UNet with a conv_in taking 4 + 1 + 4 channels: the old weights on the noisy latents, zeros on the mask and
    masked-image latents (so its output is unchanged until they learn)."""
    from diffusers import UNet2DConditionModel

    latent = unet.config.out_channels
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": 2 * latent + 1})
    state = unet.state_dict()
    weight = torch.zeros_like(wide.conv_in.weight)
    weight[:, :latent] = state["conv_in.weight"]
    wide.load_state_dict({**state, "conv_in.weight": weight})
    return wide


def _masks(n: int, size: int, full: float, rng: np.random.Generator) -> torch.Tensor:
    """[n, 1, size, size] binary masks: whole for `full` of them, else random rectangles or strokes."""
    out = [np.ones((size, size), np.float32) if rng.random() < full else
           (np.asarray(random_mask(size, size, rng)) > 127).astype(np.float32) for _ in range(n)]
    return torch.from_numpy(np.stack(out))[:, None]


def train_inpainting(unet, vae, text, latents, pixels, prompt_ids, cfg: InpaintBuildConfig, log: Callable):
    """Fine-tune the widened UNet on masked reconstruction (epsilon, min-SNR weighted); return its EMA copy.
    `text` holds the encoded prompts with the empty prompt last."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**SCHEDULE)
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    weights = torch.clamp(snr, max=cfg.snr_gamma) / snr
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                           * (0.1 + 0.45 * (1 + math.cos(math.pi * s / cfg.steps))))
    ema = copy.deepcopy(unet).eval()
    gen, rng = torch.Generator().manual_seed(cfg.seed + 3), np.random.default_rng([cfg.seed, 26])
    unet.train()
    t0, running = time.time(), 0.0
    for step in range(cfg.steps):
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        mask = _masks(cfg.batch, pixels.shape[-1], cfg.full_mask, rng)
        with torch.no_grad():
            masked = vae.encode(pixels[idx] * (mask < 0.5)).latent_dist.mode() * vae.config.scaling_factor
        cond = prompt_ids[idx].clone()
        cond[torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob] = len(text) - 1
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        grid = F.interpolate(mask, size=x0.shape[-2:])
        pred = unet(torch.cat([sched.add_noise(x0, noise, t), grid, masked], 1), t, text[cond]).sample
        loss = (weights[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1.0 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"inpainting step {step}/{cfg.steps} loss {running:.4f} "
                f"{(time.time() - t0) / (step + 1) * 1000:.0f} ms/step")
    return ema


def build_inpainting(out_dir: str | Path, cfg: InpaintBuildConfig, base: str | Path | None = None,
                     log: Callable = print):
    """The inpainting variant of the shapes model (default: the shipped one), saved as a diffusers folder that
    StableDiffusionInpaintPipeline loads; returns that pipeline."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    out, t0 = Path(out_dir), time.time()
    pipe = StableDiffusionPipeline.from_pretrained(str(base or paths.default_model_path()), safety_checker=None)
    samples = shapes.sample_world(cfg.n_images, seed=cfg.seed + 7)
    pixels = to_pixels([s.image for s in samples])
    prompts = [p for p, _, _ in shapes.base_prompts()]
    prompt_ids = torch.tensor([prompts.index(s.caption) for s in samples])
    vae, tok = pipe.vae, pipe.tokenizer
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
        latents = latents * vae.config.scaling_factor
        ids = tok(prompts + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    log(f"{len(samples)} images encoded at {time.time() - t0:.0f}s")
    unet = train_inpainting(widen_conv_in(pipe.unet), vae, text, latents, pixels, prompt_ids, cfg, log)
    made = StableDiffusionInpaintPipeline(vae=vae, text_encoder=pipe.text_encoder, tokenizer=tok, unet=unet,
                                          scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    made.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the byte-level tokenizer's files, as the shipped model has them
        src = Path(str(base or paths.default_model_path())) / "tokenizer" / name
        if src.is_file():
            (out / "tokenizer" / name).write_bytes(src.read_bytes())
    (out / "build_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log(f"inpainting model saved to {out} at {time.time() - t0:.0f}s")
    return made


# ---------------------------------------------------------------- the concept-in-mask check

@dataclass
class InpaintCase:
    """One check image: a base-world image and the box around its shape to repaint."""

    image: Image.Image
    mask: Image.Image
    colour: str


@dataclass
class InpaintReport:
    """What an inpainting model draws inside a box on base-world images, with and without a LoRA.

    concept_in_mask: share of images the judge calls the concept (the LoRA's prompt: "a <colour> <trigger>");
    colour_right: share also in the prompted colour; inside_share: of the pixels that differ from the background,
    the share inside the mask (1: nothing was drawn outside it); outside_change: mean absolute pixel change outside
    the mask (of 255), against the VAE's own round trip of the image (what a perfect model still changes)."""

    model: str
    lora: str
    trigger: str
    concept: str
    n: int
    steps: int
    guidance_scale: float
    with_lora: dict = field(default_factory=dict)
    without_lora: dict = field(default_factory=dict)
    base_prompts: dict = field(default_factory=dict)  # the world's own prompt in the box, no LoRA
    vae_round_trip_outside: float = 0.0
    seconds: float = 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


def check_cases(n: int, seed: int = 4321, margin: int = 6) -> list[tuple[InpaintCase, str]]:
    """`n` base-world images, each with a box (the shape's extent plus `margin` pixels, at least 36 px a side)
    around its shape, and the world caption of the shape they show."""
    out = []
    for s in shapes.sample_world(n, seed=seed):
        fg = np.abs(np.asarray(s.image, np.int16) - np.array(shapes.BACKGROUND)).sum(-1) > 30
        ys, xs = np.nonzero(fg)
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = max(18, (max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) / 2 + margin)
        box = [max(0, round(cx - half)), max(0, round(cy - half)), min(shapes.SIZE, round(cx + half)),
               min(shapes.SIZE, round(cy + half))]
        mask = Image.new("L", s.image.size, 0)
        ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
        out.append((InpaintCase(s.image, mask, s.colour), s.caption))
    return out


def _measure(judge: Judge, made, cases, concept: str) -> dict:
    got = judge.classify(made)
    inside, outside = [], []
    for im, case in zip(made, cases):
        m = np.asarray(case.mask) > 127
        a, b = np.asarray(im, np.float32), np.asarray(case.image, np.float32)
        outside.append(float(np.abs(a - b)[~m].mean()))
        fg = np.abs(a - np.array(shapes.BACKGROUND, np.float32)).sum(-1) > 60
        inside.append(float(fg[m].sum() / max(fg.sum(), 1)))
    n = max(len(cases), 1)
    return {"concept_in_mask": sum(s == concept for s, _ in got) / n,
            "colour_right": sum(g == (concept, c.colour) for g, c in zip(got, cases)) / n,
            "inside_share": float(np.mean(inside)), "outside_change": float(np.mean(outside)),
            "judged": {k: sum(s == k for s, _ in got) for k in sorted({s for s, _ in got})}}


def inpaint(pipe, prompts: list[str], cases: list[InpaintCase], seed: int, steps: int, guidance: float):
    """Each case's image repainted under its mask with its prompt (image i seeded seed + i)."""
    from ..sampling import render

    return [render(pipe, [p], seed + i, steps, guidance, shapes.SIZE, shapes.SIZE, image=c.image, mask=c.mask)[0]
            for i, (p, c) in enumerate(zip(prompts, cases))]


def evaluate_inpainting(model: str | Path, lora: str | Path, trigger: str, concept: str, n: int = 48,
                        steps: int = 25, guidance_scale: float = 5.0, seed: int = 0, judge: Judge | None = None,
                        output_dir: str | Path | None = None) -> InpaintReport:
    """Repaint the box around the shape of `n` base-world images with "a <its colour> <trigger>", LoRA on and off,
    and with the world's own caption (no LoRA); the judge names what was drawn."""
    from diffusers import StableDiffusionInpaintPipeline

    from ..loras.apply import load_lora_into
    from .evaluate import contact_sheet

    t0 = time.time()
    judge = judge or load_judge()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pairs = check_cases(n)
    cases = [c for c, _ in pairs]
    prompts = [shapes.caption(trigger, c.colour) for c in cases]
    base = inpaint(pipe, [caption for _, caption in pairs], cases, seed, steps, guidance_scale)
    active = load_lora_into(pipe, lora, adapter_name="lora")
    runs = {}
    for on in (True, False):
        active.enable(on)
        runs[on] = inpaint(pipe, prompts, cases, seed, steps, guidance_scale)
    with torch.no_grad():
        x = to_pixels([c.image for c in cases])
        trip = ((pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5)
    trip_outside = [float((trip[i].permute(1, 2, 0) - torch.from_numpy(np.asarray(c.image, np.float32)))
                          .abs()[torch.from_numpy(np.asarray(c.mask) < 128)].mean()) for i, c in enumerate(cases)]
    report = InpaintReport(str(model), str(lora), trigger, concept, n, steps, guidance_scale,
                           _measure(judge, runs[True], cases, concept), _measure(judge, runs[False], cases, concept),
                           vae_round_trip_outside=float(np.mean(trip_outside)), seconds=0.0)
    world = judge.classify(base)
    report.base_prompts = {"right_shape_and_colour": sum(g == (s.split()[2], c.colour) for g, (c, s) in
                                                         zip(world, [(c, cap) for c, cap in pairs])) / n,
                           **{k: v for k, v in _measure(judge, base, cases, "").items()
                              if k in ("inside_share", "outside_change")}}
    report.seconds = time.time() - t0
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.save(out / "inpaint_report.json")
        k = min(n, 12)
        ok = {on: [g == (concept, c.colour) for g, c in zip(judge.classify(runs[on][:k]), cases)] for on in runs}
        masked = [Image.composite(Image.new("RGB", c.image.size, (255, 255, 255)), c.image, c.mask) for c in cases]
        contact_sheet([("image + mask", masked[:k], [True] * k), (f"'{trigger}' + LoRA", runs[True][:k], ok[True]),
                       (f"'{trigger}' no LoRA", runs[False][:k], ok[False]),
                       ("its caption, no LoRA", base[:k], [True] * k)]).save(out / "inpaint_sheet.png")
    return report
