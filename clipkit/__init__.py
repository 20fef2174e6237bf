"""clipkit: CLIP-style image-text contrastive pretraining, evaluation and embedding search."""

__version__ = "0.1.0"
