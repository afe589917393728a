"""Where the shipped demo model lives, and the sampling defaults a demo model folder carries.

A demo model folder (``opensora_plan/assets/demo``, or ``<out>/model`` of ``demo train``) has the
release layout plus ``demo.json``::

    17x64x64/      LatteT2V version folder (config.json + diffusion_pytorch_model.safetensors)
    vae/           CausalVAE folder
    text_encoder/  T5 encoder + spiece.model (the DeepFloyd/t5-v1_1-xxl file set)
    demo.json      {"version", "text_encoder", "sample_method", "num_sampling_steps", "guidance_scale", "fps", ...}
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_INFO = "demo.json"


def default_model_path() -> Path:
    """The demo model shipped inside the package (``opensora_plan/assets/demo``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "demo"


def load_demo_info(model_path: str | os.PathLike) -> dict:
    """``demo.json`` of a demo model folder: ``version``, ``text_encoder`` (relative folder) and sampling defaults."""
    path = Path(model_path) / DEMO_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{model_path} has no {DEMO_INFO}; give a folder written by `opensora-plan demo train` "
                                f"(its model/ subfolder) or the shipped demo.")
    from opensora_plan.utils import read_json_file

    return read_json_file(path, "Demo info")


def fast_cache_options(model_path: str | os.PathLike | None) -> dict:
    """What ``--cache fast`` means for a model folder: its demo.json "cache_fast" (calibrated on that
    model, docs/demo.md) or, for other folders, ``models.step_cache.FAST_CACHE``."""
    from opensora_plan.models.step_cache import FAST_CACHE

    folder = Path(model_path) if model_path is not None else default_model_path()
    if (folder / DEMO_INFO).is_file():
        return dict(load_demo_info(folder).get("cache_fast", FAST_CACHE))
    return dict(FAST_CACHE)


def sample_defaults(model_path: str | os.PathLike | None = None, **given) -> dict:
    """Options of ``opensora-plan sample`` with every ``None`` filled in; see
    :func:`opensora_plan.pipelines.sample_t2v.resolve_sample_defaults` (where the release defaults live)."""
    from opensora_plan.pipelines.sample_t2v import resolve_sample_defaults

    return resolve_sample_defaults(model_path, **given)
