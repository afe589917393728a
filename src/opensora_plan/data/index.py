"""The dataset index: one Parquet row per dataset entry, built once, read by ``data check`` and ``train-t2v``.

``opensora-plan data index DATA --out index.parquet`` opens every video of a dataset (in parallel worker
processes; under ``torchrun`` every rank takes its share of the list) and writes what training needs to
know of it: size and mtime (to tell when the file changed), frames, fps, displayed height / width,
duration, whether it is readable (and why not), and its captions (with their T5 token lengths when a T5
folder is given). A run reading the index (``--data_index``) starts without opening any video: it only
``stat``s the files and re-probes those whose size or mtime changed since indexing.

Columns (pyarrow / Parquet, row ``i`` = entry ``i`` of the dataset):

=================  ===============  ========================================================================
``entry``          int64            position in the dataset list
``path``           string           resolved video path ("" for a malformed entry)
``size``           int64            bytes (-1: the file was missing)
``mtime_ns``       int64            modification time, ns since the epoch (-1: missing)
``frames``         int32            frames as :class:`~.video_io.VideoReader` counts them (0 if unreadable)
``fps``            float64          frames per second (0.0 if unknown)
``height``         int32            displayed height in pixels (rotation applied)
``width``          int32            displayed width in pixels
``duration_s``     float64          frames / fps (0.0 if fps is unknown)
``readable``       bool             what training can read (every frame decoded unless ``--no_decode``)
``reason``         string           why not readable or malformed (null when readable)
``captions``       list<string>     the entry's captions, as in the dataset
``caption_count``  int32            number of captions
``caption_tokens`` list<int32>      T5 tokens per caption, EOS included (null without a T5 folder)
=================  ===============  ========================================================================

The file's schema metadata (key ``opensora_plan_index``) records the dataset it was built from (path and a
fingerprint of its content), the ``--video_folder``, whether frames were decoded and the T5 folder. A run
refuses an index of another dataset, or of an older version of this one, with one line saying to re-run
``data index`` (which then probes only new or changed videos).

Resumable: parts of ``--part_size`` entries are written to ``<out>.parts/`` as they finish (atomic
files); a killed run, re-run with the same command, computes only the missing parts, then merges them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..models.text_encoder import MODEL_MAX_LENGTH
from ..options import Options, option
from .buckets import ClipInfo
from .datasets import VideoEntry, entry_problem, read_raw_entries, resolve_video_path
from .video_io import VideoReader, VideoReadError

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
META_KEY = b"opensora_plan_index"
ROW_GROUP = 4096  # rows per Parquet row group: a worker reading one entry's captions decodes at most this many
PROBE_COLUMNS = ("frames", "fps", "height", "width", "duration_s", "readable", "reason")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("entry", pa.int64()), ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
        ("frames", pa.int32()), ("fps", pa.float64()), ("height", pa.int32()), ("width", pa.int32()),
        ("duration_s", pa.float64()), ("readable", pa.bool_()), ("reason", pa.string()),
        ("captions", pa.list_(pa.string())), ("caption_count", pa.int32()), ("caption_tokens", pa.list_(pa.int32())),
    ])


# --------------------------------------------------------------------------------------------
# Probing one video
# --------------------------------------------------------------------------------------------


def decode_every_frame(reader: VideoReader, chunk: int = 16) -> None:
    """Decode all frames, ``chunk`` at a time; VideoReadError saying how far decoding got when one fails."""
    for start in range(0, reader.num_frames, chunk):
        try:
            reader.get_frames(range(start, min(start + chunk, reader.num_frames)))
        except VideoReadError as err:
            end = min(start + chunk, reader.num_frames) - 1
            raise VideoReadError(f"{err}; only frames before {start} of {reader.num_frames} are known to decode (the "
                                 f"failure is in frames {start}..{end}), and training skips this file whenever a clip "
                                 "needs them: re-encode or remove it") from err


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """``(size in bytes, mtime in ns)`` of a file, ``(-1, -1)`` when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def probe_video(path: str | os.PathLike, decode: bool = True) -> dict:
    """One index row's file and video columns: size, mtime_ns, frames, fps, height, width, duration_s,
    readable, reason. Opens the file with the reader training uses (and with ``decode`` decodes every frame,
    so a partly decodable file is unreadable); never raises for a bad video."""
    size, mtime = file_stamp(path)
    row = {"size": size, "mtime_ns": mtime, "frames": 0, "fps": 0.0, "height": 0, "width": 0, "duration_s": 0.0,
           "readable": False, "reason": None}
    try:
        with VideoReader(path) as reader:
            if decode:
                decode_every_frame(reader)
            row.update(frames=reader.num_frames, fps=float(reader.fps), height=reader.height, width=reader.width,
                       duration_s=reader.num_frames / reader.fps if reader.fps else 0.0, readable=True)
    except VideoReadError as err:
        row["reason"] = str(err)
    return row


