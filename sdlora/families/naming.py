"""How kohya names a family's denoiser layers in LoRA files, and a diffusers UNet's module paths in the original
LDM/SGM naming of Stable Diffusion checkpoints.

Single files store UNet weights under the SGM names (`model.diffusion_model.input_blocks.4.1...`), and kohya names
SDXL LoRA layers after them (`lora_unet_input_blocks_4_1_...`): one mapping serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_path(path: str, layers_per_block: int, up_has_attention: tuple[bool, ...] = ()) -> str:
    """down_blocks.1.attentions.0.x -> input_blocks.4.1.x, mid_block.resnets.1 -> middle_block.2, ...; paths
    outside the down/mid/up blocks come back unchanged."""
    n = layers_per_block + 1
    parts = path.split(".")
    head, rest = parts[:4], parts[4:]
    if parts[0] == "down_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if kind == "downsamplers":
            head, rest = [f"input_blocks.{n * (i + 1)}.0.op"], rest[1:]  # "conv" is the op itself
        else:
            head = [f"input_blocks.{n * i + j + 1}.{1 if kind == 'attentions' else 0}"]
    elif parts[0] == "up_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if kind == "upsamplers":
            head = [f"output_blocks.{n * i + layers_per_block}.{2 if up_has_attention[i] else 1}"]
        else:
            head = [f"output_blocks.{n * i + j}.{1 if kind == 'attentions' else 0}"]
    elif parts[0] == "mid_block":
        head, rest = [f"middle_block.{1 if parts[1] == 'attentions' else 2 * int(parts[2])}"], parts[3:]
    else:
        return path
    if "resnets" in path and rest and rest[0] in _RESNET:
        rest = [_RESNET[rest[0]]] + rest[1:]
    return ".".join(head + rest)


def sgm_namer(unet_config) -> Callable[[str], str]:
    """path -> SGM path for a UNet config (its layers per block and which up blocks have attention)."""
    up_attn = tuple("CrossAttn" in t for t in unet_config["up_block_types"])
    return lambda path: sgm_path(path, unet_config["layers_per_block"], up_attn)


@dataclass(frozen=True)
class KohyaNaming:
    """What kohya names each denoiser layer after: (denoiser config) -> (diffusers module path -> that path); and the
    base-name prefixes only this naming writes (how a file's layer names tell it)."""

    path: Callable[[dict], Callable[[str], str]]
    marks: tuple[str, ...] = ()

    def written_in(self, bases) -> bool:
        return bool(self.marks) and any(b.startswith(self.marks) for b in bases)


DIFFUSERS = KohyaNaming(lambda config: lambda path: path)
SGM = KohyaNaming(sgm_namer, ("lora_unet_input_blocks_", "lora_unet_output_blocks_"))
