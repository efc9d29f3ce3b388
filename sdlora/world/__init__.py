"""The shapes world: a procedural image generator (`shapes`), a small text-to-image model trained from scratch on it
(`builder`), a judge that names shape and colour (`judge`), and the evaluation of a concept LoRA (`evaluate`)."""
