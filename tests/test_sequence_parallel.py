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


# --------------------------------------------------------------------------------------------
# train-t2v with --sp_size 2 under torchrun
# --------------------------------------------------------------------------------------------


def _t2v_assets(root, fixtures_dir):
    """Tiny T5, tiny CausalVAE (fixture config), four clips: 2 latent frames of 4 x 4 (+1 image)."""
    import json

    from opensora_plan.data.video_io import write_video
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.text_encoder import build_tiny_t5

    captions = ["a red ball", "waves on a beach", "a green square", "snow on a city"]
    t5 = build_tiny_t5(root / "t5", captions, d_model=32)
    torch.manual_seed(0)
    vae = CausalVAEModel.from_config(json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text()))
    vae.save_pretrained(root / "vae")
    entries = []
    for i in range(4):
        frames = torch.zeros(9, 32, 32, 3, dtype=torch.uint8)
        for t in range(9):
            frames[t, 4 + t : 12 + t, 4 * i : 4 * i + 8] = 255
        write_video(root / f"clip{i}.mp4", frames, fps=8)
        entries.append({"path": f"clip{i}.mp4", "cap": captions[i]})
    (root / "data.json").write_text(json.dumps(entries))
    return ["--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(t5), "--ae_path", str(root / "vae"),
            "--data_path", str(root / "data.json"), "--num_frames", str(1 + vae.temporal_compression),
            "--max_image_size", str(4 * vae.spatial_compression), "--use_image_num", "1", "--model_max_length", "16",
            "--mixed_precision", "no", "--report_to", "none", "--learning_rate", "1e-3", "--use_ema",
            "--checkpointing_steps", "2"]


def _train(out, steps: int, args: list[str], nproc: int = 1, *extra: str):
    import subprocess
    import sys

    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "-m", "opensora_plan", "train-t2v", *args, "--output_dir", str(out), "--max_train_steps",
           str(steps), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _weights(out, step: int, folder: str = "model") -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / f"checkpoint-{step}" / folder / "diffusion_pytorch_model.safetensors"))


def _log(out) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_t2v_sp2_matches_one_process_and_resumes_exactly(tmp_path, fixtures_dir):
    """2 processes x sp 2 (one data-parallel rank) train like 1 process; a resumed sp run is bit-exact."""
    args = _t2v_assets(tmp_path, fixtures_dir)
    _train(tmp_path / "single", 3, args)
    _train(tmp_path / "sp", 3, args, 2, "--sp_size", "2", "--gradient_checkpointing")
    single, sp = _log(tmp_path / "single"), _log(tmp_path / "sp")
    assert [r["step"] for r in sp] == [1, 2, 3]
    import json

    assert json.loads((tmp_path / "sp" / "options.json").read_text())["sp_size"] == 2
    for a, b in zip(single, sp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for folder in ("model", "ema"):
        wa, wb = _weights(tmp_path / "single", 3, folder), _weights(tmp_path / "sp", 3, folder)
        for key in wa:
            # Adam's first steps move a weight by ~lr whatever the gradient's size, so a gradient within
            # rounding of zero may flip a step: bound the difference by a few lr and its frequency.
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=6e-3, msg=key)
        diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
        assert (diffs > 1e-5).float().mean() < 1e-3

    resumed = tmp_path / "sp_resumed"
    _train(resumed, 2, args, 2, "--sp_size", "2", "--gradient_checkpointing")
    _train(resumed, 3, args, 2, "--sp_size", "2", "--gradient_checkpointing", "--resume_from_checkpoint", "latest")
    assert [(r["step"], r["loss"]) for r in _log(resumed)] == [(r["step"], r["loss"]) for r in sp]
    for folder in ("model", "ema"):
        wa, wb = _weights(tmp_path / "sp", 3, folder), _weights(resumed, 3, folder)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sample_sp2_writes_the_single_process_videos(tmp_path):
    """``torchrun --nproc_per_node 2 -m opensora_plan sample --sp_size 2``: one group splits each video."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_t2v import TINY_VERSION, build_tiny_t2v

    from opensora_plan.data.video_io import read_video

    model_path, t5_path = build_tiny_t2v(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat playing the piano\ntime lapse of clouds\n")
    args = ["-m", "opensora_plan", "sample", "--model_path", str(model_path), "--version", TINY_VERSION,
            "--text_encoder_name", str(t5_path), "--text_prompt", str(prompts), "--num_sampling_steps", "3",
            "--sample_method", "DDIM", "--fps", "8", "--device", "cpu", "--dtype", "fp32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for out, launcher in (("single", []), ("sp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        cmd = [sys.executable, *launcher, *args, "--save_img_path", str(tmp_path / out)]
        if out == "sp":
            cmd += ["--sp_size", "2"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(names) == 2 and sorted(p.name for p in (tmp_path / "sp").iterdir()) == names
    for name in names:
        single, _ = read_video(tmp_path / "single" / name)
        sp, _ = read_video(tmp_path / "sp" / name)
        diff = (single.int() - sp.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (int(diff.max()), float((diff > 0).float().mean()))


@pytest.mark.slow
def test_train_t2v_sp2_with_deepspeed_zero2(tmp_path, fixtures_dir):
    """SP composes with ZeRO-2: sp 2 x DeepSpeed trains like 1 process; the weights load as a LatteT2V folder."""
    pytest.importorskip("deepspeed")
    from opensora_plan.models.latte import LatteT2V

    args = _t2v_assets(tmp_path, fixtures_dir)
    _train(tmp_path / "single", 3, args)
    _train(tmp_path / "sp_zero2", 3, args, 2, "--sp_size", "2", "--sharding", "deepspeed", "--deepspeed_config",
           "zero2")
    for a, b in zip(_log(tmp_path / "single"), _log(tmp_path / "sp_zero2"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    model = LatteT2V.from_pretrained(tmp_path / "sp_zero2" / "checkpoint-3" / "ema")  # what `sample` loads
    single = _weights(tmp_path / "single", 3, "ema")
    for key, value in model.state_dict().items():
        if key in single:
            torch.testing.assert_close(value, single[key], rtol=0, atol=6e-3, msg=key)
