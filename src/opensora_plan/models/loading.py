"""Strict loading of diffusers-layout model folders (``config.json`` + ``diffusion_pytorch_model.*``).

Shared by CausalVAEModel and LatteT2V. Differences from diffusers' own ``from_pretrained``:
missing/unexpected/mis-shaped keys are errors that name the keys (never silently dropped), only
local folders are read (nothing is downloaded), and parameters are created on the meta device and
then assigned from the file, so a 1B-parameter model loads without a random initialisation pass.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Iterable

import torch
from accelerate import init_empty_weights

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PIPELINE_INDEX = "model_index.json"
#: model_index.json key naming the folder of a component when it is not the component's name (the shipped
#: demo keeps the release's version-folder name, ``17x64x64/``, for its transformer).
COMPONENT_FOLDERS_KEY = "_component_folders"
#: Keyword arguments ``DiffusionPipeline.from_pretrained`` passes to every model's ``from_pretrained``;
#: accepted here with their default (no-op) values, anything else is an error naming the argument.
_DIFFUSERS_LOAD_DEFAULTS = {"device_map": None, "max_memory": None, "offload_folder": None,
                            "offload_state_dict": None, "variant": None, "use_safetensors": None,
                            "use_flashpack": False, "low_cpu_mem_usage": None, "disable_mmap": False}


def pop_diffusers_load_kwargs(kwargs: dict) -> None:
    """Remove diffusers' loader arguments from ``kwargs``; a value this loader cannot honour raises ValueError."""
    for name in list(kwargs):
        if name not in _DIFFUSERS_LOAD_DEFAULTS:
            continue
        value = kwargs.pop(name)
        if name in ("device_map", "variant", "max_memory", "offload_folder") and value is not None:
            raise ValueError(f"{name}={value!r} is not supported by this loader; leave it unset (load, then .to(device)).")


def component_folder(path: Path, class_name: str) -> Path | None:
    """The sub-folder of a pipeline folder (one with ``model_index.json``) that holds ``class_name``, or None.

    diffusers loads a component from the pipeline's root when no folder has the component's name; this
    finds the folder from ``model_index.json`` (its ``_component_folders`` entry, else the component name).
    """
    index_path = path / PIPELINE_INDEX
    if (path / CONFIG_NAME).is_file() or not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    folders = index.get(COMPONENT_FOLDERS_KEY, {})
    names = [name for name, value in index.items()
             if isinstance(value, list) and len(value) == 2 and value[1] == class_name]
    if len(names) != 1:
        return None
    return path / folders.get(names[0], names[0])


