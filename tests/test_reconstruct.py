"""Reconstruction: preprocessing transforms, the library function and the `reconstruct` CLI end to end.

Uses a random-weight CausalVAE built from the tiny fixture config and saved with ``save_pretrained``
(the quality numbers are meaningless; what is checked is plumbing, shapes, frame selection, metrics
and error handling).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from opensora_plan import cli
from opensora_plan.data.transforms import (
    center_crop,
    center_crop_to_multiple,
    frames_to_model_range,
    model_range_to_frames,
    resize_short_side,
)
from opensora_plan.data.video_io import VideoReader, write_video
from opensora_plan.metrics import psnr, ssim
from opensora_plan.pipelines.reconstruct import (
    load_clip,
    load_vae,
    quality,
    reconstruct,
    reconstruct_video,
)

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def indexed_clip(num_frames: int, height: int, width: int) -> np.ndarray:
    """Gradients plus the frame index burned into the top-left 16x16 block (value 4*t)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (xx * 3 + t * 5) % 256
        frames[t, ..., 1] = (yy * 4) % 256
        frames[t, ..., 2] = 90
        frames[t, :16, :16, :] = 4 * t
    return frames


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory, fixtures_dir):
    from opensora_plan.models.causalvae import CausalVAEModel

    config = json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text())
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    CausalVAEModel.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    write_video(path, indexed_clip(20, 40, 56), fps=10)
    return path


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def test_model_range_round_trip_is_exact_for_uint8():
    frames = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    video = frames_to_model_range(frames)
    assert video.shape == (3, 3, 5, 7) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(model_range_to_frames(video), frames)
    # Rounds instead of truncating (reference quirk fixed): 0.999 levels above 0 maps to 1, not 0.
    assert model_range_to_frames(torch.full((3, 1, 1, 1), -1 + 0.999 / 127.5)).flatten().tolist() == [1, 1, 1]


def test_resize_short_side_floors_the_long_side_and_antialiases():
    video = torch.rand(3, 2, 90, 161)
    out = resize_short_side(video, 45)
    assert out.shape == (3, 2, 45, 80)  # 161 * 45 / 90 = 80.5 -> 80
    assert resize_short_side(torch.rand(1, 161, 90), 45).shape == (1, 80, 45)
    # A 1-pixel checkerboard shrunk 3x averages to flat grey with antialias, but aliases without it.
    board = (torch.arange(60).view(1, 60) + torch.arange(60).view(60, 1)) % 2
    board = board.float().expand(1, 60, 60)
    assert resize_short_side(board, 20).std() < 0.1
    assert resize_short_side(board, 20, antialias=False).std() > 0.3


def test_center_crops():
    video = torch.arange(10 * 13).float().view(1, 10, 13)
    assert torch.equal(center_crop(video, 4), video[..., 3:7, 4:8])  # offsets round((10-4)/2), round(4.5)
    assert center_crop_to_multiple(video, 8).shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="Cannot center-crop 12x12"):
        center_crop(video, 12)


# --------------------------------------------------------------------------------------------
# Library
# --------------------------------------------------------------------------------------------


def test_load_clip_takes_strided_frames_from_zero_resized_and_cropped(clip_path):
    video, fps = load_clip(clip_path, num_frames=5, sample_rate=3, resolution=32)
    # 40x56 -> short side 32: 32x44 (44.8 floored) -> multiple of 8: 32x40.
    assert video.shape == (3, 5, 32, 40) and fps == pytest.approx(10)
    assert video.dtype == torch.float32 and -1 <= video.min() and video.max() <= 1
    # The burned-in index block (resized by 0.8 and center-cropped by 2 px) identifies the frames.
    block = (video[0, :, 2:9, 2:9].mean(dim=(1, 2)) + 1) * 127.5
    assert (block / 4).round().tolist() == [0, 3, 6, 9, 12]
    cropped, _ = load_clip(clip_path, num_frames=5, sample_rate=1, resolution=32, crop_size=24)
    assert cropped.shape == (3, 5, 24, 24)