# --------------------------------------------------------------------------------------------
# Building the index
# --------------------------------------------------------------------------------------------


@dataclass
class DataIndexOptions(Options):
    """Every option of ``opensora-plan data index`` / :func:`build_index`, with its default and checks."""

    COMMAND: ClassVar[str] = "data index"
    CONFIG: ClassVar[bool] = True

    data_path: str = option(positional=True, help="dataset JSON list")
    out: str = option(help="the index file to write (.parquet); an index of the same dataset there is refreshed: "
                      "only new or changed videos are probed")
    video_folder: str | None = option(None, help="base folder for relative paths (unset: the JSON's folder)")
    text_encoder_name: str | None = option(None, help="local T5 folder: also store caption token lengths")
    model_max_length: int = option(MODEL_MAX_LENGTH, help="token limit (recorded; data check reports against it)")
    decode: bool = option(True, flag="--no_decode", help="only open the videos (fast) instead of decoding every "
                          "frame; may pass files training skips")
    num_workers: int | None = option(None, help="probing processes per rank (unset: the CPU cores)",
                                     show_default=False)
    part_size: int = option(1000, help="entries per resumable part (a killed run redoes at most one part per "
                            "worker)")

    def __post_init__(self):
        self.require_at_least(1, "model_max_length", "part_size")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"--num_workers must be at least 1, got {self.num_workers}.")
        if Path(self.out).suffix.lower() != ".parquet":
            raise ValueError(f"--out {self.out}: give a .parquet file name, e.g. index.parquet.")
        from ..utils import check_output_file

        check_output_file(self.out, "--out")


