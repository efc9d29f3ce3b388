"""CLIP's tokenizer rebuilt offline from the BPE merges that ship with sdlora, and its byte-to-unicode table."""

from __future__ import annotations

import gzip
from pathlib import Path

CLIP_MERGES = Path(__file__).parent / "assets" / "clip" / "merges.txt.gz"


def byte_unicode() -> list[str]:
    """CLIP's byte-to-unicode table: 256 printable characters, one per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """CLIP's tokenizer (49,408 tokens), rebuilt from the shipped BPE merges as CLIP's SimpleTokenizer builds it."""
    from transformers import CLIPTokenizer

    merges = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()
    chars = byte_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token,
                         model_max_length=model_max_length)
