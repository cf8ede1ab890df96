"""imagine: diffusion-model image generation. Train, sample, evaluate and serve, CPU first."""

__version__ = "0.1.0"
