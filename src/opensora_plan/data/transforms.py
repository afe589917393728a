"""Video transforms in plain torch (no torchvision): value ranges, short-side resize, center crops.

Layouts: decoded frames are uint8 ``(T, H, W, 3)`` (what :mod:`opensora_plan.data.video_io` returns);
model inputs are float ``(3, T, H, W)`` in ``[-1, 1]`` (one video of a CausalVAE batch). The spatial
transforms act on the last two dimensions of any float tensor, so they take both ``(C, T, H, W)``
and ``(T, C, H, W)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Value ranges
# --------------------------------------------------------------------------------------------


def frames_to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``(T, H, W, 3)`` -> float32 video ``(3, T, H, W)`` in ``[-1, 1]``."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"Expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}.")
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)  # (3, T, H, W)


def model_range_to_frames(video: torch.Tensor) -> torch.Tensor:
    """float video ``(3, T, H, W)`` in ``[-1, 1]`` -> uint8 frames ``(T, H, W, 3)``.

    Clamps, then rounds to the nearest level (the reference truncates with ``astype(uint8)``, which
    biases every pixel down by half a level on average, spec 8.12; fixed on purpose).
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"Expected a video (3, T, H, W), got shape {tuple(video.shape)}.")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous()  # (T, H, W, 3)


# --------------------------------------------------------------------------------------------
# Spatial
# --------------------------------------------------------------------------------------------


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) when the short side is scaled to ``size``; the long side is floored
    (the convention of the ``ShortSideScale`` transform the reference reconstruction script uses)."""
    if width < height:
        return int(math.floor(height / width * size)), size
    return size, int(math.floor(width / height * size))


def resize_short_side(video: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Resize ``(..., H, W)`` so that min(H, W) == ``size`` (bilinear, align_corners=False).

    ``antialias=True`` low-pass filters when shrinking, as the reference reconstruction does (spec 1.9).
    """
    if not video.is_floating_point():
        raise ValueError(f"resize_short_side needs a float tensor, got {video.dtype}; convert the frames first.")
    if size < 1:
        raise ValueError(f"The short-side size must be a positive number of pixels, got {size}.")
    *lead, height, width = video.shape
    out_h, out_w = short_side_size(height, width, size)
    if (out_h, out_w) == (height, width):
        return video
    flat = video.reshape(-1, 1, height, width)  # (N, 1, H, W): every plane resized alike
    flat = F.interpolate(flat, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=antialias)
    return flat.reshape(*lead, out_h, out_w)


