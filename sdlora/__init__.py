"""sdlora: train Stable Diffusion LoRAs and work with LoRA files.

The verbs the CLI, the web UI and the tests call, importable from here (`from sdlora import train`); each is loaded
from its module on first use, so `import sdlora` does no work (beyond filtering two library warnings no user can
act on: `sdlora.quiet`).
"""

from .quiet import drop_unactionable_warnings

__version__ = "0.1.0"
drop_unactionable_warnings()  # two logging filters: no library is imported

_API = {
    "Config": "sdlora.config", "load_toml": "sdlora.config", "validate": "sdlora.config",
    "Callbacks": "sdlora.callbacks", "Commands": "sdlora.callbacks",
    "train": "sdlora.training.loop", "TrainResult": "sdlora.training.loop",
    "load_components": "sdlora.models", "load_model": "sdlora.models",
    "inspect_lora": "sdlora.loras.inspect", "convert_lora": "sdlora.loras.convert",
    "merge_into_model": "sdlora.loras.merge", "extract_lora": "sdlora.loras.merge",
    "mix_loras": "sdlora.loras.mix", "resize_lora": "sdlora.loras.mix",
    "generate": "sdlora.loras.apply", "load_lora_into": "sdlora.loras.apply", "apply_loras": "sdlora.loras.apply",
    "evaluate": "sdlora.world.evaluate",
    "compare": "sdlora.loras.compare", "CompareSettings": "sdlora.loras.compare",
    "checkpoint_scores": "sdlora.training.periodic.selection",
    "validation_history": "sdlora.training.periodic.selection",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
