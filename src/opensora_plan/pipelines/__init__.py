"""Pipelines: text-to-video sampling (``OpenSoraPlanPipeline``); reconstruction and VAE evaluation have their own modules."""

import importlib

_EXPORTS = {
    "OpenSoraPlanPipeline": "opensora_plan.pipelines.pipeline_opensora_plan",
    "OpenSoraPlanPipelineOutput": "opensora_plan.pipelines.pipeline_opensora_plan",
}

__all__ = list(_EXPORTS)


def __getattr__(name):  # lazy: importing one pipeline does not import diffusers for the others
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'opensora_plan.pipelines' has no attribute {name!r}")
