"""CausalVAE 4x8x8 (Open-Sora-Plan v1.0.0 video VAE): ``CausalVAEModel`` and its building blocks."""

from .model import TEMPORAL_CHUNKING_MODES, UNUSED_CONFIG_KEYS, CausalVAEModel, CausalVAEOutput, estimate_decode_memory

__all__ = ["CausalVAEModel", "CausalVAEOutput", "UNUSED_CONFIG_KEYS", "TEMPORAL_CHUNKING_MODES", "estimate_decode_memory"]
