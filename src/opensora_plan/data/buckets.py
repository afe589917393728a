"""Buckets: train on mixed resolutions, aspect ratios and durations in one run (docs/training.md, "Buckets").

A *bucket* is one training shape ``frames x height x width`` (pixels). A bucket spec lists several: a
string ``"17x256x256,17x192x320,17x320x192,65x256x256,1x256x256"``, a preset name (:data:`PRESETS`) or
a JSON / YAML file holding a list of ``{"frames", "height", "width"[, "batch_size"]}``.

Rules (checked by :func:`parse_buckets`): ``frames`` is 1 (images) or 1 + 4k (the CausalVAE's time
compression), ``height`` / ``width`` are multiples of 16 (8 x the VAE's spatial compression x LatteT2V's
patch size 2). Every clip is assigned once, at dataset construction, by :func:`assign_bucket`:

1. candidates are the buckets the clip is long enough for (``(frames - 1) x sample_rate + 1`` source
   frames, :func:`needed_frames`: what the loader's window needs for distinct frames at that stride) and
   large enough for (clip height >= bucket height and clip width >= bucket width: clips are never
   upscaled; a clip too small for every bucket is left out with the reason "too small");
2. among them, the closest aspect ratio wins (distance ``|log(w/h) - log(W/H)|``), then the most
   frames, then the largest area, then the earlier bucket of the spec (deterministic ties).

The clip is then centre-cropped to the bucket's aspect ratio and resized to the bucket's size
(:func:`~opensora_plan.data.transforms.video_bucket_transform`): content is never stretched.

Batch sizes differ per bucket at (about) the same token budget: ``budget = batch of the first bucket x
its tokens`` and ``batch_b = max(1, floor(budget / tokens_b))``, where tokens are the latent patches of
one sample (``(t + use_image_num) x h/16 x w/16``) and the first bucket's batch is its spec-file
``batch_size``, else ``--train_batch_size``; a ``batch_size`` in the spec file overrides a bucket's. The data order is
:class:`~opensora_plan.train.sampler.BucketBatchSampler`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .datasets import NoUsableVideoError, VideoCaptionDataset, read_raw_entries
from .video_io import VideoReader, VideoReadError

logger = logging.getLogger(__name__)

TEMPORAL_COMPRESSION = 4  # CausalVAEModel_4x8x8
SPATIAL_MULTIPLE = 16  # 8 (VAE) x 2 (LatteT2V patch size)

PRESETS = {
    # Stage-1 size, both 16:9 orientations at about the same pixel count, stage-2 length, and images.
    "t2v_256": "17x256x256,17x192x320,17x320x192,65x256x256,1x256x256",
    "t2v_512": "65x512x512,65x384x640,65x640x384,1x512x512",
}


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """One training shape in pixels; ``batch_size`` None until :func:`resolve_batch_sizes` (or the spec) sets it."""

    frames: int
    height: int
    width: int
    batch_size: int | None = None

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    def latent_tokens(self, temporal: int = TEMPORAL_COMPRESSION, patch_pixels: int = SPATIAL_MULTIPLE,
                      use_image_num: int = 0) -> int:
        """Latent patches of one sample: ``(1 + (frames - 1) / temporal + use_image_num) x (height / p) x (width / p)``
        (each joint-training image adds one latent frame at the bucket's size)."""
        latent_frames = (self.frames - 1) // temporal + 1 + use_image_num
        return latent_frames * (self.height // patch_pixels) * (self.width // patch_pixels)


def _bucket_problem(frames, height, width, temporal: int, multiple: int) -> str | None:
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{name} must be a positive integer, got {value!r}"
    if frames != 1 and (frames - 1) % temporal:
        return f"frames {frames} is not 1 or 1 + {temporal}k (e.g. 17, 65)"
    if height % multiple or width % multiple:
        return (f"height and width must be multiples of {multiple} pixels (the VAE shrinks each side 8x and "
                f"LatteT2V cuts latents into 2x2 patches), got {height}x{width}")
    return None


def parse_buckets(spec: str | os.PathLike, temporal: int = TEMPORAL_COMPRESSION,
                  multiple: int = SPATIAL_MULTIPLE) -> list[Bucket]:
    """Buckets from a spec string (``"17x256x256,1x256x256"``), a preset name or a JSON / YAML file.

    A file holds a list of ``{"frames", "height", "width"}`` objects with an optional ``"batch_size"``
    (fixes that bucket's batch size instead of the token budget), or ``{"buckets": [...]}``.
    Raises ValueError naming the bad item (malformed, not 1 or 1 + 4k frames, sides not multiples of
    16, duplicates) and FileNotFoundError for a missing ``.json`` / ``.yaml`` file.
    """
    text = str(spec).strip()
    if not text:
        raise ValueError(f"--buckets is an empty bucket spec; give e.g. {PRESETS['t2v_256']!r}, a preset "
                         f"({', '.join(PRESETS)}) or a .json/.yaml file, or leave --buckets out.")
    if text in PRESETS:
        text = PRESETS[text]
    path = Path(text).expanduser()
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.is_file():
        items = _read_spec_file(path)
    else:
        items = []
        for part in (p.strip() for p in text.split(",")):
            match = re.fullmatch(r"(\d+)\s*x\s*(\d+)\s*x\s*(\d+)", part)
            if match is None:
                raise ValueError(f"--buckets item {part!r} is not FRAMESxHEIGHTxWIDTH (e.g. 17x256x256), a preset "
                                 f"({', '.join(PRESETS)}) or a .json/.yaml file.")
            items.append(dict(zip(("frames", "height", "width"), map(int, match.groups()))))
    buckets = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not {"frames", "height", "width"} <= item.keys():
            raise ValueError(f"--buckets item {i} ({item!r}) needs 'frames', 'height' and 'width'.")
        unknown = sorted(item.keys() - {"frames", "height", "width", "batch_size"})
        if unknown:
            raise ValueError(f"--buckets item {i} has unknown keys {unknown}; use frames, height, width, batch_size.")
        problem = _bucket_problem(item["frames"], item["height"], item["width"], temporal, multiple)
        batch = item.get("batch_size")
        if problem is None and batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            problem = f"batch_size must be a positive integer, got {batch!r}"
        if problem:
            raise ValueError(f"--buckets item {i} ({item['frames']}x{item['height']}x{item['width']}): {problem}.")
        buckets.append(Bucket(item["frames"], item["height"], item["width"], batch))
    names = [b.name for b in buckets]
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise ValueError(f"--buckets lists {duplicates[0]} more than once; list every bucket once.")
    return buckets


def _read_spec_file(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"--buckets file {path} does not exist; give a spec string, a preset "
                                f"({', '.join(PRESETS)}) or an existing .json/.yaml file.")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # pyyaml: a dependency of accelerate, always installed

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise ValueError(f"--buckets file {path} cannot be parsed ({_parse_error_where(err)}); fix the file.") from None
    if isinstance(data, dict) and "buckets" in data:
        data = data["buckets"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"--buckets file {path} must hold a non-empty list of {{frames, height, width}} objects.")
    return data


def _parse_error_where(err: Exception) -> str:
    """``line N, column M: what`` of a JSON or YAML parser error, on one line (YAML's own text spans five)."""
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    mark = getattr(err, "problem_mark", None)
    what = " ".join(str(getattr(err, "problem", None) or err).split())
    if mark is not None:
        context = getattr(err, "context", None)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}" + (f" ({context})" if context else "")
    return f"{type(err).__name__}: {what}"


def resolve_batch_sizes(buckets: list[Bucket], base_batch_size: int, temporal: int = TEMPORAL_COMPRESSION,
                        patch_pixels: int = SPATIAL_MULTIPLE, use_image_num: int = 0) -> list[Bucket]:
    """Fill each bucket's batch size from the token budget ``batch(first bucket) x tokens(first bucket)``.

    The first bucket's batch is its ``batch_size`` from the spec file, else ``base_batch_size``
    (``--train_batch_size``). Tokens count every latent frame a sample carries, the ``use_image_num``
    joint-training images included (:meth:`Bucket.latent_tokens`). ``batch_b = max(1, floor(budget /
    tokens_b))``; a batch size given in the spec is kept.
    """
    if base_batch_size < 1:
        raise ValueError(f"The base batch size must be at least 1, got {base_batch_size}.")

    def tokens(b: Bucket) -> int:
        return b.latent_tokens(temporal, patch_pixels, use_image_num)

    budget = (buckets[0].batch_size or base_batch_size) * tokens(buckets[0])
    return [b if b.batch_size is not None else replace(b, batch_size=max(1, budget // tokens(b))) for b in buckets]


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipInfo:
    """What assignment needs to know of a clip (displayed size, rotation applied)."""

    frames: int
    height: int
    width: int


def needed_frames(frames: int, sample_rate: int = 1) -> int:
    """Source frames a clip needs for a ``frames``-frame bucket at ``sample_rate``: ``(frames - 1) x sample_rate + 1``.

    That many frames give the loader's window (:func:`~opensora_plan.data.transforms.window_indices`)
    ``frames`` distinct indices exactly ``sample_rate`` apart; an image bucket (1 frame) needs 1 frame
    whatever the stride.
    """
    return (frames - 1) * sample_rate + 1


def assign_bucket(clip: ClipInfo, buckets: list[Bucket], sample_rate: int = 1) -> tuple[int | None, str]:
    """``(bucket index, "")`` for the bucket ``clip`` trains in, or ``(None, reason)`` when none fits.

    Reasons: ``"too short: 9 frames < 17 needed"`` (no bucket's :func:`needed_frames` fits) or
    ``"too small: 90x120 < 192x320 (HxW)"`` (long enough for some buckets, but smaller than all of
    them; the size named is the closest-aspect one). See the module docstring for the rule.
    """
    log_aspect = math.log(clip.width / clip.height)

    def key(i: int):
        b = buckets[i]
        return abs(log_aspect - math.log(b.aspect)), -b.frames, -b.height * b.width, i

    long_enough = [i for i, b in enumerate(buckets) if needed_frames(b.frames, sample_rate) <= clip.frames]
    if not long_enough:
        needed = needed_frames(min(b.frames for b in buckets), sample_rate)
        return None, f"too short: {clip.frames} frame{'s' if clip.frames != 1 else ''} < {needed} needed"
    fitting = [i for i in long_enough if buckets[i].height <= clip.height and buckets[i].width <= clip.width]
    if not fitting:
        nearest = buckets[min(long_enough, key=key)]
        return None, f"too small: {clip.height}x{clip.width} < {nearest.height}x{nearest.width} (HxW)"
    return min(fitting, key=key), ""


def probe_clip(path: str | os.PathLike) -> ClipInfo:
    """Frames and displayed size (rotation applied) of a video; VideoReadError if unreadable.

    Counts the frames as :class:`VideoReader` does (one demux pass over the packets, no decoding: a
    truncated file whose header promises more frames is counted by what it holds) and decodes only the
    first frame (the display rotation is only exposed there). Files whose header has no frame count
    (images, some streams) are opened with the reader.
    """
    import av

    from .video_io import _pyav_rotation

    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise VideoReadError(f"Cannot read video {path}: the file has no video stream.")
            stream = container.streams.video[0]
            frames, height, width = stream.frames, stream.codec_context.height, stream.codec_context.width
            if frames > 0 and height > 0 and width > 0:
                # The reader's count (packets with a timestamp), not the header's, which a cut file keeps.
                frames = sum(1 for packet in container.demux(stream) if packet.size and packet.pts is not None)
                if not frames:
                    raise VideoReadError(f"Cannot read video {path}: it contains no frames.")
                container.seek(0, stream=stream, backward=True, any_frame=False)
                if _pyav_rotation(container, stream) % 2:
                    height, width = width, height
                return ClipInfo(frames, height, width)
    except VideoReadError:
        raise
    except Exception as err:  # FFmpeg raises many unrelated types for broken files
        raise VideoReadError(f"Cannot read video {path}: {type(err).__name__}: {err}") from err
    with VideoReader(path) as reader:  # no count in the header: the reader counts the packets
        return ClipInfo(reader.num_frames, reader.height, reader.width)


def _probe_or_reason(path) -> ClipInfo | str:
    try:
        return probe_clip(path)
    except VideoReadError as err:
        return str(err)


@dataclass
class BucketPlan:
    """Where every entry of a dataset goes: ``members[b]`` = entry indices of bucket b (in entry order),
    ``unfit`` / ``unreadable`` = lists of ``{"index", "path", "reason"}``."""

    buckets: list[Bucket]
    members: list[list[int]]
    unfit: list[dict]
    unreadable: list[dict]
    infos: list = field(default_factory=list)  # per path: ClipInfo, or why it is unreadable

    def fits(self, index: int, bucket: int, sample_rate: int = 1) -> bool:
        """Whether entry ``index`` is long and large enough for bucket ``bucket`` (whatever its aspect)."""
        info = self.infos[index] if index < len(self.infos) else None
        b = self.buckets[bucket]
        return (isinstance(info, ClipInfo) and needed_frames(b.frames, sample_rate) <= info.frames
                and b.height <= info.height and b.width <= info.width)

    def histogram(self, world_size: int = 1) -> list[dict]:
        """One row per bucket: name, clips, batch size and batches per epoch per process (drop_last)."""
        rows = []
        for bucket, members in zip(self.buckets, self.members):
            batch = bucket.batch_size or 1
            rows.append({"bucket": bucket.name, "clips": len(members), "batch_size": bucket.batch_size,
                         "batches_per_epoch": len(members) // (batch * world_size)})
        return rows


def plan_buckets(paths: list[Path], buckets: list[Bucket], sample_rate: int = 1, progress: bool = True,
                 infos: list[ClipInfo | str] | None = None) -> BucketPlan:
    """Probe every path once (a few threads, tqdm bar) and assign it; unreadable files are counted, never raised.

    ``infos`` (one :class:`ClipInfo`, or the reason the file is unreadable, per path) skips the probing:
    ``data check`` passes what its decode pass found, so its histogram agrees with its own report.
    """
    from concurrent.futures import ThreadPoolExecutor

    from opensora_plan.utils import progress_bar

    members: list[list[int]] = [[] for _ in buckets]
    unfit, unreadable = [], []
    if infos is None:
        # FFmpeg releases the GIL while it reads and decodes: threads overlap the files' I/O and decoding.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            infos = list(progress_bar(pool.map(_probe_or_reason, paths), total=len(paths), desc="buckets", unit="video",
                              disable=not progress))
    elif len(infos) != len(paths):
        raise ValueError(f"Got {len(infos)} clip infos for {len(paths)} paths; give one per path.")
    for index, info in enumerate(infos):
        if isinstance(info, str):  # why it is unreadable
            unreadable.append({"index": index, "path": str(paths[index]), "reason": info})
            continue
        choice, reason = assign_bucket(info, buckets, sample_rate)
        if choice is None:
            unfit.append({"index": index, "path": str(paths[index]), "reason": reason})
        else:
            members[choice].append(index)
    return BucketPlan(buckets, members, unfit, unreadable, infos=infos)


class _LazyPaths:
    """``paths[i]`` = the path of ``entries[i]`` (for a lazy entry sequence, without reading its captions)."""

    def __init__(self, entries):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        return self.entries.path(i)



def format_bucket_report(plan: BucketPlan, world_size: int = 1) -> str:
    """The histogram table and the clips that fit no bucket (with why), as printed by ``data check --buckets``."""
    return format_bucket_table(plan.histogram(world_size), plan.unfit, len(plan.unreadable))


def format_bucket_table(rows: list[dict], unfit: list[dict], num_unreadable: int) -> str:
    """:func:`format_bucket_report` from its parts (``BucketPlan.histogram()`` rows, the unfit clips)."""
    width = max(len("bucket"), *(len(r["bucket"]) for r in rows))
    lines = [f"{'bucket':<{width}}  {'clips':>6}  {'batch':>5}  {'batches/epoch':>13}"]
    for r in rows:
        batch = "-" if r["batch_size"] is None else str(r["batch_size"])
        lines.append(f"{r['bucket']:<{width}}  {r['clips']:>6}  {batch:>5}  {r['batches_per_epoch']:>13}")
    assigned = sum(r["clips"] for r in rows)
    lines.append(f"{assigned} clips in buckets, {len(unfit)} fit no bucket, {num_unreadable} unreadable")
    idle = [r["bucket"] for r in rows if r["clips"] and not r["batches_per_epoch"]]
    if idle:
        lines.append(f"WARNING      buckets {idle} have fewer clips than one batch: their clips are never trained "
                     "(add data or give them a smaller batch_size)")
    if not any(r["batches_per_epoch"] for r in rows):
        lines.append("ERROR        no bucket fills one batch: training would stop before its first step (add data, "
                     "change the buckets or lower --train_batch_size)")
    for item in unfit:
        lines.append(f"NO BUCKET    entry {item['index']} ({item['path']}): {item['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class BucketedVideoDataset(VideoCaptionDataset):
    """:class:`~opensora_plan.data.datasets.VideoCaptionDataset` whose clips take their bucket's shape.

    ``self[i]["video"]`` is (3, F_b + n, H_b, W_b) in [-1, 1] for entry i's bucket b (n =
    ``use_image_num`` images, from the same clip, at the bucket's size). Every video is probed once at
    construction (``self.plan``; unreadable ones are counted and left out, never raised). Only entries
    in ``self.plan.members`` may be asked for (the bucket sampler draws from them); an entry that fails
    later is replaced by the next usable entry *of the same bucket*, so a batch keeps one shape.

    Args: as VideoCaptionDataset, with ``buckets`` (batch sizes resolved) instead of ``num_frames`` /
    ``max_image_size``. Raises ValueError when no clip fits any bucket.
    """

    def __init__(self, data_path, buckets: list[Bucket], sample_rate: int = 1, use_image_num: int = 0,
                 video_folder=None, cfg_dropout: float = 0.0, random_flip: bool = True,
                 max_substitutions: int = 100, progress: bool = True, index=None):
        first = buckets[0]
        super().__init__(data_path, first.frames, max(first.height, first.width), sample_rate=sample_rate,
                         use_image_num=use_image_num, video_folder=video_folder, cfg_dropout=cfg_dropout,
                         random_flip=random_flip, max_substitutions=max_substitutions,
                         entries=None if index is None else index.entries())
        self.buckets = buckets
        if index is None:  # every video is probed here
            self.plan = plan_buckets([e.path for e in self.entries], buckets, sample_rate, progress=progress)
        else:  # a data index (data/index.py) already holds every clip's frames and size: nothing is opened
            self.plan = plan_buckets(_LazyPaths(self.entries), buckets, sample_rate, progress=progress,
                                     infos=index.clip_infos())
        self.bucket_of = {i: b for b, members in enumerate(self.plan.members) for i in members}
        if not self.bucket_of:
            reasons = Counter(item["reason"].split(":")[0] for item in self.plan.unfit + self.plan.unreadable)
            raise ValueError(f"No clip of {self.data_path} fits any bucket of {[b.name for b in buckets]} "
                             f"({dict(reasons)}); run `opensora-plan data check {self.data_path} --buckets ...` to "
                             "see why, then change the buckets or the data.")
        if self.plan.unreadable:
            logger.warning("%d of %d videos are unreadable and left out of the buckets (first: %s).",
                           len(self.plan.unreadable), len(self.entries), self.plan.unreadable[0]["reason"])
        if self.plan.unfit:
            logger.warning("%d of %d videos fit no bucket and are left out (first: %s: %s).", len(self.plan.unfit),
                           len(self.entries), self.plan.unfit[0]["path"], self.plan.unfit[0]["reason"])

    def load_clip(self, index: int, bucket: int | None = None) -> torch.Tensor:
        """Entry ``index`` in the shape of bucket ``bucket`` (default: its own): (3, F_b + n, H_b, W_b);
        VideoReadError if unusable."""
        from .transforms import image_slot_indices, temporal_window_indices, video_bucket_transform

        bucket = self.buckets[self.bucket_of[index] if bucket is None else bucket]
        entry = self.entries[index]
        with VideoReader(entry.path) as reader:
            if reader.num_frames < needed_frames(bucket.frames, self.sample_rate):  # changed since it was probed
                raise VideoReadError(f"Video {entry.path} is too short for bucket {bucket.name}: "
                                     f"{reader.num_frames} frames.")
            indices = temporal_window_indices(reader.num_frames, bucket.frames, self.sample_rate)
            frames = reader.get_frames(indices)  # (F_b, H, W, 3) uint8
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        video = video_bucket_transform(frames, bucket.height, bucket.width, flip)  # (3, F_b, H_b, W_b)
        if self.use_image_num:
            images = video[:, image_slot_indices(bucket.frames, self.use_image_num)]  # (3, n, H_b, W_b)
            video = torch.cat([video, images], dim=1)
        return video

    def substitutes(self, index: int) -> list[int]:
        """Entries tried for ``index``, in order: its bucket's members from ``index`` on (wrapping), then the
        entries of other buckets that are long and large enough for this bucket (centre-cropped to its
        aspect), in entry order. Deterministic, so a resumed run substitutes alike."""
        bucket = self.bucket_of[index]
        members = self.plan.members[bucket]
        start = members.index(index)
        own = members[start:] + members[:start]
        others = [i for i in sorted(self.bucket_of) if self.bucket_of[i] != bucket
                  and self.plan.fits(i, bucket, self.sample_rate)]
        return own + others

    def load_clip_or_substitute(self, index: int) -> tuple[int, torch.Tensor, list[dict]]:
        """``(used_index, clip, skipped)``: entry ``index`` or the next usable entry of :meth:`substitutes`,
        always in ``index``'s bucket shape. NoUsableVideoError only when no clip that fits the bucket loads."""
        if index not in self.bucket_of:
            raise IndexError(f"Entry {index} is in no bucket (unreadable or fits none); draw from plan.members.")
        bucket = self.bucket_of[index]
        skipped = []
        for candidate in self.substitutes(index)[: self.max_substitutions + 1]:
            try:
                return candidate, self.load_clip(candidate, bucket), skipped
            except VideoReadError as err:
                logger.warning("skipping video: %s", err)
                skipped.append({"path": str(self.entries[candidate].path), "reason": str(err)})
        raise NoUsableVideoError(
            f"None of the {len(skipped)} videos that fit bucket {self.buckets[bucket].name} tried for "
            f"sample {index} is usable (last: {skipped[-1]['reason']}); run `opensora-plan data check "
            f"{self.data_path}` and fix or remove them.")

    def drop_unusable_buckets(self) -> list[str]:
        """Load one clip of every bucket (the first member that loads); a bucket with no loadable clip is
        emptied with a warning, and the members that failed move to ``plan.unreadable``. Returns the
        names of the dropped buckets. Raises ValueError when no bucket is left. Run before training so a
        bucket whose files all fail cannot stop the run at its first batch."""
        dropped = []
        for b, members in enumerate(self.plan.members):
            failed = []
            for index in members[: self.max_substitutions + 1]:
                try:
                    self.load_clip(index)
                    break
                except VideoReadError as err:
                    failed.append({"index": index, "path": str(self.entries[index].path), "reason": str(err)})
            else:
                if members:  # nothing in this bucket loads (or the first max_substitutions + 1 fail)
                    dropped.append(self.buckets[b].name)
            if failed:
                bad = {item["index"] for item in failed}
                self.plan.members[b] = [i for i in members if i not in bad]
                self.plan.unreadable += failed
                for i in bad:
                    del self.bucket_of[i]
                if self.buckets[b].name in dropped:
                    for i in self.plan.members[b]:  # untried members of a dead bucket: left out too
                        del self.bucket_of[i]
                    self.plan.members[b] = []
        if dropped:
            logger.warning("Buckets %s are left out: none of their clips loads (%s).", dropped,
                           self.plan.unreadable[-1]["reason"])
        if not self.bucket_of:
            raise ValueError(f"No clip of {self.data_path} loads in any bucket; run `opensora-plan data check "
                             f"{self.data_path} --buckets ...` to see why.")
        return dropped


def check_buckets(data_path: str | os.PathLike, spec: str, base_batch_size: int = 1, sample_rate: int = 1,
                  video_folder: str | os.PathLike | None = None, world_size: int = 1,
                  progress: bool = True, infos: dict[int, ClipInfo | str] | None = None,
                  use_image_num: int = 0) -> BucketPlan:
    """The bucket plan of a dataset JSON (what ``data check --buckets`` prints); malformed entries are skipped.

    ``infos`` maps entry numbers to what ``data check``'s own pass found (a :class:`ClipInfo` or the
    reason the video is unreadable); without it every video is probed.
    """
    from .datasets import entry_problem, resolve_video_path

    data_path = Path(data_path)
    buckets = resolve_batch_sizes(parse_buckets(spec), base_batch_size, use_image_num=use_image_num)
    raw = read_raw_entries(data_path)
    kept = [i for i, e in enumerate(raw) if entry_problem(e) is None]  # data check lists the malformed ones
    plan = plan_buckets([resolve_video_path(raw[i]["path"], data_path.parent, video_folder) for i in kept], buckets,
                        sample_rate, progress=progress, infos=None if infos is None else [infos[i] for i in kept])
    plan.members = [[kept[i] for i in members] for members in plan.members]  # back to entry numbers
    for item in plan.unfit + plan.unreadable:
        item["index"] = kept[item["index"]]
    return plan
