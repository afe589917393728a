"""Video reconstruction with the CausalVAE: read -> preprocess -> encode -> decode -> write + PSNR/SSIM.

Preprocessing follows the reference reconstruction script (spec 1.9): ``num_frames`` frames from
frame 0, every ``sample_rate``-th frame; values to ``[-1, 1]``; short side resized to ``resolution``
(bilinear, antialias); optional center crop to ``crop_size``. Two things differ on purpose:

* the frames are exactly ``0, sample_rate, 2*sample_rate, ...`` and a video with too few frames is an
  error (the reference silently reconstructs fewer frames);
* frame sizes that are not multiples of the VAE's spatial factor (8) are center-cropped down to one
  (the reference would return a larger, misaligned reconstruction).

The latent is the posterior *mode* (deterministic) unless ``sample=True`` (the reference's wrapper
always draws a sample). PSNR and SSIM compare the clamped float reconstruction with the preprocessed
input, both mapped to ``[0, 1]`` (before the uint8 quantisation of the written file).

Library entry points: :func:`reconstruct` (a file or a folder, what the CLI calls),
:func:`load_vae`, :func:`load_clip`, :func:`reconstruct_video`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from opensora_plan.utils import progress_bar

from ..data.transforms import (
    center_crop,
    center_crop_to_multiple,
    frames_to_model_range,
    model_range_to_frames,
    resize_short_side,
)
from ..data.video_io import (VIDEO_EXTENSIONS, VideoReader, check_fps, describe_gif, list_videos, write_gif,
                             write_video)
from ..metrics import psnr, ssim
from ..options import Options, option
from ..utils import atomic_write_bytes, check_finite, check_output_folder, parse_dtype, resolve_device, valid_num_frames
from .outputs import OVERWRITE_HELP, check_targets

logger = logging.getLogger(__name__)

SUMMARY_NAME = "metrics.json"


@dataclass
class ReconstructionResult:
    """One reconstructed video: where it came from and went, its size, quality and time."""

    input_path: str
    output_path: str
    gif_path: str | None
    num_frames: int
    height: int
    width: int
    psnr: float
    ssim: float
    seconds: float


@dataclass
class ReconstructionSummary:
    """Everything a run produced: per-video results, skipped files with reasons, and the means."""

    results: list[ReconstructionResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def mean_psnr(self) -> float | None:
        return sum(r.psnr for r in self.results) / len(self.results) if self.results else None

    @property
    def mean_ssim(self) -> float | None:
        return sum(r.ssim for r in self.results) / len(self.results) if self.results else None

    def to_dict(self) -> dict:
        return {
            "mean_psnr": self.mean_psnr,
            "mean_ssim": self.mean_ssim,
            "num_videos": len(self.results),
            "results": [asdict(r) for r in self.results],
            "skipped": [{"path": p, "reason": reason} for p, reason in self.skipped],
        }


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def load_vae(
    model_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "fp32",
    enable_tiling: bool = False,
    tile_overlap_factor: float = 0.25,
    temporal_chunk: int | None = None,
    temporal_context: int | None = None,
    temporal_mode: str = "lossless",
):
    """Load a CausalVAE folder (``config.json`` + weights) in eval mode with the requested switches.

    ``temporal_chunk`` latent frames per decode chunk (None/0: decode all frames at once), decoded in
    ``temporal_mode`` (``"lossless"``: equal to the full decode; ``"approximate"``: each chunk after
    ``temporal_context`` latent frames of context, default 4); see ``CausalVAEModel.enable_temporal_chunking``.
    """
    from ..models.causalvae import CausalVAEModel

    if not 0 <= tile_overlap_factor < 1:
        raise ValueError(f"tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}.")
    device, dtype = resolve_device(device), parse_dtype(dtype)
    vae = CausalVAEModel.from_pretrained(model_path, torch_dtype=dtype, device=device).eval()
    if enable_tiling:
        vae.enable_tiling()
        vae.tile_overlap_factor = tile_overlap_factor
    if temporal_chunk:
        vae.enable_temporal_chunking(temporal_chunk, temporal_context, mode=temporal_mode)
    return vae


def check_num_frames(num_frames: int, temporal_compression: int) -> None:
    """The CausalVAE takes 1 frame (an image) or 1 + k*temporal_compression frames."""
    if not valid_num_frames(num_frames, temporal_compression):
        valid = ", ".join(str(1 + temporal_compression * k) for k in (0, 1, 4, 16))
        raise ValueError(
            f"--num_frames {num_frames} is not a length the VAE accepts; use 1 + {temporal_compression}k "
            f"frames (e.g. {valid})."
        )


def load_clip(
    path: str | os.PathLike,
    num_frames: int,
    sample_rate: int = 1,
    resolution: int = 512,
    crop_size: int | None = None,
    spatial_multiple: int = 8,
    backend: str = "auto",
) -> tuple[torch.Tensor, float]:
    """Read and preprocess one clip -> (video ``(3, T, H, W)`` float32 in ``[-1, 1]``, source fps).

    Raises VideoReadError (a ValueError) for unreadable files and ValueError when the video is too short.
    """
    if sample_rate < 1:
        raise ValueError(f"--sample_rate must be >= 1, got {sample_rate}.")
    with VideoReader(path, backend=backend) as reader:
        needed = (num_frames - 1) * sample_rate + 1
        if reader.num_frames < needed:
            raise ValueError(
                f"{path} has {reader.num_frames} frames but {num_frames} frames at sample rate {sample_rate} "
                f"need {needed}; lower --num_frames or --sample_rate."
            )
        frames = reader.get_frames(range(0, needed, sample_rate))  # (T, H, W, 3) uint8
        fps = reader.fps
    video = frames_to_model_range(frames)  # (3, T, H, W) in [-1, 1]
    video = resize_short_side(video, resolution)
    if crop_size:
        video = center_crop(video, crop_size)
    cropped = center_crop_to_multiple(video, spatial_multiple)
    if cropped.shape != video.shape:
        logger.info(
            "%s: cropped %dx%d to %dx%d (the VAE needs sides that are multiples of %d)",
            path, video.shape[-1], video.shape[-2], cropped.shape[-1], cropped.shape[-2], spatial_multiple,
        )
    return cropped.contiguous(), fps


@torch.inference_mode()
def reconstruct_video(vae, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
    """Encode and decode one video ``(3, T, H, W)`` in ``[-1, 1]`` -> float32 ``(3, T, H, W)`` (not clamped).

    Uses the posterior mode, or a posterior sample drawn with ``generator`` when ``sample=True``.
    """
    x = video.unsqueeze(0).to(device=vae.device, dtype=vae.dtype)  # (1, 3, T, H, W)
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator) if sample else posterior.mode()  # (1, C, t, h, w)
    check_finite(z, "The VAE encoded the video to non-finite latents", vae.dtype)
    reconstruction = vae.decode(z).sample[0]
    check_finite(reconstruction, "The VAE decoded the latents to non-finite pixels", vae.dtype)
    return reconstruction.float().cpu()  # (3, T, H, W)


def quality(video: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) of a reconstruction against its input, both ``(3, T, H, W)`` in ``[-1, 1]``."""
    a = ((video.float() + 1) / 2).transpose(0, 1)  # (T, 3, H, W) in [0, 1]
    b = ((reconstruction.float().clamp(-1, 1) + 1) / 2).transpose(0, 1)
    return float(psnr(a, b)), float(ssim(a, b))


