"""Video and image super-resolution with RGT (x2 / x4): read -> upscale frame batches in tiles -> write.

Replaces the official driver ``run.py`` + ``basicsr/test_img.py`` (spec 2.5), which cannot run at the tag
(bugs 14-20). What differs on purpose (spec 5):

* frames go straight from the decoder to the network in batches (no PNG round trip, no bicubic "ground
  truth", no PSNR against it); uint8 output = clamp to [0, 1], x255, **round** (as basicsr's ``tensor2img``);
* the checkpoint's scale is read from its keys, so x4 weights never meet an x2 network (bug 19);
* the network stays in eval mode (the official ``test()`` re-enables training mode, bug 26);
* large frames are cut into overlapping tiles whose outputs are **blended** with linear ramps over the
  overlap, normalised by the summed weights (the official ``use_chop`` pastes tile cores with 16 px of
  context and no blending: visible seams, bug 21). The tile size comes from a memory budget
  (``--sr_memory_gb``, one log line) unless ``--tile_size`` forces one. :func:`upscale_official_chop` keeps
  the official tiling only as a reference-compatible mode (parity tests, seam comparison).

Frames are processed independently (no temporal model, as in the official code): some flicker is possible.

Library entry points: :func:`upscale` (files and folders, what the CLI calls), :func:`upscale_frames`
(uint8 ``(T, H, W, 3)`` or float ``(T, 3, H, W)`` frames -> upscaled frames, e.g. after the VAE decode of
the text-to-video pipeline), :func:`upscale_tensor` (one tiled network pass), :func:`auto_tiles` (whole frames
or tiles within a memory budget).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..data.video_io import VIDEO_EXTENSIONS, VideoReader, write_video
from ..options import Options, option
from ..utils import check_output_folder, parse_dtype, progress_bar, require_cuda_for_autocast, resolve_device
from .outputs import OVERWRITE_HELP, RunResults, check_targets, folder_output, single_output

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Tile sides chosen from a budget are multiples of L-SA's longest window side (the released split_size [8, 32]):
#: no padded tokens. A --tile_size of another side works too (the attention pads its windows), only slower.
TILE_MULTIPLE = 32
#: Smallest tile: RG-SA needs >= 16 px; below 64 px the overlap would cover most of the tile.
MIN_TILE = 64
#: Peak working memory of one forward of the released RGT (width 180), bytes per input pixel per frame,
#: excluding the weights. x2: measured with benchmarks/upscale.py (CPU float32, peak RSS: 260 MiB at 128x128,
#: 1032 MiB at 256x256, i.e. 16 KB/px), rounded up; x3/x4: that plus the larger reconstruction head
#: (64 channels at 3x/4x, 256 at 2x), estimated. Half precision halves it.
BYTES_PER_PIXEL = {2: 20_000, 3: 24_000, 4: 28_000}
#: Narrower models need less: peak bytes/px ~ RELEASED_WIDTH_SHARE + (1 - it) * embed_dim / 180, fitted to two
#: measurements (x2, CPU float32, 256x256 input, peak RSS delta): width 180 16 KB/px, width 48 (the shipped demo
#: upscaler) 9.4 KB/px; the part that does not shrink is the reconstruction head and the frame buffers.
RELEASED_WIDTH, RELEASED_WIDTH_SHARE = 180, 0.44


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``size`` with at least ``overlap`` shared pixels, evenly spread."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D blend weight of one tile: linear from ~0 to 1 over ``ramp`` pixels at sides shared with a neighbour."""
    position = torch.arange(length, dtype=torch.float64) + 0.5
    weight = torch.ones(length, dtype=torch.float64)
    if rise:
        weight = torch.minimum(weight, position / ramp)
    if fall:
        weight = torch.minimum(weight, (length - position) / ramp)
    return weight


