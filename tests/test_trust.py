"""Trustworthy outputs (issue 10): no silent wrong result, no traceback, the gate checks what training reads.

Each test names the kind of fault it guards against; the inputs are small and built here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from opensora_plan import cli
from opensora_plan.data.video_io import VideoReader, decord_available, list_videos, read_video, write_gif, write_video


def _one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), err
    assert "Traceback" not in err, err
    return lines[-1]


# --------------------------------------------------------------------------------------------
# Item 5: identical frames -> identical bytes
# --------------------------------------------------------------------------------------------


def _smooth_frames(seed: int, t: int = 17, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (t, size, size, 3), dtype=np.uint8)
    return (np.cumsum(noise, axis=1) % 256).astype(np.uint8)  # (T, H, W, 3) uint8


def test_written_mp4_bytes_depend_only_on_the_frames(tmp_path):
    """x264's macroblock-tree rate control read memory that earlier encodes had left behind, so the same
    frames gave different files (3 of 6 writes of this demo video before the fix, pixels up to 22 levels
    apart). The frames are the shipped demo model's video; a larger encode between writes varies that
    memory the way a sampling process does."""
    assert cli.main(["sample", "a red circle moving left", "--seed", "2", "--num_sampling_steps", "5",
                     "--save_img_path", str(tmp_path / "a")]) == 0
    assert cli.main(["sample", "a red circle moving left", "--seed", "2", "--num_sampling_steps", "5",
                     "--save_img_path", str(tmp_path / "b")]) == 0
    first, second = (next((tmp_path / d).glob("*.mp4")).read_bytes() for d in "ab")
    assert first == second
    frames, _ = read_video(next((tmp_path / "a").glob("*.mp4")))
    digests = set()
    for i in range(6):
        write_video(tmp_path / "other.mp4", _smooth_frames(i + 1, t=9, size=256), fps=8)
        digests.add(hashlib.sha256(write_video(tmp_path / f"{i}.mp4", frames, fps=8).read_bytes()).hexdigest())
    assert len(digests) == 1
    gifs = {hashlib.sha256(write_gif(tmp_path / f"{i}.gif", frames, fps=8).read_bytes()).hexdigest() for i in range(2)}
    assert len(gifs) == 1


# --------------------------------------------------------------------------------------------
# Item 6: rotation metadata
# --------------------------------------------------------------------------------------------


def _rotated_mp4(path: Path, degrees: int, coded_w: int = 64, coded_h: int = 48, frames: int = 5) -> Path:
    """A phone-style clip: coded landscape, a display matrix saying 'turn by `degrees` counter-clockwise'.
    A white block marks the top-left corner of the coded frame."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, "yuv420p"
        stream.set_display_rotation(degrees)
        for i in range(frames):
            image = np.zeros((coded_h, coded_w, 3), np.uint8)
            image[:8, :16] = 255
            image[:, :, 1] = 30 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("degrees, corner", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotated_video_comes_back_in_display_orientation_from_every_backend(tmp_path, degrees, corner):
    path = _rotated_mp4(tmp_path / "phone.mp4", degrees)
    backends = ["pyav", "auto"] + (["decord"] if decord_available() else [])
    outputs = {}
    for backend in backends:
        with VideoReader(path, backend=backend) as reader:
            expected_hw = (48, 64) if degrees == 180 else (64, 48)
            assert (reader.height, reader.width) == expected_hw
            outputs[backend] = reader.get_frames(range(reader.num_frames))
            assert outputs[backend].shape == (5, *expected_hw, 3)
    for backend in backends[1:]:
        assert torch.equal(outputs[backend], outputs["pyav"]), backend
    white = (outputs["pyav"][0, :, :, 0] > 200).nonzero().float().mean(0)  # (row, col) of the marker
    h, w = outputs["pyav"].shape[1:3]
    rows = "top" if white[0] < h / 2 else "bottom"
    cols = "left" if white[1] < w / 2 else "right"
    assert f"{rows}-{cols}" == corner


def test_data_check_reports_the_size_training_reads(tmp_path):
    from opensora_plan.data.datasets import VideoCaptionDataset, check_dataset

    _rotated_mp4(tmp_path / "phone.mp4", 90, frames=9)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"path": "phone.mp4", "cap": "a phone clip"}]))
    report = check_dataset(data, progress=False)
    assert report["readable"] == 1 and report["height"]["max"] == 64 and report["width"]["max"] == 48
    with VideoReader(tmp_path / "phone.mp4") as reader:  # what the dataset opens
        assert (reader.height, reader.width) == (64, 48)
    sample = VideoCaptionDataset(data, num_frames=5, max_image_size=32)[0]
    assert sample["skipped"] == [] and sample["video"].shape == (3, 5, 32, 32)


# --------------------------------------------------------------------------------------------
# One video-listing function
# --------------------------------------------------------------------------------------------


def test_one_video_listing_function(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.mp4", "b.MOV", "sub/c.webm", "sub/d.mkv", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_videos(tmp_path)] == ["a.mp4", "b.MOV"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_videos(tmp_path, recursive=True)] == [
        "a.mp4", "b.MOV", "sub/c.webm", "sub/d.mkv"]
    import opensora_plan.data.datasets as datasets

    assert not hasattr(datasets, "find_videos") and not hasattr(datasets, "VIDEO_SUFFIXES")
