"""Reading and writing videos: exact frames by index (decord or PyAV), H.264 mp4 and GIF output.

Everything here speaks uint8 RGB frames laid out ``(T, H, W, 3)``.

* :class:`VideoReader` opens a file once and returns any list of frame indices (any order, repeats
  allowed) as a ``torch.uint8`` tensor. It uses decord when it is installed (``pip install
  opensora-plan[video]``, faster random access) and PyAV otherwise; both give the same frames. With
  the default ``backend="auto"`` a file decord cannot handle is read with PyAV instead.
* Frames come back in *display* orientation: a rotation stored in the container (the display
  matrix phones write, e.g. 90 degrees for a portrait clip coded as landscape) is applied, and
  ``height`` / ``width`` are the displayed size. decord 0.6.0 cannot read such files (it fails a
  size check), so rotated files are always read with PyAV; both backends give identical frames.
* A missing, unreadable or corrupt file raises :class:`VideoReadError` (a ``ValueError`` and an
  ``OSError``) naming the path and the cause, so datasets can skip the file and count it.
* :func:`write_video` writes H.264 (yuv420p) mp4, :func:`write_gif` an animated GIF, both through PyAV
  (no system ffmpeg needed) and atomically (a crash never leaves a half-written file). The same
  frames always give the same bytes (see :data:`X264_DETERMINISTIC`).
* :func:`list_videos` is the one video-listing function (by extension, optionally recursive).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import sys
import tempfile
import threading
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch

from opensora_plan.utils import atomic_path

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
BACKENDS = ("auto", "pyav", "decord")
# libx264 options that make the output a function of the frames only. With macroblock-tree rate
# control on, x264 (as bundled with PyAV 18) wrote different bytes for identical frames from one call
# to the next once torch had run in the process (measured on 64x64 clips: 6 different files out of 8
# writes, decoded pixels up to 22 levels apart); mbtree=0 removed every difference. One encoder thread
# makes the bytes independent of the machine's core count too (x264's output depends on its threads).
X264_DETERMINISTIC = {"threads": "1", "x264-params": "mbtree=0"}


class VideoReadError(ValueError, OSError):
    """A video file is missing, unreadable or corrupt (the message names the path and the cause)."""


class VideoTooShortError(VideoReadError):
    """A readable video with fewer frames than a sample needs."""


class VideoTooSmallError(VideoReadError):
    """A readable video whose frames are smaller than a sample needs."""


def unusable_reason(err: Exception) -> str:
    """Why a video was left out, in a word or two: "too short", "too small" or "unreadable"."""
    return ("too short" if isinstance(err, VideoTooShortError) else "too small" if isinstance(err, VideoTooSmallError)
            else "unreadable")


def decord_available() -> bool:
    """True when the optional decord reader can be imported."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "decord" if decord_available() else "pyav"
    if backend == "decord" and not decord_available():
        from opensora_plan.utils import MissingExtraError

        raise MissingExtraError('backend=\'decord\' was asked for but decord is not installed; pip install '
                                '"opensora-plan[video]" or use backend=\'pyav\'.')
    return backend


def _quarter_turns(rotation: float | None) -> int:
    """Counter-clockwise display rotation in degrees -> quarter turns 0..3 (non-right angles are refused)."""
    if not rotation:
        return 0
    turns = rotation / 90.0
    if abs(turns - round(turns)) > 1e-3:
        raise VideoReadError(f"display rotation of {rotation} degrees is not a multiple of 90")
    return int(round(turns)) % 4


def _pyav_rotation(container, stream) -> int:
    """Quarter turns of the display matrix, read from the first decoded frame (PyAV exposes it there)."""
    for frame in container.decode(stream):
        return _quarter_turns(frame.rotation)
    return 0