def center_crop(video: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop the central ``size`` (an int for a square, or (height, width)) from ``(..., H, W)``.

    Offsets are rounded like torchvision's ``CenterCropVideo`` (the reference's transform).
    """
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    height, width = video.shape[-2:]
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"Cannot center-crop {crop_w}x{crop_h} from a {width}x{height} frame; use a crop size no larger "
            "than the (resized) frame."
        )
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return video[..., top : top + crop_h, left : left + crop_w]


def center_crop_to_multiple(video: torch.Tensor, multiple: int) -> torch.Tensor:
    """Center-crop ``(..., H, W)`` to the largest size whose sides are multiples of ``multiple``."""
    height, width = video.shape[-2:]
    crop_h, crop_w = height // multiple * multiple, width // multiple * multiple
    if crop_h == 0 or crop_w == 0:
        raise ValueError(f"A {width}x{height} frame is smaller than {multiple} pixels on one side.")
    return center_crop(video, (crop_h, crop_w))


# --------------------------------------------------------------------------------------------
# Training transforms (text-to-video dataset, spec section 5)
# --------------------------------------------------------------------------------------------


def last_window_start(total_frames: int, num_frames: int, sample_rate: int = 1) -> int:
    """Largest start of the reference's temporal window: max(0, total - num_frames * sample_rate - 1).

    (The reference's ``- 1`` means the very last possible window is never drawn; kept for parity.)
    """
    if total_frames < 1:
        raise ValueError(f"A video needs at least 1 frame to sample from, got {total_frames}.")
    return max(0, total_frames - num_frames * sample_rate - 1)


def window_indices(total_frames: int, num_frames: int, sample_rate: int, start: int) -> list[int]:
    """``num_frames`` indices of the window starting at ``start``: floor(linspace(start, end - 1, num_frames))
    with end = min(start + num_frames * sample_rate, total); short videos therefore repeat frames."""
    end = min(start + num_frames * sample_rate, total_frames)
    # numpy's linspace with dtype=int floors, exactly as the reference computes the indices
    return np.linspace(start, end - 1, num_frames, dtype=int).tolist()


def temporal_window_indices(
    total_frames: int, num_frames: int, sample_rate: int = 1, generator: torch.Generator | None = None
) -> list[int]:
    """The reference's temporal random crop: a window with a uniform start in [0, last_window_start].

    ``generator=None`` draws from torch's global RNG (seeded per sample / per worker by the loader).
    """
    last_start = last_window_start(total_frames, num_frames, sample_rate)
    start = int(torch.randint(0, last_start + 1, (1,), generator=generator))
    return window_indices(total_frames, num_frames, sample_rate, start)


def image_slot_indices(num_frames: int, use_image_num: int) -> list[int]:
    """Frames (of the sampled clip) reused as the joint-training images: linspace(0, num_frames-1, n)."""
    return np.linspace(0, num_frames - 1, use_image_num, dtype=int).tolist()


def resize_square(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float frames (T, C, H, W) to (T, C, size, size): bilinear, align_corners=True, antialias=True.

    These are the reference's exact ``interpolate`` arguments; torch accepts antialias together with
    align_corners, so there is no deviation here. A frame already at ``size`` is returned as is: with
    align_corners=True that interpolation is the identity (checked bit-exact), and it costs ~0.3 s
    for a 65-frame 512 px clip.
    """
    if frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=True, antialias=True)


def video_train_transform(frames: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float video (3, T, size, size) in [-1, 1].

    Order as the reference: /255, centre crop to the short side, resize, horizontal flip (when
    ``flip``; the caller draws it with p = 0.5), then 2x - 1.
    """
    frames = frames.permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    # Crop before the float conversion and use in-place arithmetic: same values, less memory traffic
    # (a 65-frame 512 px clip is 200 MB in float32).
    video = center_crop(frames, min(frames.shape[-2:])).contiguous().float().div_(255.0)  # (T, 3, side, side)
    video = resize_square(video, size)  # (T, 3, size, size)
    if flip:
        video = video.flip(-1)
    video = video.mul_(2.0).sub_(1.0)
    return video.permute(1, 0, 2, 3)  # (3, T, size, size), a view


def aspect_crop_size(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int]:
    """The largest (crop_h, crop_w) of a height x width frame with the aspect ratio of out_height x out_width
    (to within rounding: one side is kept whole, the other rounded to the nearest pixel)."""
    if height * out_width >= width * out_height:  # the frame is taller than the target: keep its width
        return min(height, max(1, round(width * out_height / out_width))), width
    return height, min(width, max(1, round(height * out_width / out_height)))


def video_bucket_transform(frames: torch.Tensor, height: int, width: int, flip: bool) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float video (3, T, height, width) in [-1, 1], never stretched.

    The centred crop with the target's aspect ratio (:func:`aspect_crop_size`), then a resize to
    ``height x width`` with :func:`resize_square`'s arguments, the optional horizontal flip, 2x - 1. For a
    square target this is exactly :func:`video_train_transform`. Raises ValueError when the frame is
    smaller than the target on a side (buckets never upscale).
    """
    if frames.shape[1] < height or frames.shape[2] < width:
        raise ValueError(f"A {frames.shape[1]}x{frames.shape[2]} (HxW) frame is smaller than the {height}x{width} "
                         "bucket; buckets never upscale (assign the clip to a smaller bucket).")
    frames = frames.permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    crop = aspect_crop_size(frames.shape[-2], frames.shape[-1], height, width)
    video = center_crop(frames, crop).contiguous().float().div_(255.0)  # (T, 3, crop_h, crop_w)
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=True, antialias=True)
    if flip:
        video = video.flip(-1)
    video = video.mul_(2.0).sub_(1.0)
    return video.permute(1, 0, 2, 3)  # (3, T, height, width), a view
