"""Building the run: the models, adapters and their per-block settings, optimizers, pivotal tuning's tokens and
phases, and the declared training state."""
