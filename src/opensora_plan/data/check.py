"""``opensora-plan data check``: look at a dataset before spending GPU time on it.

Opens (and by default decodes) every video of a dataset JSON with the reader training uses and reports
what training would make of it; with ``--buckets`` also the bucket histogram (:mod:`.buckets`). It reads
the dataset with :mod:`.datasets` and the buckets with :mod:`.buckets`, which know nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..models.text_encoder import MODEL_MAX_LENGTH
from ..options import Options, option
from ..utils import valid_num_frames
from ..pipelines.outputs import OVERWRITE_HELP
from .buckets import ClipInfo, check_buckets, format_bucket_table, parse_buckets
from .datasets import entry_problem, read_raw_entries, resolve_video_path
from .index import decode_every_frame
from .video_io import VideoReader, VideoReadError


def _stats(values: list[float]) -> dict | None:
    """min / median / max of a list (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"min": ordered[0], "median": median, "max": ordered[-1]}


@dataclass
class DataCheckOptions(Options):
    """Every option of ``opensora-plan data check`` / :func:`check_dataset`, with its default and checks."""

    COMMAND: ClassVar[str] = "data check"
    CONFIG: ClassVar[bool] = True  # --config FILE holds any of these options

    data_path: str = option(positional=True, help="dataset JSON list")
    video_folder: str | None = option(None, help="base folder for relative paths (unset: the JSON's folder)")
    text_encoder_name: str | None = option(None, help="local T5 folder: also count caption tokens")
    num_frames: int | None = option(None, help="also count videos shorter than this window")
    sample_rate: int = option(1, help="window stride for --num_frames")
    model_max_length: int = option(MODEL_MAX_LENGTH, help="token limit to report against")
    buckets: str | None = option(None, help="bucket spec, preset or file (as train-t2v --buckets): print the "
                                 "bucket histogram and the clips that fit no bucket, with why")
    train_batch_size: int = option(1, help="with --buckets: the first bucket's batch (sets the token budget of the "
                                   "others) unless the spec file gives it one")
    use_image_num: int = option(0, help="with --buckets: joint-training images per clip (as train-t2v; they count "
                                "in the token budget)")
    data_index: str | None = option(None, help="index written by `opensora-plan data index`: take the videos' "
                                    "findings from it (only videos changed since indexing are opened)")
    json_out: str | None = option(None, help="also write the full report as JSON here")
    overwrite: bool = option(False, help=OVERWRITE_HELP)
    decode: bool = option(True, flag="--no_decode", help="only open the videos (fast) instead of decoding every "
                          "frame; may pass files training skips")

    def __post_init__(self):
        if self.buckets is not None:
            parse_buckets(self.buckets)  # a bad (or empty) spec fails before the decode pass
        self.require_at_least(1, "num_frames", "sample_rate", "model_max_length", "train_batch_size")
        if self.use_image_num < 0:
            raise ValueError(f"--use_image_num must be at least 0, got {self.use_image_num}.")
        if self.num_frames is not None and not valid_num_frames(self.num_frames):
            raise ValueError(f"--num_frames {self.num_frames} is not a length the CausalVAE accepts (training would "
                             "refuse it); use 1 + 4k, e.g. 17 or 65.")
        if self.buckets is None:  # a value other than the default can only have been given
            defaults = type(self).defaults()
            unused = [k for k in ("train_batch_size", "use_image_num") if getattr(self, k) != defaults[k]]
            if unused:
                raise ValueError(f"--{unused[0]} is only used with --buckets (it sets the buckets' batch sizes); add "
                                 "--buckets or drop it.")
        if self.json_out:
            from ..pipelines.outputs import check_output_file

            check_output_file(self.json_out, "--json_out", self.overwrite)  # before the decode pass, not after it
        elif self.overwrite:
            raise ValueError("--overwrite has no effect without --json_out; add --json_out or drop --overwrite.")


