"""The judge: a small CNN that names the shape and the colour in a shapes-world image.

It knows every shape, held-out ones included, so it can tell whether a LoRA taught the base model a new
shape. Trained on generator images (optionally passed through the VAE, to look like generated ones),
saved as ``judge.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import paths
from .shapes import ALL_SHAPES, COLOURS, SIZE, sample_world


@dataclass
class JudgeConfig:
    """Class names of the two heads and the conv widths."""

    shapes: list[str] = field(default_factory=lambda: list(ALL_SHAPES))
    colours: list[str] = field(default_factory=lambda: list(COLOURS))
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    size: int = SIZE


def default_judge_dir() -> Path:
    return paths.sample_data() / "judge"


def pixels(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float tensor in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


class Judge(nn.Module):
    """Four conv + pool stages, global avg+max pooling, one linear head for shape and one for colour."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        layers, cin = [], 3
        for i, cout in enumerate(config.channels):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            if i < len(config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(2 * cin, len(config.shapes))
        self.colour_head = nn.Linear(2 * cin, len(config.colours))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def classify(self, images, batch: int = 256) -> list[tuple[str, str]]:
        """(shape, colour) for each PIL image (resized to the judge's size if needed)."""
        self.eval()
        size = (self.config.size, self.config.size)
        images = [im if im.size == size else im.resize(size) for im in images]
        out = []
        for i in range(0, len(images), batch):
            s, c = self(pixels(images[i:i + batch]))
            out += [(self.config.shapes[a], self.config.colours[b]) for a, b in zip(s.argmax(1), c.argmax(1))]
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "judge.safetensors")
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2))


def load_judge(path: str | Path | None = None) -> Judge:
    """Load a judge saved by ``Judge.save`` (default: ``sample_data/judge``)."""
    path = Path(path) if path else default_judge_dir()
    judge = Judge(JudgeConfig(**json.loads((path / "config.json").read_text())))
    judge.load_state_dict(load_file(path / "judge.safetensors"))
    return judge.eval()


def accuracy(judge: Judge, images, labels: list[tuple[str, str]]) -> dict[str, float]:
    """Shares of images whose shape, colour, and both the judge gets right."""
    got = judge.classify(images)
    n = max(len(labels), 1)
    return {"shape": sum(g[0] == w[0] for g, w in zip(got, labels)) / n,
            "colour": sum(g[1] == w[1] for g, w in zip(got, labels)) / n,
            "both": sum(g == tuple(w) for g, w in zip(got, labels)) / n}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, a small brightness/colour shift and pixel noise, so generated images are judged fairly."""
    n = len(x)
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    x = mix * blurred + (1 - mix) * x
    x = x + 0.06 * torch.randn(n, 3, 1, 1, generator=gen) \
        + 0.05 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


IMAGES_PER_SHAPE = 1200


def train_judge(steps: int = 1200, seed: int = 0, n_images: int | None = None, batch: int = 64,
                roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None,
                log: Callable = print) -> Judge:
    """Train a judge on ``n_images`` generator images of every shape and colour (default: ``IMAGES_PER_SHAPE``
    per shape).

    ``roundtrip`` (e.g. VAE encode+decode) is applied to half the images, once, before training, so the
    judge also sees the blur and artefacts of decoded images.
    """
    torch.manual_seed(seed)
    cfg = JudgeConfig()
    n_images = n_images or IMAGES_PER_SHAPE * len(cfg.shapes)
    samples = sample_world(n_images, seed=seed + 1000, shapes=cfg.shapes, colours=cfg.colours)
    x = pixels([s.image for s in samples])
    if roundtrip is not None:
        with torch.no_grad():
            half = torch.arange(0, len(x), 2)
            x[half] = torch.cat([roundtrip(x[i]) for i in half.split(256)]).clamp(-1, 1)
    ys = torch.tensor([cfg.shapes.index(s.shape) for s in samples])
    yc = torch.tensor([cfg.colours.index(s.colour) for s in samples])
    judge = Judge(cfg)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=max(steps, 1), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        s, c = judge(_augment(x[idx], gen))
        loss = F.cross_entropy(s, ys[idx]) + F.cross_entropy(c, yc[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"judge step {step}/{steps} loss {loss.item():.4f}")
    return judge.eval()
