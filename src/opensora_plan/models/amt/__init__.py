"""AMT frame interpolation (AMT-G in Open-Sora-Plan v1.0.0): blocks, encoders, correlation, update, model."""

from .model import AMT_CONFIGS, LICENCE_NOTE, AMTModel, AMTOutput, amt_config, build_amt

__all__ = ["AMT_CONFIGS", "LICENCE_NOTE", "AMTModel", "AMTOutput", "amt_config", "build_amt"]
