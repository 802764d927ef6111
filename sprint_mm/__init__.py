"""sprint_mm: SPRINT training and Path-Drop Guidance sampling for image, video and text-conditioned diffusion transformers."""

__version__ = "0.1.0"
