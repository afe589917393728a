"""Open-Sora-Plan v1.0.0 text-to-video in PyTorch.

Public entry points are imported lazily so that ``import opensora_plan`` and the CLI start fast.
"""

__version__ = "0.1.0"
