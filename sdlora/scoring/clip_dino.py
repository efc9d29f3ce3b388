"""The clip-dino scorer, for real images: DINOv2 image embeddings for likeness (DreamBooth's DINO metric: mean
cosine similarity of each trigger-prompt image to the training images), preservation (cosine of the LoRA's image and
the base model's at the same seed, 1 = unchanged) and copying (the highest cosine of any trigger-prompt image to one
training image); CLIP or SigLIP for prompt adherence (DreamBooth's CLIP-T: cosine of the prompt's text embedding,
trigger taken out, and the image's). Models load through transformers' Auto classes from a folder or a hub id.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ModelError
from .base import Scores, Shots, without_trigger

BATCH = 32


def load(name: str, flag: str, text: bool):
    """(model, image processor, tokenizer or None) of a transformers model, in eval mode. A model that is neither
    a folder here nor in the hub cache is a one-line error saying how to get it."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") != 1
    if local and not Path(name).expanduser().is_dir():
        raise ModelError(f"--{flag} {name}: no such model folder; give a folder with a transformers model (config."
                         "json, weights, preprocessor) or a hub id like facebook/dinov2-small")
    where = str(Path(name).expanduser()) if local else name
    try:
        model = AutoModel.from_pretrained(where)
        if text and not hasattr(model, "get_text_features"):
            raise ModelError(f"--{flag} {name} is a {type(model).__name__}, not a text-image model: give a CLIP or "
                             "SigLIP model, e.g. openai/clip-vit-base-patch16")
        processor = AutoImageProcessor.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where) if text else None
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        how = (f"complete the folder {name}" if local else
               f"download it once with `hf download {name}` (needs a network), or pass a local folder with "
               f"--{flag} DIR")
        raise ModelError(f"--{flag} {name} could not be loaded ({first[:160]}): {how}") from None
    return model.eval().requires_grad_(False), processor, tokenizer


def _pooled(out) -> torch.Tensor:
    """The embedding of a transformers output: the tensor itself (older get_*_features), its pooler output (CLIP's
    projected features, DINOv2's normalised CLS token), or the CLS token."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


class ClipDinoScorer:
    name = "clip-dino"

    def __init__(self, trigger: str, clip_model: str, dino_model: str, device: str = "cpu"):
        self.trigger, self.device = trigger, torch.device(device)
        self.clip = load(clip_model, "clip-model", text=True)
        self.dino = self.clip if dino_model in ("", "clip") else load(dino_model, "dino-model", text=False)
        for model, _, _ in {id(m[0]): m for m in (self.clip, self.dino)}.values():
            model.to(self.device)
        self.training = torch.zeros(0)

    def reference(self, images: list[Image.Image]) -> str:
        self.training = self.image_embeddings(self.dino, images) if images else torch.zeros(0)
        return f"clip-dino scorer: likeness and copying against {len(images)} training images with the trigger"

    @torch.no_grad()
    def image_embeddings(self, which, images: list[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings (DINO: the CLS token; CLIP/SigLIP: the projected image features)."""
        model, processor, _ = which
        out = []
        for i in range(0, len(images), BATCH):
            pixels = processor(images=[im.convert("RGB") for im in images[i:i + BATCH]],
                               return_tensors="pt")["pixel_values"].to(self.device)
            raw = model.get_image_features(pixel_values=pixels) if hasattr(model, "get_image_features") else \
                model(pixel_values=pixels)
            out.append(F.normalize(_pooled(raw).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings of the CLIP/SigLIP model (SigLIP padded to its full length, as trained)."""
        model, _, tokenizer = self.clip
        cfg = getattr(model.config, "text_config", model.config)
        siglip = "siglip" in model.config.model_type
        ids = tokenizer(texts, padding="max_length" if siglip else True, truncation=True,
                        max_length=cfg.max_position_embeddings, return_tensors="pt")
        ids = {k: v.to(self.device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}
        if siglip:
            ids.pop("attention_mask", None)  # SigLIP attends to its padding, as it was trained
        return F.normalize(_pooled(model.get_text_features(**ids)).float(), dim=-1).cpu()

    def score(self, shots: Shots) -> Scores:
        concept = [i for i, c in enumerate(shots.concept) if c]
        kept = [i for i, c in enumerate(shots.concept) if not c and shots.base[i] is not None]
        clip_images = self.image_embeddings(self.clip, shots.images)
        texts = self.text_embeddings([without_trigger(p, self.trigger) for p in shots.prompts])
        adherence = float((clip_images * texts).sum(-1).mean())
        likeness = copying = preservation = None
        if concept and len(self.training):
            made = self.image_embeddings(self.dino, [shots.images[i] for i in concept])
            sims = made @ self.training.T
            likeness, copying = float(sims.mean()), float(sims.max())
        if kept:
            a = self.image_embeddings(self.dino, [shots.images[i] for i in kept])
            b = self.image_embeddings(self.dino, [shots.base[i] for i in kept])
            preservation = float((a * b).sum(-1).mean())
        return Scores(likeness, adherence, preservation, copying)
