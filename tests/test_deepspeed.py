"""``--sharding deepspeed`` (train/zero.py): ZeRO-2/3 with 2 CPU processes under torchrun equal DDP, resume exactly.

DeepSpeed is an optional extra (``pip install 'opensora-plan[deepspeed]'``); without it these tests skip.
The first DeepSpeed run on a machine JIT-compiles its CPU shared-memory comm op (minutes), cached afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ToyRegressor, read_log  # noqa: E402

from opensora_plan.train import zero  # noqa: E402
from opensora_plan.train.trainer import TrainConfig  # noqa: E402

HELPER = Path(__file__).parent / "train_helpers.py"
WEIGHTS = "checkpoint-{step}/{folder}/diffusion_pytorch_model.safetensors"


def _torchrun(out: Path, steps: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
           "--output_dir", str(out), "--max_train_steps", str(steps), "--gradient_accumulation_steps", "2", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HELPER.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _weights(out: Path, step: int, folder: str = "model") -> dict:
    return load_file(str(out / WEIGHTS.format(step=step, folder=folder)))


def test_shipped_configs_and_auto_values():
    for name in ("zero2", "zero2_offload", "zero3"):
        config = zero.load_config(name)
        assert zero.stage(config) == (3 if name == "zero3" else 2)
    filled = zero.fill_auto(zero.load_config("zero2"), micro_batch=4, accumulation=2, world_size=8, max_grad_norm=1.0,
                            mixed_precision="bf16")
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"]) == (64, 4)
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=2 but the flags give 4"):
        zero.fill_auto({"train_micro_batch_size_per_gpu": 2}, micro_batch=4, accumulation=1, world_size=1,
                       max_grad_norm=None, mixed_precision="no")
    with pytest.raises(FileNotFoundError, match="zero2_offload"):
        zero.load_config("zero9")


def test_deepspeed_options_are_checked_before_training(tmp_path):
    pytest.importorskip("deepspeed")
    with pytest.raises(ValueError, match="--deepspeed_config needs --sharding deepspeed"):
        TrainConfig(output_dir=str(tmp_path), max_train_steps=1, deepspeed_config="zero2")
    with pytest.raises(ValueError, match="--use_ema with ZeRO-3"):
        TrainConfig(output_dir=str(tmp_path), max_train_steps=1, sharding="deepspeed", deepspeed_config="zero3",
                    use_ema=True)


@pytest.mark.slow
def test_zero2_matches_ddp_resumes_exactly_and_keeps_ema(tmp_path):
    pytest.importorskip("deepspeed")
    ddp, ds, resumed = tmp_path / "ddp", tmp_path / "zero2", tmp_path / "resumed"
    _torchrun(ddp, 4, "--use_ema")
    _torchrun(ds, 4, "--use_ema", "--sharding", "deepspeed", "--deepspeed_config", "zero2")
    for a, b in zip(read_log(ddp), read_log(ds), strict=True):
        assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for folder in ("model", "ema"):  # consolidated weights in the diffusers layout, like DDP's
        wa, wb = _weights(ddp, 4, folder), _weights(ds, 4, folder)
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)
    model = ToyRegressor.from_pretrained(ds / "checkpoint-4" / "model")
    assert model.net[0].weight.shape == (16, 8)
    hashes = {(ds / f"weights_rank{r}.sha256").read_text() for r in range(2)}
    assert len(hashes) == 1  # ZeRO-2 keeps full parameters on every rank

    # 2 steps, then resume from DeepSpeed's sharded optimizer state to 4: bit-identical.
    _torchrun(resumed, 2, "--use_ema", "--sharding", "deepspeed", "--deepspeed_config", "zero2")
    assert (resumed / "checkpoint-2" / "deepspeed" / "state").is_dir()
    _torchrun(resumed, 4, "--use_ema", "--sharding", "deepspeed", "--deepspeed_config", "zero2",
              "--resume_from_checkpoint", "checkpoint-2")
    assert [(r["step"], r["loss"]) for r in read_log(resumed)] == [(r["step"], r["loss"]) for r in read_log(ds)]
    for folder in ("model", "ema"):
        wa, wb = _weights(ds, 4, folder), _weights(resumed, 4, folder)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_zero3_matches_ddp(tmp_path):
    pytest.importorskip("deepspeed")
    ddp, ds = tmp_path / "ddp", tmp_path / "zero3"
    _torchrun(ddp, 4)
    _torchrun(ds, 4, "--sharding", "deepspeed", "--deepspeed_config", "zero3")
    for a, b in zip(read_log(ddp), read_log(ds), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    wa, wb = _weights(ddp, 4), _weights(ds, 4)  # gathered from the parameter shards at save time
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)
