"""Training checkpoints: atomic writes, ``latest`` lookup, pruning, model folders in the diffusers layout.

Layout of one checkpoint (``<output_dir>/checkpoint-<step>/``)::

    model/                 config.json + diffusion_pytorch_model.safetensors (loads with from_pretrained)
    <other model>/         same, one folder per trained model of the task (e.g. discriminator/)
    ema/                   EMA weights of the model, same layout (only with --use_ema)
    training_state.pt      optimizers, LR schedulers, EMA shadow, step, data position, counters
    rng_state_<rank>.pt    python / numpy / torch (/ cuda) RNG states of every process

The whole folder is written under a hidden temporary name and renamed in one step, so a crash while
saving leaves the previous checkpoint (and no half-written one) behind.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
STATE_NAME = "training_state.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------------------------
# model folders
# --------------------------------------------------------------------------------------------


def save_model_folder(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``state_dict`` as ``folder/diffusion_pytorch_model.safetensors`` (+ the model's config.json).

    ``state_dict`` is passed separately so EMA weights can be saved with the model's config without
    copying the model. Models without a diffusers config (plain ``nn.Module``) get the weights only.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):
        model.save_config(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def load_model_folder_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load ``folder/diffusion_pytorch_model.safetensors`` into ``model`` with strict key checking."""
    from safetensors.torch import load_file

    from opensora_plan.models.loading import check_state_dict

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint weights {path} are missing; the checkpoint folder is incomplete.")
    state = load_file(str(path))
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# finding and pruning checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir`` sorted by step (temporary half-written folders are hidden)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_step(path: Path) -> int:
    match = _CHECKPOINT_RE.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder; expected a folder named checkpoint-<step>.")
    return int(match.group(1))


def resolve_resume(spec: str | None, output_dir: str | Path) -> Path | None:
    """``--resume_from_checkpoint``: ``latest`` (None when the output folder has no checkpoint yet) or a path."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("No checkpoint in %s yet; starting a fresh run.", output_dir)
            return None
        return found[-1]
    path = Path(spec)
    if not path.is_dir() and (Path(output_dir) / spec).is_dir():
        path = Path(output_dir) / spec
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {spec}: {path / STATE_NAME} does not exist; pass 'latest' or a "
            f"checkpoint-<step> folder written by this trainer."
        )
    return path


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain; returns the deleted paths."""
    if not total_limit or total_limit < 1:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - total_limit)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Removed old checkpoint %s (--checkpoints_total_limit %d).", path, total_limit)
    return doomed
