"""The text-to-video training dataset: a JSON list of videos and captions (spec section 5).

The file is a JSON list of ``{"path": "clips/a.mp4", "cap": ["a caption", "another caption"]}``
(``cap`` may also be one string). Relative paths resolve against ``video_folder`` when given, else
against the JSON file's folder. A malformed entry is an error at construction that names the entry.

Each sample is a random clip of ``num_frames`` frames (the reference's temporal crop, centre crop,
resize, random flip, [-1, 1]) as ``video`` (3, T + n, S, S), where the last ``n = use_image_num``
frames are the joint-training images taken from the same clip, and ``captions``, a list of 1 + n raw
strings: slot 0 for the video, slots 1..n for the images (the same caption repeated, as the
reference). The caption is drawn at random from the entry's list every time (the reference always
took ``cap[0]``); with ``cfg_dropout`` p it is replaced by the empty string, the unconditional input
used by classifier-free guidance at sampling time.

Bad videos never stop a run and are never silent: a missing, unreadable or too-short video is
replaced by the next index (deterministically: index + 1, + 2, ...), and the sample reports what was
skipped in ``sample["skipped"]`` (a list of ``{"path", "reason"}``). :func:`collate_video_caption`
gathers those lists per batch, so a training loop can count and list them even with worker processes.

The end of the file holds the caption-less clip dataset of CausalVAE training (``VAEVideoDataset``,
spec 1.8: crop without resize); videos are listed with ``video_io.list_videos``.

All randomness comes from torch's global RNG, which DataLoader workers (and
``train.sampler.SeededSamples``) seed per worker / per sample.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .transforms import (
    center_crop,
    image_slot_indices,
    temporal_window_indices,
    video_bucket_transform,
    video_train_transform,
    window_indices,
)
from .video_io import VideoReader, VideoReadError, VideoTooShortError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The JSON list
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoEntry:
    """One validated JSON entry: the resolved video path and its captions (at least one)."""

    path: Path
    captions: tuple[str, ...]


def entry_problem(entry) -> str | None:
    """What is wrong with one raw JSON entry (one phrase), or None when it is well formed."""
    if not isinstance(entry, dict):
        return f"must be an object with 'path' and 'cap', got {type(entry).__name__}"
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        return "has no 'path' (a non-empty string is required)"
    if "cap" not in entry:
        return "has no 'cap' (a caption string or a list of caption strings is required)"
    cap = entry["cap"]
    if isinstance(cap, str):
        return None
    if not isinstance(cap, list):
        return f"'cap' must be a string or a list of strings, got {type(cap).__name__}"
    if not cap:
        return "'cap' is an empty list (give at least one caption)"
    bad = [i for i, c in enumerate(cap) if not isinstance(c, str)]
    if bad:
        return f"'cap' item {bad[0]} is a {type(cap[bad[0]]).__name__}, not a string"
    return None


def resolve_video_path(path: str, json_dir: Path, video_folder: str | os.PathLike | None) -> Path:
    """Absolute paths stay; relative ones resolve against ``video_folder`` if given, else the JSON's folder."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    return Path(video_folder) / candidate if video_folder is not None else json_dir / candidate


def read_raw_entries(data_path: str | os.PathLike) -> list:
    """The JSON list in ``data_path``, with one-sentence errors for a missing file or a non-list."""
    from ..utils import read_text_file

    data_path = Path(data_path)
    if not data_path.exists():
        raise FileNotFoundError(f"Dataset file {data_path} does not exist; give the path of the dataset JSON list.")
    text = read_text_file(data_path, "Dataset file")  # a video given by mistake: one line naming the file
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"Dataset file {data_path} is not valid JSON ({err}); fix the file.") from err
    if not isinstance(raw, list):
        raise ValueError(
            f"Dataset file {data_path} must hold a JSON list of {{'path': ..., 'cap': ...}} objects, "
            f"got a {type(raw).__name__}."
        )
    return raw


