"""Models: CausalVAE 4x8x8 (``causalvae/``), the LatteT2V denoiser (``latte.py``), AMT frame interpolation
(``amt/``) and RGT super-resolution (``rgt.py``)."""

import importlib

_EXPORTS = {
    "AMTModel": "opensora_plan.models.amt",
    "CausalVAEModel": "opensora_plan.models.causalvae",
    "LatteT2V": "opensora_plan.models.latte",
    "RGTModel": "opensora_plan.models.rgt",
}

__all__ = list(_EXPORTS)


def __getattr__(name):  # lazy: importing one model does not import the others
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'opensora_plan.models' has no attribute {name!r}")
