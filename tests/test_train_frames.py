"""train-vfi (AMT) and train-sr (RGT) on the shared trainer: triplets / LR-HR pairs from videos, the losses,
training, held-out PSNR in log.jsonl, options.json, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opensora_plan.cli import main
from opensora_plan.data.datasets import NoUsableVideoError
from opensora_plan.data.frames import (
    SRPairDataset,
    TripletDataset,
    bicubic_degradation,
    bicubic_or_vae_degradation,
    quantise,
    vae_degradation,
)
from opensora_plan.data.video_io import list_videos, write_video
from opensora_plan.train.losses_frames import census_loss, charbonnier_loss
from opensora_plan.train.sampler import SeededSamples

SIZE = 80  # video frames are SIZE x SIZE
LEVEL = 16  # grey level added per frame: frame k = x + LEVEL * k (k identifies the frame)
FRAMES = 9


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


def _frames(count: int, shift: int = 0) -> torch.Tensor:
    """Grey frames (count, SIZE, SIZE, 3): a horizontal ramp plus LEVEL * frame index (+ a vertical ramp)."""
    x = torch.arange(SIZE).view(1, 1, SIZE)
    y = torch.arange(SIZE).view(1, SIZE, 1)
    k = torch.arange(count).view(count, 1, 1)
    grey = x + (y % 7) * shift + LEVEL * k
    return grey.clamp(0, 255).to(torch.uint8).unsqueeze(-1).expand(count, SIZE, SIZE, 3).contiguous()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Three lossless clips whose frames encode their index, one 2-frame clip and one corrupt file."""
    root = tmp_path_factory.mktemp("frame_videos")
    for i in range(3):
        write_video(root / f"clip{i}.mp4", _frames(FRAMES, shift=i), fps=8, crf=0)
    write_video(root / "short.mp4", _frames(2), fps=8, crf=0)
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """A folder with one held-out clip (another pattern than the training clips)."""
    root = tmp_path_factory.mktemp("held_out")
    write_video(root / "held.mp4", _frames(FRAMES, shift=3), fps=8, crf=0)
    return root


def _clips(videos: Path) -> list[Path]:
    return [p for p in list_videos(videos) if p.name.startswith("clip")]


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


def test_triplets_have_the_target_frame_exactly_in_the_middle(videos):
    dataset = TripletDataset(_clips(videos), crop_size=32, max_frame_gap=3)
    samples = SeededSamples(dataset, seed=0)
    gaps = set()
    for epoch in range(4):
        for index in range(len(dataset)):
            s = samples[(epoch, index)]
            assert s["img0"].shape == s["imgt"].shape == s["img1"].shape == (3, 32, 32)
            # same crop, flips and channel order for all three: the middle frame is the pixel-wise mean
            assert (s["img0"] + s["img1"] - 2 * s["imgt"]).abs().max() < 4.5 / 255  # video coding: +-1 level
            # frame k carries LEVEL * k on top of the same ramp: img1 - img0 = 2 * gap levels (either time order)
            step = (s["img1"] - s["img0"]).mean().item() * 255 / LEVEL
            assert abs(abs(step) - 2 * s["gap"]) < 0.05, (step, s["gap"])
            assert 1 <= s["gap"] <= 3 and s["start"] + 2 * s["gap"] < FRAMES
            gaps.add(s["gap"])
    assert gaps == {1, 2, 3}
    # several samples per video and epoch: sample i comes from video i mod 3
    repeated = TripletDataset(_clips(videos), crop_size=32, samples_per_video=2)
    assert len(repeated) == 6 and [repeated[i]["index"] for i in (0, 4, 5)] == [0, 1, 2]
    # a sample is a pure function of its (epoch, index) key
    again = SeededSamples(dataset, seed=0)[(1, 2)]
    first = samples[(1, 2)]
    assert all(torch.equal(first[k], again[k]) for k in ("img0", "imgt", "img1"))
    other = SeededSamples(dataset, seed=1)[(1, 2)]
    assert any(not torch.equal(first[k], other[k]) for k in ("img0", "imgt", "img1")) or first["gap"] != other["gap"]


