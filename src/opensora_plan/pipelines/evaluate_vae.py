"""VAE evaluation over a folder of videos: PSNR, SSIM and (with weights) LPIPS of reconstructions.

What ``opensora-plan eval-vae`` runs. Each video is read and preprocessed as the reference's
reconstruction scripts do (spec 1.9, via :mod:`opensora_plan.pipelines.reconstruct`: ``num_frames``
frames from frame 0 every ``sample_rate``-th frame, short side resized to ``resolution``, optional
center crop), encoded, decoded from the posterior mode (``sample=True``: a posterior sample, as the
reference's evaluation did), and scored frame by frame against the preprocessed input:

* PSNR and SSIM on frames mapped to [0, 1] (:mod:`opensora_plan.metrics`);
* LPIPS (VGG16, :mod:`opensora_plan.models.lpips`) on frames in [-1, 1], averaged over frames.

Per-video scores are averaged over videos. The numbers the reference reported for v1.0.0
(:data:`REFERENCE_V1_0_0`) were measured on 100 Kinetics-400 validation clips, which are not
shipped here; the table shows them next to the measured values for orientation only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from opensora_plan.utils import progress_bar

from ..options import Options, option
from ..utils import atomic_write_bytes
from .reconstruct import check_num_frames, load_clip, load_vae, quality, reconstruct_video
from .outputs import OVERWRITE_HELP, check_output_file

logger = logging.getLogger(__name__)

# Open-Sora-Plan v1.0.0 report, CausalVAE on 100 Kinetics-400 validation clips (spec 1.9).
REFERENCE_V1_0_0 = {"psnr": 27.171, "ssim": 0.829, "lpips": 0.106}


@dataclass
class VideoScore:
    path: str
    num_frames: int
    height: int
    width: int
    psnr: float
    ssim: float
    lpips: float | None


@dataclass
class EvaluationSummary:
    """Per-video scores, skipped files (path, reason), the settings used, and the means."""

    scores: list[VideoScore] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def mean(self, metric: str) -> float | None:
        values = [getattr(s, metric) for s in self.scores if getattr(s, metric) is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        return {
            "num_videos": len(self.scores),
            "mean": {m: self.mean(m) for m in ("psnr", "ssim", "lpips")},
            "reference_v1_0_0": REFERENCE_V1_0_0,
            "settings": self.settings,
            "videos": [asdict(s) for s in self.scores],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    def table(self) -> str:
        """Plain-text table: metric, this model, the reference's v1.0.0 number."""
        rows = [("metric", f"this VAE ({len(self.scores)} videos)", "v1.0.0 report (100 K400 val clips)")]
        for metric, label, fmt in (("psnr", "PSNR (dB) ^", "{:.3f}"), ("ssim", "SSIM ^", "{:.4f}"), ("lpips", "LPIPS v", "{:.4f}")):
            value = self.mean(metric)
            rows.append((label, "n/a (no --lpips_path)" if value is None else fmt.format(value),
                         fmt.format(REFERENCE_V1_0_0[metric])))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable/too-short videos: " + ", ".join(p for p, _ in self.skipped))
        return "\n".join(lines)


@torch.no_grad()
def lpips_video(lpips, video: torch.Tensor, reconstruction: torch.Tensor, frames_per_batch: int = 16) -> float:
    """Mean per-frame LPIPS of two (3, T, H, W) videos in [-1, 1] (the reconstruction is clamped)."""
    from ..metrics import check_value_range

    check_value_range(video, -1.0, 1.0, "lpips_video: the video")  # the reconstruction is clamped below
    a = video.float().transpose(0, 1)  # (T, 3, H, W)
    b = reconstruction.float().clamp(-1, 1).transpose(0, 1)
    device = next(lpips.parameters()).device
    total = 0.0
    for start in range(0, a.shape[0], frames_per_batch):
        chunk = slice(start, start + frames_per_batch)
        total += float(lpips(a[chunk].to(device), b[chunk].to(device)).sum())
    return total / a.shape[0]