def load_video_entries(data_path: str | os.PathLike, video_folder: str | os.PathLike | None = None) -> list[VideoEntry]:
    """Parse and validate the whole JSON list; the first malformed entry raises a ValueError naming it."""
    data_path = Path(data_path)
    raw = read_raw_entries(data_path)
    entries = []
    for index, entry in enumerate(raw):
        problem = entry_problem(entry)
        if problem is not None:
            raise ValueError(f"Entry {index} of {data_path} {problem}; fix or remove that entry.")
        cap = entry["cap"]
        captions = (cap,) if isinstance(cap, str) else tuple(cap)
        entries.append(VideoEntry(resolve_video_path(entry["path"], data_path.parent, video_folder), captions))
    if not entries:
        raise ValueError(f"Dataset file {data_path} lists no videos; add at least one entry.")
    return entries


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class VideoCaptionDataset(Dataset):
    """Video clips + raw captions for text-to-video training (see the module docstring).

    Args:
        data_path: the JSON list.
        num_frames: frames per clip (17 or 65 for the released stages).
        max_image_size: side of the square output frames (256 or 512).
        sample_rate: temporal stride of the window (the reference trains with 1).
        use_image_num: joint-training images appended after the video frames (0 = video only).
        video_folder: base folder for relative paths (default: the JSON's folder).
        cfg_dropout: probability of replacing the caption by "" (0 = the reference recipe).
        min_frames: videos with fewer frames are skipped as too short. Default 1: any decodable
            video is used and short ones repeat frames, as the reference does.
        random_flip: horizontal flip with p = 0.5 (the reference always flips at random).
        max_substitutions: how many following indices to try before giving up on a sample.
        frame_size: (height, width) output frames instead of the ``max_image_size`` square: centred crop
            to that aspect ratio, then resize (``transforms.video_bucket_transform``; never upscaled, a
            smaller video is unusable). Used for a bucketed run's held-out clips.
        entries: the entries to use instead of reading ``data_path`` (e.g. the readable rows of a data index,
            :meth:`~opensora_plan.data.index.DataIndex.entries`, a lazy sequence); ``self[i]`` is ``entries[i]``.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        num_frames: int,
        max_image_size: int,
        sample_rate: int = 1,
        use_image_num: int = 0,
        video_folder: str | os.PathLike | None = None,
        cfg_dropout: float = 0.0,
        min_frames: int = 1,
        random_flip: bool = True,
        max_substitutions: int = 100,
        frame_size: tuple[int, int] | None = None,
        entries: Sequence[VideoEntry] | None = None,
    ):
        if num_frames < 1 or sample_rate < 1 or max_image_size < 1:
            raise ValueError(
                f"num_frames, sample_rate and max_image_size must be positive, got {num_frames}, {sample_rate}, "
                f"{max_image_size}."
            )
        if use_image_num < 0:
            raise ValueError(f"use_image_num must be 0 or more, got {use_image_num}.")
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout is a probability in [0, 1], got {cfg_dropout}.")
        if min_frames < 1:
            raise ValueError(f"min_frames must be at least 1, got {min_frames}.")
        self.data_path = Path(data_path)
        self.entries = load_video_entries(data_path, video_folder) if entries is None else entries
        self.num_frames = num_frames
        self.max_image_size = max_image_size
        self.sample_rate = sample_rate
        self.use_image_num = use_image_num
        self.cfg_dropout = cfg_dropout
        self.min_frames = min_frames
        self.random_flip = random_flip
        self.max_substitutions = max_substitutions
        self.frame_size = frame_size

    def __len__(self) -> int:
        return len(self.entries)

    def load_clip(self, index: int) -> torch.Tensor:
        """The transformed clip of entry ``index``: (3, T + n, S, S) in [-1, 1]; VideoReadError if unusable."""
        entry = self.entries[index]
        with VideoReader(entry.path) as reader:
            if reader.num_frames < self.min_frames:
                raise VideoTooShortError(
                    f"Video {entry.path} is too short: {reader.num_frames} frames, at least {self.min_frames} needed."
                )
            indices = temporal_window_indices(reader.num_frames, self.num_frames, self.sample_rate)
            frames = reader.get_frames(indices)  # (T, H, W, 3) uint8
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        if self.frame_size is None:
            video = video_train_transform(frames, self.max_image_size, flip)  # (3, T, S, S)
        else:
            try:
                video = video_bucket_transform(frames, *self.frame_size, flip)  # (3, T, H, W)
            except ValueError as err:  # smaller than the frame size: never upscaled
                raise VideoReadError(f"Video {entry.path}: {err}") from None
        if self.use_image_num:
            # Images come from the already transformed clip (same crop and flip), as the reference.
            images = video[:, image_slot_indices(self.num_frames, self.use_image_num)]  # (3, n, S, S)
            video = torch.cat([video, images], dim=1)  # (3, T + n, S, S)
        return video

    def load_clip_or_substitute(self, index: int) -> tuple[int, torch.Tensor, list[dict]]:
        """``(used_index, clip, skipped)``: entry ``index`` or, if unusable, the next usable one."""
        skipped = []
        for offset in range(min(self.max_substitutions + 1, len(self))):
            candidate = (index + offset) % len(self)
            try:
                return candidate, self.load_clip(candidate), skipped
            except VideoReadError as err:
                logger.warning("skipping video: %s", err)
                skipped.append({"path": str(self.entries[candidate].path), "reason": str(err)})
        raise NoUsableVideoError(
            f"None of the {len(skipped)} entries of {self.data_path} tried for sample {index} has a usable video "
            f"(all unreadable or too short; last: {skipped[-1]['reason']}); run `opensora-plan data check "
            f"{self.data_path}` and fix or remove them."
        )

    def pick_caption(self, index: int) -> tuple[int, str]:
        """``(caption_index, caption)`` drawn at random; ``(-1, "")`` when dropped for guidance."""
        if self.cfg_dropout and bool(torch.rand(()) < self.cfg_dropout):
            return -1, ""
        captions = self.entries[index].captions
        choice = int(torch.randint(0, len(captions), (1,)))
        return choice, captions[choice]

    def __getitem__(self, index: int) -> dict:
        used, video, skipped = self.load_clip_or_substitute(index)
        caption_index, caption = self.pick_caption(used)
        return {
            "video": video,  # (3, T + n, S, S)
            "captions": [caption] * (1 + self.use_image_num),  # slot 0: video, 1..n: images
            "caption_index": caption_index,
            "index": used,
            "skipped": skipped,
        }


# --------------------------------------------------------------------------------------------
# Batching and reporting skipped videos
# --------------------------------------------------------------------------------------------


def collate_video_caption(samples: list[dict]) -> dict:
    """Stack tensors, keep strings and per-sample lists as lists, and merge the ``skipped`` reports.

    ``captions`` becomes a list of B lists (1 + n strings each); ``skipped`` one flat list for the batch.
    """
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "skipped":
            batch[key] = [item for v in values for item in v]
        elif torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class NoUsableVideoError(ValueError):
    """Every video a sample could fall back to is unreadable or too short (training cannot start or go on)."""


def first_usable(index: int, paths: Sequence[Path], load,
                 max_substitutions: int = 100) -> tuple[int, object, list[dict]]:
    """``(used_index, load(used_index), skipped)``: ``index``, or when ``load`` raises VideoReadError for it, the
    next index that loads (index + 1, + 2, ..., wrapping; at most ``max_substitutions`` others). ``skipped``
    lists ``{"path", "reason"}`` of the videos passed over, for :class:`SkippedVideos`. NoUsableVideoError
    when none of them loads."""
    skipped = []
    for offset in range(min(max_substitutions + 1, len(paths))):
        candidate = (index + offset) % len(paths)
        try:
            return candidate, load(candidate), skipped
        except VideoReadError as err:
            logger.warning("skipping video: %s", err)
            skipped.append({"path": str(paths[candidate]), "reason": str(err)})
    raise NoUsableVideoError(
        f"None of the {len(skipped)} videos tried for sample {index} is usable (all unreadable or too small; "
        f"last: {skipped[-1]['reason']}); check the data with `opensora-plan data check`."
    )


class SkippedVideos:
    """Accumulates ``batch["skipped"]`` over an epoch and summarises it (count, distinct paths, reasons).

    ``run_total`` / ``run_paths`` keep counting over the whole run (:meth:`reset` clears only the epoch).
    """

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.reasons: dict[str, str] = {}
        self.run_total = 0
        self.run_paths: set[str] = set()

    def update(self, skipped: list[dict]) -> None:
        for item in skipped:
            self.counts[item["path"]] += 1
            self.reasons[item["path"]] = item["reason"]
            self.run_total += 1
            self.run_paths.add(item["path"])

    def run_report(self) -> dict:
        return {"skipped_video_reads": self.run_total, "skipped_video_files": len(self.run_paths)}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per distinct path, or '' when nothing was skipped."""
        if not self.counts:
            return ""
        lines = [f"{self.total} samples skipped ({len(self.counts)} distinct videos):"]
        lines += [f"  {path} (x{n}): {self.reasons[path]}" for path, n in sorted(self.counts.items())]
        return "\n".join(lines)

    def reset(self) -> None:
        self.counts.clear()
        self.reasons.clear()


