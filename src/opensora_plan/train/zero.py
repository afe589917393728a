"""DeepSpeed ZeRO for the training loop (``--sharding deepspeed --deepspeed_config zero2``).

The reference trained with DeepSpeed ZeRO-2 through ``accelerate launch``. Here the trainer drives
DeepSpeed directly (``deepspeed.initialize`` with the task's own AdamW as the client optimizer), because
accelerate's DeepSpeed plugin does not start on CPU processes (``Accelerator(cpu=True)``), which is how
the 2-process tests run. DeepSpeed owns gradient accumulation, the gradient reduction, clipping and the
sharded optimizer state; the trainer keeps its LR schedule (on the client optimizer's param groups, which
ZeRO steps), seeding, logging, EMA and checkpoint layout.

Shipped configs (``configs/deepspeed/``): ``zero2`` (the reference's), ``zero2_offload`` (optimizer state
on the CPU) and ``zero3`` (parameters sharded too). ``"auto"`` values are filled from the trainer flags.
Checkpoints hold the consolidated weights in the diffusers layout (``checkpoint-N/model``, loadable by
``sample``) plus DeepSpeed's own sharded state in ``checkpoint-N/deepspeed`` for exact resume, which needs
the same number of processes (ZeRO partitions the optimizer state by data-parallel rank).

DeepSpeed is optional: ``pip install 'opensora-plan[deepspeed]'`` (0.19.8 builds from the sdist without
CUDA; ops are JIT-compiled only when a config asks for them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def require_deepspeed():
    """The ``deepspeed`` module, or :class:`~opensora_plan.utils.MissingExtraError` with the install line."""
    from opensora_plan.utils import require_extra

    return require_extra("deepspeed", "deepspeed", "--sharding deepspeed")


def load_config(spec: str | None) -> dict:
    """A DeepSpeed config from a JSON file or a shipped name (``zero2``, ``zero2_offload``, ``zero3``).

    Keys starting with ``_`` are comments and dropped. Raises FileNotFoundError for an unknown name.
    """
    from opensora_plan.utils import read_config_file

    return read_config_file(spec or "zero2", CONFIG_DIR, "--deepspeed_config")


def stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def fill_auto(config: dict, *, micro_batch: int, accumulation: int, world_size: int, max_grad_norm: float | None,
              mixed_precision: str) -> dict:
    """Replace ``"auto"`` with the trainer's values; explicit values must agree with the flags (ValueError)."""
    config = json.loads(json.dumps(config))
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
    }
    for key, value in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key != "gradient_clipping" and config[key] != value:
            raise ValueError(f"The DeepSpeed config sets {key}={config[key]} but the flags give {value}; set it to "
                             "\"auto\" or change the flags.")
    for name, enabled in (("bf16", mixed_precision == "bf16"), ("fp16", mixed_precision == "fp16")):
        section = config.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
    return config


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """``deepspeed.initialize`` on the (already initialised) default process group; returns the engine."""
    deepspeed = require_deepspeed()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend() if torch.distributed.is_initialized()
                               else None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The consolidated module state dict (collective: ZeRO-3 gathers each parameter), on the CPU."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        deepspeed = require_deepspeed()

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_state(engine, folder: Path) -> None:
    """DeepSpeed's sharded engine/optimizer state into ``folder`` (collective; every rank writes its shard)."""
    engine.save_checkpoint(str(folder), tag="state", save_latest=False)


def load_state(engine, folder: Path) -> None:
    """Restore what :func:`save_state` wrote (same number of processes)."""
    path, _ = engine.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"No DeepSpeed state in {folder}; was the checkpoint written with "
                                "--sharding deepspeed?")
