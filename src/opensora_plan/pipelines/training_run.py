"""Sample straight from a ``train-t2v`` output: a ``checkpoint-<step>`` folder or the run folder (its latest).

A ``distill`` run's checkpoints (a student) resolve the same way. A run's ``options.json`` records (absolute paths) the VAE and T5 it trained with and, for a LoRA run,
the frozen ``--pretrained`` base; the checkpoint holds ``model/`` (full weights, or the LoRA adapter)
and, with ``--use_ema``, ``ema/`` beside it, which is preferred. :func:`resolve_training_output` turns
such a folder into the parts ``sample`` loads, :func:`load_run_transformer` builds the transformer.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

OPTIONS_NAME = "options.json"
# Runs whose checkpoints hold a LatteT2V: train-t2v's, and distill's students (train/distill.py).
T2V_TASKS = ("T2VTask", "DistillTask")


@dataclass
class TrainingRunModels:
    """What a training output folder resolves to (see :func:`resolve_training_output`)."""

    checkpoint: Path  # the checkpoint-<step> folder
    weights: Path  # model/ or ema/ of that checkpoint: full LatteT2V weights or a LoRA adapter
    uses_ema: bool
    vae: Path  # a CausalVAE folder (config.json + weights)
    text_encoder: str | None  # the T5 folder the run used (None when it recorded none)
    transformer_config: dict  # the LatteT2V config as trained
    lora: Path | None  # = weights for a LoRA run
    base: str | None  # the frozen --pretrained base of a LoRA run
    seed: int = 0  # the run's seed (initialises what a partial --pretrained left out, as in training)
    pretrained: str | None = None  # the run's --pretrained (any run): its sampling file gives the run's defaults

    def describe(self) -> str:
        kind = "LoRA adapter" if self.lora else "weights"
        which = "EMA" if self.uses_ema else "trained (no EMA in this run)"
        base = f" on base {self.base}" if self.lora else ""
        return f"{self.checkpoint}: {which} {kind} from {self.weights.name}/{base}"


def is_training_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``train-t2v`` checkpoint folder or a run folder holding checkpoints."""
    from opensora_plan.train.checkpoint import STATE_NAME, list_checkpoints

    path = Path(path)
    return (path / STATE_NAME).is_file() or ((path / OPTIONS_NAME).is_file() and bool(list_checkpoints(path)))


def resolve_training_output(path: str | os.PathLike, use_ema: bool = True) -> TrainingRunModels:
    """The models of a run folder (its latest checkpoint) or one checkpoint folder.

    Raises FileNotFoundError when the run's options.json, its checkpoint weights or the VAE it recorded
    are missing, and ValueError when the run was not a ``train-t2v`` run.
    """
    from opensora_plan.train.checkpoint import STATE_NAME, WEIGHTS_NAME, list_checkpoints
    from opensora_plan.models.lora import LORA_WEIGHT_NAME

    path = Path(path)
    if (path / STATE_NAME).is_file():
        checkpoint, run_dir = path, path.parent
    else:
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"--model_path {path} holds no checkpoint-<step> folder; pass a train-t2v run "
                                    f"folder or one of its checkpoints.")
        checkpoint, run_dir = found[-1], path
    options_file = run_dir / OPTIONS_NAME
    if not options_file.is_file():
        raise FileNotFoundError(f"{options_file} is missing; the checkpoint must sit in the train-t2v output folder "
                                f"that wrote it (options.json records the VAE and T5 of the run).")
    options = json.loads(options_file.read_text())
    if options.get("task") not in T2V_TASKS:
        from opensora_plan.utils import with_article

        raise ValueError(f"{run_dir} is {with_article(str(options.get('task')))} run, not a train-t2v run; sample needs "
                         "a LatteT2V.")
    task_options, extra = options.get("task_options", {}), options.get("extra", {})
    paths = task_options.get("paths") or {k: extra.get(k) for k in ("ae_path", "text_encoder_name", "pretrained")}

    folder = "ema" if use_ema and (checkpoint / "ema").is_dir() else "model"
    weights = checkpoint / folder
    is_lora = (weights / LORA_WEIGHT_NAME).is_file()
    if not is_lora and not (weights / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{weights} holds neither {WEIGHTS_NAME} nor {LORA_WEIGHT_NAME}; the checkpoint is "
                                f"incomplete.")
    vae = _vae_folder(paths.get("ae_path"), run_dir)
    return TrainingRunModels(
        checkpoint=checkpoint, weights=weights, uses_ema=folder == "ema", vae=vae,
        text_encoder=paths.get("text_encoder_name"), transformer_config=task_options["transformer_config"],
        lora=weights if is_lora else None, base=paths.get("pretrained") if is_lora else None,
        seed=int(options.get("seed", 0)), pretrained=paths.get("pretrained"),
    )


