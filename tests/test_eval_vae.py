"""`opensora-plan eval-vae`: PSNR / SSIM / LPIPS over a folder, table + JSON, bad files skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opensora_plan.cli import main
from opensora_plan.data.video_io import write_video
from opensora_plan.models.causalvae import CausalVAEModel
from opensora_plan.models.lpips import load_lpips, lpips_state_dict_layouts, random_lpips
from opensora_plan.pipelines.evaluate_vae import REFERENCE_V1_0_0, evaluate_vae, lpips_video
from opensora_plan.pipelines.reconstruct import load_clip, load_vae, quality, reconstruct_video


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fixtures_dir):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text())
    vae = CausalVAEModel.from_config(config)
    vae.save_pretrained(str(root / "vae"))
    # clip length and size the VAE accepts, from its config: 1 + t frames, 4 latent pixels high
    frames_needed, size = 1 + vae.temporal_compression, 4 * vae.spatial_compression
    (root / "sizes.json").write_text(json.dumps({"frames": frames_needed, "size": size}))
    generator = torch.Generator().manual_seed(1)
    (root / "videos" / "class_b").mkdir(parents=True)
    length = frames_needed + 2
    for name in ("class_a/x.mp4", "class_b/y.mp4"):
        (root / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        base = torch.randint(0, 256, (1, size, size + 8, 3), generator=generator).float()
        frames = (base + 5 * torch.arange(length).view(length, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
        write_video(root / "videos" / name, frames, fps=8)
    (root / "videos" / "class_b" / "z.mkv").write_bytes(b"corrupt")
    save_file(lpips_state_dict_layouts(random_lpips(seed=4))["lpips"], root / "lpips.safetensors")
    return root


def _sizes(root: Path) -> tuple[int, int]:
    sizes = json.loads((root / "sizes.json").read_text())
    return sizes["frames"], sizes["size"]


def test_cli_table_json_and_skips(setup, capsys):
    out = setup / "metrics.json"
    frames, size = _sizes(setup)
    code = main(["eval-vae", "--model_path", str(setup / "vae"), "--video_path", str(setup / "videos"),
                 "--num_frames", str(frames), "--resolution", str(size), "--lpips_path", str(setup / "lpips.safetensors"),
                 "--json_out", str(out), "--device", "cpu"])
    assert code == 0
    table = capsys.readouterr().out
    for label in ("PSNR (dB)", "SSIM", "LPIPS", "27.171", "0.8290", "0.1060", "skipped 1"):
        assert label in table, label
    report = json.loads(out.read_text())
    assert report["num_videos"] == 2 and report["reference_v1_0_0"] == REFERENCE_V1_0_0
    assert [Path(v["path"]).name for v in report["videos"]] == ["x.mp4", "y.mp4"]
    assert report["skipped"][0]["path"].endswith("z.mkv")
    for metric in ("psnr", "ssim", "lpips"):
        values = [v[metric] for v in report["videos"]]
        assert report["mean"][metric] == pytest.approx(sum(values) / len(values))
    assert report["videos"][0]["num_frames"] == frames and report["videos"][0]["height"] == size


def test_scores_match_a_direct_computation(setup):
    frames, size = _sizes(setup)
    summary = evaluate_vae(setup / "vae", setup / "videos" / "class_a" / "x.mp4", num_frames=frames, resolution=size,
                           lpips_path=[setup / "lpips.safetensors"], device="cpu")
    vae = load_vae(setup / "vae", "cpu")
    video, _ = load_clip(setup / "videos" / "class_a" / "x.mp4", frames, 1, size)
    rec = reconstruct_video(vae, video)
    psnr_db, ssim_value = quality(video, rec)
    lpips = load_lpips(setup / "lpips.safetensors")
    per_frame = lpips(video.transpose(0, 1), rec.clamp(-1, 1).transpose(0, 1)).flatten()  # (T,)
    score = summary.scores[0]
    assert score.psnr == pytest.approx(psnr_db) and score.ssim == pytest.approx(ssim_value)
    assert score.lpips == pytest.approx(per_frame.mean().item(), rel=1e-5)
    assert lpips_video(lpips, video, rec, frames_per_batch=2) == pytest.approx(score.lpips, rel=1e-5)


def test_without_lpips_weights_reports_na_and_errors_are_clear(setup, capsys):
    summary = evaluate_vae(setup / "vae", setup / "videos", num_frames=1, resolution=_sizes(setup)[1], subset_size=1,
                           device="cpu")
    assert len(summary.scores) == 1 and summary.scores[0].lpips is None
    assert "n/a (no --lpips_path)" in summary.table()
    assert main(["eval-vae", "--model_path", str(setup / "vae"), "--video_path", str(setup / "nowhere")]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(["eval-vae", "--model_path", str(setup / "vae"), "--video_path", str(setup / "videos"),
                 "--num_frames", "2"]) == 1
    assert "--num_frames 2" in capsys.readouterr().err
