"""Faults found by a fresh-user pass over the new features: each kind gets one clear error before any work."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from opensora_plan import cli
from opensora_plan.models.loading import read_state_dict
from opensora_plan.models.step_cache import parse_cache_spec


@pytest.mark.parametrize("content", [b"", b"hello, not weights", b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_a_file_that_is_not_weights_is_one_value_error(tmp_path, content, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)) as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)


def test_a_pickle_with_python_objects_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="Python objects") as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="folder"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("spec, expected", [("none", ("none", {})), ("fast", ("fast", {})),
                                            ("teacache:0.5", ("teacache", {"threshold": 0.5})),
                                            ("first_block:0", ("first_block", {"threshold": 0.0}))])
def test_cache_spec_parses(spec, expected):
    assert parse_cache_spec(spec) == expected


@pytest.mark.parametrize("spec", ["bogus", "teacache:nan", "teacache:-1", "teacache:abc", "none:0.3"])
def test_bad_cache_spec_is_refused(spec):
    with pytest.raises(ValueError):
        parse_cache_spec(spec)


@pytest.mark.parametrize("argv, message", [
    (["sample", "a red circle moving left", "--guidance_scale", "nan"], "guidance_scale"),
    (["sample", "a red circle moving left", "--cache", "teacache:nan"], "threshold"),
    (["sample", "a red circle moving left", "--seed", "99999999999999999999"], "--seed"),
])
def test_sample_rejects_nonsense_numbers_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main([*argv, "--save_img_path", str(out)]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(out.glob("*.mp4"))


def test_data_check_refuses_an_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.json"
    data.write_text(json.dumps([]))
    assert cli.main(["data", "check", str(data)]) != 0
    assert "lists no videos" in capsys.readouterr().err


def test_teacache_threshold_nan_is_refused():
    from opensora_plan.models.step_cache import TeaCache

    with pytest.raises(ValueError, match="threshold"):
        TeaCache(threshold=math.nan)


def test_train_t2v_checks_validation_prompts_before_any_work(tmp_path):
    from opensora_plan.train.t2v import T2V_DEFAULTS, validate_t2v_options

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="empty after caption cleaning"):
        validate_t2v_options({**T2V_DEFAULTS, "output_dir": str(out), "validation_prompts": ["一个"]})
    assert not out.exists()


@pytest.mark.parametrize("change, message", [(dict(ema_decay=2.0), "--ema_decay"),
                                             (dict(lr_scheduler="bogus"), "--lr_scheduler 'bogus'"),
                                             (dict(lr_warmup_steps=-1), "--lr_warmup_steps")])
def test_train_config_rejects_nonsense_before_any_work(tmp_path, change, message):
    from opensora_plan.train.trainer import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, **change)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [(dict(learning_rate=0.0), "--learning_rate"),
                                             (dict(kl_weight=-1.0), "--kl_weight"),
                                             (dict(disc_start=-1), "--disc_start")])
def test_train_vae_rejects_nonsense_before_any_work(tmp_path, change, message):
    from opensora_plan.train.trainer import TrainConfig
    from opensora_plan.train.vae import train_vae

    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2)
    with pytest.raises(ValueError, match=message):
        train_vae(config, video_path=str(tmp_path), **change)
    assert not (tmp_path / "run").exists()


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    from opensora_plan.data import check as datasets

    monkeypatch.setattr(datasets, "check_dataset", lambda *a, **k: pytest.fail("the decode pass ran"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"path": "a.mp4", "cap": "x"}]))
    (tmp_path / "adir").mkdir()
    assert cli.main(["data", "check", str(data), "--json_out", str(tmp_path / "adir")]) != 0
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert cli.main(["data", "check", str(data), "--json_out", str(tmp_path / "afile" / "r.json")]) != 0
    assert "is an existing file" in capsys.readouterr().err


def test_sample_refuses_a_planned_output_that_is_a_folder_or_a_broken_link(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "0000-a_red_circle_moving_left.mp4").mkdir(parents=True)
    assert cli.main(["sample", "a red circle moving left", "--save_img_path", str(out)]) != 0
    assert "is an existing folder" in capsys.readouterr().err
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert cli.main(["sample", "a red circle moving left", "--save_img_path", str(link)]) != 0
    assert "broken symbolic link" in capsys.readouterr().err


# ------------------------------------------------------------------------------- -v / -q


@pytest.mark.parametrize("flag", ["-q", "-v"])
def test_quiet_hides_every_progress_bar_and_verbose_adds_debug_lines(tmp_path, flag):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "opensora_plan", "sample", "a red circle moving left",
                          "--num_sampling_steps", "4", "--save_img_path", str(tmp_path), flag],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Sampled 1 mp4 video" in run.stdout
    if flag == "-q":  # neither the denoising bar nor transformers' "Loading weights" bar
        assert "it/s" not in run.stderr and "Loading weights" not in run.stderr, run.stderr
        assert "INFO" not in run.stderr
    else:
        assert "DEBUG opensora_plan.cli: opensora-plan sample" in run.stderr
        assert "Denoising loop: 4 steps" in run.stderr


def test_pndm_step_count_is_checked_before_any_model_loads_or_folder_is_made(tmp_path):
    from opensora_plan.pipelines.sample_t2v import sample_t2v

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="at least 4 steps"):
        sample_t2v(prompt="a red circle moving left", sample_method="PNDM", num_sampling_steps=3,
                   save_img_path=str(out), model_path=str(tmp_path / "no_model_here"))
    assert not out.exists()


def test_sample_cli_takes_another_size_for_bucket_trained_models(tmp_path):
    import subprocess
    import sys

    import av

    run = subprocess.run([sys.executable, "-m", "opensora_plan", "sample", "a red circle moving left", "--num_frames",
                          "9", "--height", "48", "--width", "80", "--num_sampling_steps", "4", "--save_img_path",
                          str(tmp_path), "-q"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    (video,) = tmp_path.glob("*.mp4")
    with av.open(str(video)) as container:
        frames = [f for f in container.decode(video=0)]
    assert (len(frames), frames[0].height, frames[0].width) == (9, 48, 80)


@pytest.mark.parametrize("fields, message", [({"num_frames": 8}, "1 \\+ 4k"), ({"height": 40}, "multiple of 16"),
                                             ({"force_images": True, "num_frames": 9}, "drop --num_frames")])
def test_sample_size_flags_are_checked_before_any_work(tmp_path, fields, message):
    from opensora_plan.pipelines.sample_t2v import SampleOptions

    with pytest.raises(ValueError, match=message):
        SampleOptions(prompt="a red circle", save_img_path=str(tmp_path / "out"), **fields)
