"""LoRA adapters on LatteT2V through ``peft`` (train, save, load, scale, fuse), in the diffusers/peft layout.

An adapter replaces each targeted ``nn.Linear`` (``W x + b``) by a peft ``lora.Linear`` computing
``W x + b + scale * (alpha / r) * B A x`` with ``A`` (r, in) and ``B`` (out, r) trainable and ``W``, ``b``
frozen. ``B`` starts at zero, so a fresh adapter leaves the model's output unchanged.

Saved layout (what diffusers' ``save_lora_weights`` / peft's ``save_pretrained`` write)::

    pytorch_lora_weights.safetensors   keys "transformer.<module>.lora_A.weight" / ".lora_B.weight", float32
    adapter_config.json                the peft ``LoraConfig`` (r, lora_alpha, target_modules, ...)

LatteT2V's attention and feed-forward call a fused CPU kernel with the layer's ``weight`` instead of
the layer itself (:func:`opensora_plan.models.layers.project`); that helper calls a wrapped layer
as a module, so the adapters are never skipped, with or without gradients.

Needs ``peft`` (``pip install "opensora-plan[lora]"``; on CPU pin torch in the same command).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# LatteT2V's projections: self/cross attention (to_q, to_k, to_v, to_out.0) and the MLP (ff.net.0.proj, ff.net.2)
# of every spatial and temporal block. peft matches a name against the end of each module path.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_NAME = "default"
KEY_PREFIX = "transformer."  # diffusers' pipeline-level prefix for the transformer's LoRA keys


def require_peft():
    """The ``peft`` module, or :class:`~opensora_plan.utils.MissingExtraError` naming the [lora] extra."""
    from opensora_plan.utils import require_extra

    return require_extra("peft", "lora", "LoRA (train-t2v --lora_rank, sample --lora)")


def lora_config(rank: int, alpha: float | None = None, target_modules: list[str] | tuple[str, ...] | None = None,
                base_model: str | os.PathLike | None = None):
    """A peft ``LoraConfig``: rank ``rank`` (>= 1), ``lora_alpha`` = ``alpha`` (default: ``rank``, i.e. scaling 1),
    ``base_model_name_or_path`` = ``base_model`` (the weights the adapter is trained on, absolute; checked on load).

    Raises ValueError on a rank below 1, a non-positive alpha or an empty target list.
    """
    peft = require_peft()
    if rank < 1:
        raise ValueError(f"--lora_rank must be at least 1, got {rank}.")
    alpha = float(rank if alpha is None else alpha)
    if alpha <= 0:
        raise ValueError(f"--lora_alpha must be positive, got {alpha}.")
    if isinstance(target_modules, str):  # one name (e.g. from a JSON config), never a list of its characters
        target_modules = [target_modules]
    targets = list(LORA_TARGET_MODULES if target_modules is None else target_modules)
    if not targets:
        raise ValueError("--lora_target_modules is empty; name at least one projection, e.g. to_q to_v.")
    base = str(Path(base_model).resolve()) if base_model else None
    return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
                           base_model_name_or_path=base)


def has_lora(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` is a peft LoRA layer."""
    LoraLayer = require_peft().tuners.lora.LoraLayer
    return any(isinstance(m, LoraLayer) for m in model.modules())


def add_lora(model: torch.nn.Module, config) -> list[str]:
    """Inject fresh adapters into ``model`` (in place): base frozen, adapters float32 and trainable.

    Returns the names of the trainable parameters. Raises ValueError when a target matches no Linear
    layer of ``model`` (a typo would otherwise train nothing) or when ``model`` already has adapters.
    """
    inject_adapter_in_model = require_peft().inject_adapter_in_model
    if has_lora(model):
        raise ValueError("The model already holds LoRA adapters; load the base model again or fuse them first.")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in config.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"--lora_target_modules {target!r} matches no linear layer of the model; use names "
                             f"from {', '.join(LORA_TARGET_MODULES)}.")
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    trainable = []
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)
            trainable.append(name)
    model._lora_config = config
    return trainable