def resolve_model_folder(path: str | os.PathLike, subfolder: str | None = None, kind: str | None = None,
                         flag: str | None = None) -> Path:
    """The folder holding ``config.json`` and weights, with one clear error when it is not there.

    ``kind``: the model class in the message ("CausalVAE", "LatteT2V"); ``flag``: the option that named
    the folder (``--model_path``). Raises FileNotFoundError."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not folder.is_dir():
        example = {None: " (e.g. a version folder of LanguageBind/Open-Sora-Plan-v1.0.0)",
                   "LatteT2V": " (e.g. a version folder of LanguageBind/Open-Sora-Plan-v1.0.0)",
                   "CausalVAE": " (e.g. the vae/ folder of LanguageBind/Open-Sora-Plan-v1.0.0)"}.get(kind, "")
        raise FileNotFoundError(
            f"{flag + ' ' if flag else 'Model folder '}{folder} does not exist; expected a {kind + ' ' if kind else ''}"
            f"folder with {CONFIG_NAME} and {WEIGHT_NAMES[0]}{example}."
        )
    if not (folder / CONFIG_NAME).is_file():
        inside = model_subfolders(folder, kind)
        if inside:  # a release or demo root given for one of its models
            names = " or ".join(f"{p.name}/" for p in inside[:3])
            raise FileNotFoundError(f"{flag + ' ' if flag else ''}{folder} holds a whole model, not one "
                                    f"{kind or 'model'} folder (no {CONFIG_NAME} here); pass its {names} subfolder, "
                                    f"e.g. {flag + ' ' if flag else ''}{inside[0]}.")
        raise FileNotFoundError(f"{folder / CONFIG_NAME} is missing; a model folder needs its {CONFIG_NAME}.")
    return folder


def model_subfolders(folder: str | os.PathLike, kind: str | None) -> list[Path]:
    """The sub-folders of ``folder`` that hold a ``kind`` model (their config's ``_class_name`` starts with it; any
    model when ``kind`` is None): ``[<demo>/vae]`` for a demo or release root given as a CausalVAE. For errors
    that name the folder the user meant."""
    import json

    folder = Path(folder)
    found = []
    for sub in sorted(p for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else ():
        try:
            name = json.loads((sub / CONFIG_NAME).read_text()).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            continue
        if kind is None or str(name).startswith(kind):
            found.append(sub)
    return found


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"No weights in {folder}: expected {WEIGHT_NAMES[0]} (or {WEIGHT_NAMES[1]}); found {present}."
    )


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle (``.bin``/``.pt``, weights only); ``dtype``: floating
    tensors cast to it (a safetensors file one tensor at a time, so only the cast copy is held: a float32 file read
    into bfloat16 needs half its size, not one and a half).

    Raises FileNotFoundError for a missing file and one-line ValueErrors for a folder, a file that is
    not a weights file (a video, text, an empty or truncated file) and a pickle holding Python objects.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Weight file {path} is a folder; give the weights file itself (.safetensors, .bin or .pt).")
    if not path.is_file():
        raise FileNotFoundError(f"Weight file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                state = {}
                for key in file.keys():
                    tensor = file.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                return state
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable .safetensors weights file ({str(err).splitlines()[0]}).") from err
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) and _is_zip_or_pickle(path):
            raise ValueError(f"{path} holds Python objects besides tensors and is not loaded for safety; re-save "
                             "just its tensors (torch.save(model.state_dict(), ...)).") from None
        raise ValueError(f"{path} is not a weights file (.safetensors, or a torch .bin/.pt state dict).") from None
    except Exception as err:  # garbage bytes fail inside the unpickler in many ways (EOFError, KeyError, ...)
        raise ValueError(f"{path} is not a weights file (.safetensors, or a torch .bin/.pt state dict): "
                         f"{type(err).__name__}.") from None


def _is_zip_or_pickle(path: Path) -> bool:
    """True when the file starts like torch.save output (a zip archive, or a protocol-2+ pickle)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or (len(head) == 2 and head[0] == 0x80 and head[1] >= 2)


def _describe(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     built_from: str = "built from its config") -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped key (``built_from`` says where the
    model's layout came from: a folder's config, or a fixed size for a file that carries no config)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_describe(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches {_describe(mis_shaped)}")
    if problems:
        raise ValueError(
            f"{source} does not match {type(model).__name__} {built_from}: " + "; ".join(problems) + "."
        )


def load_pretrained(
    cls,
    path: str | os.PathLike,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    skip_prefixes: tuple[str, ...] = (),
    skip_reason: str = "",
    **config_overrides,
):
    """Build ``cls`` from ``<path>/<subfolder>/config.json`` and load its weights with strict keys.

    ``skip_prefixes`` drops tensors the class does not hold on purpose (e.g. the VAE's ``loss.*``
    training tensors), with one log line saying how many and why.
    """
    pop_diffusers_load_kwargs(config_overrides)
    if config_overrides.get("dtype") is not None and torch_dtype is None:  # diffusers' newer name
        torch_dtype = config_overrides["dtype"]
    config_overrides.pop("dtype", None)
    if subfolder is None:  # a pipeline folder given for one of its components (DiffusionPipeline loading)
        path = component_folder(Path(path), cls.__name__) or path
    kind = {"CausalVAEModel": "CausalVAE"}.get(cls.__name__, cls.__name__)
    folder = resolve_model_folder(path, subfolder, kind=kind)
    weights = find_weights(folder)
    config = cls.load_config(str(folder))
    config.update(config_overrides)
    # Parameters on meta, buffers real: non-persistent buffers (position embeddings) are computed
    # in __init__ and persistent ones are overwritten from the file below.
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    # Checkpoints may be stored in half precision; like diffusers, load into float32 unless asked.
    dtype = torch_dtype or torch.float32
    state = read_state_dict(weights, dtype)
    if skip_prefixes:
        skipped = [k for k in state if k.startswith(skip_prefixes)]
        if skipped:
            for k in skipped:
                del state[k]
            logger.info("Skipped %d tensors under %s in %s%s", len(skipped), "/".join(skip_prefixes), weights.name,
                        f" ({skip_reason})" if skip_reason else "")
    check_state_dict(model, state, str(weights))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}  # a .bin: cast here
    model.load_state_dict(state, strict=True, assign=True)
    # nn.Module.to, not ModelMixin.to: the latter logs a spurious "keep in float32" line on every cast.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval()
    return model
