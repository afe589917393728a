"""Diffusion: the IDDPM training objective (``gaussian_diffusion``) and the sampling schedulers."""

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["GaussianDiffusion"]