def source_fingerprint(data_path: str | os.PathLike) -> str:
    """sha256 of a dataset file's bytes (of a folder dataset: its files' names, sizes and mtimes)."""
    path = Path(data_path)
    digest = hashlib.sha256()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root, name)
                digest.update(f"{full.relative_to(path)}\0{file_stamp(full)}\n".encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _entry_items(data_path: Path, video_folder) -> list[tuple[str, list[str], str | None]]:
    """``(resolved path, captions, problem)`` per dataset entry (path "" and no captions for a malformed one)."""
    items = []
    for index, entry in enumerate(read_raw_entries(data_path)):
        problem = entry_problem(entry)
        if problem is not None:
            items.append(("", [], problem))
            continue
        captions = [entry["cap"]] if isinstance(entry["cap"], str) else list(entry["cap"])
        items.append((str(resolve_video_path(entry["path"], data_path.parent, video_folder)), captions, None))
    return items


_TOKENIZER = None  # per worker process: the T5 tokenizer, loaded once by _init_worker


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this worker when the process that started it dies (``kill -9`` or SIGTERM of
    ``data index`` would otherwise leave it probing, then blocked on a pipe no one reads). Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


def _init_worker(text_encoder_name, parent_pid: int):
    global _TOKENIZER
    _die_with_parent(parent_pid)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if text_encoder_name is not None:
        from ..models.text_encoder import load_tokenizer

        _TOKENIZER = load_tokenizer(text_encoder_name)


def _index_part(start: int, items: list, decode: bool, previous: dict) -> list[dict]:
    """Rows of entries ``start, start + 1, ...``; a video whose (size, mtime) equals its row in ``previous``
    (path -> row of an earlier index built alike) keeps that row's probe columns instead of being opened."""
    rows = []
    for offset, (path, captions, problem) in enumerate(items):
        row = {"entry": start + offset, "path": path, "captions": captions, "caption_count": len(captions),
               "caption_tokens": None}
        if problem is not None:
            row.update(size=-1, mtime_ns=-1, frames=0, fps=0.0, height=0, width=0, duration_s=0.0, readable=False,
                       reason=f"malformed: {problem}", reused=None)
        else:
            old = previous.get(path)
            if old is not None and (old["size"], old["mtime_ns"]) == file_stamp(path) and old["size"] >= 0:
                row.update({k: old[k] for k in ("size", "mtime_ns", *PROBE_COLUMNS)}, reused=True)
            else:
                row.update(probe_video(path, decode))
        if _TOKENIZER is not None and captions:
            row["caption_tokens"] = [len(ids) for ids in _TOKENIZER(captions, add_special_tokens=True).input_ids]
        rows.append(row)
    return rows


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    from ..utils import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's RANK / WORLD_SIZE; 0, 1 without)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_index(*args, progress: bool = True, poll_s: float = 1.0, **kwargs) -> dict:
    """Write the index of a dataset (see the module docstring); returns a summary dict.

    Parallel: ``num_workers`` processes probe parts of ``part_size`` entries; under torchrun rank ``r`` of
    ``W`` takes parts ``r, r + W, ...`` and rank 0 merges once every part is there (the other ranks return
    after their share, with ``"merged": False``). Resumable: finished parts in ``<out>.parts/`` are kept.
    An index already at ``out`` built from the same dataset path is refreshed (its rows of unchanged videos
    are kept); one of another dataset, or any other file there, is refused (ValueError).
    Takes a :class:`DataIndexOptions` or its fields.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..utils import progress_bar

    o = DataIndexOptions.of(*args, **kwargs)
    began = time.monotonic()
    data_path, out = Path(o.data_path).resolve(), Path(o.out)
    rank, world = _rank_world()
    meta = {"format": INDEX_FORMAT, "data_path": str(data_path),
            "video_folder": str(Path(o.video_folder).resolve()) if o.video_folder is not None else None,
            "source_fingerprint": source_fingerprint(data_path), "decode": o.decode,
            "text_encoder": str(o.text_encoder_name) if o.text_encoder_name else None,
            "model_max_length": o.model_max_length}
    items = _entry_items(data_path, o.video_folder)
    if not items:
        raise ValueError(f"Dataset file {data_path} lists no videos; add at least one entry.")
    meta["num_entries"] = len(items)

    previous = {}
    if out.exists():
        old = read_index_meta(out)
        if old["data_path"] != meta["data_path"]:
            raise ValueError(f"--out {out} is the index of another dataset ({old['data_path']}); use another --out "
                             "or delete that file.")
        if all(old.get(k) == meta[k] for k in ("decode", "video_folder")):
            table = pq.read_table(out, columns=["path", "size", "mtime_ns", *PROBE_COLUMNS])
            previous = {row["path"]: row for row in table.to_pylist() if row["path"]}

    parts_dir = out.with_name(out.name + ".parts")
    build = hashlib.sha256(json.dumps([meta, o.part_size], sort_keys=True).encode()).hexdigest()
    stamp = parts_dir / "build.json"
    if rank == 0:
        if stamp.is_file() and json.loads(stamp.read_text()).get("build") != build:
            raise ValueError(f"{parts_dir} holds an unfinished index build of other data or settings; delete that "
                             "folder (or finish that build with its own command) and run again.")
        parts_dir.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            from ..utils import atomic_write_bytes

            atomic_write_bytes(stamp, json.dumps({"build": build, "meta": meta}).encode())
    else:  # the other ranks write parts only into a build that rank 0 has set up for the same data
        _wait_for(lambda: stamp.is_file() and json.loads(stamp.read_text()).get("build") == build, poll_s,
                  f"rank 0 to set up {parts_dir}")

    num_parts = (len(items) + o.part_size - 1) // o.part_size

    def part_path(k: int) -> Path:
        return parts_dir / f"part-{k:05d}.parquet"

    mine = [k for k in range(rank, num_parts, world) if not part_path(k).is_file()]
    workers = o.num_workers or os.cpu_count() or 1
    schema = _schema()
    probed = reused = 0
    todo = sum(min(o.part_size, len(items) - k * o.part_size) for k in mine)
    bar = progress_bar(total=todo, desc=f"data index (rank {rank})" if world > 1 else "data index", unit="video",
                       disable=not progress, smoothing=0.1)
    context = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
    with ProcessPoolExecutor(max_workers=min(workers, max(1, len(mine))), mp_context=context,
                             initializer=_init_worker, initargs=(o.text_encoder_name, os.getpid())) as pool:
        futures = {}
        for k in mine:
            chunk = items[k * o.part_size : (k + 1) * o.part_size]
            old = {p: previous[p] for p, _, _ in chunk if p in previous}
            futures[pool.submit(_index_part, k * o.part_size, chunk, o.decode, old)] = k
        from concurrent.futures import as_completed

        for future in as_completed(futures):
            rows = future.result()
            flags = [r.pop("reused", False) for r in rows]  # None: malformed, neither probed nor kept
            reused += flags.count(True)
            probed += flags.count(False)
            _write_parquet(part_path(futures[future]), pa.Table.from_pylist(rows, schema=schema))
            bar.update(len(rows))
    bar.close()
    summary = {"out": str(out), "entries": len(items), "probed": probed, "reused": reused, "rank": rank,
               "world_size": world, "merged": False}
    if rank != 0:
        summary["seconds"] = time.monotonic() - began
        return summary
    _wait_for(lambda: all(part_path(k).is_file() for k in range(num_parts)), poll_s,
              f"the other ranks' parts in {parts_dir}")
    table = pa.concat_tables([pq.read_table(part_path(k), schema=schema) for k in range(num_parts)])
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    _write_parquet(out, table)
    import shutil

    shutil.rmtree(parts_dir, ignore_errors=True)
    readable = table.column("readable").to_numpy(zero_copy_only=False)
    reasons = table.column("reason").to_pylist()
    paths = table.column("path").to_pylist()
    problems = [{"index": i, "path": paths[i], "reason": reasons[i]} for i in np.flatnonzero(~readable).tolist()]
    summary.update(merged=True, readable=int(readable.sum()),
                   unreadable=[p for p in problems if not p["reason"].startswith("malformed: ")],
                   malformed=[p for p in problems if p["reason"].startswith("malformed: ")],
                   seconds=time.monotonic() - began)
    return summary


def _wait_for(ready, poll_s: float, what: str) -> None:
    """Poll ``ready()`` every ``poll_s`` seconds (no timeout: the other ranks may probe for hours)."""
    logged = False
    while not ready():
        if not logged:
            logger.info("data index: waiting for %s", what)
            logged = True
        time.sleep(poll_s)


def format_index_summary(summary: dict, limit: int = 20) -> str:
    """The ``data index`` result as lines (at most ``limit`` unreadable videos listed by name)."""
    rate = summary["probed"] / summary["seconds"] if summary["seconds"] else 0.0
    if not summary["merged"]:
        return (f"rank {summary['rank']}: {summary['probed']} videos probed, {summary['reused']} kept "
                f"({rate:.1f} videos/s); rank 0 merges the index into {summary['out']}")
    lines = [f"{summary['out']}: {summary['entries']} entries, {summary['readable']} readable, "
             f"{len(summary['unreadable'])} unreadable, {len(summary['malformed'])} malformed; "
             f"{summary['probed']} videos probed here ({rate:.1f} videos/s), {summary['reused']} kept from the "
             f"previous index, {summary['seconds']:.1f} s"]
    for item in summary["malformed"][:limit]:
        lines.append(f"MALFORMED    entry {item['index']}: {item['reason'].removeprefix('malformed: ')}")
    for item in summary["unreadable"][: max(0, limit - len(summary["malformed"]))]:
        lines.append(f"UNREADABLE   entry {item['index']}: {item['reason']}")
    more = len(summary["malformed"]) + len(summary["unreadable"]) - limit
    if more > 0:
        lines.append(f"             ... and {more} more (the index's 'reason' column lists them all)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading the index
# --------------------------------------------------------------------------------------------


def read_index_meta(path: str | os.PathLike) -> dict:
    """The metadata an index records of its build; ValueError (one line) for a file that is not an index."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        meta = json.loads(metadata[META_KEY])
    except FileNotFoundError:
        raise FileNotFoundError(f"Data index {path} does not exist; build it with `opensora-plan data index DATA "
                                f"--out {path}`.") from None
    except Exception:
        raise ValueError(f"{path} is not a data index written by `opensora-plan data index`.") from None
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"Data index {path} has format {meta.get('format')}, this version reads {INDEX_FORMAT}; "
                         "rebuild it with `opensora-plan data index`.")
    return meta