# --------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------


def _check_rec_folder(rec_path: Path) -> None:
    """--rec_path as an output folder: not a file, and not a name with a file suffix (out.txt, out.avi)."""
    if rec_path.suffix and not rec_path.is_dir():
        raise ValueError(f"--rec_path {rec_path} has the suffix {rec_path.suffix!r}: give an .mp4 file (one input "
                         "video) or a folder name without a suffix.")
    check_output_folder(rec_path, "--rec_path")


def output_names(sources: list[Path]) -> list[str]:
    """``<stem>.mp4`` per input, unique: inputs that share a stem (clip.avi, clip.mov) keep their suffix
    in the name (clip.avi.mp4, clip.mov.mp4) so no output overwrites another."""
    stems = [s.stem.lower() for s in sources]
    names = [f"{s.name}.mp4" if stems.count(s.stem.lower()) > 1 else f"{s.stem}.mp4" for s in sources]
    if len({n.lower() for n in names}) != len(names):  # e.g. a.mp4 next to a.mp4.mp4: refuse rather than overwrite
        raise ValueError(f"Inputs {', '.join(n for n in names if names.count(n) > 1)} would share an output name; "
                         "rename them.")
    return names


def _reconstruct_file(vae, source: Path, target: Path, gif: bool, fps: float | None, sample: bool,
                      generator: torch.Generator | None, clip_options: dict) -> ReconstructionResult:
    start = time.perf_counter()
    video, source_fps = load_clip(source, spatial_multiple=vae.spatial_compression, **clip_options)
    reconstruction = reconstruct_video(vae, video, sample=sample, generator=generator)
    psnr_db, ssim_value = quality(video, reconstruction)
    frames = model_range_to_frames(reconstruction)  # (T, H, W, 3) uint8
    out_fps = fps or (source_fps / clip_options["sample_rate"] if source_fps else 30.0)
    write_video(target, frames, out_fps)
    if gif and fps is None and (note := describe_gif(out_fps)):  # a given --fps was told before any work
        logger.warning("%s: %s", source.name, note)
    gif_path = write_gif(target.with_suffix(".gif"), frames, out_fps) if gif else None
    return ReconstructionResult(
        input_path=str(source), output_path=str(target), gif_path=str(gif_path) if gif_path else None,
        num_frames=frames.shape[0], height=frames.shape[1], width=frames.shape[2],
        psnr=psnr_db, ssim=ssim_value, seconds=time.perf_counter() - start,
    )


