"""Random-weight Stable Diffusion pipelines built from configs: the test suite's fixtures and the benchmark's
full-size models. Nothing is downloaded: the tokenizer is written locally (a byte-level vocabulary, so every word
tokenizes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_tokenizer(folder: str | Path, words: tuple[str, ...] = (), max_length: int = 77) -> Path:
    """A CLIPTokenizer folder: every byte (plain and word-final) is a token, plus whole-word merges for `words`."""
    from transformers import CLIPTokenizer

    from .tokenizers import byte_unicode

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


TINY = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
              norm_num_groups=8),
    vae=dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
             up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=77),
)

SD15 = dict(
    unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, norm_num_groups=32, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             layers_per_block=2),
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77),
)


def build_components(spec: dict = TINY, seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Random-weight SD-1-shaped components (unet, vae, text_encoder, tokenizer-less) from a size spec."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_cfg = CLIPTextConfig(vocab_size=49408 if spec is SD15 else 600, bos_token_id=0, eos_token_id=2,
                              pad_token_id=1, projection_dim=spec["text"]["hidden_size"], **spec["text"])
    text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def save_tiny_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                       words: tuple[str, ...] = ("a", "photo", "of", "dog", "cat", "sks", "red", "blue")) -> Path:
    """Save a tiny SD-1-shaped pipeline (random weights) as a diffusers folder, loadable offline."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    parts = build_components(TINY, seed, prediction_type)
    tok_dir = write_tokenizer(folder / "_tok", words)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tokenizer) <= parts["text_encoder"].config.vocab_size
    pipe = StableDiffusionPipeline(tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return folder


TINY_XL = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
              transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
              cross_attention_dim=64, norm_num_groups=8),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=77, projection_dim=32),
)


def save_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0,
                            words: tuple[str, ...] = ("a", "photo", "of", "dog", "cat", "sks", "red", "blue")) -> Path:
    """Save a tiny SDXL-shaped pipeline (two text encoders, size/crop conditioning) as a diffusers folder."""
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_XL["unet"])
    vae = build_components(TINY, seed)["vae"]
    text_cfg = CLIPTextConfig(vocab_size=600, bos_token_id=0, eos_token_id=2, pad_token_id=1, **TINY_XL["text"])
    te1, te2 = CLIPTextModel(text_cfg), CLIPTextModelWithProjection(text_cfg)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_tok", words))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    return folder


SDXL_BASE = dict(
    unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, projection_dim=768),
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"),
)


def build_sdxl_components(spec: dict = SDXL_BASE, seed: int = 0) -> dict:
    """Random-weight SDXL-shaped components (full size by default): unet, vae, text_encoder, text_encoder_2."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    parts = {"unet": UNet2DConditionModel(**spec["unet"]), "vae": build_components(SD15, seed)["vae"]}
    ids = dict(vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**ids, **spec["text"]))
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **spec["text_2"]))
    parts["scheduler"] = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="leading", steps_offset=1)
    return parts


def full_size_configs(family: str, sd3_blocks: int = 24, t5_layers: int = 24) -> dict:
    """The configs of `full_size_components`' denoiser, vae and text encoder(s), as dicts (nothing is allocated);
    SD3: SD3.5 Medium's (`sd3_blocks` of its blocks) with T5-XXL (`t5_layers` of its layers) as text_encoder_3."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    ids = dict(vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if family == "sd3":
        return _sd3_configs(ids, sd3_blocks, t5_layers)
    spec = SDXL_BASE if family == "sdxl" else SD15
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**spec["unet"]), AutoencoderKL(**SD15["vae"])
    out = {"unet": dict(unet.config), "vae": dict(vae.config)}
    if family == "sdxl":
        out["text_encoder"] = CLIPTextConfig(**ids, **spec["text"]).to_dict()
        out["text_encoder_2"] = CLIPTextConfig(**ids, **spec["text_2"]).to_dict()
    else:
        text = CLIPTextConfig(**ids, projection_dim=spec["text"]["hidden_size"], **spec["text"])
        out["text_encoder"] = text.to_dict()
    return out


def _sd3_configs(ids: dict, blocks: int, t5_layers: int) -> dict:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, T5Config

    with torch.device("meta"):
        transformer, vae = SD3Transformer2DModel(**sd35_medium(blocks)), AutoencoderKL(**SD3_VAE)
    return {"transformer": dict(transformer.config), "vae": dict(vae.config),
            "text_encoder": CLIPTextConfig(**ids, **SDXL_BASE["text"]).to_dict(),
            "text_encoder_2": CLIPTextConfig(**ids, **SDXL_BASE["text_2"]).to_dict(),
            "text_encoder_3": T5Config(**{**T5_XXL, "num_layers": t5_layers}).to_dict()}