def check_dataset(*args, progress: bool = True, **kwargs) -> dict:
    """Open every video of a dataset JSON and summarise it (all problems listed, nothing raised for them).

    With ``decode`` (default) every frame of every video is decoded with the reader training uses, so a
    video passes only when training can read all of it: a partly decodable file (truncated, corrupt
    packets) is listed as unreadable with the number of frames that decode. ``decode=False`` only
    opens the files (fast, but may pass files that training then skips).

    Reports entry count, malformed entries, readable / unreadable videos (with reasons), frames, fps,
    resolution and duration (min / median / max), caption counts and lengths in words, and in tokens
    when a T5 folder is given (with how many exceed ``model_max_length`` and will be truncated). With
    ``num_frames``, also how many videos are shorter than one sampling window (their frames repeat).
    Takes a :class:`DataCheckOptions`, or its fields (data_path positionally); with ``json_out`` the
    report is also written there as JSON (the path is checked when the options are built).
    """
    import json

    from opensora_plan.utils import progress_bar

    from ..utils import atomic_write_bytes

    o = DataCheckOptions.of(*args, **kwargs)
    data_path = Path(o.data_path)
    raw = read_raw_entries(data_path)
    if not raw:  # the same rule as training (load_video_entries): an empty list is not a dataset
        raise ValueError(f"Dataset file {data_path} lists no videos; add at least one entry.")
    tokenizer = None
    if o.text_encoder_name is not None:
        from ..models.text_encoder import load_tokenizer

        tokenizer = load_tokenizer(o.text_encoder_name)

    from ..models.text_encoder import preprocess_texts

    index = None
    if o.data_index is not None:
        from .index import DataIndex

        index = DataIndex.open(o.data_index, data_path, o.video_folder, max_stale=len(raw), progress=progress)
        if o.decode and not index.decode:
            raise ValueError(f"--data_index {o.data_index} was built with --no_decode (videos only opened); pass "
                             "--no_decode here too, or rebuild the index without it.")
    malformed, unreadable, emptied = [], [], []
    infos = {}  # entry number -> ClipInfo or why unreadable: the bucket histogram uses this pass's findings
    frames, fps, heights, widths, durations = [], [], [], [], []
    words, tokens, per_entry = [], [], []
    for index_row, entry in enumerate(progress_bar(raw, desc="data check", unit="video",
                                                   disable=not progress or index is not None)):
        problem = entry_problem(entry)
        if problem is not None:
            malformed.append({"index": index_row, "problem": problem})
            continue
        captions = [entry["cap"]] if isinstance(entry["cap"], str) else entry["cap"]
        per_entry.append(len(captions))
        words += [len(c.split()) for c in captions]
        # Training cleans captions as the reference; one that cleaning empties trains as the unconditional input.
        emptied += [{"index": index_row, "caption": c} for c, cleaned in zip(captions, preprocess_texts(captions))
                    if c.strip() and not cleaned]
        if tokenizer is not None:
            tokens += [len(ids) for ids in tokenizer(captions, add_special_tokens=True).input_ids]
        path = resolve_video_path(entry["path"], data_path.parent, o.video_folder)
        try:
            if index is not None:  # what the index found (re-probed at open when the file changed)
                if not index.readable[index_row]:
                    raise VideoReadError(index.reasons[index_row])
                info = (int(index.frames[index_row]), float(index.fps[index_row]), int(index.height[index_row]),
                        int(index.width[index_row]))
            else:
                with VideoReader(path) as reader:
                    if o.decode:
                        decode_every_frame(reader)
                    info = reader.num_frames, reader.fps, reader.height, reader.width
            infos[index_row] = ClipInfo(info[0], info[2], info[3])
            frames.append(info[0])
            fps.append(info[1])
            heights.append(info[2])
            widths.append(info[3])
            durations.append(info[0] / info[1] if info[1] else 0.0)
        except VideoReadError as err:
            unreadable.append({"index": index_row, "path": str(path), "reason": str(err)})
            infos[index_row] = str(err)

    report = {
        "data_path": str(data_path),
        "entries": len(raw),
        "malformed": malformed,
        "readable": len(frames),
        "unreadable": unreadable,
        "frames": _stats(frames),
        "fps": _stats(fps),
        "height": _stats(heights),
        "width": _stats(widths),
        "duration_s": _stats(durations),
        "captions": {
            "total": len(words),
            "per_entry": _stats(per_entry),
            "words": _stats(words),
            "tokens": _stats(tokens),
            "over_max_length": sum(t > o.model_max_length for t in tokens) if tokenizer is not None else None,
            "model_max_length": o.model_max_length,
            "emptied_by_cleaning": emptied,
        },
    }
    if index is not None:
        report["data_index"] = {"path": str(o.data_index), "reprobed": [index.paths[i].as_py() for i in index.refreshed]}
    if o.num_frames is not None:
        report["shorter_than_window"] = sum(f < o.num_frames * o.sample_rate for f in frames)
        report["window_frames"] = o.num_frames * o.sample_rate
    if o.buckets:
        plan = check_buckets(data_path, o.buckets, o.train_batch_size, o.sample_rate, video_folder=o.video_folder,
                             progress=progress, infos=infos, use_image_num=o.use_image_num)
        histogram = plan.histogram()
        report["buckets"] = {"histogram": histogram, "unfit": plan.unfit, "unreadable": plan.unreadable,
                             "trainable": any(r["batches_per_epoch"] for r in histogram)}
    if o.json_out:
        atomic_write_bytes(o.json_out, json.dumps(report, indent=2).encode("utf-8"))
    return report


