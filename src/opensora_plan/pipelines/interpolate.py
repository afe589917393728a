"""Frame interpolation with AMT (Open-Sora-Plan v1.0.0's AMT-G): m frames -> 2^n (m - 1) + 1 frames.

Recursive doubling as in the official ``interpolation.py``: each pass puts the model's t = 0.5 frame
between every two consecutive frames; pass k's float frames are the inputs of pass k + 1 (no uint8 round
trip). Frames are replicate-padded (centred split, the extra pixel at the end) to a multiple of 16 and
cropped back at the end, as the weights expect. Fixes against the official driver (docs/interpolation.md):

* uint8 output is **rounded** (the official ``tensor2img`` truncates, a -1/2 LSB bias); ``quantize=
  "truncate"`` reproduces it for parity;
* frames are padded up to the smallest size the correlation pyramid handles (128 px for AMT-G), so small
  frames (e.g. 64x64) work instead of giving an all-NaN frame;
* no memory-based silent down-scaling: ``scale_factor`` is an explicit option; the correlation is
  computed in exact chunks (``corr_chunk``) to bound memory instead;
* the device is passed in (the official function reads a global that only exists under ``__main__``),
  checkpoints load with ``map_location="cpu"``, pairs are streamed and batched (not all frames kept on
  the device), and the output fps follows the source (times the factor) unless ``fps`` is given.

Library entry points: :func:`interpolate_video` (a tensor of frames, usable after a VAE decode),
:func:`load_interpolation_model`, :func:`interpolate` (files or a folder, what the CLI calls).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..data.video_io import VIDEO_EXTENSIONS, VideoReader, list_videos, write_video
from ..options import Options, option
from ..utils import (check_output_folder, parse_dtype, plural, progress_bar, require_cuda_for_autocast,
                     resolve_device)
from .outputs import OVERWRITE_HELP, RunResults, check_targets, folder_output, single_output

logger = logging.getLogger(__name__)

FACTORS = (2, 4, 8)
QUANTIZE_MODES = ("round", "truncate")


# --------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Padding:
    """Replicate padding of (H, W) frames to ``padded_hw``: [left, right, top, bottom] margins (the official
    ``InputPadder`` split: floor(p / 2) before, the rest after)."""

    lrtb: tuple[int, int, int, int]
    padded_hw: tuple[int, int]

    @classmethod
    def for_size(cls, height: int, width: int, multiple: int = 16, min_size: int = 0) -> Padding:
        def side(n: int) -> int:
            return max(math.ceil(n / multiple), math.ceil(min_size / multiple)) * multiple

        ph, pw = side(height) - height, side(width) - width
        return cls((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), (height + ph, width + pw))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, list(self.lrtb), mode="replicate") if any(self.lrtb) else x

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.lrtb
        h, w = x.shape[-2:]
        return x[..., top:h - bottom, left:w - right]


def padding_for(model, height: int, width: int, scale_factor: float = 1.0) -> Padding:
    """The padding ``model`` needs for (height, width) frames at ``scale_factor``: sides a multiple of
    16 / scale_factor (the official divisor) and at least the model's minimum size / scale_factor."""
    divisor = round(model.size_multiple / scale_factor)
    return Padding.for_size(height, width, divisor, math.ceil(model.min_size / scale_factor))


def check_scale_factor(scale_factor: float, flag: str = "--scale_factor") -> None:
    """scale_factor must be in (0, 1] with 16 / scale_factor a whole number (the padding divisor)."""
    if not 0 < scale_factor <= 1 or abs(16 / scale_factor - round(16 / scale_factor)) > 1e-9:
        raise ValueError(f"{flag} must be 16/k for a whole k >= 16 (1, 0.5, 0.25, 0.8, ...), got {scale_factor}; "
                         "the estimation size must stay a multiple of 16.")


# --------------------------------------------------------------------------------------------
# Frames in, frames out
# --------------------------------------------------------------------------------------------


