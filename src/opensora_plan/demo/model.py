"""The demo model's folder file, ``demo.json``: the sampling defaults of ``pipelines/model_folder.py`` plus a
record of how the model was trained.

A demo model folder (``opensora_plan/assets/demo``, or ``<out>/model`` of ``demo train``) has the
release layout plus ``demo.json``::

    17x64x64/      LatteT2V version folder (config.json + diffusion_pytorch_model.safetensors)
    vae/           CausalVAE folder
    text_encoder/  T5 encoder + spiece.model (the DeepFloyd/t5-v1_1-xxl file set)
    demo.json      {"version", "text_encoder", "sample_method", "num_sampling_steps", "guidance_scale", "fps", ...}

Where the shipped model lives and what its file means for sampling are library matters
(:mod:`opensora_plan.pipelines.model_folder`); they are re-exported here for the demo's own code.
"""

from __future__ import annotations

import os
from pathlib import Path

from opensora_plan.pipelines.model_folder import (
    DEMO_INFO,
    default_model_path,
    fast_cache_options,
)

__all__ = ["DEMO_INFO", "default_model_path", "fast_cache_options", "load_demo_info", "sample_defaults"]


def load_demo_info(model_path: str | os.PathLike) -> dict:
    """``demo.json`` of a demo model folder as written: ``version``, ``text_encoder`` (relative folder), sampling
    defaults and the training record. A distilled student shipped inside a demo folder (``student/``, docs/distill.md)
    has a ``sampling_config.json`` with the same fields (its ``text_encoder`` / ``vae`` point at the teacher's)."""
    from opensora_plan.pipelines.model_folder import SAMPLING_CONFIG

    path = Path(model_path) / DEMO_INFO
    if not path.is_file() and (Path(model_path) / SAMPLING_CONFIG).is_file():
        path = Path(model_path) / SAMPLING_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{model_path} has no {DEMO_INFO}; give a folder written by `opensora-plan demo train` "
                                f"(its model/ subfolder) or the shipped demo.")
    from opensora_plan.utils import read_json_file

    return read_json_file(path, "Demo info")


def sample_defaults(model_path: str | os.PathLike | None = None, **given) -> dict:
    """Options of ``opensora-plan sample`` with every ``None`` filled in; see
    :func:`opensora_plan.pipelines.sample_t2v.resolve_sample_defaults` (where the release defaults live)."""
    from opensora_plan.pipelines.sample_t2v import resolve_sample_defaults

    return resolve_sample_defaults(model_path, **given)