def format_check_report(report: dict) -> str:
    """The ``data check`` report as readable lines."""

    def fmt(stats, unit=""):
        if stats is None:
            return "n/a"
        return " / ".join(f"{stats[k]:.4g}{unit}" for k in ("min", "median", "max")) + "  (min / median / max)"

    caps = report["captions"]
    lines = [
        f"dataset      {report['data_path']}",
        f"entries      {report['entries']}  (malformed: {len(report['malformed'])})",
        f"videos       {report['readable']} readable, {len(report['unreadable'])} unreadable",
    ]
    if "data_index" in report:
        changed = report["data_index"]["reprobed"]
        lines.append(f"index        {report['data_index']['path']} ({len(changed)} videos changed since indexing, "
                     "probed again)" if changed else f"index        {report['data_index']['path']} (up to date)")
    lines += [
        f"frames       {fmt(report['frames'])}",
        f"fps          {fmt(report['fps'])}",
        f"height       {fmt(report['height'], ' px')}",
        f"width        {fmt(report['width'], ' px')}",
        f"duration     {fmt(report['duration_s'], ' s')}",
        f"captions     {caps['total']} in all, per entry {fmt(caps['per_entry'])}",
        f"  words      {fmt(caps['words'])}",
    ]
    if caps["tokens"] is not None:
        lines.append(f"  tokens     {fmt(caps['tokens'])}; {caps['over_max_length']} longer than "
                     f"{caps['model_max_length']} (truncated)")
    if caps.get("emptied_by_cleaning"):
        lines.append(f"  cleaning   {len(caps['emptied_by_cleaning'])} captions become empty after caption cleaning "
                     "(e.g. CJK-only) and would train as the unconditional caption:")
        lines += [f"             entry {item['index']}: {item['caption']!r}" for item in caps["emptied_by_cleaning"][:10]]
    if "shorter_than_window" in report:
        lines.append(f"short        {report['shorter_than_window']} videos have fewer than {report['window_frames']} "
                     f"frames (frames are repeated)")
    for item in report["malformed"]:
        lines.append(f"MALFORMED    entry {item['index']}: {item['problem']}")
    for item in report["unreadable"]:
        lines.append(f"UNREADABLE   entry {item['index']}: {item['reason']}")
    if "buckets" in report:
        b = report["buckets"]
        lines += ["", format_bucket_table(b["histogram"], b["unfit"], len(b["unreadable"]))]
    return "\n".join(lines)
