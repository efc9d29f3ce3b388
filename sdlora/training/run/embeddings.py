"""New token embeddings for pivotal tuning and textual inversion.

A concept token `<s1>` with N vectors becomes the tokens `<s1> <s1>_1 ... <s1>_{N-1}` (diffusers' multi-vector
convention: `load_textual_inversion` and the pipelines expand `<s1>` the same way). Only the new rows train: they
live in their own parameter, so the rest of the embedding matrix stays bit-identical by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import ConfigError


def token_names(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expansion(token: str, n: int) -> str:
    """What a prompt holds in place of the concept: the token followed by its extra vectors."""
    return " ".join(token_names(token, n))


def replace_trigger(text: str, trigger: str, token: str, n: int) -> str:
    """Replace the trigger word (whole words only) by the token's expansion; with no trigger, expand the token."""
    if trigger:
        return re.sub(rf"(?<![\w<]){re.escape(trigger)}(?![\w>])", expansion(token, n), text)
    return re.sub(rf"{re.escape(token)}(?!_\d)", expansion(token, n), text) if n > 1 else text


class TrainableEmbedding(torch.nn.Module):
    """The frozen token embedding, with rows first_new .. first_new+n-1 taken from a trainable parameter."""

    def __init__(self, base: torch.nn.Embedding, first_new: int, init: torch.Tensor):
        super().__init__()
        self.base, self.first_new = base, first_new
        self.new = torch.nn.Parameter(init.clone().float())

    @property
    def weight(self) -> torch.Tensor:
        w, end = self.base.weight, self.first_new + self.new.shape[0]
        return torch.cat([w[: self.first_new], self.new.to(w.dtype), w[end:]])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        n = self.new.shape[0]
        is_new = (ids >= self.first_new) & (ids < self.first_new + n)
        if is_new.any():
            rows = self.new.to(out.dtype)[(ids - self.first_new).clamp(0, n - 1)]
            out = torch.where(is_new[..., None], rows, out)
        return out


@dataclass
class NewTokens:
    """The new token rows of one text encoder."""

    token: str
    first_id: int
    module: TrainableEmbedding

    @property
    def vectors(self) -> torch.Tensor:
        return self.module.new.detach().float().cpu()


def add_tokens(tokenizer, text_encoder, token: str, n: int, init_word: str = "", seed: int = 0) -> NewTokens:
    """Add the concept's tokens, initialised from `init_word` (mean of its token embeddings) or randomly."""
    names = token_names(token, n)
    clash = [t for t in names if t in tokenizer.get_vocab()]
    if clash:
        raise ConfigError(f"pivotal token {clash[0]!r} already exists in the tokenizer; pick a new one like '<s1>'")
    first = len(tokenizer)
    tokenizer.add_tokens(names)
    base = text_encoder.get_input_embeddings()
    weight = base.weight.detach().float()
    if init_word:
        ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"pivotal init word {init_word!r} has no tokens")
        init = weight[ids].mean(0, keepdim=True).repeat(n, 1)
    else:
        g = torch.Generator().manual_seed(seed)
        init = torch.randn(n, weight.shape[1], generator=g) * weight.std() + weight.mean()
    if len(tokenizer) > weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer))
    module = TrainableEmbedding(text_encoder.get_input_embeddings(), first, init.to(weight.device))
    module.base.requires_grad_(False)
    text_encoder.set_input_embeddings(module)
    return NewTokens(token, first, module)


@dataclass
class ConceptTokens:
    """One concept's new tokens in every text encoder of the model (SDXL: CLIP-L and CLIP-G), with the names their
    vectors travel under in files (`embedding_keys`: clip_l, clip_g)."""

    per_encoder: list[NewTokens]
    embedding_keys: list[str]
    num_vectors: int

    @property
    def token(self) -> str:
        return self.per_encoder[0].token

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [nt.module.new for nt in self.per_encoder]

    def vectors(self) -> list[torch.Tensor]:
        return [nt.vectors.clone() for nt in self.per_encoder]

    def load(self, vectors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, vectors):
                p.copy_(v)

    def tensors(self, dtype=torch.float16) -> dict[str, torch.Tensor]:
        """{'clip_l': [n, dim]} (+ 'clip_g' for SDXL): the embedding file's content and the LoRA file's bundle."""
        return {k: v.to(dtype) for k, v in zip(self.embedding_keys, self.vectors())}

    def prompt(self, text: str, trigger: str) -> str:
        """A caption or sample prompt with the trigger word replaced by the token's expansion."""
        return replace_trigger(text, trigger, self.token, self.num_vectors)


def add_concept(tokenizers: list, encoders: list, embedding_keys: list[str], token: str, n: int,
                init_word: str = "", seed: int = 0) -> ConceptTokens:
    """The concept's new tokens in every text encoder; encoder i's random start (no init word) uses seed + i."""
    return ConceptTokens([add_tokens(tok, enc, token, n, init_word, seed + i)
                          for i, (tok, enc) in enumerate(zip(tokenizers, encoders))], list(embedding_keys), n)
