"""``opensora-plan sample`` end to end on tiny random models saved to folders (Latte + VAE + tiny T5)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opensora_plan import cli
from opensora_plan.data.video_io import read_video
from opensora_plan.pipelines.sample_t2v import read_prompts, shard, video_filename
from tiny_t2v import TINY_VERSION, build_tiny_t2v

PROMPTS = ["a cat playing the piano", "a red car driving through a snowy forest", "time lapse of clouds"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return build_tiny_t2v(tmp_path_factory.mktemp("sample_models"))


def _args(model_path, t5_path, out, prompt, *extra):
    """``prompt``: a prompt (str) or a prompt file (Path, passed with --prompt_file)."""
    source = ["--prompt_file", str(prompt)] if isinstance(prompt, Path) else ["--text_prompt", prompt]
    return ["sample", "--model_path", str(model_path), "--version", TINY_VERSION, "--text_encoder_name", str(t5_path),
            *source, "--save_img_path", str(out), "--num_sampling_steps", "2",
            "--sample_method", "DDIM", "--fps", "8", *extra]


def test_sample_writes_one_mp4_per_prompt_and_a_time_line(tiny_models, tmp_path, capsys):
    model_path, t5_path = tiny_models
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    out = tmp_path / "videos"
    assert cli.main(_args(model_path, t5_path, out, prompt_file, "--seed", "3")) == 0

    files = sorted(p.name for p in out.iterdir())
    assert files == [video_filename(i, p) for i, p in enumerate(PROMPTS[:2])]
    assert files[0] == "0000-a_cat_playing_the_piano.mp4"
    video, fps = read_video(out / files[0])  # (T, H, W, 3) uint8
    assert fps == 8
    cfg = json.loads((model_path / TINY_VERSION / "config.json").read_text())
    assert video.shape[0] == 4 * (cfg["video_length"] - 1) + 1
    assert tuple(video.shape[1:3]) == tuple(8 * s for s in cfg["sample_size"])
    assert re.search(r"Sampled 2 mp4 videos of .* with model .* in [\d.]+ s \([\d.]+ s per video\)", capsys.readouterr().out)


def test_image_mode_writes_png(tiny_models, tmp_path):
    model_path, t5_path = tiny_models
    assert cli.main(_args(model_path, t5_path, tmp_path, PROMPTS[0], "--force_images")) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["0000-a_cat_playing_the_piano.png"]


@pytest.mark.parametrize("break_what, message", [
    ("model_path", r"--model_path .*missing does not exist; expected a local copy"),
    ("version", r"Version folder .*65x512x512 does not exist; .*found: tiny-17x64x64, vae"),
    ("vae_weights", r"No weights in .*vae: expected diffusion_pytorch_model.safetensors"),
    ("t5", r"T5 folder .*no_t5 does not exist"),
    ("prompt_file", r"Prompt file .*nope.txt does not exist"),
    ("sample_method", r"Unknown sample method 'Nope'; choose one of"),
])
def test_user_errors_are_one_line(tiny_models, tmp_path, capsys, break_what, message):
    model_path, t5_path = tiny_models
    args = dict(model_path=model_path, t5=t5_path, prompt=PROMPTS[0], extra=[])
    if break_what == "model_path":
        args["model_path"] = tmp_path / "missing"
    elif break_what == "version":
        args["extra"] = ["--version", "65x512x512"]
    elif break_what == "vae_weights":
        broken = shutil.copytree(model_path, tmp_path / "models")
        (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        args["model_path"] = broken
    elif break_what == "t5":
        args["t5"] = tmp_path / "no_t5"
    elif break_what == "prompt_file":
        args["prompt"] = tmp_path / "nope.txt"
    elif break_what == "sample_method":
        args["extra"] = ["--sample_method", "Nope"]
    argv = _args(args["model_path"], args["t5"], tmp_path / "out", args["prompt"], *args["extra"])
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prompt_helpers(tmp_path):
    assert read_prompts("a cat") == ["a cat"]
    (tmp_path / "p.txt").write_text("one\n\n  two  \n")
    assert read_prompts(prompt_file=str(tmp_path / "p.txt")) == ["one", "two"]
    with pytest.raises(ValueError, match="prompt is empty"):
        read_prompts("  ")
    assert video_filename(12, "A cat, on a mat!  (4K)") == "0012-A_cat_on_a_mat_4K.mp4"
    assert video_filename(0, "???") == "0000-prompt.mp4"
    assert len(video_filename(0, "x" * 500)) < 100
    jobs = list(range(7))
    shares = [shard(jobs, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == jobs and shares[0] == [0, 3, 6]


@pytest.mark.slow
def test_torchrun_two_processes_split_the_prompts(tiny_models, tmp_path):
    """``torchrun --nproc_per_node 2`` on CPU (gloo): each rank writes its share, same videos as one process."""
    model_path, t5_path = tiny_models
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "opensora_plan",
           *_args(model_path, t5_path, tmp_path / "multi", prompt_file, "--device", "cpu")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"\[rank 0/2\] Sampled 2 mp4 videos", result.stdout), result.stdout
    assert re.search(r"\[rank 1/2\] Sampled 1 mp4 video ", result.stdout), result.stdout
    expected = [video_filename(i, p) for i, p in enumerate(PROMPTS)]
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == expected

    # Seed of prompt i is seed + i: prompt 1 alone with --seed 1 gives the video rank 1 wrote.
    assert cli.main(_args(model_path, t5_path, tmp_path / "single", PROMPTS[1], "--device", "cpu", "--seed", "1")) == 0
    single, _ = read_video(tmp_path / "single" / video_filename(0, PROMPTS[1]))
    multi, _ = read_video(tmp_path / "multi" / expected[1])
    diff = (single.int() - multi.int()).abs()  # lossy H.264 of float-identical frames: tiny codec noise only
    assert diff.float().mean() < 0.5 and (diff <= 2).float().mean() > 0.99