class DataIndex:
    """An index file opened for a run: the probe columns as numpy arrays, captions read on demand.

    Memory: about 40 bytes per entry plus the paths (Arrow buffers, no Python object per entry, so forked
    data-loader workers share them); captions stay on disk and :meth:`entries` reads them one Parquet row
    group (:data:`ROW_GROUP` rows) at a time. :meth:`open` checks the index belongs to the dataset and
    refreshes entries whose file changed.
    """

    def __init__(self, path: str | os.PathLike):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.meta = read_index_meta(self.path)
        table = pq.read_table(self.path, columns=["path", "size", "mtime_ns", *PROBE_COLUMNS])
        self.paths = table.column("path").combine_chunks()  # pyarrow StringArray
        self.size = table.column("size").to_numpy().copy()
        self.mtime_ns = table.column("mtime_ns").to_numpy().copy()
        self.frames = table.column("frames").to_numpy().copy()
        self.fps = table.column("fps").to_numpy().copy()
        self.height = table.column("height").to_numpy().copy()
        self.width = table.column("width").to_numpy().copy()
        self.readable = table.column("readable").to_numpy(zero_copy_only=False).copy()
        reasons = table.column("reason")
        self.reasons = {i: reasons[i].as_py() for i in np.flatnonzero(~self.readable).tolist()}
        self.refreshed: list[int] = []

    @classmethod
    def open(cls, path: str | os.PathLike, data_path: str | os.PathLike | None = None, video_folder=None,
             flag: str = "--data_index", max_stale: int | None = None, progress: bool = True) -> "DataIndex":
        """The index at ``path`` after checking it is the index of ``data_path`` (same file, same content,
        same ``video_folder``) and re-probing the entries whose file size or mtime changed since indexing.

        Raises ValueError (one line) for an index of another dataset or an older version of it, and when
        more entries changed than ``max_stale`` (default: 100 or 1% of the entries, whichever is larger;
        every process re-probes them, so a big change belongs in ``data index`` instead).
        """
        meta = read_index_meta(path)
        rebuild = f"re-run `opensora-plan data index {meta['data_path']} --out {path}` (only new or changed videos " \
                  "are probed)"
        if data_path is not None:
            data_path = Path(data_path).resolve()
            if str(data_path) != meta["data_path"]:
                raise ValueError(f"{flag} {path} is the index of {meta['data_path']}, not of {data_path}; give the "
                                 "index of this dataset or build one with `opensora-plan data index`.")
            if source_fingerprint(data_path) != meta["source_fingerprint"]:
                raise ValueError(f"{flag} {path} is out of date: {data_path} changed since it was indexed; {rebuild}.")
        folder = str(Path(video_folder).resolve()) if video_folder is not None else None
        if folder != meta["video_folder"]:
            raise ValueError(f"{flag} {path} was built with --video_folder {meta['video_folder']}, this run gives "
                             f"{folder}; use the same --video_folder or rebuild the index.")
        index = cls(path)
        stale = index.stale_entries()
        limit = max(100, len(index) // 100) if max_stale is None else max_stale
        if len(stale) > limit:
            raise ValueError(f"{flag} {path}: {len(stale)} videos changed since indexing (first: "
                             f"{index.paths[stale[0]].as_py()}), more than {limit} to re-probe at start; {rebuild}.")
        if stale:
            index.reprobe(stale, progress=progress)
        return index

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def decode(self) -> bool:
        return bool(self.meta["decode"])

    def stale_entries(self) -> list[int]:
        """Entries (well-formed ones) whose file's (size, mtime) is not the indexed one: changed, replaced,
        removed or created since. One ``stat`` per entry; no video is opened."""
        stale = []
        for offset in range(0, len(self.paths), ROW_GROUP):
            for i, path in enumerate(self.paths.slice(offset, ROW_GROUP).to_pylist(), start=offset):
                if path and file_stamp(path) != (self.size[i], self.mtime_ns[i]):
                    stale.append(i)
        return stale

    def reprobe(self, rows: list[int], progress: bool = True) -> None:
        """Probe ``rows`` again (threads: FFmpeg releases the GIL) and update their columns in memory."""
        from concurrent.futures import ThreadPoolExecutor

        from ..utils import progress_bar

        paths = [self.paths[i].as_py() for i in rows]
        logger.warning("data index %s: %d videos changed since indexing and are probed again (first: %s).",
                       self.path, len(rows), paths[0])
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found = list(progress_bar(pool.map(lambda p: probe_video(p, self.decode), paths), total=len(paths),
                                      desc="re-probe", unit="video", disable=not progress))
        for i, row in zip(rows, found):
            self.size[i], self.mtime_ns[i] = row["size"], row["mtime_ns"]
            for key in ("frames", "fps", "height", "width", "readable"):
                getattr(self, key)[i] = row[key]
            if row["readable"]:
                self.reasons.pop(i, None)
            else:
                self.reasons[i] = row["reason"]
        self.refreshed = list(rows)

    def readable_entries(self) -> np.ndarray:
        """Entry numbers of the readable videos, int64 (ascending)."""
        return np.flatnonzero(self.readable)

    def unreadable(self) -> list[dict]:
        """``{"index", "path", "reason"}`` of every unreadable or malformed entry."""
        return [{"index": i, "path": self.paths[i].as_py(), "reason": r} for i, r in sorted(self.reasons.items())]

    def entries(self, rows: np.ndarray | None = None) -> "IndexEntries":
        """The entries ``rows`` (default: all) as a lazy sequence of :class:`~.datasets.VideoEntry`."""
        return IndexEntries(self, rows)

    def clip_infos(self) -> "IndexClipInfos":
        """Per entry a :class:`~.buckets.ClipInfo` or the reason it is unreadable (what bucket planning takes)."""
        return IndexClipInfos(self)


class IndexEntries(Sequence):
    """``entries[i]`` = :class:`~.datasets.VideoEntry` of index row ``rows[i]``, its captions read from the
    index file one row group at a time (the last group read is kept per process)."""

    def __init__(self, index: DataIndex, rows: np.ndarray | None = None):
        self.index = index
        self.rows = rows
        self._group = (None, None)  # (row group number, its captions)
        self._file = (None, None)  # (pid, ParquetFile): reopened in each forked worker

    def __len__(self) -> int:
        return len(self.index) if self.rows is None else len(self.rows)

    def row(self, i: int) -> int:
        """The index row (= dataset entry number) of item ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"entry {i} out of range for {len(self)} entries")
        return int(i % len(self) if self.rows is None else self.rows[i])

    def path(self, i: int) -> Path:
        return Path(self.index.paths[self.row(i)].as_py())

    def captions(self, i: int) -> tuple[str, ...]:
        import pyarrow.parquet as pq

        row = self.row(i)
        group = row // ROW_GROUP
        if self._group[0] != group:
            pid, handle = self._file
            if pid != os.getpid():
                handle = pq.ParquetFile(self.index.path)
                self._file = (os.getpid(), handle)
            self._group = (group, handle.read_row_group(group, columns=["captions"]).column(0).to_pylist())
        return tuple(self._group[1][row - group * ROW_GROUP])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return VideoEntry(self.path(i), self.captions(i))

    def __getstate__(self):  # spawned workers reopen the file
        state = dict(self.__dict__)
        state["_file"] = (None, None)
        state["_group"] = (None, None)
        return state


class IndexClipInfos(Sequence):
    """Per index row a :class:`~.buckets.ClipInfo` (frames, displayed height, width) or why it is unreadable."""

    def __init__(self, index: DataIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        ix = self.index
        if not ix.readable[i]:
            return ix.reasons[int(i)]
        return ClipInfo(int(ix.frames[i]), int(ix.height[i]), int(ix.width[i]))