# --------------------------------------------------------------------------------------------
# Clips without captions (CausalVAE training and evaluation)
# --------------------------------------------------------------------------------------------

class VAEVideoDataset(Dataset):
    """Clips for VAE training, as the reference's VideoDataset (spec 1.8).

    A random window of ``num_frames * sample_rate`` frames (short videos repeat frames),
    ``num_frames`` evenly spaced indices in it, values to [0, 1], center crop to
    ``resolution`` x ``resolution`` (no resize), then 2x - 1. Each sample is
    ``{"video": (3, T, R, R) in [-1, 1], "index", "skipped"}``. An unreadable video, or one smaller
    than the crop, is replaced by the next index and reported in ``skipped`` (``{"path", "reason"}``).
    ``deterministic=True`` always takes the window at frame 0 (validation clips).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], num_frames: int, resolution: int, sample_rate: int = 1,
                 deterministic: bool = False, max_substitutions: int = 100):
        if not paths:
            raise ValueError("The VAE dataset got no videos; point --video_path or --data_path at some videos.")
        if num_frames < 1 or sample_rate < 1 or resolution < 1:
            raise ValueError(
                f"num_frames, sample_rate and resolution must be positive, got {num_frames}, {sample_rate}, {resolution}."
            )
        self.paths = [Path(p) for p in paths]
        self.num_frames = num_frames
        self.resolution = resolution
        self.sample_rate = sample_rate
        self.deterministic = deterministic
        self.max_substitutions = max_substitutions

    def __len__(self) -> int:
        return len(self.paths)

    def load_clip(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        with VideoReader(path) as reader:
            if min(reader.height, reader.width) < self.resolution:
                raise VideoReadError(
                    f"Video {path} is {reader.width}x{reader.height}, smaller than the {self.resolution}x"
                    f"{self.resolution} crop (--resolution)."
                )
            if self.deterministic:
                indices = window_indices(reader.num_frames, self.num_frames, self.sample_rate, start=0)
            else:
                indices = temporal_window_indices(reader.num_frames, self.num_frames, self.sample_rate)
            frames = reader.get_frames(indices)  # (T, H, W, 3) uint8
        video = frames.permute(3, 0, 1, 2).float() / 255.0  # (3, T, H, W) in [0, 1]
        video = center_crop(video, self.resolution)  # (3, T, R, R)
        return (video * 2.0 - 1.0).contiguous()

    def __getitem__(self, index: int) -> dict:
        used, video, skipped = first_usable(index, self.paths, self.load_clip, self.max_substitutions)
        return {"video": video, "index": used, "skipped": skipped}
