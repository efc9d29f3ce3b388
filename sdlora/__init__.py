"""sdlora: train Stable Diffusion LoRAs and work with LoRA files.

The verbs the CLI, the web UI and the tests call are imported from their modules, e.g.
``from sdlora.train import train``; nothing heavy is imported here.
"""

__version__ = "0.1.0"
