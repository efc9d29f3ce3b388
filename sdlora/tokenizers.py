"""CLIP's tokenizer rebuilt offline from the BPE merges that ship with sdlora, and its byte-to-unicode table; tokenizer
folders written locally for random-weight models (a byte-level CLIP vocabulary, so every word tokenizes, and a small
T5 one)."""

from __future__ import annotations

import gzip
import json
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


def write_tokenizer(folder: str | Path, words: tuple[str, ...] = (), max_length: int = 77) -> Path:
    """A CLIPTokenizer folder: every byte (plain and word-final) is a token, plus whole-word merges for `words`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_unicode()
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=max_length)
    tok.save_pretrained(folder)
    return folder


def write_t5_tokenizer(folder: str | Path, words: tuple[str, ...] = (), max_length: int = 256) -> Path:
    """A T5 tokenizer folder (tokenizer.json, a Unigram model as T5's): every printable ASCII character is a piece,
    plus whole-word pieces for `words`; pad 0, </s> 1, <unk> 2 as in T5."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in "▁" + string.ascii_letters + string.digits + string.punctuation]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                          model_max_length=max_length)
    tok.save_pretrained(folder)
    return Path(folder)
