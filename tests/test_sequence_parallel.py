"""Sequence parallelism (models/parallel.py): 2 gloo processes give the single-process outputs and gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opensora_plan.models.latte import build_latte
from opensora_plan.models.parallel import (
    enable_sequence_parallel,
    init_sequence_parallel,
    reduce_sequence_parallel_grads,
    split_sizes,
)


def tiny_latte():
    """LatteT2V-Tiny with perturbed weights (as tests/tiny_t2v.py; not imported so that the spawned workers
    skip its transformers import)."""
    torch.manual_seed(0)
    model = build_latte("LatteT2V-Tiny/122")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model

# (name, latent frames incl. images, use_image_num, latent h x w, temporal attention on, gradient checkpointing)
CASES = [
    ("video, 5 frames (odd), 16 positions", 5, 0, (8, 8), True, False),
    ("joint image-video, 5 + 2 images", 7, 2, (8, 8), True, False),
    ("off-size latent: 15 positions (odd), checkpointing", 5, 0, (6, 10), True, True),
    ("image mode, 4 frames", 4, 0, (8, 8), False, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(frames: int, use_image_num: int, size: tuple[int, int], config) -> tuple:
    g = torch.Generator().manual_seed(frames * 100 + use_image_num)
    batch, length = 2, 7
    latents = torch.randn(batch, config.in_channels, frames, *size, generator=g)
    slots = (1 + use_image_num,) if use_image_num else ()
    captions = torch.randn(batch, *slots, length, config.caption_channels, generator=g)
    mask = (torch.rand(batch, *slots, length, generator=g) > 0.3).float()
    mask[..., 0] = 1
    weights = torch.randn(batch, config.out_channels, frames, *size, generator=g)  # loss = <output, weights>
    return latents, torch.tensor([3, 700]), captions, mask, weights


def _run(model, inputs, use_image_num, temporal):
    latents, t, captions, mask, weights = inputs
    model.zero_grad(set_to_none=True)
    out = model(latents, t, captions, mask, use_image_num=use_image_num, enable_temporal_attentions=temporal).sample
    (out * weights).sum().backward()
    return out.detach(), {n: _grad(p) for n, p in model.named_parameters()}


def _grad(p: torch.Tensor) -> torch.Tensor:  # image mode leaves the temporal blocks without gradients
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group, dp_rank, dp_size = init_sequence_parallel(world)
        assert (dp_rank, dp_size) == (0, 1)
        report = {}
        for name, frames, n_images, size, temporal, checkpointing in CASES:
            model = tiny_latte().train()
            if checkpointing:
                model.enable_gradient_checkpointing()
            inputs = _inputs(frames, n_images, size, model.config)
            ref_out, ref_grads = _run(model, inputs, n_images, temporal)  # single process
            enable_sequence_parallel(model, group)
            out, grads = _run(model, inputs, n_images, temporal)
            reduce_sequence_parallel_grads(model, group)
            grads = {n: _grad(p) for n, p in model.named_parameters()}
            out_err = float((out - ref_out).abs().max())
            grad_err = max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1))
                           for n in ref_grads)
            report[name] = (out_err, grad_err, float(ref_out.abs().max()))
        results[rank] = report
    finally:
        dist.destroy_process_group()


def test_split_sizes():
    assert split_sizes(17, 2) == [9, 8]
    assert split_sizes(5, 4) == [2, 1, 1, 1]
    assert sum(split_sizes(1024, 3)) == 1024


def test_sp2_matches_single_process_outputs_and_gradients():
    """Forward outputs and (group-summed) parameter gradients of LatteT2V-Tiny with sp 2 equal 1 process."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in range(2):
        for name, (out_err, grad_err, scale) in results[rank].items():
            assert scale > 0.1, name  # a non-trivial output
            assert out_err <= 1e-5, f"rank {rank}, {name}: output differs by {out_err}"
            assert grad_err <= 1e-5, f"rank {rank}, {name}: gradient differs by {grad_err} (relative to max(1, |g|))"


def test_sequence_parallel_rejects_too_few_frames():
    with pytest.raises(ValueError, match="sp_size"):
        init_sequence_parallel(0)
