"""Library warnings no sdlora user can act on, dropped by exact text (every other message still shows).

- bitsandbytes (>= 0.49), imported by peft whenever it is installed, looks for the optional `kernels` package on a CPU
  with AVX512-BF16 and warns "Failed to load CPU gemm_4bit_forward from kernels-community" at every start, QLoRA or
  not. The kernel speeds up a repacked inference-only 4-bit layout that sdlora never uses (see `quantize_nf4`).
- transformers (>= 5) without torchvision says "`CLIPImageProcessor` requires torchvision (not installed); falling
  back to ..." when diffusers' pipeline modules import the image processors of safety checkers and IP-Adapters,
  which sdlora never loads.
"""

from __future__ import annotations

import logging

UNACTIONABLE = {  # logger -> texts its dropped records contain
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
}


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


def drop_unactionable_warnings() -> None:
    """Filter exactly the messages in UNACTIONABLE at the loggers that emit them (before the libraries load)."""
    for name, texts in UNACTIONABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(texts))
