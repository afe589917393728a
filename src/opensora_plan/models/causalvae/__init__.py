"""CausalVAE 4x8x8 (Open-Sora-Plan v1.0.0 video VAE): ``CausalVAEModel`` and its building blocks."""

from .model import UNUSED_CONFIG_KEYS, CausalVAEModel, CausalVAEOutput

__all__ = ["CausalVAEModel", "CausalVAEOutput", "UNUSED_CONFIG_KEYS"]