def test_load_clip_rejects_short_videos(clip_path):
    with pytest.raises(ValueError, match=r"has 20 frames but 9 frames at sample rate 3 need 25"):
        load_clip(clip_path, num_frames=9, sample_rate=3, resolution=32)


def test_mode_reconstruction_is_the_plain_encode_decode_and_sampling_is_seeded(tiny_vae_dir, clip_path):
    vae = load_vae(tiny_vae_dir, device="cpu")
    video, _ = load_clip(clip_path, num_frames=5, sample_rate=1, resolution=16)
    with torch.no_grad():
        expected = vae.decode(vae.encode(video[None]).latent_dist.mode()).sample[0]
    assert torch.equal(reconstruct_video(vae, video), expected)
    a = reconstruct_video(vae, video, sample=True, generator=torch.Generator().manual_seed(1))
    b = reconstruct_video(vae, video, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, expected)
    psnr_db, ssim_value = quality(video, expected)
    to01 = lambda v: ((v.clamp(-1, 1) + 1) / 2).transpose(0, 1)  # noqa: E731
    assert psnr_db == pytest.approx(float(psnr(to01(video), to01(expected))))
    assert ssim_value == pytest.approx(float(ssim(to01(video), to01(expected))))


def test_load_vae_switches(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir, device="cpu", dtype="bf16", enable_tiling=True, tile_overlap_factor=0.5,
                   temporal_chunk=2, temporal_context=1, temporal_mode="approximate")
    assert vae.dtype == torch.bfloat16 and vae.use_tiling and vae.tile_overlap_factor == 0.5
    assert vae.temporal_chunk_latent_frames == 2 and vae.temporal_chunking_mode == "approximate" and not vae.training
    assert load_vae(tiny_vae_dir, device="cpu", temporal_chunk=3).temporal_chunking_mode == "lossless"
    with pytest.raises(ValueError, match="tile_overlap_factor"):
        load_vae(tiny_vae_dir, device="cpu", enable_tiling=True, tile_overlap_factor=1.0)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run_cli(capsys, *args):
    code = cli.main(["reconstruct", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_file_mode_writes_mp4_and_gif_and_prints_metrics(tiny_vae_dir, clip_path, tmp_path, capsys):
    rec = tmp_path / "out" / "rec.mp4"
    code, out, err = run_cli(capsys, "--model_path", tiny_vae_dir, "--video_path", clip_path, "--rec_path", rec,
                             "--num_frames", 9, "--sample_rate", 2, "--resolution", 24, "--gif", "--device", "cpu")
    assert code == 0, err
    match = re.search(r"9 frames 32x24\s+PSNR (\d+\.\d+) dB\s+SSIM (-?\d\.\d+)", out)
    assert match, out
    with VideoReader(rec) as reader:
        assert (reader.num_frames, reader.height, reader.width) == (9, 24, 32)
        assert reader.fps == pytest.approx(5)  # source 10 fps / sample rate 2
    with VideoReader(rec.with_suffix(".gif"), backend="pyav") as reader:
        assert reader.num_frames == 9
    # The printed PSNR is that of the (unquantised) reconstruction against the preprocessed input.
    vae = load_vae(tiny_vae_dir, device="cpu")
    video, _ = load_clip(clip_path, num_frames=9, sample_rate=2, resolution=24)
    assert float(match.group(1)) == pytest.approx(quality(video, reconstruct_video(vae, video))[0], abs=0.01)


def test_cli_folder_mode_skips_bad_files_and_writes_a_summary(tiny_vae_dir, clip_path, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(clip_path.read_bytes())
    write_video(videos / "b_short.mp4", indexed_clip(3, 40, 56), fps=10)
    (videos / "c_corrupt.mp4").write_bytes(b"not a video" * 50)
    write_video(videos / "d.mkv.mp4", indexed_clip(6, 32, 48), fps=8)
    (videos / "notes.txt").write_text("ignored")
    rec = tmp_path / "rec"
    code, out, err = run_cli(capsys, "--model_path", tiny_vae_dir, "--video_path", videos, "--rec_path", rec,
                             "--num_frames", 5, "--resolution", 16, "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in rec.iterdir()) == ["a.mp4", "d.mkv.mp4", "metrics.json"]
    summary = json.loads((rec / "metrics.json").read_text())
    assert summary["num_videos"] == 2
    assert [s["path"].split("/")[-1] for s in summary["skipped"]] == ["b_short.mp4", "c_corrupt.mp4"]
    assert "has 3 frames" in summary["skipped"][0]["reason"]
    assert summary["mean_psnr"] == pytest.approx(sum(r["psnr"] for r in summary["results"]) / 2)
    assert "skipped 2 files" in out and "c_corrupt.mp4" in out and "mean over 2 videos" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("short", "has 20 frames but 33 frames"),
        ("corrupt", "Cannot read video"),
        ("no_model", "does not exist"),
        ("bad_num_frames", "is not a length the VAE accepts"),
        ("missing_video", "--video_path"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(case, message, tiny_vae_dir, clip_path, tmp_path, capsys):
    video, model, num_frames = clip_path, tiny_vae_dir, 5
    if case == "short":
        num_frames = 33
    elif case == "corrupt":
        video = tmp_path / "corrupt.mp4"
        video.write_bytes(b"\x00" * 1000)
    elif case == "no_model":
        model = tmp_path / "no_such_vae"
    elif case == "bad_num_frames":
        num_frames = 8
    elif case == "missing_video":
        video = tmp_path / "missing.mp4"
    code, out, err = run_cli(capsys, "--model_path", model, "--video_path", video, "--rec_path", tmp_path / "o.mp4",
                             "--num_frames", num_frames, "--resolution", 16, "--device", "cpu")
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


def test_library_folder_mode_needs_a_separate_output_folder(tiny_vae_dir, clip_path, tmp_path):
    with pytest.raises(ValueError, match="must be a folder"):
        reconstruct(tiny_vae_dir, clip_path.parent, tmp_path / "x.mp4", num_frames=5, device="cpu")
    with pytest.raises(ValueError, match="is the input folder"):
        reconstruct(tiny_vae_dir, clip_path.parent, clip_path.parent, num_frames=5, device="cpu")


@pytest.mark.slow
def test_cli_tiling_and_temporal_chunking_reach_the_model(tiny_vae_dir, tmp_path, capsys):
    # 272 px > the 256 px tile size, so tiled encode and decode really run; 9 frames -> 3 latent
    # frames, decoded one at a time. Output must still be a full-size, full-length video.
    source = write_video(tmp_path / "big.mp4", indexed_clip(9, 272, 288), fps=9)
    rec = tmp_path / "rec.mp4"
    code, out, err = run_cli(capsys, "--model_path", tiny_vae_dir, "--video_path", source, "--rec_path", rec,
                             "--num_frames", 9, "--resolution", 272, "--enable_tiling", "--temporal_chunk", 1,
                             "--temporal_mode", "approximate", "--temporal_context", 1, "--device", "cpu", "--dtype", "bf16")
    assert code == 0, err
    assert "9 frames 288x272" in out
    with VideoReader(rec) as reader:
        assert (reader.num_frames, reader.height, reader.width) == (9, 272, 288)


@pytest.mark.slow
def test_vae_benchmark_script_prints_a_table_and_writes_json(fixtures_dir, tmp_path):
    # Smoke test of benchmarks/vae.py on the tiny config: one subprocess per (mode, phase).
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vae.py"
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--config", str(fixtures_dir / "causalvae_tiny_config" / "config.json"),
         "--sizes", "5x32x32", "--dtypes", "fp32", "--modes", "full,lossless,approximate", "--chunk", "1",
         "--context", "1", "--threads", "1", "--compare", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"5x32x32\s+fp32\s+full \|\s+\d+\.\d+", proc.stdout), proc.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["mode"], r["encode"] is None) for r in rows] == [("full", False), ("lossless", True), ("approximate", True)]
    assert rows[1]["decode"]["max_abs_diff"] <= 1e-4 < rows[2]["decode"]["max_abs_diff"]
    for row in rows:
        decode = row["decode"]
        assert decode["peak_bytes"] >= decode["before_bytes"] > 0 and decode["seconds"][0] > 0