@dataclass
class EvalVAEOptions(Options):
    """Every option of ``opensora-plan eval-vae`` / :func:`evaluate_vae`, with its default and checks."""

    COMMAND: ClassVar[str] = "eval-vae"
    CONFIG: ClassVar[bool] = True  # --config FILE holds any of these options

    model_path: str = option(help="CausalVAE folder (config.json + weights)")
    video_path: str = option(help="a video file or a folder of videos (recursive)")
    num_frames: int = option(17, help="frames per clip from frame 0, 1 + 4k")
    sample_rate: int = option(1, help="take every n-th frame")
    resolution: int = option(336, help="the short side is resized to this many pixels (aspect kept)")
    crop_size: int | None = option(None, help="centre crop to a square of this size after resizing")
    lpips_path: list[str] | None = option(None, help="LPIPS weight file(s); without them LPIPS is not computed")
    subset_size: int | None = option(None, help="evaluate only the first N videos (sorted by path)")
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)")
    dtype: str = option("fp32", choices=["fp32", "bf16", "fp16"], help="model dtype")
    sample: bool = option(False, help="decode a posterior sample instead of the mean")
    seed: int = option(0, help="seed for --sample")
    enable_tiling: bool = option(False, help="spatial tiling")
    tile_overlap_factor: float = option(0.25, help="tile overlap")
    json_out: str | None = option(None, help="write the per-video scores and means here (JSON)")
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        self.require_at_least(1, "num_frames", "sample_rate", "resolution", "subset_size")
        if self.json_out:
            check_output_file(self.json_out, "--json_out", self.overwrite)  # before the VAE loads
        elif self.overwrite:
            raise ValueError("--overwrite has no effect without --json_out; add --json_out or drop --overwrite.")


def evaluate_vae(*args, **kwargs) -> EvaluationSummary:
    """Score the CausalVAE at ``model_path`` on one video or every video under a folder (recursive).

    Unreadable or too-short videos are skipped and listed. ``subset_size`` keeps the first N videos
    (sorted by path). ``json_out`` receives :meth:`EvaluationSummary.to_dict`.
    Takes an :class:`EvalVAEOptions`, or its fields (model_path, video_path positionally).
    """
    o = EvalVAEOptions.of(*args, **kwargs)
    from ..models.lpips import load_lpips
    from ..data.video_io import VIDEO_EXTENSIONS, list_videos
    from ..models.loading import resolve_model_folder

    resolve_model_folder(o.model_path, kind="CausalVAE", flag="--model_path")  # before any video is read

    video_path = Path(o.video_path)
    if not video_path.exists():
        raise FileNotFoundError(f"--video_path {video_path} does not exist; give a video file or a folder of videos.")
    sources = list_videos(video_path, recursive=True) if video_path.is_dir() else [video_path]
    if o.subset_size:
        sources = sources[:o.subset_size]
    if not sources:
        raise ValueError(f"No videos ({'/'.join(VIDEO_EXTENSIONS)}) under {video_path}; point --video_path at a folder of videos.")
    lpips = load_lpips(o.lpips_path, device=None) if o.lpips_path else None
    vae = load_vae(o.model_path, o.device, o.dtype, o.enable_tiling, o.tile_overlap_factor)
    check_num_frames(o.num_frames, vae.temporal_compression)
    if lpips is not None:
        lpips.to(vae.device)
    generator = torch.Generator(device=vae.device).manual_seed(o.seed) if o.sample else None

    summary = EvaluationSummary(settings=dict(
        model_path=str(o.model_path), video_path=str(video_path), num_frames=o.num_frames, sample_rate=o.sample_rate,
        resolution=o.resolution, crop_size=o.crop_size, dtype=o.dtype, sample=o.sample, seed=o.seed,
        enable_tiling=o.enable_tiling, lpips=bool(o.lpips_path),
    ))
    for source in progress_bar(sources, desc="eval-vae", unit="video"):
        try:
            video, _ = load_clip(source, o.num_frames, o.sample_rate, o.resolution, o.crop_size,
                                 spatial_multiple=vae.spatial_compression)
        except ValueError as err:  # VideoReadError or too few frames: a bad input, not a bad run
            logger.warning("skipping %s: %s", source, err)
            summary.skipped.append((str(source), str(err)))
            continue
        reconstruction = reconstruct_video(vae, video, sample=o.sample, generator=generator)  # (3, T, H, W)
        psnr_db, ssim_value = quality(video, reconstruction)
        summary.scores.append(VideoScore(
            path=str(source), num_frames=video.shape[1], height=video.shape[2], width=video.shape[3],
            psnr=psnr_db, ssim=ssim_value,
            lpips=lpips_video(lpips, video, reconstruction) if lpips is not None else None,
        ))
    if o.json_out:
        atomic_write_bytes(o.json_out, json.dumps(summary.to_dict(), indent=2).encode())
    return summary
