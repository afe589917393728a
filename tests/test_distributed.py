"""Data parallel (DDP over gloo) and FSDP2 sharded training with 2 CPU processes under torchrun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import read_log  # noqa: E402

HELPER = Path(__file__).parent / "train_helpers.py"
WEIGHTS = "checkpoint-{step}/model/diffusion_pytorch_model.safetensors"


def _torchrun(out: Path, steps: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
           "--output_dir", str(out), "--max_train_steps", str(steps), "--gradient_accumulation_steps", "2", *extra]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _assert_same(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def test_two_process_ddp_ranks_hold_identical_weights(tmp_path):
    _torchrun(tmp_path, 4, "--use_ema")
    hashes = [(tmp_path / f"weights_rank{r}.sha256").read_text().strip() for r in range(2)]
    assert hashes[0] == hashes[1]
    assert '"distributed_type": "DistributedType.MULTI_CPU"' in (tmp_path / "options.json").read_text()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoint-4").glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]


@pytest.mark.slow
def test_fsdp2_two_processes_match_ddp_and_resume(tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp2"
    _torchrun(ddp, 6)
    _torchrun(fsdp, 4, "--sharding", "fsdp2")
    # Each rank holds a different shard, and the gathered weights equal the replicated run's.
    shards = [(fsdp / f"weights_rank{r}.sha256").read_text().split("\n")[1] for r in range(2)]
    assert shards[0] != shards[1]
    _assert_same(ddp / WEIGHTS.format(step=4), fsdp / WEIGHTS.format(step=4))
    # Resume the sharded run (optimizer state re-sharded from the full checkpoint) for 2 more steps.
    shutil.rmtree(fsdp / "checkpoint-2")
    _torchrun(fsdp, 6, "--sharding", "fsdp2", "--resume_from_checkpoint", "latest")
    _assert_same(ddp / WEIGHTS.format(step=6), fsdp / WEIGHTS.format(step=6))
    for a, b in zip(read_log(ddp), read_log(fsdp)):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-6


@pytest.mark.slow
def test_train_t2v_two_processes_ddp_and_fsdp2(tmp_path, fixtures_dir):
    """The real command under torchrun with tiny models: DDP (replica hashes checked by the trainer) and FSDP2."""
    import json

    from opensora_plan.data.video_io import write_video
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.demo.tiny_t5 import build_tiny_t5

    captions = ["a red ball", "waves on a beach", "a green square", "snow on a city"]
    t5 = build_tiny_t5(tmp_path / "t5", captions, d_model=32)
    torch.manual_seed(0)
    vae_config = json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text())
    vae = CausalVAEModel.from_config(vae_config)
    vae.save_pretrained(tmp_path / "vae")
    num_frames, size = 1 + vae.temporal_compression, 4 * vae.spatial_compression  # 2 latent frames of 4 x 4
    entries = []
    for i in range(4):
        frames = torch.zeros(9, 32, 32, 3, dtype=torch.uint8)
        frames[:, 8:16, 4 * i : 4 * i + 8] = 255
        write_video(tmp_path / f"clip{i}.mp4", frames, fps=8)
        entries.append({"path": f"clip{i}.mp4", "cap": captions[i]})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for sharding in ("ddp", "fsdp2"):
        out = tmp_path / sharding
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "opensora_plan", "train-t2v", "--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(t5),
               "--ae_path", str(tmp_path / "vae"), "--data_path", str(tmp_path / "data.json"), "--num_frames",
               str(num_frames), "--max_image_size", str(size), "--use_image_num", "1", "--model_max_length", "16",
               "--max_train_steps", "2",
               "--mixed_precision", "bf16", "--report_to", "none", "--sharding", sharding, "--output_dir", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        assert [r["step"] for r in read_log(out)] == [1, 2]
    # Same data, same losses. The sharded grad norm sums in another order, so the clip factor differs in
    # the last bits; Adam's first steps are ~lr * sign(grad), so a gradient within rounding of zero may
    # move a weight by up to 2 * lr per step the other way. Everything else must agree to float precision.
    wa = load_file(str(tmp_path / "ddp" / WEIGHTS.format(step=2)))
    wb = load_file(str(tmp_path / "fsdp2" / WEIGHTS.format(step=2)))
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diffs.max() <= 2 * 2 * 2e-5
    assert (diffs > 1e-6).float().mean() < 1e-3
    for a, b in zip(read_log(tmp_path / "ddp"), read_log(tmp_path / "fsdp2")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