def probe_rotation(path: str | os.PathLike) -> int:
    """Counter-clockwise quarter turns (0..3) that bring the coded frames of ``path`` to display orientation."""
    with av.open(str(path), mode="r") as container:
        if not container.streams.video:
            return 0
        return _pyav_rotation(container, container.streams.video[0])


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class VideoReader:
    """Random access to the frames of one video file.

    >>> with VideoReader("clip.mp4") as reader:
    ...     frames = reader.get_frames([0, 2, 4])  # (3, H, W, 3) uint8
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto"):
        self.path = Path(path)
        self.backend = _resolve_backend(backend)
        # With backend="auto", any decord failure falls back to PyAV: decord 0.6.0 fails on some
        # valid files (e.g. frame widths of 48 px: "DECORDArrayCopyFromTo: The size must exactly match").
        self._fallback_to_pyav = backend == "auto" and self.backend == "decord"
        if not self.path.is_file():
            raise VideoReadError(f"Cannot read video {self.path}: no such file.")
        self._container = None
        self._decord = None
        self.rotation = 0  # counter-clockwise quarter turns applied to every frame
        try:
            if self.backend == "decord":
                # decord ignores the display matrix and fails on rotated files: those are read with PyAV.
                self.rotation = probe_rotation(self.path)
                if self.rotation:
                    self._switch_to_pyav()
                else:
                    try:
                        self._open_decord()
                    except Exception:
                        if not self._fallback_to_pyav:
                            raise
                        self._switch_to_pyav()
            else:
                self._open_pyav()
        except VideoReadError:
            self.close()
            raise
        except Exception as err:  # decord/FFmpeg raise many unrelated types for broken files
            self.close()
            cause = getattr(err, "strerror", None) or str(err)  # PyAV's str() repeats the path
            raise VideoReadError(f"Cannot read video {self.path}: {type(err).__name__}: {cause}.") from err
        if self.num_frames == 0:
            self.close()
            raise VideoReadError(f"Cannot read video {self.path}: it contains no frames.")

    def _switch_to_pyav(self) -> None:
        self._decord = None
        self.backend = "pyav"
        self._fallback_to_pyav = False
        self._open_pyav()

    # -- decord ------------------------------------------------------------------------------

    def _open_decord(self) -> None:
        import decord

        with native_stderr_to_logging("decord"):
            self._decord = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=2)
        self.num_frames = len(self._decord)
        self.fps = float(self._decord.get_avg_fps())
        self.height, self.width = self._decord[0].shape[:2] if self.num_frames else (0, 0)

    # -- PyAV --------------------------------------------------------------------------------

    def _open_pyav(self) -> None:
        self._container = av.open(str(self.path), mode="r")
        if not self._container.streams.video:
            raise VideoReadError(f"Cannot read video {self.path}: the file has no video stream.")
        stream = self._container.streams.video[0]
        self._stream = stream
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else 0.0
        self.height = stream.codec_context.height
        self.width = stream.codec_context.width

        # One demux pass (no decoding) gives every frame's timestamp and the key frames. It counts
        # the frames even when the container does not store a count (`stream.frames == 0`), and
        # frame index i is the i-th smallest presentation timestamp, so access by index is exact.
        pts, key_pts = [], []
        for packet in self._container.demux(stream):
            if packet.size == 0:  # the flush packet at the end of the stream
                continue
            if packet.pts is None:
                raise VideoReadError(
                    f"Cannot read video {self.path}: its packets carry no timestamps, so frames cannot be "
                    "addressed by index; re-mux it into mp4 (e.g. `ffmpeg -i in -c copy out.mp4`)."
                )
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
        pts.sort()
        self._pts = pts
        self._index_of_pts = {p: i for i, p in enumerate(pts)}
        # For every frame, the index of the last key frame at or before it: where a seek would land.
        key_indices = sorted(self._index_of_pts[p] for p in key_pts) or [0]
        self._key_index = [key_indices[max(bisect.bisect_right(key_indices, i) - 1, 0)] for i in range(len(pts))]
        self.num_frames = len(pts)
        if pts:
            # The display matrix is only exposed on decoded frames: decode the first one.
            self._seek_pyav(pts[0])
            self.rotation = _pyav_rotation(self._container, self._stream)
            if self.rotation % 2:
                self.height, self.width = self.width, self.height  # the displayed size

    def _seek_pyav(self, target: int) -> None:
        """Seek to the key frame at or before ``target``. Image files (FFmpeg's image2 / *_pipe demuxers,
        one frame) are reopened instead: after the demux pass, seeking the image2 demuxer back to 0 left
        decode() empty for JPEGs over ~4 KB (PyAV 18), which read as "the stream ended before frame 0"."""
        if self._container.format.name == "image2" or self._container.format.name.endswith("_pipe"):
            self._container.close()
            self._container = av.open(str(self.path), mode="r")
            self._stream = self._container.streams.video[0]
        else:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)

    def _get_frames_pyav(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decode the sorted, unique frame indices ``wanted``; seek only when it saves decoding."""
        out: dict[int, np.ndarray] = {}
        decoder = None
        last_decoded = -1
        for index in wanted:
            target = self._pts[index]
            if decoder is None or last_decoded < self._key_index[index]:
                # Seeking lands on the key frame before `target`; when we already decoded past that
                # key frame it is cheaper to keep decoding forwards.
                self._seek_pyav(target)
                decoder = self._container.decode(self._stream)
            for frame in decoder:
                frame_index = self._index_of_pts.get(frame.pts, -1)
                if frame_index == -1 or frame_index < index:
                    continue
                last_decoded = frame_index
                if frame_index > index:
                    raise VideoReadError(
                        f"Cannot read video {self.path}: frame {index} could not be decoded (the decoder "
                        f"went from an earlier frame straight to frame {frame_index})."
                    )
                out[index] = np.rot90(frame.to_ndarray(format="rgb24"), self.rotation)  # (H, W, 3) displayed
                break
            else:
                raise VideoReadError(
                    f"Cannot read video {self.path}: the stream ended before frame {index} of "
                    f"{self.num_frames}; the file is probably truncated."
                )
        return out

    # -- public --------------------------------------------------------------------------------

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` (any order, repeats allowed) as a uint8 tensor ``(T, H, W, 3)``."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.num_frames]
        if bad:
            raise IndexError(
                f"Frame indices {bad[:5]} are out of range for {self.path}, which has {self.num_frames} frames "
                f"(valid: 0..{self.num_frames - 1})."
            )
        if not indices:
            return torch.empty(0, self.height, self.width, 3, dtype=torch.uint8)
        if self._container is None and self._decord is None:
            raise ValueError(f"VideoReader for {self.path} is closed; open a new one.")
        try:
            if self.backend == "decord":
                try:
                    with native_stderr_to_logging("decord"):
                        frames = self._decord.get_batch(indices).asnumpy()  # (T, H, W, 3)
                except Exception:
                    if not self._fallback_to_pyav:
                        raise
                    self._switch_to_pyav()
                    return self.get_frames(indices)
            else:
                decoded = self._get_frames_pyav(sorted(set(indices)))
                frames = np.stack([decoded[i] for i in indices])  # (T, H, W, 3)
        except VideoReadError:
            raise
        except Exception as err:
            raise VideoReadError(f"Cannot decode video {self.path}: {type(err).__name__}: {err}") from err
        return torch.from_numpy(np.ascontiguousarray(frames))

    def close(self) -> None:
        """Release the file; further ``get_frames`` calls fail."""
        if self._container is not None:
            self._container.close()
            self._container = None
        self._decord = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_frames

    def __repr__(self) -> str:
        return (
            f"VideoReader({str(self.path)!r}, backend={self.backend!r}, num_frames={self.num_frames}, "
            f"fps={self.fps:.3f}, size={self.width}x{self.height}, rotation={90 * self.rotation})"
        )


def read_video(
    path: str | os.PathLike, indices: Sequence[int] | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, float]:
    """Read ``indices`` (default: every frame) of a video -> (uint8 frames ``(T, H, W, 3)``, fps)."""
    with VideoReader(path, backend=backend) as reader:
        frames = reader.get_frames(range(reader.num_frames) if indices is None else indices)
        return frames, reader.fps


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _as_uint8_frames(frames) -> np.ndarray:
    """numpy or torch uint8 ``(T, H, W, 3)`` -> contiguous numpy array, with a clear error otherwise."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(
            f"Video frames must be uint8, got {frames.dtype}; convert with "
            "`((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)` or similar first."
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"Video frames must have shape (T, H, W, 3) with T >= 1, got {tuple(frames.shape)}.")
    return np.ascontiguousarray(frames)


def _fps_fraction(fps: float) -> Fraction:
    """``fps`` as the container's frame-rate fraction (denominator <= 10000); ValueError when it is not
    positive or is below 1/10000 fps, which the fraction would round to 0 (and PyAV silently to 24 fps)."""
    if not fps or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}.")
    rate = Fraction(fps).limit_denominator(10000)
    if rate <= 0:
        raise ValueError(f"fps {fps:g} is below the lowest frame rate a video file holds here (0.0001 fps); "
                         "raise --fps.")
    return rate


def check_fps(fps: float, gif: bool = False) -> str | None:
    """Check before any work that a video (and with ``gif`` a GIF) can be written at ``fps``: ValueError
    otherwise; returns :func:`describe_gif`'s line when ``gif`` and the GIF drops frames, else None."""
    _fps_fraction(fps)
    return describe_gif(fps) if gif else None


def write_video(
    path: str | os.PathLike, frames, fps: float, crf: int = 18, preset: str = "veryfast", lossless: bool = False
) -> Path:
    """Write uint8 frames ``(T, H, W, 3)`` (numpy or torch) as an H.264 yuv420p mp4; returns the path.

    ``crf`` is x264's quality (0 = lossless luma, 18 = visually lossless, 23 = x264's default).
    H and W must be even (yuv420p halves the chroma planes). Identical frames give identical bytes
    (:data:`X264_DETERMINISTIC`; no creation time or other run-dependent metadata is written).
    ``lossless``: RGB H.264 instead (libx264rgb, crf 0): the frames read back bit-exact (yuv420p halves the
    colour resolution, which blurs every coloured edge), in files that fewer players open (decord fails on some
    sizes; the ``auto`` reader then falls back to PyAV); for training data.
    """
    frames = _as_uint8_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(
            f"H.264 (yuv420p) needs an even frame size, got {width}x{height}; crop or pad the frames to even "
            "width and height first (or use write_gif)."
        )
    path = Path(path)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=_fps_fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24" if lossless else "yuv420p"
        stream.options = {"crf": "0" if lossless else str(crf), "preset": preset, **X264_DETERMINISTIC}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


# GIF frame delays are whole centiseconds in 16 bits, and browsers play a delay under 2 cs (20 ms) as 10 cs
# (100 ms), so a GIF plays at most 50 fps as written and holds at most 655.35 s per frame.
GIF_MAX_FPS = 50.0
GIF_MIN_FPS = 100 / 65535


def gif_plan(fps: float) -> tuple[int, float]:
    """How a video at ``fps`` becomes a GIF: ``(keep every n-th frame, the GIF's fps)``, same duration.

    Up to :data:`GIF_MAX_FPS` every frame is kept; above it every n-th (n = ceil(fps / 50)), so the GIF
    plays at fps / n <= 50 instead of browsers slowing its too-short delays to 100 ms. Raises ValueError
    for an fps that is not positive or is below :data:`GIF_MIN_FPS` (a delay no GIF can hold).
    """
    _fps_fraction(fps)  # positive
    if fps < GIF_MIN_FPS:
        raise ValueError(f"A GIF frame lasts at most 655.35 s, so {fps:g} fps cannot be written as a GIF (the "
                         f"lowest is {GIF_MIN_FPS:.4f} fps); raise --fps or drop --gif.")
    step = max(1, math.ceil(fps / GIF_MAX_FPS - 1e-9))
    return step, fps / step


def describe_gif(fps: float) -> str | None:
    """One line saying what the GIF of a video at ``fps`` does differently (frames dropped), or None when it
    keeps every frame; ValueError as :func:`gif_plan`. Commands print it before any work."""
    step, gif_fps = gif_plan(fps)
    if step == 1:
        return None
    return (f"--gif: GIFs play at most {GIF_MAX_FPS:g} fps (browsers slow shorter frame delays to 100 ms), so the "
            f"GIF of the {fps:g} fps video keeps every {_ordinal(step)} frame and plays at {gif_fps:g} fps, same "
            "duration (the mp4 keeps every frame).")


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def write_gif(path: str | os.PathLike, frames, fps: float) -> Path:
    """Write uint8 frames ``(T, H, W, 3)`` (numpy or torch) at ``fps`` as an animated GIF (looping); returns
    the path.

    Above 50 fps every n-th frame is written at fps / n (:func:`gif_plan`, :func:`describe_gif` says so in one
    line): GIF delays are whole centiseconds and browsers slow delays under 20 ms to 100 ms. PyAV's GIF encoder
    (256-colour ``rgb8`` palette) is ~30x faster than Pillow but makes larger files.
    """
    step, fps = gif_plan(fps)
    frames = _as_uint8_frames(frames)[::step]
    _, height, width, _ = frames.shape
    path = Path(path)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=_fps_fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb8"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def list_videos(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Video files (``VIDEO_EXTENSIONS``, case-insensitive) in ``folder`` (and its subfolders when
    ``recursive``), sorted by path. FileNotFoundError when ``folder`` is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a folder of videos ({'/'.join(VIDEO_EXTENSIONS)}).")
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


# --------------------------------------------------------------------------------------------
# Native log lines
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def native_stderr_to_logging(name: str):
    """Send what C/C++ code writes to file descriptor 2 inside the block to ``logging`` (DEBUG).

    decord's C++ core prints its own log lines (``[12:00:00] .../video_reader.cc:...``) straight to
    stderr; the reader raises a VideoReadError with the cause anyway, so the raw lines only go to the
    debug log (``opensora-plan -v``). Python's own ``sys.stderr`` is not touched.

    File descriptor 2 belongs to the whole process: the block holds a module lock, so threads (bucket
    probing opens readers in a pool) take turns. Without it two overlapping blocks restore each other's
    redirection and leave fd 2 on a deleted temporary file for the rest of the process. While a block
    runs, what *other* threads' native code writes to fd 2 goes to the debug log too.
    """
    with _STDERR_LOCK:
        yield from _redirect_native_stderr(name)


_STDERR_LOCK = threading.RLock()  # re-entrant: a block may open another reader (same thread, nested dup2 is safe)


def _redirect_native_stderr(name: str):
    fd = 2  # what C code writes to, whatever Python's sys.stderr has been replaced with
    try:
        os.fstat(fd)
    except OSError:  # no file descriptor 2 at all
        yield
        return
    with tempfile.TemporaryFile() as sink:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    logger.debug("%s: %s", name, line.strip())
