"""The data path: images, captions, masks and tags read from disk, cached latents and batches."""
