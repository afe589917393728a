"""FSDP2 sharding (``torch.distributed.fsdp.fully_shard``) for models too large to replicate per GPU.

Why FSDP2 rather than DeepSpeed ZeRO-2 (the reference's choice): it is part of PyTorch (no extra
package to compile), it runs on CPU over gloo so the 2-process test runs in CI (FSDP1 refuses CPU,
stack.md section 5), and it shards more than ZeRO-2 (parameters too, i.e. ZeRO-3) while each
transformer block is gathered only while it runs. A task lists its sharding units in
``shard_units(name)`` (LatteT2V: every spatial and temporal block); each unit and then the whole model
become FSDP modules. Checkpoints gather full state dicts, so they are the same files a DDP run writes.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)


def shard_model(model: torch.nn.Module, task, name: str, accelerator) -> None:
    """Shard ``model`` in place over all processes; mixed precision as autocast, like the DDP path."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = accelerator.device
    model.to(device)
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    units = task.shard_units(name) if hasattr(task, "shard_units") else []
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if accelerator.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective: every process must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_phase_model(task, phase) -> torch.nn.Module:
    """The one model an optimizer phase trains (FSDP2 optimizer state is keyed by that model's parameters)."""
    if len(phase.models) != 1:
        raise ValueError(f"Phase {phase.name!r} trains {len(phase.models)} models; with --sharding fsdp2 each "
                         f"optimizer phase must train exactly one model (use --sharding ddp).")
    return task.models[phase.models[0]]


def _raw_optimizer(phase) -> torch.optim.Optimizer:
    return getattr(phase.optimizer, "optimizer", phase.optimizer)  # under accelerate's AcceleratedOptimizer


def full_optimizer_state(task, phase) -> dict:
    """The unsharded optimizer state of one phase (collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(check_phase_model(task, phase), _raw_optimizer(phase), options=options)


def load_optimizer_state(task, phase, state: dict) -> None:
    """Shard a full optimizer state (as written by :func:`full_optimizer_state`) into the phase's optimizer."""
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(check_phase_model(task, phase), _raw_optimizer(phase), state, options=options)