def cast_frozen_base(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen (non-adapter) parameter of ``model`` in ``dtype``, e.g. bfloat16 for a bf16 LoRA
    run: half the base's memory, adapters stay float32. Buffers are untouched. Returns the number of
    parameters cast."""
    count = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += param.numel()
    return count


def lora_state_dict(model: torch.nn.Module,
                    state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights in the diffusers layout ("transformer.<module>.lora_A.weight", float32, CPU).

    ``state_dict`` (default ``model.state_dict()``) lets a caller pass other values, e.g. EMA weights.
    """
    state = model.state_dict() if state_dict is None else state_dict
    tag = f".{ADAPTER_NAME}."
    return {KEY_PREFIX + k.replace(tag, "."): v.detach().to("cpu", torch.float32).contiguous()
            for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def save_lora(model: torch.nn.Module, folder: str | os.PathLike,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` + ``folder/adapter_config.json``; returns ``folder``."""
    from safetensors.torch import save_file

    config = getattr(model, "_lora_config", None)
    if config is None:
        raise ValueError("The model has no LoRA adapter to save; add one with add_lora or load_lora first.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in config_dict.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config_dict, sort_keys=True, default=str)}
    save_file(lora_state_dict(model, state_dict), str(folder / LORA_WEIGHT_NAME), metadata=metadata)
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def find_lora(path: str | os.PathLike) -> Path | None:
    """The adapter folder at ``path``: the folder itself, its ``model/`` or ``lora/`` (a checkpoint), else None."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".safetensors"):
        path = path.parent
    for folder in (path, path / "model", path / "lora"):
        if (folder / LORA_WEIGHT_NAME).is_file():
            return folder
    return None


def read_lora(path: str | os.PathLike) -> tuple[object, dict[str, torch.Tensor]]:
    """(peft ``LoraConfig``, adapter weights with the ``transformer.`` prefix removed) from a saved adapter.

    Raises FileNotFoundError when ``path`` holds no ``pytorch_lora_weights.safetensors``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    peft = require_peft()
    folder = find_lora(path)
    if folder is None:
        raise FileNotFoundError(f"--lora {path} holds no {LORA_WEIGHT_NAME}; give the folder written by "
                                f"train-t2v --lora_rank (e.g. runs/x/checkpoint-600/model).")
    weights = load_file(str(folder / LORA_WEIGHT_NAME))
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        config_dict = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    else:  # a file written by diffusers' save_lora_weights carries the config in its metadata
        with safe_open(str(folder / LORA_WEIGHT_NAME), "pt") as f:
            meta = (f.metadata() or {}).get("lora_adapter_metadata")
        if meta is None:
            raise FileNotFoundError(f"{folder} has no {ADAPTER_CONFIG_NAME} and its weights carry no LoRA metadata; "
                                    f"save the adapter with its config.")
        config_dict = json.loads(meta)
    weights = {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: v for k, v in weights.items()}
    config_dict = check_adapter_config(config_dict, weights, folder)
    known = set(peft.LoraConfig.__dataclass_fields__)
    config = peft.LoraConfig(**{k: v for k, v in config_dict.items() if k in known and k != "peft_type"})
    return config, weights


def check_adapter_config(config: dict, weights: dict[str, torch.Tensor], folder: str | os.PathLike) -> dict:
    """The adapter config of ``folder`` checked against its ``weights`` (keys "<module>.lora_A.weight", no
    prefix), with every missing field filled by an explicit, logged rule; never peft's silent defaults
    (alpha 8 would load a rank-4 adapter at twice its strength, rank 16 at half):

    * ``r`` missing: the rank of the weights (``lora_A`` rows); given, it must be a positive whole number equal
      to it (unless a ``rank_pattern`` gives per-layer ranks);
    * ``lora_alpha`` missing: ``r``, i.e. strength 1.0 (diffusers' rule for adapters saved without alphas);
      given, a positive number;
    * ``target_modules`` missing or empty: the modules the weights hold adapters for;
    * ``use_dora`` (magnitude vectors this loader does not apply): refused.

    Raises ValueError (one line naming the folder and the field) for a wrong value; returns the filled dict.
    """
    config = dict(config)
    where = f"LoRA adapter {folder}"
    ranks = {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in weights.items() if k.endswith(".lora_A.weight")}
    if not ranks:
        raise ValueError(f"{where} holds no lora_A weights; is it a LoRA adapter (train-t2v --lora_rank)?")
    if config.get("use_dora"):
        raise ValueError(f"{where} is a DoRA adapter (use_dora: true), which this loader does not apply; use a "
                         "plain LoRA adapter.")
    per_layer = bool(config.get("rank_pattern"))
    rank = config.get("r")
    if rank is None:
        if len(set(ranks.values())) != 1:
            raise ValueError(f"{where}: its {ADAPTER_CONFIG_NAME} has no 'r' and its weights have several ranks "
                             f"({sorted(set(ranks.values()))}); add \"r\" (and a rank_pattern) to the config.")
        rank = config["r"] = next(iter(ranks.values()))
        logger.warning("%s: %s has no 'r'; using rank %d, the rank of its weights.", where, ADAPTER_CONFIG_NAME, rank)
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: 'r' in {ADAPTER_CONFIG_NAME} must be a positive whole number, got {rank!r}.")
    elif not per_layer and set(ranks.values()) != {rank}:
        raise ValueError(f"{where}: {ADAPTER_CONFIG_NAME} says r={rank} but its weights have rank "
                         f"{'/'.join(map(str, sorted(set(ranks.values()))))}; fix 'r' in the config.")
    alpha = config.get("lora_alpha")
    if alpha is None:
        config["lora_alpha"] = rank
        logger.warning("%s: %s has no 'lora_alpha'; using lora_alpha = r = %d (strength alpha/r = 1.0, diffusers' "
                       "rule for adapters without alphas). Add \"lora_alpha\" to the config if it was trained with "
                       "another.", where, ADAPTER_CONFIG_NAME, rank)
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}: 'lora_alpha' in {ADAPTER_CONFIG_NAME} must be a positive number, got {alpha!r}.")
    targets = config.get("target_modules")
    if not targets:
        config["target_modules"] = sorted(ranks)
        logger.warning("%s: %s names no target_modules; using the %d modules its weights hold adapters for.",
                       where, ADAPTER_CONFIG_NAME, len(ranks))
    elif not isinstance(targets, (str, list, tuple)) or any(not isinstance(t, str) for t in (
            [targets] if isinstance(targets, str) else targets)):
        raise ValueError(f"{where}: 'target_modules' in {ADAPTER_CONFIG_NAME} must be a list of module names, got "
                         f"{targets!r}.")
    return config


def check_lora_base(path: str | os.PathLike, base: str | os.PathLike) -> None:
    """Log a warning when the adapter at ``path`` records the base model it was trained on
    (``base_model_name_or_path``, written by ``train-t2v --lora_rank``) and it is not ``base``: an adapter on
    another base of the same size loads without error but is not the model it was trained with."""
    folder = find_lora(path)
    if folder is None or not (folder / ADAPTER_CONFIG_NAME).is_file():
        return
    from opensora_plan.utils import read_json_file

    recorded = read_json_file(folder / ADAPTER_CONFIG_NAME, "LoRA adapter config").get("base_model_name_or_path")
    if recorded and Path(recorded).resolve() != Path(base).resolve():
        logger.warning("LoRA adapter %s was trained on %s, not on %s; it fits the transformer's shapes, but expect "
                       "other videos than in training.", folder, recorded, base)


def load_lora(model: torch.nn.Module, path: str | os.PathLike, scale: float = 1.0) -> None:
    """Add the adapter saved at ``path`` to ``model`` (in place, frozen, for inference) at ``scale``.

    Every saved tensor must land on an adapter parameter and every adapter parameter must be saved
    (strict), else ValueError naming the first mismatching keys.
    """
    config, weights = read_lora(path)
    add_lora(model, config)
    load_lora_weights_into(model, weights, str(path))
    model.requires_grad_(False)
    set_lora_scale(model, scale)


def load_lora_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter weights (keys "<module>.lora_A.weight", no prefix) into the model's adapters, strictly."""
    tag = f".{ADAPTER_NAME}."
    params = {k.replace(tag, "."): p for k, p in model.named_parameters() if ".lora_" in k}
    missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA weights {source} do not fit the model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; was it trained on another transformer or with other target modules?")
    with torch.no_grad():
        for key, param in params.items():
            if weights[key].shape != param.shape:
                raise ValueError(f"LoRA weight {key} in {source} has shape {tuple(weights[key].shape)}, the model's "
                                 f"adapter {tuple(param.shape)}; it was trained on another transformer size.")
            param.copy_(weights[key])


def _lora_layers(model: torch.nn.Module):
    LoraLayer = require_peft().tuners.lora.LoraLayer
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("The model holds no LoRA adapter; load one first (load_lora / --lora).")
    return layers


def set_lora_scale(model: torch.nn.Module, scale: float) -> None:
    """Scale every adapter's contribution: output = W x + b + scale * (alpha / r) * B A x (scale 0 = base model).

    Raises ValueError while the adapters are fused (unfuse first).
    """
    for layer in _lora_layers(model):
        if layer.merged:
            raise ValueError("The LoRA is fused into the weights; call unfuse_lora() before changing its scale.")
        layer.set_scale(ADAPTER_NAME, float(scale))


def fuse_lora(model: torch.nn.Module) -> None:
    """Add the (scaled) adapter deltas into the base weights: same output, no adapter cost per step."""
    for layer in _lora_layers(model):
        if not layer.merged:
            layer.merge()


def unfuse_lora(model: torch.nn.Module) -> None:
    """Undo :func:`fuse_lora` (subtract the deltas again; exact up to float rounding)."""
    for layer in _lora_layers(model):
        if layer.merged:
            layer.unmerge()
