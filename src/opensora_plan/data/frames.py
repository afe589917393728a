"""Frame datasets for the interpolation (AMT, ``train-vfi``) and super-resolution (RGT, ``train-sr``) trainings.

Both read a list of videos (a folder or the project's JSON list, listed by ``train.vae.video_paths``) with
:class:`~opensora_plan.data.video_io.VideoReader` and use the project's skip-and-count rule
(:func:`~opensora_plan.data.datasets.first_usable`): an unreadable video, or one too short or too small
for a sample, is replaced by the next one and reported in ``sample["skipped"]`` (``{"path", "reason"}``),
which the task counts with :class:`~opensora_plan.data.datasets.SkippedVideos`.

* :class:`TripletDataset`: for index i, frames ``(f, f + g, f + 2g)`` of video i as ``(img0, imgt, img1)``,
  the target in the middle; the gap ``g`` is drawn from ``1..max_frame_gap`` (capped by the clip's length),
  then AMT's Vimeo90K augmentations (upstream ``datasets/vimeo_datasets.py``, with its probabilities): 2x
  zoom (p 0.1), random crop, RGB<->BGR (p 0.5), vertical flip (p 0.3), horizontal flip (p 0.5),
  transpose (p 0.05, square crops), temporal reversal (p 0.5).
* :class:`SRPairDataset`: a random frame of video i, degraded as a whole frame (the LR image a camera-sized
  frame would give, no crop-border effects) by a function of :data:`DEGRADATIONS` (bicubic, or bicubic then a
  CausalVAE round trip), then an aligned random crop (HR ``crop_size``, LR ``crop_size / scale``) and
  BasicSR's ``augment`` (RGT's training data pipeline): horizontal flip, vertical flip, transpose, each p 0.5.

An epoch holds ``samples_per_video`` samples of every video (sample i from video ``i % num_videos``), so a
few long clips still fill large batches.

Randomness: every draw of a sample comes from one ``torch.Generator`` seeded by a single draw from torch's
global RNG, which :class:`~opensora_plan.train.sampler.SeededSamples` seeds from ``(seed, epoch, index)``:
a sample is a pure function of its key (exact resume; any number of loader workers). ``deterministic=True``
(held-out clips) draws nothing: the middle triplet / middle frame, centre crop, no augmentation.

Tensors are float in [0, 1], ``(3, H, W)``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..utils import plural
from .datasets import first_usable
from .video_io import VideoReader, VideoReadError, VideoTooShortError, VideoTooSmallError

# AMT's augmentation probabilities (MCG-NKU/AMT datasets/vimeo_datasets.py, used for every AMT size).
AMT_ZOOM_P = 0.1  # random_resize: frames upscaled 2x (bilinear) before the crop
AMT_CHANNEL_REVERSE_P = 0.5
AMT_VERTICAL_FLIP_P = 0.3
AMT_HORIZONTAL_FLIP_P = 0.5
AMT_TRANSPOSE_P = 0.05
AMT_TIME_REVERSE_P = 0.5
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, the grey of the saturation jitter (as torchvision's)


# Videos a sample may pass over (unreadable, too small, too short) before it fails: the datasets' default.
MAX_SUBSTITUTIONS = 100


def check_crop_fits(paths: Sequence[str | os.PathLike], crop_size: int, tries: int = MAX_SUBSTITUTIONS + 1) -> None:
    """Before a run loads a model or writes anything: ValueError (one line) when the first ``tries`` videos (those
    a sample may try) are readable but all smaller than ``crop_size`` on their short side, where the run would
    otherwise fail at its first sample. Stops at the first video the crop fits (one probe for a usable dataset);
    unreadable videos are left to the samples' own skipping."""
    too_small = []  # (width, height, path)
    for path in list(paths)[:tries]:
        try:
            with VideoReader(path) as reader:
                width, height = reader.width, reader.height
        except VideoReadError:
            continue
        if min(width, height) >= crop_size:
            return
        too_small.append((width, height, path))
    if too_small:
        width, height, path = max(too_small, key=lambda size: min(size[:2]))
        raise ValueError(f"--crop_size {crop_size} is larger than the training frames: the largest of the "
                         f"{plural(len(too_small), 'readable video')} probed, {path}, is {width}x{height}; use "
                         f"--crop_size {min(width, height)} or less.")


