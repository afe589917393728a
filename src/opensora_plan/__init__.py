"""Open-Sora-Plan v1.0.0 text-to-video in PyTorch.

Public entry points are imported lazily so that ``import opensora_plan`` and the CLI start fast:
``from opensora_plan import OpenSoraPlanPipeline`` is the same class as ``opensora_plan.pipelines``'.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "OpenSoraPlanPipeline": "opensora_plan.pipelines",
    "OpenSoraPlanPipelineOutput": "opensora_plan.pipelines",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):  # lazy: `import opensora_plan` does not import torch or diffusers
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'opensora_plan' has no attribute {name!r}")
