"""Text-to-video dataset: JSON parsing, frame sampling, transforms, captions, and bad-data handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from opensora_plan.data.datasets import (
    NoUsableVideoError,
    SkippedVideos,
    VideoCaptionDataset,
    collate_video_caption,
    load_video_entries,
)
from opensora_plan.data.transforms import image_slot_indices, temporal_window_indices
from opensora_plan.data.video_io import write_video

STEP = 10  # grey level per frame index in the test clips: frame i has value STEP * i


def index_clip(num_frames: int, height: int = 48, width: int = 64) -> torch.Tensor:
    """uint8 (T, H, W, 3) where every pixel of frame i is STEP * i (so decoded frames name their index)."""
    values = (torch.arange(num_frames) * STEP).to(torch.uint8)
    return values.view(-1, 1, 1, 1).expand(num_frames, height, width, 3).contiguous()


def decoded_indices(video: torch.Tensor) -> list[int]:
    """Frame indices back from a dataset video (3, T, S, S) in [-1, 1] made of index_clip frames."""
    levels = (video.mean(dim=(0, 2, 3)) + 1) / 2 * 255  # (T,)
    return [round(v / STEP) for v in levels.tolist()]


def write_json(folder, entries, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture()
def clips(tmp_path):
    """A folder with a 24-frame clip, a 6-frame clip, a corrupt file, and a JSON naming them (+ a missing one)."""
    write_video(tmp_path / "long.mp4", index_clip(24), fps=24, crf=0)
    write_video(tmp_path / "short.mp4", index_clip(6), fps=24, crf=0)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00not a video\x00" * 64)
    return tmp_path


# --------------------------------------------------------------------------------------------
# JSON parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, phrase",
    [
        ({"cap": "x"}, "no 'path'"),
        ({"path": "a.mp4"}, "no 'cap'"),
        ({"path": "a.mp4", "cap": 3}, "'cap' must be a string or a list"),
        ({"path": "a.mp4", "cap": []}, "empty list"),
        ({"path": "a.mp4", "cap": ["ok", 5]}, "'cap' item 1"),
        ("a.mp4", "must be an object"),
    ],
)
def test_malformed_entry_is_an_error_naming_the_entry(tmp_path, bad, phrase):
    path = write_json(tmp_path, [{"path": "a.mp4", "cap": "fine"}, {"path": "b.mp4", "cap": ["fine"]}, bad])
    with pytest.raises(ValueError, match=f"Entry 2 of .*{phrase}"):
        VideoCaptionDataset(path, num_frames=4, max_image_size=16)


def test_json_must_be_a_list_and_exist(tmp_path):
    with pytest.raises(ValueError, match="must hold a JSON list"):
        load_video_entries(write_json(tmp_path, {"path": "a.mp4"}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video_entries(tmp_path / "nope.json")


def test_paths_resolve_against_json_folder_video_folder_or_stay_absolute(tmp_path):
    sub = tmp_path / "meta"
    sub.mkdir()
    entries = [{"path": "clips/a.mp4", "cap": "x"}, {"path": str(tmp_path / "abs.mp4"), "cap": ["y", "z"]}]
    path = write_json(sub, entries)
    by_json = load_video_entries(path)
    assert by_json[0].path == sub / "clips" / "a.mp4"
    assert by_json[1].path == tmp_path / "abs.mp4"
    assert by_json[0].captions == ("x",) and by_json[1].captions == ("y", "z")
    by_folder = load_video_entries(path, video_folder=tmp_path / "videos")
    assert by_folder[0].path == tmp_path / "videos" / "clips" / "a.mp4"
    assert by_folder[1].path == tmp_path / "abs.mp4"


# --------------------------------------------------------------------------------------------
# Frame sampling and transforms
# --------------------------------------------------------------------------------------------


def test_temporal_window_matches_the_reference_rule():
    # window = 5 * 2 = 10 of 24 frames: start in [0, 13]; indices = floor(linspace(start, start + 9, 5))
    starts = set()
    for seed in range(200):
        indices = temporal_window_indices(24, 5, 2, generator=torch.Generator().manual_seed(seed))
        start = indices[0]
        starts.add(start)
        assert indices == [start + d for d in (0, 2, 4, 6, 9)]
    assert starts == set(range(14))
    # shorter than the window: start 0, frames repeat
    assert temporal_window_indices(6, 8, 1) == np.floor(np.linspace(0, 5, 8)).astype(int).tolist()
    assert image_slot_indices(17, 4) == [0, 5, 10, 16]  # floor(0, 5.33, 10.67, 16)


def test_sampled_frames_follow_the_window(clips):
    path = write_json(clips, [{"path": "long.mp4", "cap": "x"}])
    dataset = VideoCaptionDataset(path, num_frames=5, max_image_size=16, sample_rate=2)
    for seed in range(5):
        torch.manual_seed(seed)
        indices = decoded_indices(dataset[0]["video"])
        assert indices == [indices[0] + d for d in (0, 2, 4, 6, 9)]
        assert 0 <= indices[0] <= 13


def test_short_video_repeats_frames(clips):
    path = write_json(clips, [{"path": "short.mp4", "cap": "x"}])
    video = VideoCaptionDataset(path, num_frames=8, max_image_size=16)[0]["video"]
    assert decoded_indices(video) == [0, 0, 1, 2, 2, 3, 4, 5]


def test_center_crop_resize_flip_and_range(tmp_path):
    # 48x64 frames with a bright 8-pixel band at each side (cut by the centre crop) and a ramp inside
    frames = torch.zeros(4, 48, 64, 3, dtype=torch.uint8)
    frames[:, :, :8] = 255
    frames[:, :, 56:] = 255
    frames[:, :, 8:56, 0] = torch.linspace(0, 240, 48).to(torch.uint8)  # red ramp left -> right
    write_video(tmp_path / "a.mp4", frames, fps=8, crf=0)
    path = write_json(tmp_path, [{"path": "a.mp4", "cap": "x"}])
    dataset = VideoCaptionDataset(path, num_frames=4, max_image_size=24, random_flip=False)
    video = dataset[0]["video"]
    assert video.shape == (3, 4, 24, 24)
    assert video.min() >= -1 and video.max() <= 1
    # expected: the decoded frames cropped to the central 48x48, resized with the reference arguments
    from opensora_plan.data.video_io import read_video

    decoded, _ = read_video(tmp_path / "a.mp4")
    crop = decoded[:, :, 8:56].permute(0, 3, 1, 2).float() / 255
    expected = F.interpolate(crop, size=(24, 24), mode="bilinear", align_corners=True, antialias=True) * 2 - 1
    torch.testing.assert_close(video, expected.permute(1, 0, 2, 3), atol=1e-5, rtol=0)
    assert video[0, :, :, 0].mean() < video[0, :, :, -1].mean()  # ramp kept its direction (no flip)

    flipping = VideoCaptionDataset(path, num_frames=4, max_image_size=24)
    flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = flipping[0]["video"]
        if torch.allclose(out, video.flip(-1), atol=1e-5):
            flipped += 1
        else:
            torch.testing.assert_close(out, video, atol=1e-5, rtol=0)
    assert 8 <= flipped <= 32  # p = 0.5


def test_joint_images_come_from_the_same_clip(clips):
    path = write_json(clips, [{"path": "long.mp4", "cap": ["a cat", "a dog"]}])
    dataset = VideoCaptionDataset(path, num_frames=8, max_image_size=16, use_image_num=3)
    sample = dataset[0]
    video = sample["video"]
    assert video.shape == (3, 8 + 3, 16, 16)
    torch.testing.assert_close(video[:, 8:], video[:, image_slot_indices(8, 3)])
    assert len(sample["captions"]) == 4 and len(set(sample["captions"])) == 1


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def test_caption_is_drawn_at_random_not_always_the_first(clips):
    path = write_json(clips, [{"path": "short.mp4", "cap": ["first", "second", "third"]}])
    dataset = VideoCaptionDataset(path, num_frames=2, max_image_size=8)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        index, caption = dataset.pick_caption(0)
        assert caption == ["first", "second", "third"][index]
        seen.add(caption)
    assert seen == {"first", "second", "third"}
    torch.manual_seed(3)
    a = dataset[0]
    torch.manual_seed(3)
    b = dataset[0]
    assert a["captions"] == b["captions"] and torch.equal(a["video"], b["video"])  # seeded -> reproducible


def test_cfg_dropout_gives_the_empty_caption(clips):
    path = write_json(clips, [{"path": "short.mp4", "cap": "a caption"}])
    always = VideoCaptionDataset(path, num_frames=2, max_image_size=8, cfg_dropout=1.0, use_image_num=1)
    sample = always[0]
    assert sample["captions"] == ["", ""] and sample["caption_index"] == -1
    never = VideoCaptionDataset(path, num_frames=2, max_image_size=8, cfg_dropout=0.0)
    assert never[0]["captions"] == ["a caption"]
    sometimes = VideoCaptionDataset(path, num_frames=2, max_image_size=8, cfg_dropout=0.3)
    torch.manual_seed(0)
    dropped = sum(sometimes.pick_caption(0)[0] == -1 for _ in range(1000))
    assert 240 <= dropped <= 360


# --------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------


def test_corrupt_and_missing_videos_are_skipped_and_reported(clips):
    entries = [
        {"path": "corrupt.mp4", "cap": "c"},
        {"path": "missing.mp4", "cap": "m"},
        {"path": "long.mp4", "cap": "l"},
    ]
    dataset = VideoCaptionDataset(write_json(clips, entries), num_frames=4, max_image_size=16)
    sample = dataset[0]
    assert sample["index"] == 2 and sample["captions"] == ["l"]  # substitute: the next readable entry
    assert [s["path"] for s in sample["skipped"]] == [str(clips / "corrupt.mp4"), str(clips / "missing.mp4")]
    assert "no such file" in sample["skipped"][1]["reason"]
    assert dataset[2]["skipped"] == []

    batch = collate_video_caption([dataset[0], dataset[1], dataset[2]])
    assert batch["video"].shape == (3, 3, 4, 16, 16)
    assert batch["index"].tolist() == [2, 2, 2]
    assert len(batch["skipped"]) == 3  # corrupt + missing, then missing again
    tally = SkippedVideos()
    tally.update(batch["skipped"])
    assert tally.total == 3 and tally.counts[str(clips / "missing.mp4")] == 2
    assert "3 samples skipped (2 distinct videos)" in tally.summary()


def test_too_short_videos_are_skipped_when_min_frames_is_set(clips):
    entries = [{"path": "short.mp4", "cap": "s"}, {"path": "long.mp4", "cap": "l"}]
    dataset = VideoCaptionDataset(write_json(clips, entries), num_frames=8, max_image_size=8, min_frames=8)
    sample = dataset[0]
    assert sample["index"] == 1 and "too short: 6 frames" in sample["skipped"][0]["reason"]


def test_all_bad_is_a_clear_error(clips):
    entries = [{"path": "corrupt.mp4", "cap": "c"}, {"path": "missing.mp4", "cap": "m"}]
    dataset = VideoCaptionDataset(write_json(clips, entries), num_frames=4, max_image_size=8)
    with pytest.raises(NoUsableVideoError, match="all unreadable or too short.*data check"):
        dataset[0]


def test_skipped_reports_survive_dataloader_workers(clips):
    entries = [{"path": "corrupt.mp4", "cap": "c"}, {"path": "long.mp4", "cap": "l"}] * 2
    dataset = VideoCaptionDataset(write_json(clips, entries), num_frames=4, max_image_size=8)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_video_caption)
    tally = SkippedVideos()
    for batch in loader:
        assert batch["video"].shape == (2, 3, 4, 8, 8)
        tally.update(batch["skipped"])
    assert tally.total == 2 and list(tally.counts) == [str(clips / "corrupt.mp4")]


# --------------------------------------------------------------------------------------------
# data check
# --------------------------------------------------------------------------------------------


def test_data_check_reports_counts_stats_and_every_problem(clips, capsys):
    from opensora_plan import cli

    entries = [
        {"path": "long.mp4", "cap": ["one two three", "four five"]},
        {"path": "short.mp4", "cap": "six"},
        {"path": "corrupt.mp4", "cap": "seven eight"},
        {"path": "missing.mp4", "cap": "nine"},
        {"cap": "no path"},
    ]
    path = write_json(clips, entries)
    out = clips / "report.json"
    assert cli.main(["data", "check", str(path), "--num_frames", "9", "--json_out", str(out)]) == 1
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["entries"] == 5 and report["readable"] == 2
    assert [m["index"] for m in report["malformed"]] == [4]
    assert [u["index"] for u in report["unreadable"]] == [2, 3]
    assert report["frames"] == {"min": 6, "median": 15.0, "max": 24}
    assert report["height"]["max"] == 48 and report["width"]["min"] == 64
    assert report["fps"]["median"] == pytest.approx(24)
    assert report["captions"]["total"] == 5 and report["captions"]["words"] == {"min": 1, "median": 2, "max": 3}
    assert report["shorter_than_window"] == 1
    assert "2 readable, 2 unreadable" in printed
    assert "UNREADABLE   entry 3" in printed and "MALFORMED    entry 4" in printed


def test_data_check_of_a_clean_dataset_exits_zero(clips, capsys):
    from opensora_plan import cli

    path = write_json(clips, [{"path": "long.mp4", "cap": "a"}])
    assert cli.main(["data", "check", str(path)]) == 0
    assert "1 readable, 0 unreadable" in capsys.readouterr().out


def test_resize_to_the_same_size_is_the_identity_of_the_reference_call():
    from opensora_plan.data.transforms import resize_square

    frames = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    reference = F.interpolate(frames, size=(20, 20), mode="bilinear", align_corners=True, antialias=True)
    assert torch.equal(resize_square(frames, 20), reference)