@torch.no_grad()
def upscale_tensor(model, x: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 32) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, sH, sW) float, not clamped; in overlapping blended tiles.

    ``tile_size`` None (or not smaller than both sides): one forward of the whole frame. Tiles are
    ``tile_size`` (capped at the frame side) with >= ``tile_overlap`` input pixels shared with each
    neighbour; outputs are weighted by linear ramps over the overlap and normalised by the summed weights.
    """
    _, _, height, width = x.shape
    if tile_size is None or (height <= tile_size and width <= tile_size):
        return model(x)
    if tile_overlap * 2 > tile_size:
        raise ValueError(f"--tile_overlap {tile_overlap} must be at most half of --tile_size {tile_size}.")
    scale = model.upscale
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    rows, cols = tile_starts(height, tile_h, tile_overlap), tile_starts(width, tile_w, tile_overlap)
    out = None
    total = torch.zeros(height * scale, width * scale, dtype=torch.float64)
    for i, top in enumerate(rows):
        weight_h = _ramp(tile_h * scale, tile_overlap * scale, i > 0, i < len(rows) - 1)
        for j, left in enumerate(cols):
            weight_w = _ramp(tile_w * scale, tile_overlap * scale, j > 0, j < len(cols) - 1)
            tile = model(x[..., top:top + tile_h, left:left + tile_w])  # (B, 3, s*tile_h, s*tile_w)
            if out is None:
                out = torch.zeros(*tile.shape[:2], height * scale, width * scale, dtype=torch.float32, device=x.device)
            weight = weight_h[:, None] * weight_w[None, :]  # (s*tile_h, s*tile_w)
            region = (slice(top * scale, (top + tile_h) * scale), slice(left * scale, (left + tile_w) * scale))
            out[..., region[0], region[1]] += tile.float() * weight.to(out.device, torch.float32)
            total[region] += weight
    return (out / total.to(out.device, torch.float32)).to(x.dtype)


@torch.no_grad()
def upscale_official_chop(model, x: torch.Tensor) -> torch.Tensor:
    """Reference-compatible tiling: the official ``RGTModel.test(use_chop=True)`` (spec 2.4), for parity only.

    ceil-ish grid of floor(H/200)+1 x floor(W/200)+1 tiles; the frame is first extended at the bottom/right
    by its mirror image to a multiple of the grid; every tile gets 16 px of context on interior sides; the
    cores are pasted without blending (seams); the extension is cropped. Batch 1 only, as the official code.
    """
    _, _, height, width = x.shape
    if x.shape[0] != 1:
        raise ValueError(f"The official tiling handles one frame at a time, got a batch of {x.shape[0]}.")
    scale, shave = model.upscale, 16
    grid_h, grid_w = height // 200 + 1, width // 200 + 1
    pad_h, pad_w = -height % grid_h, -width % grid_w
    x = torch.cat([x, x.flip(2)], dim=2)[:, :, :height + pad_h]  # mirror (edge pixel repeated)
    x = torch.cat([x, x.flip(3)], dim=3)[:, :, :, :width + pad_w]
    core_h, core_w = (height + pad_h) // grid_h, (width + pad_w) // grid_w
    out = x.new_zeros(1, x.shape[1], (height + pad_h) * scale, (width + pad_w) * scale)
    for i in range(grid_h):
        top = max(i * core_h - shave, 0)
        bottom = (i + 1) * core_h + (shave if i < grid_h - 1 else 0)
        for j in range(grid_w):
            left = max(j * core_w - shave, 0)
            right = (j + 1) * core_w + (shave if j < grid_w - 1 else 0)
            tile = model(x[..., top:bottom, left:right])
            dy, dx = (i * core_h - top) * scale, (j * core_w - left) * scale
            out[..., i * core_h * scale:(i + 1) * core_h * scale, j * core_w * scale:(j + 1) * core_w * scale] = (
                tile[..., dy:dy + core_h * scale, dx:dx + core_w * scale])
    return out[..., :height * scale, :width * scale]


def pixels_for_budget(memory_gb: float, scale: int, weights_bytes: int = 0, half_precision: bool = False,
                      embed_dim: int = RELEASED_WIDTH) -> int:
    """Input pixels (summed over the frames or tiles of one call) whose forward fits ``memory_gb`` for an RGT of
    width ``embed_dim`` (the released 180 by default) and factor ``scale``, besides ``weights_bytes``."""
    per_pixel = BYTES_PER_PIXEL.get(scale, BYTES_PER_PIXEL[4] * scale * scale // 16) // (2 if half_precision else 1)
    per_pixel *= RELEASED_WIDTH_SHARE + (1 - RELEASED_WIDTH_SHARE) * min(embed_dim / RELEASED_WIDTH, 1.0)
    return int(max(memory_gb * 2**30 - weights_bytes, 0) / per_pixel)


def tile_size_for_budget(memory_gb: float, scale: int, batch_size: int = 1, weights_bytes: int = 0,
                         half_precision: bool = False, embed_dim: int = RELEASED_WIDTH) -> int:
    """Largest tile side (a multiple of 32, at least 64) whose forward of ``batch_size`` frames fits ``memory_gb``
    for an RGT of width ``embed_dim`` (the released 180 by default)."""
    pixels = pixels_for_budget(memory_gb, scale, weights_bytes, half_precision, embed_dim) / batch_size
    return max(MIN_TILE, int(math.sqrt(pixels)) // TILE_MULTIPLE * TILE_MULTIPLE)


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------



def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float -> (..., H, W, 3) uint8: clamp to [0, 1], x255, round (basicsr's tensor2img)."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1)


def _check_frame_size(model, height: int, width: int, tile_size: int | None) -> None:
    """ValueError when (height, width) frames (or their tiles) are too small for ``model``."""
    model.check_size(*((height, width) if tile_size is None else (min(tile_size, height), min(tile_size, width))))


def upscale_frames(model, frames: torch.Tensor | np.ndarray, batch_size: int = 4, tile_size: int | None = None,
                   tile_overlap: int = 32, dtype: str | torch.dtype = "fp32", progress: bool = True):
    """Upscale a clip frame by frame: uint8 ``(T, H, W, 3)`` -> uint8 ``(T, sH, sW, 3)``, or float ``(T, 3, H, W)``
    in [0, 1] -> float ``(T, 3, sH, sW)`` clamped to [0, 1] (the caller maps a VAE's [-1, 1] output first).

    ``batch_size`` frames per network call (per tile); ``dtype`` bf16/fp16 runs under CUDA autocast;
    ``tile_size`` None: whole frames (see :func:`auto_tiles`). Returns CPU tensors.
    """
    frames = torch.as_tensor(frames)
    as_uint8 = frames.dtype == torch.uint8
    if as_uint8 and (frames.ndim != 4 or frames.shape[-1] != 3):
        raise ValueError(f"uint8 frames must be (T, H, W, 3), got {tuple(frames.shape)}.")
    if not as_uint8 and (frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point()):
        raise ValueError(f"Frames must be uint8 (T, H, W, 3) or float (T, 3, H, W) in [0, 1], got "
                         f"{frames.dtype} {tuple(frames.shape)}.")
    height, width = (frames.shape[1:3] if as_uint8 else frames.shape[2:4])
    _check_frame_size(model, height, width, tile_size)  # before any work
    device = next(model.parameters()).device
    dtype = parse_dtype(dtype)
    require_cuda_for_autocast(dtype, device, "upscale")
    autocast = dtype != torch.float32
    outputs = []
    starts = range(0, frames.shape[0], batch_size)
    with progress_bar(total=frames.shape[0], desc="upscale", unit="frame", disable=not progress) as bar:
        for start in starts:
            batch = frames[start:start + batch_size].to(device)
            batch = batch.permute(0, 3, 1, 2).float() / 255 if as_uint8 else batch.float()  # (b, 3, H, W)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                out = upscale_tensor(model, batch, tile_size, tile_overlap)  # (b, 3, sH, sW)
            outputs.append(to_uint8(out).cpu() if as_uint8 else out.float().clamp(0, 1).cpu())
            bar.update(batch.shape[0])
    return torch.cat(outputs)


def auto_tiles(model, height: int, width: int, batch_size: int = 4, tile_overlap: int = 32,
               memory_gb: float | None = None, half_precision: bool = False) -> tuple[int, int | None]:
    """(frames per call, tile side or None) for ``height`` x ``width`` frames on ``model``'s device, within
    ``memory_gb`` per call (unset: 80% of free GPU memory on CUDA, 4 GB on CPU); one log line says which.

    Whole frames, ``batch_size`` per call, when they fit; else whole frames, fewer per call (at least one); else
    one frame per call in the largest tiles the budget allows (a multiple of 32, room for twice the overlap):
    RG-SA attends to a summary of the whole tile, so the larger the tile, the closer it is to the whole frame.
    """
    device = next(model.parameters()).device
    budget = memory_gb
    if budget is None:
        budget = 0.8 * torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else 4.0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pixels = pixels_for_budget(budget, model.upscale, weights, half_precision, model.config.embed_dim)
    per_call = min(batch_size, pixels // (height * width))
    if per_call >= 1:
        logger.info("Whole %dx%d frames, %d per call, for a %.1f GB budget", width, height, per_call, budget)
        return per_call, None
    tile_size = tile_size_for_budget(budget, model.upscale, 1, weights, half_precision, model.config.embed_dim)
    tile_size = max(tile_size, -(-2 * tile_overlap // TILE_MULTIPLE) * TILE_MULTIPLE)  # room for the overlap
    logger.info("Tiles of at most %d px (overlap %d), one %dx%d frame per call, for a %.1f GB budget", tile_size,
                tile_overlap, width, height, budget)
    return 1, tile_size


def model_scale(model_path: str | os.PathLike) -> int | None:
    """The upscale factor of an RGT ``save_pretrained`` folder, read from its ``config.json`` (nothing loads);
    None for an official ``.pth`` file, whose factor is known once it is loaded (:func:`check_scale`)."""
    import json

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get("upscale", 2)
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not an RGT config.json ({err}); give a save_pretrained RGT folder.") from None
    return int(value)


def check_scale(scale: int, model_scale: int | None, model_path: str | os.PathLike, flag: str = "--model_path",
                scale_flag: str = "--scale") -> None:
    """ValueError when an RGT model's factor differs from the one asked for."""
    if model_scale is not None and model_scale != scale:
        raise ValueError(f"The upscale model {model_path} is an x{model_scale} model but {scale_flag} is {scale}; "
                         f"give x{scale} weights with {flag} or use {scale_flag} {model_scale}.")


# --------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------


@dataclass
class UpscaleOptions(Options):
    """Every option of ``opensora-plan upscale`` / :func:`upscale`, with its default and checks."""

    COMMAND: ClassVar[str] = "upscale"
    CONFIG: ClassVar[bool] = True
    NONFINITE_OK: ClassVar[tuple[str, ...]] = ("sr_memory_gb",)  # checked below, nan and inf too

    input: str = option(positional=True, help="a video (mp4/avi/webm/mkv/mov), an image (png/jpg) or a folder of them")
    model_path: str | None = option(None, help="RGT weights: an official RGT_x2.pth / RGT_x4.pth, or a save_pretrained "
                                    "folder (unset: the small x2 model the shipped demo lists in its demo.json "
                                    "stages, trained on the demo's shapes only; docs/demo.md)", show_default=False)
    output: str | None = option(None, help="output file (one input: .mp4 for a video, .png/.jpg for an image) or "
                                "folder (unset: <input>_sr_x<scale>.mp4 / .png beside a file, <input>_sr_x<scale>/ for a "
                                "folder)", show_default=False)
    scale: int | None = option(None, choices=[2, 3, 4], help="expected upscale factor; refused when the model's "
                               "differs (unset: the model's)")
    batch_size: int = option(4, help="frames per network call (at most: fewer when the budget holds fewer)")
    tile_size: int | None = option(None, help="tile side in input pixels (forces tiling; unset: from --sr_memory_gb)")
    tile_overlap: int = option(32, help="input pixels shared by neighbouring tiles, blended with linear ramps")
    sr_memory_gb: float | None = option(None, help="memory budget of one network call, chooses the tile size "
                                        "(unset: 80%% of free GPU memory on CUDA, 4 GB on CPU)")
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)")
    dtype: str = option("fp32", choices=["fp32", "bf16", "fp16"], help="bf16/fp16: CUDA autocast (weights stay fp32; CUDA only)")
    fps: float | None = option(None, help="output fps of videos (unset: the source fps)")
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        self.require_at_least(1, "batch_size")
        if self.tile_size is not None and self.tile_size < MIN_TILE:  # any side works (RGT pads its windows)
            raise ValueError(f"--tile_size must be at least {MIN_TILE} px, got {self.tile_size}.")
        if self.tile_overlap < 0 or (self.tile_size is not None and 2 * self.tile_overlap > self.tile_size):
            raise ValueError(f"--tile_overlap must be between 0 and half of the tile size, got {self.tile_overlap}.")
        if self.sr_memory_gb is not None and not (self.sr_memory_gb > 0 and math.isfinite(self.sr_memory_gb)):
            raise ValueError(f"--sr_memory_gb must be a positive number of GiB, got {self.sr_memory_gb}.")
        if self.sr_memory_gb is not None and self.tile_size is not None:
            raise ValueError("--tile_size fixes the tiles, so --sr_memory_gb has no effect; give one of them.")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps must be positive, got {self.fps}.")
        if self.fps is not None:
            from opensora_plan.data.video_io import check_fps

            check_fps(self.fps)  # a rate the mp4 cannot hold fails now, not after the model ran


