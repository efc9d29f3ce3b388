"""One training step and its objective: noise and timesteps, the loss, the text path, and the objectives that replace
the default (sliders, inpainting)."""