@dataclass
class ReconstructOptions(Options):
    """Every option of ``opensora-plan reconstruct`` / :func:`reconstruct`, with its default and checks."""

    COMMAND: ClassVar[str] = "reconstruct"
    CONFIG: ClassVar[bool] = True  # --config FILE holds any of these options

    model_path: str = option(help="CausalVAE folder (e.g. the release's vae/)")
    video_path: str = option(help="input video, or a folder of mp4/avi/webm/mkv/mov")
    rec_path: str = option(help="output .mp4 (file mode) or output folder")
    num_frames: int = option(65, help="frames to reconstruct, 1 + 4k")
    sample_rate: int = option(1, help="take every n-th frame from frame 0")
    resolution: int = option(512, help="the short side is resized to this many pixels (aspect kept); "
                             "then --crop_size, if given, centre-crops a square")
    crop_size: int | None = option(None, help="centre crop to a square of this size after resizing")
    enable_tiling: bool = option(False, help="spatial tiling (frames larger than 256 px)")
    tile_overlap_factor: float = option(0.25, help="tile overlap")
    temporal_chunk: int | None = option(0, help="decode this many latent frames at a time to bound memory (0: all "
                                        "at once)")
    temporal_mode: str = option("lossless", choices=["lossless", "approximate"],
                                help="lossless: same output as decoding all at once; approximate: per-chunk GroupNorm")
    temporal_context: int | None = option(None, help="approximate mode: latent frames of context decoded before each "
                                          "chunk and dropped (unset: 4)")
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)")
    dtype: str = option("fp32", choices=["fp32", "bf16", "fp16"], help="model dtype")
    sample: bool = option(False, help="decode a posterior sample instead of the mode")
    seed: int = option(0, help="seed for --sample")
    gif: bool = option(False, help="also write <name>.gif beside each mp4")
    overwrite: bool = option(False, help=OVERWRITE_HELP)
    fps: float | None = option(None, help="output fps (unset: source fps / sample_rate)")
    backend: str = option("auto", choices=["auto", "pyav", "decord"], help="video reader")

    def __post_init__(self):
        self.require_at_least(1, "num_frames", "sample_rate", "resolution")
        if self.temporal_chunk is not None and self.temporal_chunk < 0:
            raise ValueError(f"--temporal_chunk must be >= 0 (0: decode all at once), got {self.temporal_chunk}.")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps must be positive, got {self.fps}.")
        # Values with no effect are refused (a value equal to the default cannot be told from no value).
        if not self.sample and self.seed != 0:
            raise ValueError(f"--seed {self.seed} has no effect without --sample (the posterior mode is decoded); add "
                             "--sample or drop --seed.")
        if self.temporal_context is not None and self.temporal_mode != "approximate":
            raise ValueError("--temporal_context is used only by --temporal_mode approximate (lossless decoding needs "
                             "no context); add --temporal_mode approximate or drop --temporal_context.")