@dataclass
class UpscaleResult:
    input_path: str
    output_path: str
    num_frames: int
    height: int
    width: int
    seconds: float


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "video" if suffix in VIDEO_EXTENSIONS else "image" if suffix in IMAGE_EXTENSIONS else None


def plan_outputs(input_path: Path, output: Path, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(source, target) pairs; one-line refusals for unknown inputs and for outputs that would overwrite."""
    if not input_path.exists():
        raise FileNotFoundError(f"Input {input_path} does not exist; give a video, an image or a folder of them.")
    if input_path.is_dir():
        check_output_folder(folder_output(input_path, output), "--output")
        sources = sorted(p for p in input_path.iterdir() if p.is_file() and _kind(p))
        if not sources:
            raise ValueError(f"No videos or images in {input_path}; expected {'/'.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}.")
        names = [s.stem + (".mp4" if _kind(s) == "video" else s.suffix.lower()) for s in sources]
        names = [s.name + n[len(s.stem):] if names.count(n) > 1 else n for s, n in zip(sources, names)]
        pairs = [(s, output / n) for s, n in zip(sources, names)]
    else:
        kind = _kind(input_path)
        if kind is None:
            raise ValueError(f"Input {input_path} is neither a video ({'/'.join(VIDEO_EXTENSIONS)}) nor an image "
                             f"({'/'.join(IMAGE_EXTENSIONS)}).")
        wanted = (".mp4",) if kind == "video" else IMAGE_EXTENSIONS
        default_name = input_path.stem + (".mp4" if kind == "video" else input_path.suffix.lower())
        target = single_output(input_path, output, wanted, default_name, kind)
        check_output_folder(target.parent, "--output")
        pairs = [(input_path, target)]
    check_targets([s for s, _ in pairs], [t for _, t in pairs], overwrite)
    return pairs


def default_output(input_path: Path, scale: int) -> Path:
    """Where ``upscale`` writes when ``--output`` is unset: ``<stem>_sr_x<scale>.mp4`` (a video) or
    ``<stem>_sr_x<scale><suffix>`` (an image) beside the input, ``<input>_sr_x<scale>/`` for a folder (as
    ``interpolate`` names its ``_interp_x<factor>`` outputs)."""
    if input_path.is_dir():
        return input_path.with_name(f"{input_path.name}_sr_x{scale}")
    suffix = ".mp4" if _kind(input_path) == "video" else input_path.suffix.lower()
    return input_path.with_name(f"{input_path.stem}_sr_x{scale}{suffix}")


def _read(source: Path) -> tuple[torch.Tensor, float | None, np.ndarray | None]:
    """(T, H, W, 3) uint8 frames, the fps (None for an image) and an image's (H, W) uint8 alpha channel (None
    without one: a video, a JPEG, an opaque PNG); ValueError for an unreadable file."""
    if _kind(source) == "image":
        from PIL import Image

        try:
            with Image.open(source) as image:
                alpha = np.array(image.convert("RGBA"))[..., 3] if image.has_transparency_data else None
                # np.array copies: PIL's buffer is read-only and torch warns about a non-writable array
                return torch.from_numpy(np.array(image.convert("RGB"))).unsqueeze(0), None, alpha  # (1, H, W, 3)
        except OSError as err:  # PIL's UnidentifiedImageError, a truncated file
            raise ValueError(f"Cannot read image {source}: {err}.") from None
    with VideoReader(source) as reader:
        return reader.get_frames(range(reader.num_frames)), reader.fps, None


def _write(target: Path, frames: torch.Tensor, fps: float | None, alpha: np.ndarray | None = None) -> None:
    """Write a video, or an image; an image's ``alpha`` is resized bicubically to the upscaled size and re-attached
    (RGT upscales colour only; Real-ESRGAN's ``--alpha_upsampler bicubic`` does the same), or dropped with a
    warning for a JPEG, which holds none."""
    from ..utils import atomic_path

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".mp4":
        write_video(target, frames, fps or 30.0)
        return
    from PIL import Image

    image = Image.fromarray(frames[0].numpy())
    png = target.suffix.lower() == ".png"
    if alpha is not None and png:
        image.putalpha(Image.fromarray(alpha).resize(image.size, Image.Resampling.BICUBIC))
    elif alpha is not None:
        logger.warning("%s: a JPEG holds no transparency, so the input's alpha channel is dropped; write a .png to "
                       "keep it.", target)
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG" if png else "JPEG", quality=95)


def upscale(*args, **kwargs) -> RunResults:
    """Upscale a video, an image or a folder of them with RGT. Takes :class:`UpscaleOptions` or its fields.

    Returns one :class:`UpscaleResult` per written file; in a folder a bad input (unreadable, too small) is
    skipped and listed in the result's ``skipped``, while a bad single input is an error."""
    from .model_folder import check_stage_model_kind, stage_model

    o = UpscaleOptions.of(*args, **kwargs)
    model_path = stage_model("upscale", o.model_path, None, "--model_path", "upscale")  # unset: the shipped demo's
    check_stage_model_kind("upscale", model_path)
    source = Path(o.input)
    # an unset --output is named after the scale: --scale, else the folder's config.json, else (a .pth) x2 until
    # the model has loaded
    scale = o.scale or model_scale(model_path) or 2
    pairs = plan_outputs(source, default_output(source, scale) if o.output is None else Path(o.output), o.overwrite)
    device, dtype = resolve_device(o.device), parse_dtype(o.dtype)
    require_cuda_for_autocast(dtype, device, "upscale")

    from ..models.rgt import load_rgt

    model = load_rgt(model_path, device=device)  # float32 weights; half precision through autocast
    if o.scale is not None:
        check_scale(o.scale, model.upscale, model_path)
    plans = {}  # (height, width) -> (frames per call, tile side or None): one log line per frame size
    if o.output is None and model.upscale != scale:  # an official .pth: its scale known only now
        pairs = plan_outputs(source, default_output(source, model.upscale), o.overwrite)
    results, folder_mode = RunResults(), Path(o.input).is_dir()
    for source, target in pairs:
        start = time.perf_counter()
        try:  # a bad input file: unreadable, or too small for the network
            frames, fps, alpha = _read(source)
            size = tuple(frames.shape[1:3])
            if size not in plans:
                plans[size] = ((o.batch_size, o.tile_size) if o.tile_size is not None else
                               auto_tiles(model, *size, o.batch_size, o.tile_overlap, o.sr_memory_gb,
                                          dtype != torch.float32))
            batch_size, tile_size = plans[size]
            _check_frame_size(model, *size, tile_size)
            height, width = frames.shape[1] * model.upscale, frames.shape[2] * model.upscale
            if target.suffix.lower() == ".mp4" and (height % 2 or width % 2):  # H.264's limit, before the model runs
                raise ValueError(f"{source} is {frames.shape[2]}x{frames.shape[1]}, so x{model.upscale} gives "
                                 f"{width}x{height}, and the H.264 output needs even sides; crop or pad it to an even "
                                 "size first, or use an x2 / x4 model.")
        except ValueError as err:
            reason = str(err) if str(source) in str(err) else f"{source}: {err}"
            if not folder_mode:
                raise ValueError(reason) from None
            logger.debug("skipping %s", reason)  # listed once at the end (outputs.skipped_lines)
            results.skipped.append((str(source), reason))
            continue
        out = upscale_frames(model, frames, batch_size, tile_size, o.tile_overlap, dtype)
        _write(target, out, o.fps or fps, alpha)
        results.append(UpscaleResult(str(source), str(target), out.shape[0], out.shape[1], out.shape[2],
                                     time.perf_counter() - start))
    return results