def _chance(p: float, generator: torch.Generator) -> bool:
    return bool(torch.rand((), generator=generator) < p)


def _randint(high: int, generator: torch.Generator) -> int:
    """A uniform integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator))


def _sample_generator() -> torch.Generator:
    # One draw from the global RNG (seeded per (seed, epoch, index) by SeededSamples) seeds every other draw.
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def _to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 255.0


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels, as saving an image file would."""
    return (images.clamp(0, 1) * 255).round() / 255


class _VideoFrames(Dataset):
    """Shared part: paths, crop size, sizes checks, skip-and-substitute, the per-sample generator."""

    def __init__(self, paths: Sequence[str | os.PathLike], crop_size: int, deterministic: bool,
                 max_substitutions: int, samples_per_video: int = 1):
        if samples_per_video < 1:
            raise ValueError(f"samples_per_video must be at least 1, got {samples_per_video}.")
        if not paths:
            raise ValueError(f"{type(self).__name__} got no videos; point --video_path or --data_path at some videos.")
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}.")
        self.paths = [Path(p) for p in paths]
        self.crop_size = crop_size
        self.deterministic = deterministic
        self.max_substitutions = max_substitutions
        self.samples_per_video = samples_per_video

    def __len__(self) -> int:
        return len(self.paths) * self.samples_per_video

    def _check_size(self, reader: VideoReader, path: Path) -> None:
        if min(reader.height, reader.width) < self.crop_size:
            raise VideoTooSmallError(f"Video {path} is {reader.width}x{reader.height}, smaller than the {self.crop_size}x"
                                 f"{self.crop_size} crop (--crop_size).")

    def load(self, index: int, generator: torch.Generator | None) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        generator = None if self.deterministic else _sample_generator()
        video = index % len(self.paths)  # sample i of an epoch comes from video i mod the number of videos
        used, sample, skipped = first_usable(video, self.paths, lambda i: self.load(i, generator),
                                             self.max_substitutions)
        return {**sample, "index": used, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# Interpolation triplets
# --------------------------------------------------------------------------------------------


class TripletDataset(_VideoFrames):
    """``(img0, imgt, img1)`` triplets for frame interpolation (see the module docstring).

    Each sample: ``img0``, ``imgt``, ``img1`` ``(3, S, S)`` in [0, 1] (``S = crop_size``), ``gap`` (frames
    between img0 and imgt in the video), ``start`` (frame of img0 before temporal reversal), ``index``,
    ``skipped``. A video with fewer than 3 frames is skipped ("too short for a triplet"); a gap larger than
    the video allows is capped at ``(num_frames - 1) // 2``.

    ``saturation_jitter`` s > 0 (random samples only; not AMT's recipe): the colour saturation of the three
    frames is scaled by one factor drawn uniformly from [1 - s, 1] (each pixel moved towards its BT.601 grey),
    so a model trained on a few pure colours also sees paler ones.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], crop_size: int = 224, max_frame_gap: int = 1,
                 deterministic: bool = False, max_substitutions: int = MAX_SUBSTITUTIONS, samples_per_video: int = 1,
                 saturation_jitter: float = 0.0):
        super().__init__(paths, crop_size, deterministic, max_substitutions, samples_per_video)
        if max_frame_gap < 1:
            raise ValueError(f"max_frame_gap must be at least 1, got {max_frame_gap}.")
        if not 0.0 <= saturation_jitter <= 1.0:
            raise ValueError(f"saturation_jitter must be between 0 and 1, got {saturation_jitter}.")
        self.max_frame_gap = max_frame_gap
        self.saturation_jitter = saturation_jitter

    def load(self, index: int, generator: torch.Generator | None) -> dict:
        path = self.paths[index]
        with VideoReader(path) as reader:
            if reader.num_frames < 3:
                raise VideoTooShortError(f"Video {path} is too short for a triplet: {plural(reader.num_frames, 'frame')}, "
                                         "at least 3 needed.")
            self._check_size(reader, path)
            largest = min(self.max_frame_gap, (reader.num_frames - 1) // 2)
            if generator is None:
                gap = largest
                start = (reader.num_frames - 1 - 2 * gap) // 2
            else:
                gap = 1 + _randint(largest, generator)
                start = _randint(reader.num_frames - 2 * gap, generator)
            frames = _to_float(reader.get_frames([start, start + gap, start + 2 * gap]))  # (3, 3, H, W)
        frames = self._crop(frames, generator)  # (3, 3, S, S)
        if generator is not None:
            frames = self._augment(frames, generator)
            if self.saturation_jitter:
                factor = 1.0 - self.saturation_jitter * torch.rand((), generator=generator).item()
                grey = torch.einsum("c,nchw->nhw", torch.tensor(LUMA_WEIGHTS), frames).unsqueeze(1)
                frames = grey + factor * (frames - grey)  # (3, 3, S, S), still in [0, 1]
        return {"img0": frames[0], "imgt": frames[1], "img1": frames[2], "gap": gap, "start": start}

    def _crop(self, frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        size = self.crop_size
        height, width = frames.shape[-2:]
        if generator is None:
            top, left = (height - size) // 2, (width - size) // 2
            return frames[..., top : top + size, left : left + size]
        if size % 2 == 0 and _chance(AMT_ZOOM_P, generator):
            # AMT's random_resize (2x bilinear upscale, then the crop) = a half-size crop upscaled 2x.
            half = size // 2
            top, left = _randint(height - half + 1, generator), _randint(width - half + 1, generator)
            crop = frames[..., top : top + half, left : left + half]
            return F.interpolate(crop, scale_factor=2.0, mode="bilinear", align_corners=False).clamp(0, 1)
        top, left = _randint(height - size + 1, generator), _randint(width - size + 1, generator)
        return frames[..., top : top + size, left : left + size]

    @staticmethod
    def _augment(frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """AMT's Vimeo90K augmentations, in its order, on ``(3 frames, 3, S, S)``."""
        if _chance(AMT_CHANNEL_REVERSE_P, generator):
            frames = frames.flip(1)  # RGB <-> BGR
        if _chance(AMT_VERTICAL_FLIP_P, generator):
            frames = frames.flip(2)
        if _chance(AMT_HORIZONTAL_FLIP_P, generator):
            frames = frames.flip(3)
        if _chance(AMT_TRANSPOSE_P, generator):
            frames = frames.transpose(2, 3)
        if _chance(AMT_TIME_REVERSE_P, generator):
            frames = frames.flip(0)  # img1, imgt, img0: the target stays in the middle
        return frames.contiguous()


# --------------------------------------------------------------------------------------------
# Super-resolution pairs
# --------------------------------------------------------------------------------------------


def bicubic_degradation(hr: torch.Tensor, scale: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """HR ``(N, 3, H, W)`` in [0, 1] (H, W multiples of ``scale``) -> LR ``(N, 3, H / scale, W / scale)``.

    RGT (like SwinIR/HAT) trained on DF2K LR images made with MATLAB ``imresize(hr, 1/scale, 'bicubic')``,
    which antialiases (it widens the a = -0.5 cubic kernel by ``scale`` when shrinking). torch's
    ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` does the same (its antialiased
    bicubic uses a = -0.5 as well), up to MATLAB's symmetric border padding (torch renormalises the kernel
    at the border instead), so it is the closest torch-only match. The result is clamped and rounded to
    8-bit levels: the LR images of DF2K were PNG files.
    """
    lr = F.interpolate(hr, scale_factor=1.0 / scale, mode="bicubic", antialias=True, align_corners=False)
    return quantise(lr)


def vae_degradation(hr: torch.Tensor, scale: int, generator: torch.Generator | None = None, *,
                    vae: torch.nn.Module, latent_noise: float = 0.0) -> torch.Tensor:
    """HR ``(N, 3, H, W)`` in [0, 1] -> LR ``(N, 3, H / scale, W / scale)`` in [0, 1]: the bicubic LR after a
    round trip through a CausalVAE (``vae``, e.g. the demo's), as the frames a text-to-video model decodes.

    Each LR frame is encoded alone (a 1-frame video: the causal VAE's image path), the posterior's mean decoded,
    and the result clamped and rounded to 8-bit levels. What the round trip adds is what an upscaler meets after
    sampling: the VAE's softened edges and rounded corners and its faint background noise. The posterior is not
    sampled: the demo VAE's posterior standard deviation is ~0.02 against latents of ~1.2 (~0.06 levels once
    decoded). A sampled video's latents are less exact than an encoding: ``latent_noise`` s > 0 (training draws
    only, ``generator`` given) adds Gaussian noise to the latent before decoding, its standard deviation a
    fraction, drawn uniformly from [0, s] per call, of the latent's own; held-out clips (``generator`` None) get
    none, so they stay fixed. LR sides that are not multiples of the VAE's spatial compression (8) are padded
    by replication for the VAE and cropped back. Runs on the VAE's device and dtype, without gradients.
    """
    lr = bicubic_degradation(hr, scale)
    parameter = next(vae.parameters())
    height, width = lr.shape[-2:]
    step = int(getattr(vae, "spatial_compression", 1))
    pad = (0, -width % step, 0, -height % step)
    x = F.pad(lr * 2 - 1, pad, mode="replicate") if any(pad) else lr * 2 - 1
    with torch.no_grad():
        x = x.unsqueeze(2).to(parameter.device, parameter.dtype)  # (N, 3, 1, h, w) in [-1, 1]
        z = vae.encode(x).latent_dist.mode()  # (N, C, 1, h / 8, w / 8)
        if latent_noise and generator is not None:
            strength = latent_noise * float(torch.rand((), generator=generator))
            noise = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
            z = z + strength * z.std() * noise
        y = vae.decode(z).sample[:, :, 0, :height, :width]
    return quantise((y.float().cpu() + 1) / 2)


def bicubic_or_vae_degradation(hr: torch.Tensor, scale: int, generator: torch.Generator | None = None, *,
                               vae: torch.nn.Module, latent_noise: float = 0.0) -> torch.Tensor:
    """:func:`bicubic_degradation` or :func:`vae_degradation`, one of the two per sample (p 0.5 each, drawn from
    ``generator``): an upscaler that keeps its gain on crisp frames and learns the VAE's. Held-out clips
    (``generator`` None) get the VAE round trip, the case the mix is for."""
    if generator is not None and _chance(0.5, generator):
        return bicubic_degradation(hr, scale)
    return vae_degradation(hr, scale, generator, vae=vae, latent_noise=latent_noise)


# The degradations ``--degradation`` offers: name -> fn(hr (N, 3, H, W) in [0, 1], scale, generator) -> LR
# (N, 3, H / scale, W / scale) in [0, 1]. The place to add others (e.g. Real-ESRGAN style blur + noise + JPEG):
# write the function (draw its randomness from ``generator``, which is None for held-out clips) and add it here;
# the option's choices and docs/training_frames.md follow. A function with keyword-only ``vae`` and
# ``latent_noise`` parameters is given the CausalVAE of ``--degradation_vae`` (:func:`degradation_needs_vae`), which the
# run loads once, and ``--vae_latent_noise``.
DEGRADATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "bicubic": bicubic_degradation,
    "vae": vae_degradation,
    "bicubic_or_vae": bicubic_or_vae_degradation,
}


def degradation_needs_vae(name: str) -> bool:
    """Whether degradation ``name`` of :data:`DEGRADATIONS` takes a CausalVAE (its ``vae`` keyword)."""
    return "vae" in inspect.signature(DEGRADATIONS[name]).parameters


class SRPairDataset(_VideoFrames):
    """``(lr, hr)`` pairs for super-resolution (see the module docstring).

    Each sample: ``hr`` ``(3, S, S)``, ``lr`` ``(3, S / scale, S / scale)``, both in [0, 1], ``frame``
    (its index in the video), ``index``, ``skipped``. ``crop_size`` must be a multiple of ``scale``.
    ``vae``: the CausalVAE a degradation that needs one takes (``vae``, ``bicubic_or_vae``), else None;
    ``vae_latent_noise``: its ``latent_noise`` (:func:`vae_degradation`). Raises ValueError for an unknown
    degradation, a missing (or needless) ``vae``, or a negative (or needless) ``vae_latent_noise``.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], scale: int = 2, crop_size: int = 128,
                 degradation: str = "bicubic", deterministic: bool = False, max_substitutions: int = MAX_SUBSTITUTIONS,
                 samples_per_video: int = 1, vae: torch.nn.Module | None = None, vae_latent_noise: float = 0.0):
        super().__init__(paths, crop_size, deterministic, max_substitutions, samples_per_video)
        if scale < 1 or crop_size % scale:
            raise ValueError(f"crop_size {crop_size} must be a multiple of the scale {scale}.")
        if degradation not in DEGRADATIONS:
            raise ValueError(f"Degradation {degradation!r} is not known; use one of {', '.join(DEGRADATIONS)}.")
        if degradation_needs_vae(degradation) != (vae is not None):
            raise ValueError(f"Degradation {degradation!r} " + ("needs a CausalVAE (vae=...)." if vae is None else
                                                                "takes no VAE; leave vae out."))
        if vae_latent_noise < 0 or (vae_latent_noise and vae is None):
            raise ValueError(f"vae_latent_noise must be >= 0 and goes with a VAE degradation; got {vae_latent_noise} "
                             f"with {degradation!r}.")
        self.scale = scale
        self.degradation = degradation
        self._degrade = DEGRADATIONS[degradation]
        self._degrade_options = {"vae": vae, "latent_noise": vae_latent_noise} if vae is not None else {}

    def load(self, index: int, generator: torch.Generator | None) -> dict:
        path, scale = self.paths[index], self.scale
        with VideoReader(path) as reader:
            self._check_size(reader, path)
            frame = reader.num_frames // 2 if generator is None else _randint(reader.num_frames, generator)
            hr = _to_float(reader.get_frames([frame]))  # (1, 3, H, W)
        hr = hr[..., : hr.shape[-2] // scale * scale, : hr.shape[-1] // scale * scale]
        lr = self._degrade(hr, scale, generator, **self._degrade_options)  # (1, 3, H / s, W / s)
        size = self.crop_size // scale  # LR crop
        low_h, low_w = lr.shape[-2:]
        if generator is None:
            top, left = (low_h - size) // 2, (low_w - size) // 2
        else:
            top, left = _randint(low_h - size + 1, generator), _randint(low_w - size + 1, generator)
        lr = lr[0, :, top : top + size, left : left + size]  # (3, S / s, S / s)
        hr = hr[0, :, top * scale : (top + size) * scale, left * scale : (left + size) * scale]  # (3, S, S)
        if generator is not None:  # BasicSR augment(hflip=True, rotation=True), on both images alike
            for dims in ((2,), (1,)):  # horizontal, vertical flip
                if _chance(0.5, generator):
                    lr, hr = lr.flip(dims), hr.flip(dims)
            if _chance(0.5, generator):
                lr, hr = lr.transpose(1, 2), hr.transpose(1, 2)
        return {"lr": lr.contiguous(), "hr": hr.contiguous(), "frame": frame}