def _vae_folder(ae_path: str | None, run_dir: Path) -> Path:
    if not ae_path:
        raise FileNotFoundError(f"The run in {run_dir} recorded no VAE (options.json has no ae_path); it was "
                                f"trained before runs recorded it. Sample with --model_path pointing at a "
                                f"release-layout folder instead.")
    path = Path(ae_path)
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"The VAE the run in {run_dir} used, {path}, is gone (no config.json there or in "
                            f"its vae/); restore it or sample from a release-layout folder.")


def load_run_transformer(run: TrainingRunModels, torch_dtype: torch.dtype, device: torch.device | str,
                         lora_scale: float = 1.0):
    """The run's LatteT2V in eval mode on ``device`` / ``torch_dtype``; a LoRA run's adapter at ``lora_scale``."""
    from opensora_plan.models.latte import LatteT2V

    if run.lora is None:
        return LatteT2V.from_pretrained(run.weights, torch_dtype=torch_dtype, device=device).eval()
    from opensora_plan.models.lora import load_lora
    from opensora_plan.train.pretrained import load_pretrained_weights

    if not run.base or not Path(run.base).exists():
        raise FileNotFoundError(f"The LoRA run's base model {run.base} (its --pretrained) is gone; restore it to "
                                f"sample {run.checkpoint}.")
    # Built as the training built it: the trained config, then the base weights (position embeddings follow
    # the config), then the adapter.
    config = {k: v for k, v in run.transformer_config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)  # as train-t2v seeds before building the model
        transformer = LatteT2V.from_config(config)
    load_pretrained_weights(transformer, run.base)
    load_lora(transformer, run.lora, scale=lora_scale)
    transformer.to(device)
    if any(p.dtype != torch_dtype for p in transformer.parameters()):
        transformer.to(torch_dtype)
    return transformer.eval()


def resolve_lora_adapter(path: str | os.PathLike) -> tuple[Path, str] | None:
    """``sample --lora``: the adapter folder at ``path`` and a phrase saying which one, or None if there is none.

    A ``train-t2v --lora_rank`` run folder resolves to its latest checkpoint, a checkpoint folder to its
    ``ema/`` adapter when the run kept an EMA, else ``model/`` (as ``--model_path`` does); give
    ``<checkpoint>/model`` for the non-EMA adapter. Any other path: the folder itself or its ``model/`` /
    ``lora/`` (:func:`opensora_plan.models.lora.find_lora`).
    """
    from opensora_plan.models.lora import LORA_WEIGHT_NAME, find_lora
    from opensora_plan.train.checkpoint import STATE_NAME, list_checkpoints

    path = Path(path)
    checkpoint = path if (path / STATE_NAME).is_file() else None
    if checkpoint is None and (path / OPTIONS_NAME).is_file() and list_checkpoints(path):
        checkpoint = list_checkpoints(path)[-1]
    if checkpoint is not None:
        for folder, which in (("ema", "EMA"), ("model", "trained (no EMA in this run)")):
            if (checkpoint / folder / LORA_WEIGHT_NAME).is_file():
                return checkpoint / folder, f"{which} LoRA adapter from {checkpoint / folder}"
        return None
    found = find_lora(path)
    return (found, f"LoRA adapter from {found}") if found is not None else None


def checkpoint_subfolder_hint(path: str | os.PathLike) -> str | None:
    """For ``--model_path <checkpoint>/model`` (or ``ema/``): a message saying what to pass instead; else None."""
    from opensora_plan.models.lora import LORA_WEIGHT_NAME
    from opensora_plan.train.checkpoint import STATE_NAME

    path = Path(path)
    if path.name not in ("model", "ema") or not (path.parent / STATE_NAME).is_file():
        return None
    checkpoint = path.parent
    if (path / LORA_WEIGHT_NAME).is_file():
        return (f"--model_path {path} is the LoRA adapter of {checkpoint}, not a model folder; sample the run with "
                f"--model_path {checkpoint} (its EMA adapter when it has one, on the run's base), or apply this "
                f"adapter to the base with --model_path <base> --lora {path}.")
    return (f"--model_path {path} is the {path.name}/ weights folder of {checkpoint}; pass --model_path "
            f"{checkpoint} (the EMA weights are preferred when the run kept them).")
