"""Validation you can trust (issue 11, part 4) and the trainer's progress report (part 5), on tiny models.

Held-out loss at fixed timesteps and noise, EMA weights swapped in without a copy and restored exactly,
preview mp4 files, W&B reporting, and the first step's time reported on its own.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train_t2v import _cli_options, assets  # noqa: E402,F401 (the tiny T5 / VAE / clips fixture)
from train_helpers import read_log  # noqa: E402

from opensora_plan.train.ema import EMA  # noqa: E402
from opensora_plan.train.t2v import build_t2v, train_t2v  # noqa: E402
from opensora_plan.train.trainer import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def held_out(assets):  # noqa: F811
    """Two clips not in the training list (other motion), in the --data_path JSON format."""
    from opensora_plan.data.video_io import write_video

    root, _, _ = assets
    entries = []
    for i in range(2):
        frames = torch.zeros(9, 40, 48, 3, dtype=torch.uint8)
        for t in range(9):  # a bright square moving right
            frames[t, 10 : 22, 2 + 3 * t + i : 14 + 3 * t + i] = 200
        write_video(root / f"held{i}.mp4", frames, fps=8)
        entries.append({"path": f"held{i}.mp4", "cap": ["waves on a beach", "a red ball rolls to the left"]})
    (root / "held_out.json").write_text(json.dumps(entries))
    return root / "held_out.json"


def _options(assets, held_out, out, steps, **extra):  # noqa: F811
    defaults = dict(use_image_num=0, validation_data_path=str(held_out), validation_steps=2,
                    validation_num_timesteps=4, checkpointing_steps=100)
    return _cli_options(assets, out, steps, **{**defaults, **extra})


def _val_records(output_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("val_")}
            for r in read_log(output_dir) if "val_loss" in r]


def _weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / f"checkpoint-{step}" / "model" / "diffusion_pytorch_model.safetensors"))


def test_held_out_loss_is_logged_at_step_0_every_n_steps_and_at_the_end(assets, held_out, tmp_path):  # noqa: F811
    train(*build_t2v(_options(assets, held_out, tmp_path, 5, report_to="tensorboard")))
    records = _val_records(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    for r in records:
        per_timestep = {k: v for k, v in r.items() if k.startswith("val_loss_t")}
        assert sorted(per_timestep) == ["val_loss_t125", "val_loss_t375", "val_loss_t625", "val_loss_t875"]
        assert r["val_loss"] == pytest.approx(sum(per_timestep.values()) / 4, rel=1e-5)
        assert r["val_loss"] == pytest.approx(r["val_mse"] + r["val_vb"], rel=1e-5)
    assert records[-1]["val_loss"] != records[0]["val_loss"]  # the weights changed, so did the loss
    # The same values went to TensorBoard (val/loss at steps 0, 2, 4, 5).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("val/loss")
    assert [s.step for s in scalars] == [0, 2, 4, 5]
    assert [s.value for s in scalars] == pytest.approx([r["val_loss"] for r in records], rel=1e-6)


def test_two_runs_with_the_same_seed_report_identical_held_out_losses(assets, held_out, tmp_path):  # noqa: F811
    train(*build_t2v(_options(assets, held_out, tmp_path / "a", 2)))
    train(*build_t2v(_options(assets, held_out, tmp_path / "b", 2)))
    assert _val_records(tmp_path / "a") == _val_records(tmp_path / "b")


def test_held_out_loss_is_deterministic_for_fixed_weights_and_uses_no_global_rng(assets, held_out, tmp_path):  # noqa: F811
    task, _ = build_t2v(_options(assets, held_out, tmp_path, 1))
    model = task.models["model"].eval()
    torch.manual_seed(123)
    first = task.held_out_loss(model)
    rng_after = torch.get_rng_state()
    torch.manual_seed(999)  # another global RNG state changes nothing
    task._held_out = None  # encode the clips again too
    second = task.held_out_loss(model)
    assert first == second
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), rng_after)  # the global RNG was not drawn from
    # The noise does not depend on the training --seed (QA 8): a seed sweep compares the same noise.
    other_seed, _ = build_t2v(_options(assets, held_out, tmp_path / "s", 1, seed=1))
    other_seed.models["model"].load_state_dict(model.state_dict())
    assert other_seed.held_out_loss(other_seed.models["model"].eval()) == first
    # Different weights give a different loss.
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    assert task.held_out_loss(model)["val_loss"] != first["val_loss"]


def test_validation_does_not_change_training(assets, held_out, tmp_path):  # noqa: F811
    """Losses and final weights (and the EMA) are bit-identical with and without validation every step."""
    common = dict(use_ema=True, ema_decay=0.9, checkpointing_steps=3)
    plain = _cli_options(assets, tmp_path / "plain", 3, use_image_num=0, **common)
    validated = _options(assets, held_out, tmp_path / "validated", 3, validation_steps=1, **common)
    train(*build_t2v(plain))
    train(*build_t2v(validated))
    keys = ("loss", "mse", "vb", "grad_norm")
    train_a = [{k: r[k] for k in keys} for r in read_log(tmp_path / "plain") if r["step"] > 0]
    train_b = [{k: r[k] for k in keys} for r in read_log(tmp_path / "validated") if r["step"] > 0]
    assert train_a == train_b and len(train_a) == 3
    assert len(_val_records(tmp_path / "validated")) == 4  # steps 0, 1, 2, 3
    for folder in ("model", "ema"):
        a = load_file(str(tmp_path / "plain" / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "validated" / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_is_swapped_in_without_a_copy_and_restored_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[1].bias.requires_grad_(False)  # frozen: not averaged, untouched
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {k: v.data_ptr() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4)
    with ema.applied_to(model) as swapped:
        assert swapped is model
        for name, value in model.named_parameters():
            if name in ema.shadow:
                assert torch.equal(value, ema.shadow[name]) and value.data_ptr() == ema.shadow[name].data_ptr()
        assert torch.equal(model[1].bias, trained["1.bias"])
        averaged_out = model(x)
    assert not torch.equal(averaged_out, model(x))
    for name, value in model.state_dict().items():  # the very same tensors are back, bit for bit
        assert torch.equal(value, trained[name]) and value.data_ptr() == storages[name]
    with pytest.raises(RuntimeError, match="boom"), ema.applied_to(model):
        raise RuntimeError("boom")  # restored on errors too
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="without the averaged parameters"), ema.applied_to(torch.nn.Linear(4, 8)):
        pass


def test_validation_uses_the_ema_weights(assets, held_out, tmp_path):  # noqa: F811
    """The held-out loss logged at the end is the loss of the saved EMA weights, not of the trained ones."""
    options = _options(assets, held_out, tmp_path, 2, use_ema=True, ema_decay=0.5, learning_rate=1e-2,
                       checkpointing_steps=2)
    train(*build_t2v(options))
    logged = _val_records(tmp_path)[-1]["val_loss"]
    task, _ = build_t2v({**options, "output_dir": str(tmp_path / "check")})
    model = task.models["model"].eval()
    model.load_state_dict(load_file(str(tmp_path / "checkpoint-2" / "ema" / "diffusion_pytorch_model.safetensors")))
    assert task.held_out_loss(model)["val_loss"] == pytest.approx(logged, rel=1e-6)
    model.load_state_dict(_weights(tmp_path, 2))
    assert task.held_out_loss(model)["val_loss"] != pytest.approx(logged, rel=1e-6)


def test_preview_videos_are_mp4_files_with_the_clip_length(assets, tmp_path):  # noqa: F811
    from opensora_plan.data.video_io import read_video

    _, _, sizes = assets
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls\nwaves on a beach\n")
    options = _cli_options(assets, tmp_path / "run", 2, use_image_num=0, validation_prompt_file=str(prompts),
                           validation_steps=2, validation_sampling_steps=4, validation_sample_method="DDIM",
                           validation_guidance_scale=3.0, report_to="tensorboard")
    train(*build_t2v(options))
    folder = tmp_path / "run" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0", "step-2"]
    files = sorted(p.name for p in (folder / "step-2").iterdir())
    assert files == ["0000-a_red_ball_rolls.mp4", "0001-waves_on_a_beach.mp4"]
    frames = read_video(folder / "step-2" / files[0])[0]
    assert frames.shape[0] == sizes["num_frames"] and frames.shape[1] == sizes["max_image_size"]
    with pytest.raises(ValueError, match="validation_sample_method"):
        build_t2v({**options, "validation_sample_method": "NoSuchScheduler", "output_dir": str(tmp_path / "other")})


def test_bad_validation_options_fail_before_any_model_loads(assets, held_out, tmp_path):  # noqa: F811
    options = _options(assets, held_out, tmp_path, 1)
    with pytest.raises(ValueError, match="needs --validation_steps"):
        build_t2v({**options, "validation_steps": None})
    with pytest.raises(FileNotFoundError, match="validation_data_path"):
        build_t2v({**options, "validation_data_path": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="validation_num_timesteps"):
        build_t2v({**options, "validation_num_timesteps": 0})
    assert not (tmp_path / "log.jsonl").exists()


def test_report_to_wandb_without_the_package_is_one_clear_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec  # as if wandb were not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install \"opensora-plan\[wandb\]\""):
        TrainConfig(output_dir=str(tmp_path), max_train_steps=1, report_to="wandb")


def test_report_to_wandb_without_a_login_is_one_clear_error(assets, held_out, tmp_path, monkeypatch):  # noqa: F811
    """QA 3: no `wandb login`, no WANDB_API_KEY, no netrc, WANDB_MODE unset -> one line naming the fixes."""
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    try:
        with pytest.raises(ValueError, match=r"no W&B login found; run `wandb login`.*WANDB_MODE=offline"):
            build_t2v(_options(assets, held_out, tmp_path / "run", 1, report_to="wandb"))
    finally:
        wandb.teardown()  # the look-up set up wandb's process-wide settings for this environment
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")  # offline needs no login
    TrainConfig(output_dir=str(tmp_path), max_train_steps=1, report_to="wandb")


def test_report_to_wandb_offline_logs_train_and_validation(assets, held_out, tmp_path, monkeypatch):  # noqa: F811
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(*build_t2v(_options(assets, held_out, tmp_path, 2, report_to="wandb")))
    wandb.teardown()  # wandb's service process writes the records file asynchronously; wait for it
    runs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    # The offline record file holds each logged key and its value as JSON text (protobuf strings).
    data = runs[0].read_bytes()
    assert b"train/loss" in data and b"val/loss_t125" in data
    for record in _val_records(tmp_path):
        assert json.dumps(record["val_loss"]).encode() in data


def test_progress_reports_the_first_step_separately(assets, tmp_path, caplog, capsys):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="opensora_plan.train.trainer"):
        summary = train(*build_t2v(_cli_options(assets, tmp_path, 3, use_image_num=0)))
    log = read_log(tmp_path)
    assert "first_step_seconds" in log[0] and all("first_step_seconds" not in r for r in log[1:])
    assert summary["first_step_seconds"] == log[0]["first_step_seconds"] > 0
    # samples/s of the run leaves the first step out: 2 steps x batch 2 over their own time.
    later = sum(2 / r["samples_per_s"] for r in log[1:])
    assert summary["samples_per_s"] == pytest.approx(4 / later, rel=1e-6)
    # The first step's time is reported once (QA 7): one log line, not also written on the bar.
    assert sum("first step (warm-up/compile)" in r.getMessage().lower() for r in caplog.records) == 1
    err = capsys.readouterr().err  # the bar goes to stderr
    assert "first step (warm-up/compile)" not in err.lower() and "3/3" in err and "samples/s" in err


def test_cli_flags_reach_the_run(assets, held_out, tmp_path):  # noqa: F811
    from test_train_t2v import _argv

    from opensora_plan import cli

    # A later flag wins: video-only clips (the held-out loss has no joint-training images).
    assert cli.main(_argv(assets, tmp_path, 1, "--use_image_num", "0", "--validation_data_path", str(held_out),
                          "--validation_steps", "1", "--validation_num_timesteps", "3")) == 0
    records = _val_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    assert len([k for k in records[0] if k.startswith("val_loss_t")]) == 3
    options = json.loads((tmp_path / "options.json").read_text())
    assert options["extra"]["validation_data_path"] == str(held_out)


def test_a_resumed_run_logs_the_same_held_out_losses(assets, held_out, tmp_path):  # noqa: F811
    full = _options(assets, held_out, tmp_path / "full", 4, checkpointing_steps=2, use_ema=True, ema_decay=0.5)
    train(*build_t2v(full))
    part = {**full, "output_dir": str(tmp_path / "part")}
    train(*build_t2v({**part, "max_train_steps": 2}))
    train(*build_t2v({**part, "resume_from_checkpoint": "latest"}))
    assert [r["step"] for r in _val_records(tmp_path / "part")] == [0, 2, 4]
    assert _val_records(tmp_path / "part") == _val_records(tmp_path / "full")


@pytest.mark.slow
def test_validation_under_two_ddp_processes(assets, held_out, tmp_path):  # noqa: F811
    """torchrun, 2 processes, EMA: the main process validates while the other waits; replicas stay identical
    (the trainer checks their hashes at the end) and the baseline equals the one-process run's."""
    import os
    import subprocess

    from test_train_t2v import _argv

    flags = ["--use_image_num", "0", "--validation_data_path", str(held_out), "--validation_steps", "1",
             "--use_ema", "--ema_decay", "0.5", "--train_batch_size", "1"]
    argv = _argv(assets, tmp_path / "ddp", 2, *flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "opensora_plan", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("replicas hold identical weights") == 1  # the main process says it (QA 14b)
    records = _val_records(tmp_path / "ddp")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert '"world_size": 2' in (tmp_path / "ddp" / "options.json").read_text()
    train(*build_t2v(_cli_options(assets, tmp_path / "one", 1, **{
        "use_image_num": 0, "validation_data_path": str(held_out), "validation_steps": 1, "use_ema": True,
        "ema_decay": 0.5, "train_batch_size": 1, "learning_rate": 1e-3})))
    one = _val_records(tmp_path / "one")[0]
    # Equal up to float rounding: the two processes' GEMMs may block differently (seen: 1e-7 relative).
    assert one.keys() == records[0].keys()
    assert one == pytest.approx(records[0], rel=1e-5)


def test_unreadable_held_out_videos_are_left_out_never_replaced(assets, held_out, tmp_path, caplog):  # noqa: F811
    """QA 1: good0, three unreadable entries, good1 -> the loss is the mean over good0 and good1 (1/2 each),
    not good1 counted four times; one warning lists them; the count is reported; all unreadable -> one error
    before anything is written to --output_dir."""
    root = held_out.parent
    (root / "not_a_video.mp4").write_text("this is text")
    (root / "empty.mp4").write_bytes(b"")
    entries = json.loads(held_out.read_text())
    bad = [{"path": name, "cap": ["x"]} for name in ("not_a_video.mp4", "missing.mp4", "empty.mp4")]
    mixed = root / "held_out_mixed.json"
    mixed.write_text(json.dumps([entries[0], *bad, entries[1]]))
    clean, _ = build_t2v(_options(assets, held_out, tmp_path / "clean", 1))
    with caplog.at_level(logging.WARNING, logger="opensora_plan.train.t2v"):
        task, _ = build_t2v(_options(assets, mixed, tmp_path / "mixed", 1))
    warnings = [r.getMessage() for r in caplog.records if "held-out videos are unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 5" in warnings[0] and "missing.mp4" in warnings[0]
    task.models["model"].load_state_dict(clean.models["model"].state_dict())
    model = clean.models["model"].eval()
    expected = clean.held_out_loss(model)
    assert task.held_out_loss(task.models["model"].eval()) == expected and expected["val_clips"] == 2
    report = task.run_report()
    assert report["held_out_clips"] == 2 and report["held_out_unreadable"] == 3
    all_bad = root / "held_out_bad.json"
    all_bad.write_text(json.dumps(bad))
    out = tmp_path / "bad_run"
    with pytest.raises(ValueError, match="none of its 3 videos can be read"):
        train_t2v(_options(assets, all_bad, out, 1))
    assert not out.exists() or not any(out.iterdir())  # no options.json, log.jsonl, pretrained_report.json


def test_dry_run_reads_the_held_out_data_and_prints_a_validation_section(assets, held_out, tmp_path):  # noqa: F811
    """QA 2: --dry_run reads the held-out list as the training list is read and summarises validation."""
    from opensora_plan.train.t2v import dry_run_report

    root = held_out.parent
    entries = json.loads(held_out.read_text())
    mixed = root / "held_out_dry.json"
    mixed.write_text(json.dumps([*entries, {"path": "gone.mp4", "cap": ["x"]}]))
    out = tmp_path / "run"
    options = _options(assets, mixed, out, 10, validation_steps=5, validation_prompts="a red ball", dry_run=True)
    report = train_t2v(options)["report"]
    assert ("validation: 2 held-out clips (1 unreadable), loss at 4 timesteps every 5 steps; 1 preview prompt"
            in report)
    assert "UNREADABLE held-out entry 2" in report and "gone.mp4" in report
    assert not out.exists() or not any(out.iterdir())
    task, config = build_t2v(_cli_options(assets, tmp_path / "none", 1, use_image_num=0))
    assert "validation: none" in dry_run_report(task, config)["report"]


class _RecordingWriter:
    def __init__(self):
        self.tags = []

    def add_images(self, tag, images, step):
        self.tags.append(tag)

    def add_video_file(self, tag, path, step):
        self.tags.append(tag)


def test_previews_use_the_runs_model_max_length_and_distinct_writer_keys(assets, tmp_path, monkeypatch):  # noqa: F811
    """QA 11: prompts are encoded at --model_max_length (as the captions were); QA 12: frames and the mp4 go to
    the writer under distinct keys."""
    import opensora_plan.pipelines.pipeline_opensora_plan as pipeline_module

    lengths = []
    real = pipeline_module.encode_texts

    def spy(tokenizer, text_encoder, texts, max_length, *args, **kwargs):
        lengths.append(max_length)
        return real(tokenizer, text_encoder, texts, max_length, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "encode_texts", spy)
    options = _cli_options(assets, tmp_path / "run", 1, use_image_num=0, model_max_length=12,
                           validation_prompts="a red ball rolls", validation_steps=1, validation_sampling_steps=4,
                           validation_sample_method="DDIM", validation_guidance_scale=3.0)
    task, _ = build_t2v(options)
    writer = _RecordingWriter()
    task.validate(3, task.models, tmp_path / "validation", writer)
    assert lengths and set(lengths) == {12}
    assert writer.tags == ["validation/00/frames", "validation/00/video"]
    assert (tmp_path / "validation" / "step-3" / "0000-a_red_ball_rolls.mp4").is_file()


def test_validation_prompts_takes_several_prompts_after_one_flag(assets, tmp_path, capsys):  # noqa: F811
    """QA 4: `--validation_prompts "a" "b"` previews both (it used to take one prompt)."""
    from test_train_t2v import _argv

    from opensora_plan import cli

    out = tmp_path / "run"
    assert cli.main(_argv(assets, out, 4, "--use_image_num", "0", "--validation_steps", "2", "--dry_run",
                          "--validation_prompts", "a red ball rolls", "waves on a beach")) == 0
    assert "every 2 steps; 2 preview prompts" in capsys.readouterr().out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls\n")
    with pytest.raises(ValueError, match="not both"):
        build_t2v(_cli_options(assets, out, 1, validation_prompts=["a", "b"], validation_prompt_file=str(prompts)))
    with pytest.raises(ValueError, match="looks like a file name"):
        build_t2v(_cli_options(assets, out, 1, validation_prompts=["a red ball", "prompts.txt"]))


def test_a_resumed_run_that_adds_validation_gets_a_baseline(assets, held_out, tmp_path):  # noqa: F811
    """QA 13: 2 steps without validation, then resume with --validation_data_path: val_loss at 2 (the resumed
    weights), 4 and at the end; a resume of a run that already validates adds no extra baseline."""
    plain = _cli_options(assets, tmp_path, 2, use_image_num=0, checkpointing_steps=2)
    train(*build_t2v(plain))
    train(*build_t2v(_options(assets, held_out, tmp_path, 5, checkpointing_steps=2, resume_from_checkpoint="latest")))
    records = _val_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5]
    task, _ = build_t2v(_options(assets, held_out, tmp_path / "check", 1))
    model = task.models["model"].eval()
    model.load_state_dict(_weights(tmp_path, 2))
    assert task.held_out_loss(model)["val_loss"] == pytest.approx(records[0]["val_loss"], rel=1e-6)


def test_previews_default_to_the_demo_models_sampling_settings(tmp_path):
    """QA 9: --pretrained the shipped demo (its version folder or the folder itself) -> previews use its
    demo.json sampler / steps / guidance unless the --validation_* flags are given; else PNDM, 20, 7.5."""
    from opensora_plan.demo.model import default_model_path, load_demo_info
    from opensora_plan.train.t2v import T2V_DEFAULTS, validate_t2v_options

    demo = default_model_path()
    info = load_demo_info(demo)
    base = {**T2V_DEFAULTS, "output_dir": str(tmp_path / "run"), "model": str(demo / info["version"]),
            "validation_prompts": ["a red circle moving left"], "validation_steps": 10}
    for pretrained in (demo / info["version"], demo):
        opts = {**base, "pretrained": str(pretrained), "validation_sampling_steps": 10}
        validate_t2v_options(opts)
        assert (opts["validation_sample_method"], opts["validation_sampling_steps"],
                opts["validation_guidance_scale"]) == (info["sample_method"], 10, info["guidance_scale"])
    opts = {**base, "pretrained": None, "model": "LatteT2V-XL/122"}
    validate_t2v_options(opts)
    assert (opts["validation_sample_method"], opts["validation_sampling_steps"],
            opts["validation_guidance_scale"]) == ("PNDM", 20, 7.5)


def test_run_summary_line_names_the_held_out_clips_used():
    from opensora_plan import cli

    summary = {"step": 4, "skipped_steps": 0, "output_dir": "runs/x", "held_out_clips": 2, "held_out_unreadable": 3}
    line = cli._train_summary_line(summary)
    assert "held-out loss over 2 clips (3 unreadable left out)" in line
    assert "held-out" not in cli._train_summary_line({"step": 4, "skipped_steps": 0, "output_dir": "runs/x"})


def test_held_out_clips_of_a_bucketed_run_are_read_at_the_first_buckets_shape(held_out):
    """The model's grid is the first bucket's: held-out clips are cropped to it (never upscaled), not to the
    unused --max_image_size square."""
    from opensora_plan.train.t2v import T2V_DEFAULTS, _validation_dataset

    opts = {**T2V_DEFAULTS, "validation_data_path": str(held_out), "buckets": "5x32x48,9x32x32"}
    dataset = _validation_dataset(opts)
    assert dataset.load_clip(0).shape == (3, 5, 32, 48)  # (3, F, H, W) of bucket 5x32x48
    opts["buckets"] = "5x48x64"  # larger than the 40x48 clips: left out, never upscaled
    with pytest.raises(ValueError, match="none of its 2 videos"):
        _validation_dataset(opts)
    plain = _validation_dataset({**T2V_DEFAULTS, "validation_data_path": str(held_out), "num_frames": 5,
                                 "max_image_size": 32})
    assert plain.load_clip(0).shape == (3, 5, 32, 32)


def test_held_out_clips_are_decoded_once_and_one_that_fails_decoding_is_left_out(assets, held_out, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    """The run's start only opens the held-out videos; the held-out loss decodes each clip once (features are
    kept), and a file that opens but does not decode (truncated) is left out and counted then."""
    import av
    import numpy as np

    from opensora_plan.data.video_io import VideoReader

    root = held_out.parent
    full, cut = root / "cut.full.mp4", root / "cut.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:  # moov first: the index survives
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for _ in range(20):
            frame = av.VideoFrame.from_ndarray((rng.random((40, 48, 3)) * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 4])  # 5 frames' packets, the first 2 decode
    entries = json.loads(held_out.read_text())
    mixed = root / "held_out_cut.json"
    mixed.write_text(json.dumps([entries[0], {"path": "cut.mp4", "cap": ["x"]}, entries[1]]))
    decoded = []  # held-out files whose frames were read (once per clip read, whatever the reader's fallbacks)
    real = VideoReader.get_frames

    def get_frames(self, indices):
        if self.path.name.startswith(("held", "cut")) and not getattr(self, "_counted", False):
            self._counted = True
            decoded.append(self.path.name)
        return real(self, indices)

    monkeypatch.setattr(VideoReader, "get_frames", get_frames)
    task, _ = build_t2v(_options(assets, mixed, tmp_path / "run", 1))
    assert decoded == [] and len(task.validation_data) == 3  # opened, not decoded
    metrics = task.held_out_loss(task.models["model"].eval())
    assert sorted(decoded) == ["cut.mp4", "held0.mp4", "held1.mp4"]  # each once (the cut one fails)
    task.held_out_loss(task.models["model"].eval())
    assert len(decoded) == 3 and metrics["val_clips"] == 2
    report = task.run_report()
    assert report["held_out_clips"] == 2 and report["held_out_unreadable"] == 1
