"""Scoring generated images: likeness to the training images, prompt adherence, preservation of the base model,
copying of a training image, and one combined score. Scorers are pluggable (`make.make_scorer`): `shapes` (the
shapes world's judge) and `clip-dino` (CLIP or SigLIP, and DINOv2, through transformers). Image validation during
training and `sdlora compare` both call them."""