def test_saturation_jitter_pales_all_three_frames_by_one_factor_towards_their_grey(tmp_path):
    grey = _frames(FRAMES)
    colour = torch.stack([grey[..., 0], 255 - grey[..., 1], grey[..., 2] // 3], -1)  # (T, H, W, 3) coloured
    clips = [write_video(tmp_path / f"colour{i}.mp4", colour.roll(8 * i, 2), fps=8, lossless=True) for i in range(3)]
    plain = SeededSamples(TripletDataset(clips, crop_size=32, max_frame_gap=3), seed=0)
    jittered = SeededSamples(TripletDataset(clips, crop_size=32, max_frame_gap=3, saturation_jitter=0.5), seed=0)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    factors = []
    for key in [(0, i) for i in range(3)] + [(1, i) for i in range(3)]:
        a, b = plain[key], jittered[key]
        assert a["gap"] == b["gap"] and a["start"] == b["start"]  # the same triplet, crop and flips
        for name in ("img0", "imgt", "img1"):
            grey = (a[name] * weights).sum(0, keepdim=True)
            assert torch.allclose((b[name] * weights).sum(0, keepdim=True), grey, atol=1e-6)  # grey kept
            spread, jittered_spread = a[name] - grey, b[name] - grey
            factor = (jittered_spread * spread).sum() / (spread * spread).sum()
            assert torch.allclose(jittered_spread, factor * spread, atol=1e-6)
            factors.append(round(factor.item(), 5))
        assert len(set(factors[-3:])) == 1  # one factor for the three frames
    assert all(0.5 <= f <= 1.0 for f in factors) and len(set(factors)) > 1
    with pytest.raises(ValueError, match="between 0 and 1"):
        TripletDataset(clips, crop_size=32, saturation_jitter=1.5)
    held_out = TripletDataset(clips[:1], crop_size=32, deterministic=True, saturation_jitter=0.5)[0]
    same = TripletDataset(clips[:1], crop_size=32, deterministic=True)[0]
    assert torch.equal(held_out["imgt"], same["imgt"])  # validation is never jittered


def test_held_out_triplet_is_the_middle_one_centre_cropped(videos):
    dataset = TripletDataset(_clips(videos)[:1], crop_size=32, max_frame_gap=2, deterministic=True)
    s = dataset[0]
    assert (s["gap"], s["start"]) == (2, 2)  # frames 2, 4, 6 of 9
    expected = _frames(FRAMES)[[2, 4, 6], 24:56, 24:56].permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(torch.stack([s["img0"], s["imgt"], s["img1"]]), expected, atol=2.5 / 255)


def test_unreadable_and_too_short_videos_are_skipped_and_counted(videos):
    paths = sorted(list_videos(videos))  # broken.mp4, clip0..2, short.mp4
    dataset = TripletDataset(paths, crop_size=32)
    sample = dataset[0]  # broken.mp4 -> clip0
    assert sample["index"] == 1 and "Cannot read video" in sample["skipped"][0]["reason"]
    sample = dataset[len(paths) - 1]  # short.mp4 -> (wraps) broken.mp4 -> clip0
    reasons = [s["reason"] for s in sample["skipped"]]
    assert "too short for a triplet: 2 frames" in reasons[0] and len(reasons) == 2 and sample["index"] == 1
    with pytest.raises(NoUsableVideoError, match="smaller than the 96x96 crop"):
        TripletDataset(_clips(videos)[:1], crop_size=96)[0]


def test_held_out_clips_left_out_are_counted_by_reason_in_the_last_line(videos):
    """A readable clip that is too short is not 'unreadable' (train-vfi's last line names each reason)."""
    from types import SimpleNamespace

    from opensora_plan.cli import _train_summary_line
    from opensora_plan.train.frame_task import FrameTrainTask

    paths = [videos / "short.mp4", videos / "clip0.mp4", videos / "broken.mp4"]
    task = SimpleNamespace(validation=TripletDataset(paths, crop_size=32, deterministic=True), _held_out=None,
                           held_out_unreadable=[], skipped=SimpleNamespace(run_report=dict))
    assert len(FrameTrainTask.held_out_samples(task)) == 1
    report = FrameTrainTask.run_report(task)
    assert report["held_out_left_out"] == {"too short": 1, "unreadable": 1} and report["held_out_unreadable"] == 1
    line = _train_summary_line({"step": 2, "skipped_steps": 0, "output_dir": "out", **report})
    assert "held-out loss over 1 clip (1 too short, 1 unreadable left out)" in line


def test_sr_pairs_are_bicubic_downscales_of_the_hr_crops(videos):
    dataset = SRPairDataset(_clips(videos), scale=2, crop_size=32)
    samples = SeededSamples(dataset, seed=0)
    for index in range(len(dataset)):
        s = samples[(0, index)]
        assert s["hr"].shape == (3, 32, 32) and s["lr"].shape == (3, 16, 16)
        # flips / transposes commute with the bicubic downscale; the LR was made from the whole frame, so
        # compare away from the crop border (where the whole frame's neighbours enter)
        lr = bicubic_degradation(s["hr"].unsqueeze(0), 2)[0]
        assert (lr - s["lr"])[:, 2:-2, 2:-2].abs().max() <= 1.01 / 255
        assert torch.equal(s["lr"], (s["lr"] * 255).round() / 255)  # 8-bit levels, like an image file
    with pytest.raises(ValueError, match="multiple of the scale 2"):
        SRPairDataset(_clips(videos), scale=2, crop_size=31)


@pytest.fixture(scope="module")
def tiny_vae():
    """A randomly initialised CausalVAE of the demo's width (4 channels, 8x spatial compression)."""
    from opensora_plan.models.causalvae import CausalVAEModel

    torch.manual_seed(0)
    return CausalVAEModel(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=0, resolution=64).eval()


def test_vae_degradation_is_the_bicubic_lr_through_a_fixed_vae_round_trip(tiny_vae):
    torch.manual_seed(3)
    hr = torch.rand(2, 3, 64, 48)
    lr = vae_degradation(hr, 2, None, vae=tiny_vae)
    assert lr.shape == (2, 3, 32, 24) and lr.dtype == torch.float32
    assert 0 <= lr.min() and lr.max() <= 1 and torch.equal(lr, quantise(lr))  # 8-bit levels
    with torch.no_grad():  # by hand: each frame a 1-frame video, the posterior's mean decoded
        x = bicubic_degradation(hr, 2).mul(2).sub(1).unsqueeze(2)
        expected = quantise((tiny_vae.decode(tiny_vae.encode(x).latent_dist.mode()).sample[:, :, 0] + 1) / 2)
    assert (lr - expected).abs().max() <= 1.01 / 255
    assert not torch.equal(lr, bicubic_degradation(hr, 2))
    # held-out clips and training draws give the same frame: nothing is random
    assert torch.equal(vae_degradation(hr, 2, torch.Generator().manual_seed(1), vae=tiny_vae), lr)
    assert torch.equal(vae_degradation(hr, 2, None, vae=tiny_vae), lr)
    # frames are degraded one by one (N is a batch of images), and odd LR sides are padded for the VAE
    assert (vae_degradation(hr[1:], 2, vae=tiny_vae) - lr[1:]).abs().max() <= 1.01 / 255
    odd = vae_degradation(torch.rand(1, 3, 84, 76), 2, vae=tiny_vae)
    assert odd.shape == (1, 3, 42, 38) and torch.equal(odd, quantise(odd))
    # latent noise: training draws only, a function of the generator; held-out clips get none
    noisy = [vae_degradation(hr, 2, torch.Generator().manual_seed(seed), vae=tiny_vae, latent_noise=0.5)
             for seed in (1, 1, 2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    assert not torch.equal(noisy[0], lr) and torch.equal(noisy[0], quantise(noisy[0]))
    assert torch.equal(vae_degradation(hr, 2, None, vae=tiny_vae, latent_noise=0.5), lr)


def test_bicubic_or_vae_draws_one_of_the_two_per_sample_and_holds_out_the_vae(tiny_vae):
    hr = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bicubic, vae = bicubic_degradation(hr, 2), vae_degradation(hr, 2, vae=tiny_vae)
    drawn = []
    for seed in range(16):
        lr = bicubic_or_vae_degradation(hr, 2, torch.Generator().manual_seed(seed), vae=tiny_vae)
        assert torch.equal(lr, bicubic) or torch.equal(lr, vae)
        drawn.append(torch.equal(lr, vae))
        again = bicubic_or_vae_degradation(hr, 2, torch.Generator().manual_seed(seed), vae=tiny_vae)
        assert torch.equal(again, lr)  # a function of the sample's generator
    assert 0 < sum(drawn) < len(drawn)
    assert torch.equal(bicubic_or_vae_degradation(hr, 2, None, vae=tiny_vae), vae)


def test_sr_pairs_with_the_vae_degradation(videos, tiny_vae):
    clips = _clips(videos)
    held = SRPairDataset(clips, scale=2, crop_size=32, degradation="vae", deterministic=True, vae=tiny_vae)
    a, b = held[0], held[0]
    assert a["lr"].shape == (3, 16, 16) and a["hr"].shape == (3, 32, 32) and torch.equal(a["lr"], b["lr"])
    from opensora_plan.data.video_io import VideoReader

    with VideoReader(clips[0]) as reader:  # the middle frame, as read back from the file
        whole = reader.get_frames([FRAMES // 2]).permute(0, 3, 1, 2).float() / 255
    expected = vae_degradation(whole, 2, vae=tiny_vae)[0, :, 12:28, 12:28]  # the centre crop of the whole LR
    assert torch.equal(a["lr"], expected)
    samples = SeededSamples(SRPairDataset(clips, scale=2, crop_size=32, degradation="bicubic_or_vae",
                                          vae=tiny_vae), seed=0)
    assert torch.equal(samples[(0, 1)]["lr"], samples[(0, 1)]["lr"])
    with pytest.raises(ValueError, match="needs a CausalVAE"):
        SRPairDataset(clips, scale=2, crop_size=32, degradation="vae")
    with pytest.raises(ValueError, match="takes no VAE"):
        SRPairDataset(clips, scale=2, crop_size=32, vae=tiny_vae)
    with pytest.raises(ValueError, match="vae_latent_noise must be >= 0"):
        SRPairDataset(clips, scale=2, crop_size=32, vae_latent_noise=0.3)


def test_losses_are_zero_for_a_perfect_prediction_and_census_ignores_brightness():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 24, 24)
    assert charbonnier_loss(image, image).item() == pytest.approx(1e-3)  # sqrt(eps)
    assert census_loss(image, image).item() == 0.0
    assert census_loss(image + 0.1, image).item() < 1e-6  # a brightness shift keeps every census sign
    assert census_loss(image.flip(-1), image).item() > 0.1


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def rgt_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rgt") / "tiny_rgt.json"
    path.write_text(json.dumps({"upscale": 2, "depth": [1, 1], "embed_dim": 32, "num_heads": [2, 2],
                                "split_size": [4, 8]}))
    return path


@pytest.fixture(scope="module")
def amt_size() -> str:
    from opensora_plan.models.amt import AMT_CONFIGS

    assert "AMT-Tiny" in AMT_CONFIGS
    return "AMT-Tiny"


# command, model option, crop: the smallest crops the tiny models take (AMT: sides >= 64, multiples of 16)
TASKS = {"train-vfi": ("amt_size", 64), "train-sr": ("rgt_config", 32)}


def _args(command: str, model: str, videos: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [command, "--video_path", str(videos), "--model_config", str(model), "--crop_size", str(TASKS[command][1]),
            "--max_train_steps", str(steps), "--train_batch_size", "2", "--mixed_precision", "no", "--report_to",
            "none", "--output_dir", str(out), *extra]


@pytest.mark.parametrize("command, steps, lr", [("train-vfi", 8, "1e-3"), ("train-sr", 30, "3e-4")])
def test_training_lowers_the_held_out_loss_and_logs_psnr_ssim(request, tmp_path, videos, held_out, command, steps, lr):
    model = request.getfixturevalue(TASKS[command][0])
    out = tmp_path / "run"
    assert main(_args(command, model, videos, out, steps, "--learning_rate", lr, "--validation_data", str(held_out),
                      "--validation_steps", str(steps))) == 0
    validation = [r for r in _log(out) if "val_psnr" in r]
    assert [r["step"] for r in validation] == [0, steps]  # the baseline, then the last step
    assert validation[1]["val_loss"] < validation[0]["val_loss"]
    assert validation[1]["val_psnr"] > validation[0]["val_psnr"] and 0 < validation[1]["val_ssim"] <= 1
    assert (out / "validation" / "validation.jsonl").is_file()
    options = json.loads((out / "options.json").read_text())
    assert options["task"] == {"train-vfi": "VFITrainTask", "train-sr": "SRTrainTask"}[command]
    assert options["task_options"]["num_validation_videos"] == 1
    assert options["extra"]["crop_size"] == TASKS[command][1]
    # the run's options.json is a --config file of the command that wrote it; resuming goes on from the last step
    assert main([command, "--config", str(out / "options.json"), "--max_train_steps", str(steps + 1),
                 "--resume_from_checkpoint", "latest"]) == 0
    assert _log(out)[-1]["step"] == steps + 1


@pytest.mark.parametrize("command", list(TASKS))
def test_resume_matches_the_uninterrupted_run_bit_for_bit(request, tmp_path, videos, command):
    model = request.getfixturevalue(TASKS[command][0])
    ema = ["--use_ema", "--ema_decay", "0.5", "--checkpointing_steps", "2", "--seed", "5", "--samples_per_video", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(command, model, videos, full, 3, *ema)) == 0
    assert main(_args(command, model, videos, part, 2, *ema)) == 0
    assert main(_args(command, model, videos, part, 3, *ema, "--resume_from_checkpoint", "latest")) == 0
    keys = ("loss", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in _log(full)] == [[r[k] for k in keys] for r in _log(part)]
    for name in ("model", "ema"):
        a, b = _weights(full / "checkpoint-3" / name), _weights(part / "checkpoint-3" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_fine_tuning_starts_from_official_checkpoint_files(tmp_path, videos, amt_size, rgt_config):
    """amt-g.pth holds {"state_dict": ...}, RGT_x2.pth {"params"/"params_ema": ...}; --model_config names a
    non-default architecture of such a file."""
    from opensora_plan.models.amt import AMTModel, build_amt
    from opensora_plan.models.rgt import RGTModel

    torch.manual_seed(1)
    amt = build_amt(amt_size)
    rgt = RGTModel.from_config(json.loads(rgt_config.read_text()))
    official = {"train-vfi": (amt, {"state_dict": amt.state_dict()}, amt_size, AMTModel),
                "train-sr": (rgt, {"params_ema": rgt.state_dict()}, rgt_config, RGTModel)}
    for command, (model, payload, config, cls) in official.items():
        path = tmp_path / f"{command}.pth"
        torch.save(payload, path)
        out = tmp_path / command
        args = _args(command, config, videos, out, 1, "--pretrained", str(path), "--learning_rate", "1e-3")
        assert main(args) == 0
        tuned = cls.from_pretrained(out / "checkpoint-1" / "model").state_dict()
        start = model.state_dict()
        assert tuned.keys() <= start.keys()
        changed = [k for k in tuned if not torch.equal(tuned[k], start[k])]
        assert changed, command  # one AdamW step moved the weights loaded from the file
        # a run's folder fine-tunes further (save_pretrained layout)
        again = tmp_path / f"{command}-again"
        folder_args = [a for a in _args(command, config, videos, again, 1) if a not in ("--model_config", str(config))]
        assert main([*folder_args, "--pretrained", str(out / "checkpoint-1" / "model")]) == 0


def test_user_errors_are_one_line_before_any_work(tmp_path, videos, capsys):
    base = ["--video_path", str(videos), "--output_dir", str(tmp_path / "x"), "--max_train_steps", "1"]
    assert main(["train-sr", *base]) == 1
    assert "train-sr needs --model_config" in capsys.readouterr().err
    assert main(["train-vfi", *base, "--model_config", "m", "--validation_videos", "1", "--validation_data",
                 str(videos)]) == 1
    assert "give one" in capsys.readouterr().err
    assert main(["train-vfi", *base, "--model_config", "m", "--max_frame_gap", "0"]) == 1
    assert "--max_frame_gap must be at least 1" in capsys.readouterr().err
    assert main(["train-sr", *base, "--model_config", "m", "--validation_steps", "10"]) == 1
    assert "--validation_steps 10 has no effect without held-out clips" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_sr_with_the_vae_degradation_and_its_one_line_errors(tmp_path, videos, held_out, rgt_config,
                                                                    tiny_vae, capsys):
    vae_dir = tmp_path / "model"  # a model folder with a vae/ subfolder is accepted, as train-t2v's --ae_path
    tiny_vae.save_pretrained(vae_dir / "vae")
    out = tmp_path / "run"
    assert main(_args("train-sr", rgt_config, videos, out, 2, "--degradation", "bicubic_or_vae", "--degradation_vae",
                      str(vae_dir), "--vae_latent_noise", "0.3", "--validation_data", str(held_out),
                      "--validation_steps", "2")) == 0
    assert [r["step"] for r in _log(out) if "val_psnr" in r] == [0, 2]
    extra = json.loads((out / "options.json").read_text())["extra"]
    assert extra["degradation"] == "bicubic_or_vae" and extra["degradation_vae"] == str(vae_dir.resolve())
    assert extra["vae_latent_noise"] == 0.3
    capsys.readouterr()

    from opensora_plan.models.rgt import RGTModel

    RGTModel.from_config(json.loads(rgt_config.read_text())).save_pretrained(tmp_path / "rgt")
    bad = tmp_path / "bad"
    base = _args("train-sr", rgt_config, videos, bad, 1)
    for extra_args, message in (
        (["--degradation", "vae"], "--degradation vae needs --degradation_vae"),
        (["--degradation", "bicubic_or_vae", "--degradation_vae", str(tmp_path / "nowhere")], "is not a CausalVAE folder"),
        (["--degradation", "vae", "--degradation_vae", str(tmp_path / "rgt")], "holds an RGTModel, not a CausalVAE"),
        (["--degradation_vae", str(vae_dir)], "--degradation_vae has no effect with --degradation bicubic"),
        (["--vae_latent_noise", "0.3"], "--vae_latent_noise has no effect with --degradation bicubic"),
        (["--degradation", "vae", "--degradation_vae", str(vae_dir), "--vae_latent_noise", "-1"], "must be in [0, 1]"),
        (["--degradation", "vae", "--degradation_vae", str(vae_dir), "--vae_latent_noise", "5"], "must be in [0, 1]"),
    ):
        assert main([*base, *extra_args]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not bad.exists()


@pytest.mark.slow
def test_two_processes_with_torchrun_keep_identical_replicas(tmp_path, videos, held_out, amt_size):
    """DDP over gloo for train-vfi (AMT has the more involved graph); the trainer compares replica hashes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "opensora_plan.cli", *_args("train-vfi", amt_size, videos, out, 2, "--validation_data", str(held_out),
                                           "--validation_steps", "2")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas hold identical weights" in result.stderr
    assert [r["step"] for r in _log(out)] == [0, 1, 2] and "val_psnr" in _log(out)[-1]


@pytest.mark.parametrize("command", ["train-sr", "train-vfi"])
def test_a_crop_larger_than_every_training_frame_is_one_error_before_any_output(request, tmp_path, videos, capsys,
                                                                                command):
    """It failed at the first sample, leaving options.json behind (QA); the videos are probed first."""
    model = request.getfixturevalue(TASKS[command][0])
    out = tmp_path / "run"
    argv = _args(command, model, videos, out, 1)
    argv[argv.index("--crop_size") + 1] = str(SIZE + 16)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--crop_size {SIZE + 16} is larger than the training frames" in err and f"{SIZE}x{SIZE}; use " in err
    assert f"--crop_size {SIZE} or less" in err
    assert not out.exists()


def test_train_sr_resume_may_switch_the_degradation_vae_off_and_on_again(tmp_path, videos, rgt_config, tiny_vae,
                                                                         caplog):
    """--degradation_vae is a data option (what the LR inputs look like), applied with a warning on resume like
    --degradation; under train-t2v's name --ae_path it was refused, so a run switched to bicubic could never
    return to the VAE degradation (QA 4)."""
    tiny_vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    vae = ["--degradation", "vae", "--degradation_vae", str(tmp_path / "vae"), "--checkpointing_steps", "1"]
    assert main(_args("train-sr", rgt_config, videos, out, 1, *vae)) == 0
    resume = ["--resume_from_checkpoint", "latest", "--checkpointing_steps", "1"]
    assert main(_args("train-sr", rgt_config, videos, out, 2, "--degradation", "bicubic", *resume)) == 0
    assert "--degradation vae -> bicubic" in caplog.text
    assert f"--degradation_vae {(tmp_path / 'vae').resolve()} -> None" in caplog.text  # switching off is named too
    switched = json.loads((out / "options.json").read_text())["resumes"][-1]["changed"]
    assert switched["degradation_vae"] == {"before": str((tmp_path / "vae").resolve()), "after": None}
    assert main(_args("train-sr", rgt_config, videos, out, 3, *vae, *resume)) == 0
    assert "--degradation bicubic -> vae" in caplog.text and "--degradation_vae None -> " in caplog.text
    extra = json.loads((out / "options.json").read_text())["extra"]
    assert extra["degradation"] == "vae" and extra["degradation_vae"] == str((tmp_path / "vae").resolve())
