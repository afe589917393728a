"""``--pretrained``: initial LatteT2V weights from a folder, a safetensors file or Latte's ``t2v.pt``.

The reference loaded Latte's ``t2v.pt`` with ``strict=False`` and said nothing about what did not fit
(spec 8.13). Here every missing, unexpected and mis-shaped key is listed in the log and in
``<output_dir>/pretrained_report.json``; only matching tensors are loaded. Position embeddings are
never taken from the file: they are non-persistent buffers recomputed from the model's config
(``sample_size``, ``video_length``), which is what lets stage 1 (17x256) weights start stage 2 (65x256)
and stage 3 (65x512).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry although they are recomputed from the config (Latte / older code).
POSITION_EMBEDDING_KEYS = ("pos_embed.pos_embed", "temp_pos_embed")


def read_pretrained_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a model folder, ``.safetensors`` file or torch checkpoint; returns (state, description).

    A torch checkpoint may be a plain state dict or a dict with ``model`` (Latte's ``t2v.pt``); a
    ``module.`` prefix (DDP-saved) is removed.
    """
    from opensora_plan.models.loading import find_weights, model_subfolders, read_state_dict

    path = Path(path)
    if path.is_dir():
        inside = [] if (path / "config.json").is_file() else model_subfolders(path, "LatteT2V")
        if inside:  # a release or demo root
            raise FileNotFoundError(f"--pretrained {path} holds a whole model, not one LatteT2V folder; pass one of "
                                    f"its transformer folders, e.g. --pretrained {inside[0]}.")
        path = find_weights(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained {path} does not exist; give a LatteT2V folder, a .safetensors file or a Latte t2v.pt."
        )
    if path.suffix == ".safetensors":
        state = read_state_dict(path)
    else:
        try:
            state = read_state_dict(path)
        except ValueError as err:  # not a weights file, or a pickle with Python objects (e.g. argparse args)
            raise ValueError(f"--pretrained: {err} For a Latte t2v.pt with extra objects, re-save its weights "
                             f"with torch.save({{'model': ckpt['model']}}, 'weights.pt').") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"--pretrained {path} is not a state dict (name -> tensor), nor a dict with one under 'model'.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, str(path)


def load_pretrained_weights(model: torch.nn.Module, path: str | os.PathLike, report_file: Path | None = None) -> dict:
    """Copy every matching tensor of ``path`` into ``model``; report (and return) all that did not match."""
    state, source = read_pretrained_state(path)
    own = model.state_dict()
    recomputed = sorted(k for k in state if k in POSITION_EMBEDDING_KEYS and k not in own)
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(k for k in state.keys() - own.keys() if k not in recomputed)
    mis_shaped = {
        k: {"file": list(state[k].shape), "model": list(own[k].shape)}
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    }
    loadable = {k: v for k, v in state.items() if k in own and k not in mis_shaped}
    if not loadable:
        raise ValueError(
            f"--pretrained {source}: none of its {len(state)} tensors fits the {type(model).__name__} being trained "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped); check --model."
        )
    model.load_state_dict(loadable, strict=False)
    report = {
        "source": source,
        "loaded": len(loadable),
        "model_tensors": len(own),
        "missing": missing,
        "unexpected": unexpected,
        "shape_mismatched": mis_shaped,
        "position_embeddings_recomputed": recomputed,
    }
    logger.info("--pretrained %s: loaded %d of the model's %d tensors", source, len(loadable), len(own))
    for name, keys in (("missing (kept at initialisation)", missing), ("unexpected (ignored)", unexpected),
                       ("shape-mismatched (kept at initialisation)", list(mis_shaped))):
        if keys:
            logger.warning("--pretrained %s: %d %s keys: %s", source, len(keys), name, ", ".join(keys))
    if recomputed:
        logger.info("--pretrained: position embeddings %s are recomputed for the new size", recomputed)
    if report_file is not None:
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps(report, indent=2))
    return report
