"""``sample --model_path runs/x/checkpoint-N`` (or the run folder) without a hand-built folder: the run's VAE and
T5 come from options.json, EMA weights are preferred, a LoRA run's base is found, and the videos equal
those sampled from a hand-built release-layout folder of the same weights."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_t2v import _argv, assets  # noqa: E402,F401  (module fixture: tiny T5, VAE and clips)

from opensora_plan import cli  # noqa: E402
from opensora_plan.data.video_io import read_video  # noqa: E402
from opensora_plan.models.latte import build_latte  # noqa: E402

PROMPT = "a red ball rolls to the left"


def _sample(out: Path, model_path: Path, *extra: str) -> torch.Tensor:
    argv = ["sample", PROMPT, "--model_path", str(model_path), "--save_img_path", str(out),
            "--num_sampling_steps", "3", "--sample_method", "DDIM", "--fps", "8", "--seed", "2", *extra]
    assert cli.main(argv) == 0
    (video,) = sorted(out.glob("*.mp4"))
    return read_video(video)[0]


def _release_folder(root: Path, transformer: Path, vae: Path) -> Path:
    """What a user had to build by hand before: <root>/<version>/ + <root>/vae/."""
    shutil.copytree(transformer, root / "v")
    shutil.copytree(vae, root / "vae")
    return root


def test_sample_a_checkpoint_directly_uses_the_runs_models_and_ema(assets, tmp_path, capsys):  # noqa: F811
    root, t5, _ = assets
    run = tmp_path / "run"
    assert cli.main(_argv(assets, run, 2, "--use_ema", "--checkpointing_steps", "1")) == 0
    elsewhere = tmp_path / "elsewhere"  # relative paths in the run must not matter: sample from another cwd
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        capsys.readouterr()
        direct = _sample(tmp_path / "direct", run / "checkpoint-1")
        said = capsys.readouterr().out
        latest = _sample(tmp_path / "latest", run)  # the run folder = its final checkpoint
    finally:
        os.chdir(cwd)
    assert "checkpoint-1" in said and "EMA" in said
    by_hand = _release_folder(tmp_path / "hand", run / "checkpoint-1" / "ema", root / "vae")
    expected = _sample(tmp_path / "hand_out", by_hand, "--version", "v", "--text_encoder_name", str(t5))
    assert torch.equal(direct, expected)
    assert not torch.equal(latest, direct)  # checkpoint-2 is another model

    # A run without EMA samples its trained weights and says so.
    plain = tmp_path / "plain"
    assert cli.main(_argv(assets, plain, 1)) == 0
    capsys.readouterr()
    _sample(tmp_path / "plain_out", plain / "checkpoint-1")
    assert "no EMA" in capsys.readouterr().out


def test_sample_a_lora_checkpoint_and_lora_flag(assets, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("peft")
    root, t5, _ = assets
    torch.manual_seed(3)
    base = build_latte("LatteT2V-Tiny/122", caption_channels=32, sample_size=[4, 4], video_length=2)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    run = tmp_path / "lora_run"
    assert cli.main(_argv(assets, run, 2, "--pretrained", str(tmp_path / "base"), "--lora_rank", "4",
                          "--learning_rate", "1e-2")) == 0
    capsys.readouterr()
    direct = _sample(tmp_path / "direct", run / "checkpoint-2")
    assert "LoRA adapter" in capsys.readouterr().out
    # The same through a release folder of the base + --lora; at --lora_scale 0 the base model's video.
    by_hand = _release_folder(tmp_path / "hand", tmp_path / "base", root / "vae")
    hand = ["--version", "v", "--text_encoder_name", str(t5)]
    with_flag = _sample(tmp_path / "flag", by_hand, *hand, "--lora", str(run / "checkpoint-2" / "model"))
    assert torch.equal(direct, with_flag)
    base_video = _sample(tmp_path / "base_out", by_hand, *hand)
    assert torch.equal(_sample(tmp_path / "zero", run / "checkpoint-2", "--lora_scale", "0"), base_video)
    assert not torch.equal(direct, base_video)
    assert cli.main(["sample", PROMPT, "--model_path", str(by_hand), *hand, "--lora", str(tmp_path)]) == 1
    assert "holds no pytorch_lora_weights.safetensors" in capsys.readouterr().err
    # QA 10: --lora takes the run or checkpoint folder too (as --model_path does) and says which adapter.
    capsys.readouterr()
    assert torch.equal(_sample(tmp_path / "lora_run_flag", by_hand, *hand, "--lora", str(run)), direct)
    assert "trained (no EMA in this run) LoRA adapter from" in capsys.readouterr().out
    # --model_path <checkpoint>/model of a LoRA run: what to pass instead, not "Version folder ... does not exist".
    assert cli.main(["sample", PROMPT, "--model_path", str(run / "checkpoint-2" / "model")]) == 1
    err = capsys.readouterr().err
    assert "is the LoRA adapter of" in err and "Version folder" not in err


def test_lora_flag_prefers_the_ema_adapter_of_a_checkpoint(tmp_path):
    from opensora_plan.models.lora import LORA_WEIGHT_NAME
    from opensora_plan.pipelines.training_run import resolve_lora_adapter
    from opensora_plan.train.checkpoint import STATE_NAME

    checkpoint = tmp_path / "run" / "checkpoint-4"
    for folder in ("model", "ema"):
        (checkpoint / folder).mkdir(parents=True)
        (checkpoint / folder / LORA_WEIGHT_NAME).write_bytes(b"")
    (checkpoint / STATE_NAME).write_bytes(b"")
    (tmp_path / "run" / "options.json").write_text("{}")
    for given in (tmp_path / "run", checkpoint):
        folder, which = resolve_lora_adapter(given)
        assert folder == checkpoint / "ema" and which.startswith("EMA LoRA adapter")
    assert resolve_lora_adapter(checkpoint / "model")[0] == checkpoint / "model"  # the non-EMA adapter
    assert resolve_lora_adapter(tmp_path) is None
