"""diffseg-bench: benchmark and ablate segmentation methods built on diffusion-model attention."""

__version__ = "0.1.0"
