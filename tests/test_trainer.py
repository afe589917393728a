"""The generic training loop with a toy task: exact resume, atomic checkpoints, non-finite skip, EMA, logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ToyTask, read_log  # noqa: E402

from opensora_plan.train import checkpoint as ckpt  # noqa: E402
from opensora_plan.train.ema import EMA  # noqa: E402
from opensora_plan.train.sampler import ResumableSampler, SeededSamples  # noqa: E402
from opensora_plan.train.trainer import NonFiniteLossError, TrainConfig, train  # noqa: E402

HELPER = Path(__file__).parent / "train_helpers.py"
COMPARED = ("loss", "lr", "grad_norm", "critic_loss", "critic_grad_norm", "model_abs_pred", "epoch")


def _config(out, steps, **kw):
    kw.setdefault("checkpointing_steps", 2)
    kw.setdefault("train_batch_size", 2)
    return TrainConfig(output_dir=str(out), max_train_steps=steps, mixed_precision="no", report_to="none", **kw)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ckpt.WEIGHTS_NAME))


def _assert_same_weights(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    # 12 samples / batch 2 / accumulation 2 = 3 steps per epoch: the run crosses epochs and resumes mid-epoch.
    steps, extra = 8, dict(gradient_accumulation_steps=2, use_ema=True)
    reference = tmp_path / "uninterrupted"
    train(ToyTask(two_phase=True, n=12), _config(reference, steps, **extra))

    crashed = tmp_path / "crashed"
    cmd = [sys.executable, str(HELPER), "--output_dir", str(crashed), "--max_train_steps", str(steps),
           "--two_phase", "--use_ema", "--gradient_accumulation_steps", "2", "--sleep", "0.25", "--num_samples", "12"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(crashed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill -9, wherever the process is (maybe mid-step)
    proc.wait()
    saved = ckpt.list_checkpoints(crashed)
    assert saved and ckpt.checkpoint_step(saved[-1]) < steps, "the run finished before it could be killed"

    train(ToyTask(two_phase=True, n=12), _config(crashed, steps, resume_from_checkpoint="latest", **extra))
    ref_log, res_log = read_log(reference), read_log(crashed)
    assert [r["step"] for r in res_log] == list(range(1, steps + 1))
    for a, b in zip(ref_log, res_log):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    for folder in ("model", "critic", "ema"):
        _assert_same_weights(reference / f"checkpoint-{steps}" / folder, crashed / f"checkpoint-{steps}" / folder)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = ckpt.save_model_folder

    def failing_save(model, state, folder):
        if folder.parent.name.startswith(".checkpoint-4"):
            raise OSError("disk full (simulated)")
        real_save(model, state, folder)

    monkeypatch.setattr(ckpt, "save_model_folder", failing_save)
    with pytest.raises(OSError, match="simulated"):
        train(ToyTask(), _config(tmp_path, 6))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")], "temporary folder left behind"
    before = _weights(tmp_path / "checkpoint-2" / "model")

    monkeypatch.setattr(ckpt, "save_model_folder", real_save)
    summary = train(ToyTask(), _config(tmp_path, 6, resume_from_checkpoint="latest"))
    assert summary["step"] == 6
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    for key, value in _weights(tmp_path / "checkpoint-2" / "model").items():
        assert torch.equal(value, before[key])


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    task = ToyTask(nan_calls={2})  # the third optimizer step's loss is NaN
    start = {k: v.clone() for k, v in task.models["model"].state_dict().items()}
    summary = train(task, _config(tmp_path, 4))
    log = read_log(tmp_path)
    assert summary["skipped_steps"] == 1
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 1]
    assert task.calls == 5  # 4 steps + the skipped one
    final = task.models["model"].state_dict()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], start[k]) for k in start)


def test_nonfinite_loss_in_a_row_stops_with_clear_error(tmp_path):
    task = ToyTask(nan_calls=set(range(100)))
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 steps in a row"):
        train(task, _config(tmp_path, 4, max_nonfinite_steps=3))
    assert not ckpt.list_checkpoints(tmp_path)


def test_ema_really_steps_and_is_saved_beside_the_model(tmp_path):
    task = ToyTask()
    initial = {k: v.clone() for k, v in task.models["model"].state_dict().items()}
    train(task, _config(tmp_path, 4, use_ema=True, ema_decay=0.5, checkpointing_steps=4))
    ema = _weights(tmp_path / "checkpoint-4" / "ema")
    model = _weights(tmp_path / "checkpoint-4" / "model")
    assert json.loads((tmp_path / "checkpoint-4" / "ema" / "config.json").read_text())["hidden"] == 16
    key = "net.0.weight"
    assert not torch.equal(ema[key], initial[key]), "EMA never moved from the initial weights"
    assert not torch.equal(ema[key], model[key]), "EMA equals the raw weights"


def test_ema_update_formula():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75, warmup=False)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.75 * before + 0.25 * (before + 4.0))
    assert ema.num_updates == 1
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="unwrapped model"):
        ema.update(torch.nn.Sequential(model))  # parameter names "0.weight": not the averaged model


def test_checkpoints_total_limit_and_logs(tmp_path):
    train(ToyTask(), _config(tmp_path, 6, checkpoints_total_limit=2, lr_scheduler="linear", lr_warmup_steps=3))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    log = read_log(tmp_path)
    for record in log:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= record.keys()
    # Linear warm-up over 3 steps, advanced once per optimizer step (not once per process).
    assert [round(r["lr"] / 1e-2, 6) for r in log[:3]] == [0.0, round(1 / 3, 6), round(2 / 3, 6)]
    options = json.loads((tmp_path / "options.json").read_text())
    assert options["max_train_steps"] == 6 and options["task"] == "ToyTask"


def test_resume_latest_without_checkpoint_starts_fresh_and_bad_path_is_clear(tmp_path):
    assert ckpt.resolve_resume("latest", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)


def test_sampler_splits_ranks_and_resumes_mid_epoch():
    shares = [list(ResumableSampler(10, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert not {i for _, i in shares[0]} & {i for _, i in shares[1]}
    sampler = ResumableSampler(10, seed=3, rank=1, world_size=2)
    sampler.set_epoch(0, start=2)
    assert list(sampler) == shares[1][2:]
    sampler.set_epoch(1)
    assert [i for _, i in sampler] != [i for _, i in shares[1]]  # a new permutation each epoch


def test_seeded_samples_do_not_depend_on_global_rng():
    data = SeededSamples(ToyTask().dataset, seed=5)
    torch.manual_seed(1)
    first = data[(0, 3)]["x"]
    state = torch.get_rng_state()
    torch.manual_seed(99)
    assert torch.equal(data[(0, 3)]["x"], first)
    assert not torch.equal(data[(1, 3)]["x"], first)  # another epoch, another augmentation
    torch.manual_seed(1)
    data[(0, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        _config(tmp_path, 1).__class__(output_dir=str(tmp_path), max_train_steps=1, mixed_precision="fp8")
    with pytest.raises(ValueError, match="train_batch_size"):
        train(ToyTask(n=4), _config(tmp_path, 1, train_batch_size=8))


@pytest.mark.slow
def test_compile_keeps_plain_keys_and_ema_steps(tmp_path):
    train(ToyTask(), _config(tmp_path, 2, compile=True, use_ema=True, ema_decay=0.5))
    model, ema = _weights(tmp_path / "checkpoint-2" / "model"), _weights(tmp_path / "checkpoint-2" / "ema")
    assert sorted(model) == ["net.0.bias", "net.0.weight", "net.3.bias", "net.3.weight"]  # no _orig_mod. prefix
    assert not torch.equal(model["net.0.weight"], ema["net.0.weight"])


def test_losses_do_not_depend_on_dataloader_workers(tmp_path):
    train(ToyTask(n=8), _config(tmp_path / "w0", 3, checkpointing_steps=3))
    train(ToyTask(n=8), _config(tmp_path / "w2", 3, checkpointing_steps=3, dataloader_num_workers=2))
    assert [r["loss"] for r in read_log(tmp_path / "w0")] == [r["loss"] for r in read_log(tmp_path / "w2")]


def test_fsdp_no_sync_is_a_context_manager():
    """FSDP2 with gradient accumulation defers the reduce-scatter through it; a decorator moved onto another
    function (session 6) made it a bare generator and every accumulated FSDP2 step fail."""
    from opensora_plan.train.trainer import _fsdp_no_sync

    calls = []

    class Model:
        def set_requires_gradient_sync(self, value):
            calls.append(value)

    with _fsdp_no_sync(Model()):
        assert calls == [False]
    assert calls == [False, True]