def to_uint8(frames: torch.Tensor, quantize: str = "round") -> torch.Tensor:
    """(T, 3, H, W) floats in [0, 1] -> (T, H, W, 3) uint8; ``"truncate"`` reproduces the official driver."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}.")
    scaled = frames.float() * 255.0
    scaled = scaled.round() if quantize == "round" else scaled
    return scaled.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def num_output_frames(num_frames: int, factor: int) -> int:
    """``factor`` = 2^n: 2^n (m - 1) + 1 frames from m."""
    return factor * (num_frames - 1) + 1


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def interpolate_video(model, frames: torch.Tensor, factor: int = 2, *, batch_size: int = 1, scale_factor: float = 1.0,
                      dtype: str | torch.dtype = "fp32", quantize: str = "round", corr_chunk: int | None = None,
                      progress: bool = True) -> torch.Tensor:
    """Insert ``factor - 1`` frames between every two frames of a video with an AMT ``model``.

    ``frames``: (T, H, W, 3) uint8 (returned as uint8, ``quantize`` "round" or "truncate") or (T, 3, H, W)
    floats in [0, 1] (returned as floats, not quantised). Returns factor * (T - 1) + 1 frames in the
    input's layout, on the CPU. ``factor``: 2, 4 or 8 (1, 2 or 3 doubling passes). Pairs run ``batch_size``
    at a time on the model's device, under autocast when ``dtype`` is bf16/fp16 (CUDA); only the frames of
    ``batch_size`` source intervals are on the device at once. ``corr_chunk``: correlation chunk size in
    source pixels at 1/8 resolution (None: the whole volume; same output, bounded memory).
    """
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {', '.join(map(str, FACTORS))} (2^n new frames), got {factor}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    check_scale_factor(scale_factor, "scale_factor")
    is_uint8 = frames.dtype == torch.uint8
    if is_uint8 and (frames.ndim != 4 or frames.shape[-1] != 3):
        raise ValueError(f"uint8 frames must be (T, H, W, 3), got {tuple(frames.shape)}.")
    if not is_uint8 and (frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point()):
        raise ValueError(f"Frames must be (T, H, W, 3) uint8 or (T, 3, H, W) float in [0, 1], got "
                         f"{tuple(frames.shape)} {frames.dtype}.")
    if frames.shape[0] < 2:
        raise ValueError(f"Interpolation needs at least 2 frames, got {frames.shape[0]}.")
    amp_dtype = parse_dtype(dtype)
    device = next(model.parameters()).device
    require_cuda_for_autocast(amp_dtype, device, "interpolate")
    # The official conversion: uint8 / 255 (bit-identical floats), channels first.
    video = frames.permute(0, 3, 1, 2).float() / 255.0 if is_uint8 else frames.float()  # (T, 3, H, W)
    padding = padding_for(model, video.shape[-2], video.shape[-1], scale_factor)
    passes = int(math.log2(factor))
    previous_chunk = model.corr_chunk_size
    model.set_correlation_chunk(corr_chunk)
    try:
        result = _double(model, video, padding, passes, batch_size, scale_factor, device, amp_dtype, progress)
    finally:
        model.set_correlation_chunk(previous_chunk)
    return to_uint8(result, quantize) if is_uint8 else result


def _double(model, video: torch.Tensor, padding: Padding, passes: int, batch_size: int, scale_factor: float,
            device: torch.device, amp_dtype: torch.dtype, progress: bool) -> torch.Tensor:
    """``passes`` doubling passes over (T, 3, H, W) floats -> (2^passes (T - 1) + 1, 3, H, W) on the CPU.

    Works through ``batch_size`` source intervals at a time: the frames between two source frames depend only
    on those two, so doing every pass for a few intervals equals the official pass-by-pass order over the
    whole video, with only those intervals' frames on the device."""
    factor = 2**passes
    intervals = video.shape[0] - 1
    outputs = [video[:1]]
    bar = progress_bar(total=intervals * (factor - 1), desc="interpolate", unit="pair", disable=not progress)
    for start in range(0, intervals, batch_size):
        stop = min(start + batch_size, intervals)
        # Frames of these source intervals on the device, padded: (k + 1, 3, Hp, Wp)
        chunk = padding.pad(video[start:stop + 1].to(device))
        for _ in range(passes):
            middles = []
            for i in range(0, chunk.shape[0] - 1, batch_size):
                j = min(i + batch_size, chunk.shape[0] - 1)
                with _autocast(device, amp_dtype):
                    out = model(chunk[i:j], chunk[i + 1:j + 1], 0.5, scale_factor=scale_factor).imgt_pred
                middles.append(out.float())
                bar.update(j - i)
            middles = torch.cat(middles, 0)  # (k, 3, Hp, Wp)
            merged = torch.empty((2 * chunk.shape[0] - 1, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
            merged[0::2], merged[1::2] = chunk, middles
            chunk = merged
        outputs.append(padding.unpad(chunk[1:]).cpu())
    bar.close()
    return torch.cat(outputs, 0)  # (factor * (T - 1) + 1, 3, H, W)


def load_interpolation_model(model_path: str | os.PathLike, device: str | torch.device | None = None):
    """An AMT model from the official checkpoint file (``amt-g.pth``) or a ``save_pretrained`` folder, in eval
    mode on ``device`` (unset: CUDA when available)."""
    from ..models.amt import AMTModel

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    path = Path(model_path)
    if path.is_dir():
        return AMTModel.from_pretrained(path, device=device)
    return AMTModel.from_official_checkpoint(path, device=device)


# --------------------------------------------------------------------------------------------
# Whole runs (files or a folder)
# --------------------------------------------------------------------------------------------


@dataclass
class InterpolationResult:
    """One interpolated video."""

    input_path: str
    output_path: str
    num_frames_in: int
    num_frames_out: int
    fps: float
    seconds: float


class InterpolationResults(RunResults):
    """The :class:`InterpolationResult` of every written video (a list), and ``skipped``: ``(path, reason)`` of
    every input of a folder that could not be interpolated (unreadable, fewer than 2 frames, odd sides)."""


@dataclass
class InterpolateOptions(Options):
    """Every option of ``opensora-plan interpolate`` / :func:`interpolate`, with its default and checks."""

    COMMAND: ClassVar[str] = "interpolate"
    CONFIG: ClassVar[bool] = True

    input: str = option(help="input video, or a folder of videos", positional=True)
    model_path: str | None = option(None, help="AMT weights: the official amt-g.pth, or a save_pretrained folder "
                                    "(unset: the small model the shipped demo lists in its demo.json stages, "
                                    "trained on the demo's shapes only; docs/demo.md)", show_default=False)
    output: str | None = option(None, help="output .mp4 (one input video) or folder (unset: <input>_interp_x<factor>.mp4 "
                                "beside a video, <input>_interp_x<factor>/ for a folder)", show_default=False)
    factor: int = option(2, choices=list(FACTORS), help="frame-rate multiplier: 2^n (m - 1) + 1 frames from m")
    fps: float | None = option(None, help="output fps (unset: input fps x factor)", show_default=False)
    batch_size: int = option(1, help="frame pairs per model call")
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)", show_default=False)
    dtype: str = option("fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype (bf16/fp16: CUDA only)")
    scale_factor: float = option(1.0, help="estimate flows on frames resized by this factor (16/k: 1, 0.5, ...); "
                                 "the warp stays at full size")
    corr_chunk: int = option(1024, help="correlation chunk in source pixels at 1/8 size; bounds memory, same "
                             "output (0: the whole volume at once)")
    quantize: str = option("round", choices=list(QUANTIZE_MODES), help="float -> uint8: round, or truncate as "
                           "the official driver does (parity)")
    backend: str = option("auto", choices=["auto", "pyav", "decord"], help="video reader")
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        self.require_at_least(1, "batch_size")
        self.require_at_least(0, "corr_chunk")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps must be positive, got {self.fps}.")
        if self.fps is not None:
            from opensora_plan.data.video_io import check_fps

            check_fps(self.fps)  # a rate the mp4 cannot hold fails now, not after the model ran
        check_scale_factor(self.scale_factor)
        require_cuda_for_autocast(self.dtype, resolve_device(self.device), "interpolate")


def _plan_outputs(source: Path, output: Path | None, factor: int, overwrite: bool = False) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs) with every check an output path needs (pipelines/outputs.py), before anything is loaded."""
    if source.is_dir():
        sources = list_videos(source)
        if not sources:
            raise ValueError(f"No videos ({'/'.join(VIDEO_EXTENSIONS)}) in {source}; give a video or a folder of them.")
        folder = folder_output(source, output or source.with_name(f"{source.name}_interp_x{factor}"))
        check_output_folder(folder, "--output")
        stems = [s.stem.lower() for s in sources]
        names = [f"{s.name}.mp4" if stems.count(s.stem.lower()) > 1 else f"{s.stem}.mp4" for s in sources]
        targets = [folder / name for name in names]
    else:
        if not source.is_file():
            raise FileNotFoundError(f"INPUT {source} does not exist; give a video file or a folder of videos.")
        default_name = f"{source.stem}_interp_x{factor}.mp4"
        if output is None:
            target = source.with_name(default_name)
        else:
            target = single_output(source, output, (".mp4",), default_name, "video")
            check_output_folder(target.parent, "--output")
        sources, targets = [source], [target]
    check_targets(sources, targets, overwrite)
    return sources, targets


def _check_input(reader: VideoReader, source: Path) -> None:
    """A video interpolation can take: at least 2 frames, even sides (H.264); ValueError otherwise."""
    if len(reader) < 2:
        raise ValueError(f"{source} has {plural(len(reader), 'frame')}; interpolation needs at least 2.")
    if reader.width % 2 or reader.height % 2:
        raise ValueError(f"{source} is {reader.width}x{reader.height}; the H.264 output needs even sides, "
                         "so crop or pad it to an even size first.")


def interpolate(*args, **kwargs) -> InterpolationResults:
    """Interpolate one video file or every video in a folder; returns one result per written video.

    Takes an :class:`InterpolateOptions`, or its fields (``input`` positionally). Every option and output
    path is checked before the model loads; a bad single input is an error, while in a folder a bad video
    (unreadable, fewer than 2 frames, odd sides) is skipped and listed in the result's ``skipped``.
    """
    from .model_folder import stage_model

    o = InterpolateOptions.of(*args, **kwargs)
    sources, targets = _plan_outputs(Path(o.input), Path(o.output) if o.output else None, o.factor, o.overwrite)
    model_path = stage_model("interpolate", o.model_path, None, "--model_path", "interpolate")
    folder_mode = Path(o.input).is_dir()
    if not folder_mode:  # headers only: a bad input fails before the model loads
        with VideoReader(sources[0], backend=o.backend) as reader:
            _check_input(reader, sources[0])
    model = load_interpolation_model(model_path, o.device)
    results = InterpolationResults()
    for source, target in progress_bar(list(zip(sources, targets)), desc="videos", unit="video",
                                       disable=len(sources) == 1):
        start = time.perf_counter()
        try:
            with VideoReader(source, backend=o.backend) as reader:
                _check_input(reader, source)
                frames = reader.get_frames(range(len(reader)))  # (T, H, W, 3) uint8
                source_fps = reader.fps or 30.0
        except ValueError as err:  # VideoReadError, too few frames, odd sides: a bad input file
            if not folder_mode:
                raise
            logger.debug("skipping %s: %s", source, err)  # listed once at the end (outputs.skipped_lines)
            results.skipped.append((str(source), str(err)))
            continue
        out = interpolate_video(model, frames, o.factor, batch_size=o.batch_size, scale_factor=o.scale_factor,
                                dtype=o.dtype, quantize=o.quantize, corr_chunk=o.corr_chunk or None)
        fps = o.fps or source_fps * o.factor
        target.parent.mkdir(parents=True, exist_ok=True)
        write_video(target, out, fps)
        results.append(InterpolationResult(str(source), str(target), frames.shape[0], out.shape[0], fps,
                                           time.perf_counter() - start))
    return results


__all__ = ["InterpolateOptions", "InterpolationResult", "InterpolationResults", "Padding", "interpolate", "interpolate_video",
           "load_interpolation_model", "num_output_frames", "padding_for", "to_uint8"]
