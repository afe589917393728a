"""CausalVAE training on the shared trainer: CLI end to end, checkpoints, exact resume, LPIPS from disk, data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opensora_plan.cli import main
from opensora_plan.data.video_io import write_video
from opensora_plan.models.causalvae import CausalVAEModel
from opensora_plan.models.lpips import lpips_state_dict_layouts, random_lpips
from opensora_plan.train.trainer import TrainConfig
from opensora_plan.data.datasets import NoUsableVideoError, VAEVideoDataset
from opensora_plan.data.video_io import list_videos
from opensora_plan.train.vae import VAETrainTask, train_vae, video_paths


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # accelerate keeps one process-wide state; runs with another --mixed_precision need it reset.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="module")
def tiny_config(fixtures_dir) -> Path:
    return fixtures_dir / "causalvae_tiny_config" / "config.json"


@pytest.fixture(scope="module")
def sizes(tiny_config) -> dict:
    """Clip lengths and crop size the tiny VAE accepts, derived from its config (not hard-coded)."""
    config = json.loads(tiny_config.read_text())
    temporal = 2 ** sum(bool(s) for s in config["encoder_temporal_downsample"])
    spatial = 2 ** sum(bool(s) for s in config["encoder_spatial_downsample"])
    # the 3-layer PatchGAN needs at least 32 px
    return {"clip": 1 + 2 * temporal, "short": 1 + temporal, "res": max(32, 4 * spatial)}


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory, sizes) -> Path:
    """Three short clips in nested folders (a bit larger than the crop) and one corrupt file."""
    root = tmp_path_factory.mktemp("videos")
    generator = torch.Generator().manual_seed(0)
    length, height, width = 2 * sizes["clip"], sizes["res"] + 8, sizes["res"] + 16
    for i, sub in enumerate(["a", "a", "b/c"]):
        base = torch.randint(0, 256, (1, height, width, 3), generator=generator).float()
        frames = (base + 4 * torch.arange(length).view(length, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
        (root / sub).mkdir(parents=True, exist_ok=True)
        write_video(root / sub / f"clip{i}.mp4", frames, fps=8)
    (root / "b" / "broken.webm").write_bytes(b"not a video")
    (root / "notes.txt").write_text("ignored")
    return root


def _config(out: Path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(out), max_train_steps=steps, checkpointing_steps=kw.pop("checkpointing_steps", steps),
                       mixed_precision=kw.pop("mixed_precision", "no"), report_to="none", seed=3, **kw)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_find_videos_is_recursive_and_filters_extensions(video_folder):
    names = [p.relative_to(video_folder).as_posix() for p in list_videos(video_folder, recursive=True)]
    assert names == ["a/clip0.mp4", "a/clip1.mp4", "b/broken.webm", "b/c/clip2.mp4"]


def test_json_data_path_gives_the_listed_videos(tmp_path, video_folder):
    listing = tmp_path / "data.json"
    listing.write_text(json.dumps([{"path": str(video_folder / "a" / "clip1.mp4"), "cap": ["x"]},
                                   {"path": "a/clip0.mp4", "cap": "y"}]))
    paths = video_paths(None, listing, video_folder=video_folder)
    assert paths == [video_folder / "a" / "clip1.mp4", video_folder / "a" / "clip0.mp4"]
    with pytest.raises(ValueError, match="exactly one of --video_path"):
        video_paths(video_folder, listing)


def test_dataset_crops_samples_and_reports_bad_videos(video_folder, sizes):
    paths = list_videos(video_folder, recursive=True)
    dataset = VAEVideoDataset(paths, num_frames=sizes["short"], resolution=sizes["res"], sample_rate=2)
    broken = [p.name for p in paths].index("broken.webm")
    sample = dataset[broken]
    assert sample["video"].shape == (3, sizes["short"], sizes["res"], sizes["res"])
    assert -1.0 <= sample["video"].min() and sample["video"].max() <= 1.0
    assert sample["index"] == broken + 1 and sample["skipped"][0]["path"].endswith("broken.webm")
    # frames too small for the crop are a bad sample too, not a crash
    big = 2 * sizes["res"]
    small = VAEVideoDataset(paths[:1], num_frames=1, resolution=big)
    with pytest.raises(NoUsableVideoError, match=f"smaller than the {big}x{big} crop"):
        small[0]
    # epoch report counts skipped samples seen by the generator phase, then resets
    task = VAETrainTask(vae=None, loss=None, dataset=dataset)
    task.skipped.update(sample["skipped"])
    assert task.epoch_report()["skipped_videos"] == 1 and task.epoch_report() == {}


def test_train_vae_cli_video_clips_checkpoint_loads(tmp_path, video_folder, tiny_config, sizes):
    out = tmp_path / "run"
    args = ["train-vae", "--video_path", str(video_folder), "--model_config", str(tiny_config),
            "--num_frames", str(sizes["clip"]), "--resolution", str(sizes["res"]), "--max_train_steps", "2",
            "--checkpointing_steps", "1",
            "--perceptual_weight", "0", "--disc_start", "1", "--mixed_precision", "no", "--output_dir", str(out),
            "--seed", "1", "--validation_videos", "1", "--validation_steps", "2"]
    assert main(args) == 0
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2]
    for key in ("loss", "nll_loss", "kl_loss", "g_loss", "d_weight", "grad_norm"):
        assert all(key in r for r in log), key
    # steps count once per batch: disc_start 1 -> off at the first batch (the discriminator phase, whose
    # gradients would all be 0, is not run), on at the second
    assert log[0]["disc_factor"] == 0.0 and "discriminator_loss" not in log[0]
    assert log[1]["disc_factor"] == 1.0 and log[1]["d_weight"] > 0 and log[1]["discriminator_loss"] > 0
    # held-out clip: PSNR/SSIM logged before training (the baseline) and at step 2, reconstructions and
    # scalars in TensorBoard
    validation = [json.loads(line) for line in (out / "validation" / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [0, 2] and validation[1]["psnr"] > 0
    assert any((out / "tensorboard").iterdir())
    options = json.loads((out / "options.json").read_text())
    assert options["task"] == "VAETrainTask" and options["task_options"]["disc_start"] == 1
    assert options["task_options"]["num_validation_videos"] == 1
    vae = CausalVAEModel.from_pretrained(out / "checkpoint-2" / "model")
    start = CausalVAEModel.from_pretrained(out / "checkpoint-1" / "model")
    assert vae.config.hidden_size == json.loads(tiny_config.read_text())["hidden_size"]
    assert any(not torch.equal(a, b) for a, b in zip(vae.state_dict().values(), start.state_dict().values()))
    loss_keys = load_file(str(out / "checkpoint-2" / "loss" / "diffusion_pytorch_model.safetensors")).keys()
    assert "logvar" in loss_keys and "discriminator.main.0.weight" in loss_keys
    assert not any(k.startswith("perceptual_loss.") for k in loss_keys)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, video_folder, tiny_config, sizes):
    common = dict(model_config=str(tiny_config), video_path=str(video_folder), num_frames=1, resolution=sizes["res"],
                  perceptual_weight=0.0, disc_start=1, learning_rate=1e-3)
    full, part = tmp_path / "full", tmp_path / "part"
    train_vae(_config(full, 2), **common)
    train_vae(_config(part, 1), **common)
    train_vae(_config(part, 2, resume_from_checkpoint="latest"), **common)
    keys = ("loss", "discriminator_loss", "nll_loss", "kl_loss", "d_weight", "grad_norm")
    assert [[r.get(k) for k in keys] for r in _log(full)] == [[r.get(k) for k in keys] for r in _log(part)]
    for name in ("model", "loss"):
        a = load_file(str(full / "checkpoint-2" / name / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(part / "checkpoint-2" / name / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lpips_from_disk_in_bf16(tmp_path, video_folder, tiny_config, sizes):
    layouts = lpips_state_dict_layouts(random_lpips(seed=5))
    save_file(layouts["torchvision"], tmp_path / "vgg16.safetensors")
    save_file(layouts["heads"], tmp_path / "lpips_heads.safetensors")
    out = tmp_path / "run"
    summary = train_vae(_config(out, 1, mixed_precision="bf16"), model_config=str(tiny_config),
                        video_path=str(video_folder), num_frames=1, resolution=sizes["res"], perceptual_weight=1.0,
                        lpips_path=[str(tmp_path / "vgg16.safetensors"), str(tmp_path / "lpips_heads.safetensors")])
    assert summary["step"] == 1
    record = _log(out)[0]
    assert record["nll_loss"] > 0 and torch.isfinite(torch.tensor(record["loss"]))
    loss_keys = load_file(str(out / "checkpoint-1" / "loss" / "diffusion_pytorch_model.safetensors")).keys()
    assert "perceptual_loss.lin0.model.1.weight" in loss_keys  # the official loss.* layout, minus the prefix


def test_user_errors_are_one_line(tmp_path, video_folder, tiny_config, capsys):
    base = ["train-vae", "--video_path", str(video_folder), "--model_config", str(tiny_config), "--output_dir",
            str(tmp_path / "x")]
    assert main(base + ["--lpips_path", str(tmp_path / "nope.pth")]) == 1
    assert "nope.pth does not exist" in capsys.readouterr().err
    assert main(base + ["--perceptual_weight", "0", "--num_frames", "2"]) == 1
    assert "--num_frames 2 is not a length" in capsys.readouterr().err
    assert main(["train-vae", "--video_path", str(video_folder), "--perceptual_weight", "0", "--output_dir", "x"]) == 1
    assert "needs --model_config" in capsys.readouterr().err


def test_learning_rates_follow_base_lr_and_time_multiplier():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            self.time_mix = torch.nn.Linear(2, 2)  # a parameter name containing "time"

    from opensora_plan.models.causalvae.losses import LPIPSWithDiscriminator

    toy = Toy()
    loss = LPIPSWithDiscriminator(None, perceptual_weight=0.0, disc_ndf=8)
    generator, discriminator = VAETrainTask(toy, loss, dataset=[], learning_rate=3e-5).phases()
    base, time_group = generator.optimizer.param_groups
    assert base["lr"] == 3e-5 and time_group["lr"] == pytest.approx(3e-4)
    assert {id(p) for p in time_group["params"]} == {id(p) for p in toy.time_mix.parameters()}
    assert {id(p) for p in base["params"]} == {id(p) for p in toy.conv.parameters()} | {id(loss.logvar)}
    assert generator.optimizer.defaults["betas"] == (0.5, 0.9) and generator.max_grad_norm == 1.0
    assert discriminator.optimizer.param_groups[0]["lr"] == 3e-5
    assert {id(p) for p in discriminator.params} == {id(p) for p in loss.discriminator.parameters()}
    assert discriminator.models == ("loss",) and generator.models == ("model", "loss")


def test_pretrained_official_file_also_fills_logvar_and_discriminator(tmp_path, tiny_config):
    """An official-layout VAE file carries loss.* tensors: the VAE loads without them, the loss module from them."""
    from opensora_plan.models.causalvae.losses import LPIPSWithDiscriminator
    from opensora_plan.train.vae import build_vae, load_pretrained_loss_state

    torch.manual_seed(0)
    CausalVAEModel.from_config(json.loads(tiny_config.read_text())).save_pretrained(str(tmp_path / "vae"))
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    source = LPIPSWithDiscriminator(random_lpips(seed=1), logvar_init=0.25)
    official = {f"loss.{k}": v.contiguous() for k, v in source.state_dict().items()}
    save_file({**load_file(str(weights)), **official}, weights)

    vae = build_vae(None, tmp_path / "vae")
    assert not any(k.startswith("loss.") for k in vae.state_dict())
    target = LPIPSWithDiscriminator(None, perceptual_weight=0.0)
    assert load_pretrained_loss_state(target, tmp_path / "vae")
    assert target.logvar.item() == 0.25
    for key, value in target.discriminator.state_dict().items():
        assert torch.equal(value, source.discriminator.state_dict()[key]), key


@pytest.mark.slow
def test_two_processes_with_torchrun_keep_identical_replicas(tmp_path, video_folder, tiny_config, sizes):
    """DDP over gloo: both the VAE and the loss module are wrapped; the trainer checks replica hashes."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "opensora_plan.cli", "train-vae", "--video_path", str(video_folder), "--model_config",
               str(tiny_config), "--num_frames", str(sizes["short"]), "--resolution", str(sizes["res"]),
               "--max_train_steps", "2",
               "--perceptual_weight", "0", "--disc_start", "1", "--mixed_precision", "no", "--report_to", "none",
               "--output_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas hold identical weights" in result.stderr
    assert [r["step"] for r in _log(out)] == [1, 2]
    CausalVAEModel.from_pretrained(out / "checkpoint-2" / "model")