def full_size_components(family: str, tokenizer_dir: str | Path, seed: int = 0, device: str | None = None,
                         sd3_blocks: int = 24, t5_layers: int = 24):
    """`Components` of a full-size SD 1.5-, SDXL- or SD3.5-Medium-shaped model with random weights (for benchmarks),
    with local tokenizers written to `tokenizer_dir`. With `device` (e.g. 'cuda') the weights are made and
    initialised there: seconds on a GPU instead of a minute of CPU initialisation; the schedulers stay on the CPU.
    SD3: `sd3_blocks` of SD3.5 Medium's 24 blocks (the first 13 with dual attention, as there) and `t5_layers` of
    T5-XXL's 24, for machines that cannot hold all of them."""
    import contextlib

    from transformers import AutoTokenizer, CLIPTokenizer

    from .families import FAMILIES
    from .models import Components, freeze, frozen_text, training_scheduler

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tokenizer_dir, ("a", "photo", "of", "sks")))
    with torch.device(device) if device else contextlib.nullcontext():
        parts = build_sd3_components(seed=seed, full=True, t5_layers=t5_layers, blocks=sd3_blocks) \
            if family == "sd3" else build_sdxl_components(seed=seed) if family == "sdxl" else \
            build_components(SD15, seed)
    parts["scheduler"] = type(parts["scheduler"]).from_config(parts["scheduler"].config)  # made on the CPU
    fam = FAMILIES[family]
    denoiser, encoders = parts[fam.denoiser_attr], [parts[s.attr] for s in fam.text_encoders]
    words = ("a", "photo", "of", "sks")
    t5_tok = AutoTokenizer.from_pretrained(write_t5_tokenizer(Path(tokenizer_dir) / "t5", words)) \
        if fam.frozen_encoders else None
    frozen = [frozen_text(parts[s.attr], t5_tok, denoiser.config, 256) for s in fam.frozen_encoders]
    name = "random-sd3.5-medium" if family == "sd3" else f"random-{family}"
    return freeze(Components(fam, name, denoiser, parts["vae"], [tokenizer] * len(encoders), encoders,
                             *training_scheduler(parts["scheduler"], "auto", fam), frozen))


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


# tiny SD3 transformers: SD3 Medium's structure (no qk-norm), SD3.5 Medium's (qk-norm, dual attention in block 0) and
# SD3.5 Large's (qk-norm); joint width 64 = CLIP-L 32 + CLIP-G 32 = T5's width, pooled 64 = 32 + 32
TINY_SD3 = dict(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                pos_embed_max_size=32)
SD3_VARIANTS = {"sd3": {}, "sd35m": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
                "sd35l": {"qk_norm": "rms_norm"}}
SD3_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3)
# SD3.5 Medium as diffusers configures it
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))


def sd35_medium(blocks: int = 24) -> dict:
    """SD3.5 Medium's transformer config with its first `blocks` blocks (dual attention in the first 13, as there)."""
    return {**SD35_MEDIUM, "num_layers": blocks, "dual_attention_layers": tuple(range(min(13, blocks)))}


# T5-XXL's encoder (the benchmark may take fewer of its 24 layers)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
              is_gated_act=True)


def build_sd3_components(variant: str = "sd3", seed: int = 0, t5: bool = True, full: bool = False,
                         t5_layers: int = 24, blocks: int = 24) -> dict:
    """Random-weight SD3 parts: tiny (by variant: sd3, sd35m, sd35l), or SD3.5 Medium at full size (`full`: `blocks`
    of its 24 blocks, and a T5-XXL-wide encoder of `t5_layers` layers); text_encoder_3 None without `t5`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    parts = {"transformer": SD3Transformer2DModel(**(sd35_medium(blocks) if full else
                                                     {**TINY_SD3, **SD3_VARIANTS[variant]}))}
    vae = SD3_VAE if full else {**TINY["vae"], "shift_factor": 0.0609, "scaling_factor": 1.5305,
                                "use_quant_conv": False, "use_post_quant_conv": False}
    parts["vae"] = AutoencoderKL(**vae)
    ids = dict(vocab_size=49408 if full else 600, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    texts = (SDXL_BASE["text"], SDXL_BASE["text_2"]) if full else (TINY_XL["text"],) * 2
    for name, text in zip(("text_encoder", "text_encoder_2"), texts):
        parts[name] = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **text))
    t5_cfg = {**T5_XXL, "num_layers": t5_layers} if full else \
        dict(vocab_size=120, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
             feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
    parts["text_encoder_3"] = T5EncoderModel(T5Config(**t5_cfg)) if t5 else None
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return parts


def save_tiny_sd3_pipeline(folder: str | Path, variant: str = "sd3", seed: int = 0, t5: bool = True,
                           words: tuple[str, ...] = ("a", "photo", "of", "dog", "cat", "sks", "red", "blue")) -> Path:
    """Save a tiny SD3-shaped StableDiffusion3Pipeline (random weights) as a diffusers folder, loadable offline:
    `variant` sd3 (SD3 Medium's structure), sd35m (dual attention, qk-norm) or sd35l (qk-norm); `t5` False saves it
    without text_encoder_3."""
    import shutil

    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = Path(folder)
    parts = build_sd3_components(variant, seed, t5)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_tok", words))
    t5_tok = AutoTokenizer.from_pretrained(write_t5_tokenizer(folder / "_tok3", words)) if t5 else None
    pipe = StableDiffusion3Pipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=t5_tok, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    if t5:
        shutil.rmtree(folder / "_tok3")
    return folder