def reconstruct(*args, **kwargs) -> ReconstructionSummary:
    """Reconstruct one video file or every video in a folder with the CausalVAE at ``model_path``.

    File mode: ``rec_path`` is the output ``.mp4`` (or a folder to put ``<name>.mp4`` in); any problem
    raises. Folder mode (``video_path`` is a folder): outputs go to ``rec_path/<name>.mp4``, unreadable
    or too-short videos are skipped and listed, and ``rec_path/metrics.json`` holds the summary.
    ``fps`` of the output defaults to the source fps divided by ``sample_rate``.
    Takes a :class:`ReconstructOptions`, or its fields (model_path, video_path, rec_path positionally).
    """
    o = ReconstructOptions.of(*args, **kwargs)
    temporal_chunk = o.temporal_chunk or None  # 0: decode all at once
    from ..models.loading import resolve_model_folder

    resolve_model_folder(o.model_path, kind="CausalVAE", flag="--model_path")  # before any video is read
    video_path, rec_path = Path(o.video_path), Path(o.rec_path)
    if not video_path.exists():
        raise FileNotFoundError(f"--video_path {video_path} does not exist; give a video file or a folder of videos.")
    folder_mode = video_path.is_dir()
    if folder_mode:
        if rec_path.suffix.lower() == ".mp4":
            raise ValueError(f"--video_path {video_path} is a folder, so --rec_path must be a folder, not {rec_path}.")
        _check_rec_folder(rec_path)
        if rec_path.resolve() == video_path.resolve():
            raise ValueError(f"--rec_path {rec_path} is the input folder; choose another folder so no input is overwritten.")
        sources = list_videos(video_path)
        if not sources:
            raise ValueError(f"No videos ({'/'.join(VIDEO_EXTENSIONS)}) in {video_path}; point --video_path at a video "
                             "or a folder of them.")
        targets = [rec_path / name for name in output_names(sources)]
    else:
        if rec_path.suffix.lower() == ".mp4":
            target = rec_path
            check_output_folder(rec_path.parent, "--rec_path's folder")
        else:
            _check_rec_folder(rec_path)
            target = rec_path / f"{video_path.stem}.mp4"
        if target.resolve() == video_path.resolve():
            raise ValueError(f"--rec_path {target} is the input video itself; choose another output path.")
        sources, targets = [video_path], [target]
    if o.gif and any(t.with_suffix(".gif") == s for s, t in zip(sources, targets)):
        raise ValueError("--gif would overwrite an input .gif; choose another --rec_path.")
    # Every file the run writes: an existing one is refused without --overwrite, before the VAE loads.
    planned = targets + ([t.with_suffix(".gif") for t in targets] if o.gif else [])
    check_targets(sources, planned + ([rec_path / SUMMARY_NAME] if folder_mode else []), o.overwrite,
                  flag="--rec_path")
    if o.fps is not None and (note := check_fps(o.fps, gif=o.gif)):  # the formats' limits, before any model loads
        logger.warning(note)

    vae = load_vae(o.model_path, o.device, o.dtype, o.enable_tiling, o.tile_overlap_factor, temporal_chunk,
                   o.temporal_context, o.temporal_mode)
    check_num_frames(o.num_frames, vae.temporal_compression)
    generator = torch.Generator(device=vae.device).manual_seed(o.seed) if o.sample else None
    clip_options = dict(num_frames=o.num_frames, sample_rate=o.sample_rate, resolution=o.resolution,
                        crop_size=o.crop_size, backend=o.backend)

    summary = ReconstructionSummary()
    for source, target in progress_bar(list(zip(sources, targets)), desc="reconstruct", unit="video",
                               disable=not folder_mode):
        try:
            result = _reconstruct_file(vae, source, target, o.gif, o.fps, o.sample, generator, clip_options)
        except ValueError as err:  # VideoReadError, too few frames, crop too large: a bad input file
            if not folder_mode:
                raise
            logger.debug("skipping %s: %s", source, err)  # listed once at the end (outputs.skipped_lines)
            summary.skipped.append((str(source), str(err)))
            continue
        summary.results.append(result)
    if folder_mode:
        atomic_write_bytes(rec_path / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2).encode())
    return summary
