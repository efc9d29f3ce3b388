"""The loop's periodic work: validation by loss and by images, choosing the best file, samples, checkpoints and LoRA
files, the JSON-lines log."""
