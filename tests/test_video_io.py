"""Video I/O: exact frame access by index (PyAV and decord agree), mp4/gif writing, clear read errors."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch

from opensora_plan.data.video_io import (
    VideoReadError,
    VideoReader,
    decord_available,
    list_videos,
    read_video,
    write_gif,
    write_video,
)

BACKENDS = ["pyav", pytest.param("decord", marks=pytest.mark.skipif(not decord_available(), reason="decord not installed"))]


def indexed_clip(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth moving gradients plus the frame index burned into two flat 16x16 blocks.

    The blocks hold the index's base-16 digits as grey levels 16*d + 8, so up to 256 frames are
    labelled and up to 7 levels of compression error per block still read back right.
    """
    assert num_frames <= 256 and width >= 32 and height >= 16
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (xx * 2 + t * 3) % 256
        frames[t, ..., 1] = (yy * 3 + t) % 256
        frames[t, ..., 2] = 128
        frames[t, :16, :16, :] = 16 * (t % 16) + 8
        frames[t, :16, 16:32, :] = 16 * (t // 16) + 8
    return frames


def burned_index(frames: torch.Tensor) -> list[int]:
    """Recover the burned-in index of each frame from the centres of its two digit blocks."""
    def digit(block: torch.Tensor) -> int:
        return int((block.float().mean() - 8) / 16 + 0.5)

    return [digit(f[4:12, 4:12]) + 16 * digit(f[4:12, 20:28]) for f in frames]


def psnr_uint8(a, b) -> float:
    mse = float(((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).mean())
    return 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = indexed_clip(33)
    path = write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, fps=24)
    return path, frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_keeps_count_fps_size_and_quality(clip, backend):
    path, frames = clip
    with VideoReader(path, backend=backend) as reader:
        assert (reader.num_frames, reader.height, reader.width) == frames.shape[:3]
        assert reader.fps == pytest.approx(24)
        decoded = reader.get_frames(range(reader.num_frames))
    assert decoded.dtype == torch.uint8 and decoded.shape == frames.shape
    assert burned_index(decoded) == list(range(len(frames)))
    assert psnr_uint8(decoded, frames) > 35


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_by_index_any_order_with_repeats(clip, backend):
    path, _ = clip
    wanted = [32, 3, 3, 17, 0, 31]
    with VideoReader(path, backend=backend) as reader:
        frames = reader.get_frames(wanted)
        assert burned_index(frames) == wanted
        everything = reader.get_frames(range(reader.num_frames))
    assert torch.equal(frames, everything[wanted])


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_decord_and_pyav_give_identical_frames(clip):
    path, _ = clip
    wanted = [5, 0, 32, 16, 16]
    a, fps_a = read_video(path, wanted, backend="pyav")
    b, fps_b = read_video(path, wanted, backend="decord")
    assert torch.equal(a, b)
    assert fps_a == pytest.approx(fps_b)


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_auto_backend_falls_back_to_pyav_where_decord_fails(tmp_path):
    # decord 0.6.0 cannot copy out frames 48 px wide (a decord bug); "auto" must still read them.
    frames = indexed_clip(5, 32, 48)
    path = write_video(tmp_path / "w48.mp4", frames, fps=5)
    with pytest.raises(VideoReadError, match="DECORDArrayCopyFromTo"):
        VideoReader(path, backend="decord").get_frames([0])
    with VideoReader(path, backend="auto") as reader:
        assert burned_index(reader.get_frames([4, 0])) == [4, 0]
        assert reader.backend == "pyav"


def test_pyav_seeks_exactly_across_key_frames(tmp_path):
    # x264 with a key frame every 8 frames, so far-apart indices need real seeks (not just decoding on).
    frames = indexed_clip(60)
    path = tmp_path / "gop.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"g": "8", "keyint_min": "8", "crf": "12"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    wanted = [59, 1, 40, 41, 9, 8, 7, 33]
    with VideoReader(path, backend="pyav") as reader:
        assert reader.num_frames == 60
        assert burned_index(reader.get_frames(wanted)) == wanted


def test_counts_frames_when_container_stores_no_count(tmp_path):
    # WebM/Matroska stores no frame count (stream.frames == 0); the reader counts packets instead.
    frames = indexed_clip(12)
    path = tmp_path / "clip.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=12)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    with VideoReader(path, backend="pyav") as reader:
        assert reader.num_frames == 12
        assert burned_index(reader.get_frames([11, 0, 6])) == [11, 0, 6]


def test_write_accepts_torch_and_gif_reads_back(tmp_path):
    frames = torch.from_numpy(indexed_clip(6, 32, 40))
    path = write_gif(tmp_path / "out.gif", frames, fps=10)
    decoded, _ = read_video(path, backend="pyav")
    assert decoded.shape == frames.shape
    assert burned_index(decoded) == list(range(6))  # 256-colour palette: pixels approximate, order exact


@pytest.mark.parametrize("backend", ["pyav", "auto"])  # decord itself fails on some RGB H.264 sizes; auto falls back
def test_lossless_write_reads_back_bit_exact(tmp_path, backend):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)  # saturated colours: yuv420p would blur them
    path = write_video(tmp_path / "exact.mp4", frames, fps=8, lossless=True)
    decoded, fps = read_video(path, backend=backend)
    assert fps == 8 and np.array_equal(decoded.numpy(), frames)
    lossy, _ = read_video(write_video(tmp_path / "lossy.mp4", frames, fps=8, crf=0), backend=backend)
    assert not np.array_equal(lossy.numpy(), frames)  # crf 0 alone keeps yuv420p's halved colour planes


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even frame size"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 33, 32, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 32, 32, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "chw.mp4", np.zeros((2, 3, 32, 32), np.uint8), fps=8)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_missing_and_truncated_files_raise_video_read_error(tmp_path, clip, backend):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError, match="garbage.mp4"):
        VideoReader(garbage, backend=backend)
    with pytest.raises(VideoReadError, match="no such file"):
        VideoReader(tmp_path / "missing.mp4", backend=backend)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip[0].read_bytes()[: clip[0].stat().st_size // 2])
    with pytest.raises(VideoReadError, match="truncated.mp4"):
        VideoReader(truncated, backend=backend).get_frames([0])
    # A VideoReadError is both a ValueError and an OSError, so either `except` catches it.
    assert issubclass(VideoReadError, ValueError) and issubclass(VideoReadError, OSError)


def test_out_of_range_index_is_a_clear_error(clip):
    path, frames = clip
    with VideoReader(path, backend="pyav") as reader, pytest.raises(IndexError, match="out of range"):
        reader.get_frames([0, len(frames)])


def test_list_videos_filters_by_extension(tmp_path):
    for name in ["b.mp4", "a.MKV", "c.webm", "notes.txt", "d.avi", "e.mov"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_videos(tmp_path)] == ["a.MKV", "b.mp4", "c.webm", "d.avi", "e.mov"]


@pytest.mark.parametrize("suffix, size", [(".jpg", 64), (".jpg", 24), (".png", 64), (".webp", 64)])
def test_single_images_read_as_one_frame_videos(tmp_path, suffix, size):
    """JPEGs over ~4 KB (FFmpeg's image2 demuxer) used to decode nothing after the reader's demux pass."""
    from PIL import Image

    pixels = (np.random.default_rng(0).random((size, size + 16, 3)) * 255).astype(np.uint8)  # noise: a large JPEG
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path, quality=95)
    with VideoReader(path) as reader:
        assert (reader.num_frames, reader.height, reader.width) == (1, size, size + 16)
        frames = reader.get_frames([0, 0])
        assert frames.shape == (2, size, size + 16, 3) and torch.equal(frames[0], frames[1])
        again = reader.get_frames([0])  # a second read reopens again
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    # The picture PIL decodes (FFmpeg upsamples the noise's chroma differently, so compare by correlation).
    assert np.corrcoef(again[0].float().flatten(), expected.float().flatten())[0, 1] > 0.9
