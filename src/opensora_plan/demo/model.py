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
import warnings
from pathlib import Path

DEMO_INFO = "demo.json"
# Release defaults of `opensora-plan sample` when a real checkpoint folder (without demo.json) is given.
RELEASE_SAMPLE_DEFAULTS = {"version": "65x512x512", "text_encoder_name": "DeepFloyd/t5-v1_1-xxl",
                           "sample_method": "PNDM", "num_sampling_steps": 50, "guidance_scale": 7.5, "fps": 24.0}


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
    """Options of ``opensora-plan sample`` with every ``None`` filled in.

    No ``model_path``: the shipped demo model and its ``demo.json`` settings. A folder holding a
    ``demo.json`` (a ``demo train`` output): that file's settings. Any other folder (a real checkpoint):
    the release defaults (``RELEASE_SAMPLE_DEFAULTS``). Values given (not ``None``) always win.
    Keys: model_path, version, text_encoder_name, sample_method, num_sampling_steps, guidance_scale, fps.
    """
    from opensora_plan.diffusion.schedulers import clips_sample

    unknown = sorted(set(given) - set(RELEASE_SAMPLE_DEFAULTS))
    if unknown:
        raise ValueError(f"sample_defaults got unknown options {unknown}; expected {sorted(RELEASE_SAMPLE_DEFAULTS)}.")
    folder = Path(model_path) if model_path is not None else default_model_path()
    if (folder / DEMO_INFO).is_file():
        info = load_demo_info(folder)
        defaults = {"version": info["version"], "text_encoder_name": str(folder / info["text_encoder"]),
                    **{k: info[k] for k in ("sample_method", "num_sampling_steps", "guidance_scale", "fps")}}
    elif model_path is None:
        raise FileNotFoundError(f"The shipped demo model is missing from {folder}; reinstall opensora-plan or pass "
                                f"--model_path (a release folder) and --text_encoder_name.")
    else:
        defaults = dict(RELEASE_SAMPLE_DEFAULTS)
    options = {"model_path": str(folder) if model_path is None else model_path, **defaults}
    options.update({k: v for k, v in given.items() if v is not None})
    # The demo's scaled latents reach +-8: a scheduler that clips x0 to [-1, 1] (DDIM, DDPM as the reference
    # builds them) turns every object the same colour (docs/demo.md).
    if (folder / DEMO_INFO).is_file() and clips_sample(options["sample_method"]):
        warnings.warn(
            f"{options['sample_method']} clips the predicted latents to [-1, 1] (as the reference builds it); the "
            f"demo model's latents reach +-8, so its videos lose their colours (docs/demo.md, 'Pick the scheduler "
            f"with care'). Its default, {defaults['sample_method']}, does not clip.", UserWarning, stacklevel=2)
    return options
