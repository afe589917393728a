"""Text-to-video evaluation of a folder of generated videos: CLIP score and FVD (``opensora-plan eval-t2v``).

Protocols (docs/evaluation.md has the reasoning and how numbers compare with papers):

* **CLIP score** (CLIPSIM): for every video, each frame (all frames by default, or ``clip_frames``
  evenly spaced ones) is scored against the video's prompt as ``100 * max(cos(E_image, E_text), 0)``
  with a local ``transformers`` CLIP (:class:`opensora_plan.models.clip.CLIPScorer`, OpenAI CLIP
  preprocessing); frame scores are averaged per video, then over videos.
* **FVD**: StyleGAN-V's protocol. From every video the first ``num_frames`` frames (16) taken every
  ``sample_rate``-th frame from frame 0; frames scaled to [0, 1], short side resized to
  ``resolution`` (224; bilinear, align_corners=False, no antialiasing, long side rounded up),
  center crop (offset rounded down), scaled to [-1, 1]; the Kinetics-400 I3D's 400 logits
  (:mod:`opensora_plan.models.i3d`) for the real and the generated set; Fréchet distance between
  the two fitted Gaussians (:func:`opensora_plan.metrics.frechet_distance`). The real set is a folder
  of videos or an ``.npz`` of statistics written earlier with ``save_real_stats``.

Prompts come from a ``.txt`` file (line i belongs to the video named ``{i:04d}-...``, the names
``opensora-plan sample`` writes), a JSON file (the training data list ``[{"path", "cap"}]`` or a
``{"file name": "prompt"}`` map), or, without either, from the file names themselves (lossy:
punctuation and case are lost and names are cut at 80 characters).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from opensora_plan.utils import progress_bar

from ..options import Options, option
from ..utils import atomic_write_bytes, read_text_file
from .outputs import OVERWRITE_HELP, check_output_file

logger = logging.getLogger(__name__)

METRICS = ("clip_score", "fvd")
DEFAULT_JSON_NAME = "eval_t2v.json"
FVD_NUM_FRAMES = 16  # StyleGAN-V / most T2V papers: FVD on 16-frame clips
FVD_RESOLUTION = 224  # the I3D's input size
_INDEX_PREFIX = re.compile(r"^(\d+)-(.*)$")  # "0007-a_cat_playing_the_piano" (sample_t2v.video_filename)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class VideoResult:
    path: str
    prompt: str | None
    total_frames: int
    clip_score: float | None = None  # mean over the scored frames
    clip_frames: int | None = None  # how many frames were scored
    in_fvd: bool = False


@dataclass
class T2VEvaluation:
    """Per-video results, skipped files (path, reason), settings and the two metrics."""

    videos: list[VideoResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    fvd: float | None = None
    fvd_num_generated: int = 0
    fvd_num_real: int = 0

    @property
    def clip_score(self) -> float | None:
        values = [v.clip_score for v in self.videos if v.clip_score is not None]
        return float(np.mean(values)) if values else None

    @property
    def clip_num_videos(self) -> int:
        return sum(v.clip_score is not None for v in self.videos)

    def to_dict(self) -> dict:
        return {
            "clip_score": self.clip_score,
            "clip_score_num_videos": self.clip_num_videos,
            "fvd": self.fvd,
            "fvd_num_generated": self.fvd_num_generated,
            "fvd_num_real": self.fvd_num_real,
            "settings": self.settings,
            "videos": [asdict(v) for v in self.videos],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    def table(self) -> str:
        """Plain-text table: metric, value, what it was computed on."""
        s = self.settings
        rows = [("metric", "value", "computed on")]
        if "clip_score" in s.get("metrics", ()):
            frames = "all frames" if not s.get("clip_frames") else f"{s['clip_frames']} frames"
            rows.append(("CLIP score ^", "n/a" if self.clip_score is None else f"{self.clip_score:.2f}",
                         f"{self.clip_num_videos} videos, {frames} each"))
        if "fvd" in s.get("metrics", ()):
            rows.append(("FVD v", "n/a" if self.fvd is None else f"{self.fvd:.2f}",
                         f"{self.fvd_num_generated} generated vs {self.fvd_num_real} real clips of "
                         f"{s['num_frames']} frames at {s['resolution']}px"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.fvd is not None and min(self.fvd_num_generated, self.fvd_num_real) < 2048:
            lines.append(f"note: FVD is biased upward at small N; papers use 2048 clips per set (here "
                         f"{self.fvd_num_generated}/{self.fvd_num_real}); compare only numbers with the same N.")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s): " + ", ".join(f"{p} ({r})" for p, r in self.skipped))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def prompt_from_filename(path: Path) -> str:
    """``0007-a_cat_playing_the_piano.mp4`` -> ``a cat playing the piano`` (lossy, see module doc)."""
    match = _INDEX_PREFIX.match(path.stem)
    return (match.group(2) if match else path.stem).replace("_", " ").strip()


def _caption_of(entry: dict, source: Path) -> str:
    caption = entry.get("cap", entry.get("caption"))
    if isinstance(caption, list):
        caption = caption[0] if caption else None
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{source}: entry {entry.get('path')!r} has no caption; give each entry a 'cap' string.")
    return caption.strip()


def resolve_prompts(videos: Sequence[Path], prompts: str | os.PathLike | None) -> dict[Path, str]:
    """The prompt of every video (see the module doc for the accepted sources).

    Raises FileNotFoundError for a missing prompt file and ValueError naming the videos that have
    no prompt in it.
    """
    if prompts is None:
        return {v: prompt_from_filename(v) for v in videos}
    source = Path(prompts)
    if not source.is_file():
        raise FileNotFoundError(f"--prompts file {source} does not exist; give a .txt (one prompt per line) or a .json.")
    found: dict[Path, str] = {}
    if source.suffix.lower() == ".txt":
        lines = [line.strip() for line in read_text_file(source, "--prompts file").splitlines() if line.strip()]
        for video in videos:
            match = _INDEX_PREFIX.match(video.stem)
            if match and int(match.group(1)) < len(lines):
                found[video] = lines[int(match.group(1))]
    elif source.suffix.lower() == ".json":
        try:
            data = json.loads(read_text_file(source, "--prompts file"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts file {source} is not valid JSON ({err}).") from None
        if isinstance(data, dict):
            table = {str(k): str(v) for k, v in data.items()}
        elif isinstance(data, list) and all(isinstance(e, dict) and "path" in e for e in data):
            table = {str(e["path"]): _caption_of(e, source) for e in data}
        else:
            raise ValueError(f"{source} must hold a list of {{'path', 'cap'}} entries or a {{file name: prompt}} map.")
        by_name = {Path(k).name: v for k, v in table.items()}
        by_stem = {Path(k).stem: v for k, v in table.items()}
        for video in videos:
            prompt = table.get(str(video), by_name.get(video.name, by_stem.get(video.stem)))
            if prompt is not None:
                found[video] = prompt
    else:
        raise ValueError(f"--prompts {source} must be a .txt (one prompt per line) or a .json file.")
    missing = [v.name for v in videos if v not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} video(s) have no prompt in {source} ({shown}); a .txt needs one line per video index "
            "(names '0007-...'), a .json an entry per file name."
        )
    return found


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def fvd_clip_indices(total_frames: int, num_frames: int, sample_rate: int) -> list[int] | None:
    """Frames 0, s, 2s, ... (``num_frames`` of them), or None when the video is too short."""
    if (num_frames - 1) * sample_rate >= total_frames:
        return None
    return list(range(0, num_frames * sample_rate, sample_rate))


def fvd_preprocess(frames: torch.Tensor, resolution: int = FVD_RESOLUTION) -> torch.Tensor:
    """uint8 frames ``(T, H, W, 3)`` -> float32 ``(3, T, resolution, resolution)`` in [-1, 1].

    StyleGAN-V's ``preprocess_single``: [0, 1], short side to ``resolution`` (bilinear,
    align_corners=False, no antialiasing; the long side rounded up), center crop with the offset
    rounded down, then ``(x - 0.5) * 2``.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"Expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}.")
    video = frames.permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    height, width = video.shape[-2:]
    scale = resolution / min(height, width)
    size = (resolution, math.ceil(width * scale)) if height < width else (math.ceil(height * scale), resolution)
    video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    video = video[:, :, top : top + resolution, left : left + resolution]
    return ((video - 0.5) * 2).permute(1, 0, 2, 3).contiguous()  # (3, T, res, res)


def _too_short(total: int, num_frames: int, sample_rate: int) -> str:
    return f"left out of FVD: {total} frames, the FVD clip needs {(num_frames - 1) * sample_rate + 1}"


def clip_frame_indices(total_frames: int, clip_frames: int) -> list[int]:
    """All frames (``clip_frames`` 0 or >= total) or ``clip_frames`` evenly spaced ones, first and last included."""
    if clip_frames <= 0 or clip_frames >= total_frames:
        return list(range(total_frames))
    return np.linspace(0, total_frames - 1, clip_frames).round().astype(int).tolist()


class _I3DFeatures:
    """Batches preprocessed clips through the I3D; ``features()`` -> ``(N, 400)`` float64."""

    def __init__(self, i3d, device: torch.device, batch_size: int):
        self.i3d, self.device, self.batch_size = i3d, device, batch_size
        self.pending: list[torch.Tensor] = []
        self.done: list[np.ndarray] = []

    def add(self, clip: torch.Tensor) -> None:
        self.pending.append(clip)
        if len(self.pending) >= self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if self.pending:
            batch = torch.stack(self.pending).to(self.device)  # (B, 3, T, res, res)
            self.done.append(self.i3d(batch).double().cpu().numpy())  # (B, 400)
            self.pending = []

    def features(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.done) if self.done else np.zeros((0, 0))


# --------------------------------------------------------------------------------------------
# Real-set statistics
# --------------------------------------------------------------------------------------------


def _stats_settings(num_frames: int, sample_rate: int, resolution: int) -> dict:
    return {"num_frames": num_frames, "sample_rate": sample_rate, "resolution": resolution}


def load_real_stats(path: Path, expected: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, n)`` from an ``.npz`` written by ``save_real_stats``; settings must match."""
    with np.load(path) as data:
        missing = {"mu", "sigma", "num_videos", "num_frames", "sample_rate", "resolution"} - set(data.files)
        if missing:
            raise ValueError(f"{path} is not a real-set statistics file (missing {sorted(missing)}); write one "
                             "with --save_real_stats.")
        stored = {k: int(data[k]) for k in expected}
        if stored != expected:
            raise ValueError(f"{path} was computed with {stored} but this run uses {expected}; recompute it.")
        return data["mu"], data["sigma"], int(data["num_videos"])


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def _list_videos(folder: Path, flag: str) -> list[Path]:
    from ..data.video_io import VIDEO_EXTENSIONS, list_videos

    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} is not a folder; give a folder of videos (searched recursively).")
    videos = list_videos(folder, recursive=True)
    if not videos:
        raise ValueError(f"No videos ({'/'.join(VIDEO_EXTENSIONS)}) under {flag} {folder}.")
    return videos


def _metric_list(text: str) -> list[str]:
    """``--metrics clip_score,fvd`` -> ["clip_score", "fvd"] (checked by EvalT2VOptions)."""
    return [m.strip() for m in text.split(",") if m.strip()]


@dataclass
class EvalT2VOptions(Options):
    """Every option of ``opensora-plan eval-t2v`` / :func:`evaluate_t2v`, with its default and checks."""

    COMMAND: ClassVar[str] = "eval-t2v"
    CONFIG: ClassVar[bool] = True  # --config FILE holds any of these options

    videos: str = option(help="folder of generated videos (searched recursively)")
    metrics: list[str] = option(default_factory=lambda: list(METRICS), type=_metric_list,
                                help="comma-separated: clip_score, fvd")
    prompts: str | None = option(None, help="prompt source: the .txt given to 'sample' (line i <-> video 000i-...) "
                                 "or a .json (data list [{path, cap}] or {file name: prompt}); unset: read back from "
                                 "the file names")
    real: str | None = option(None, help="real videos for FVD: a folder (recursive) or an .npz from "
                              "--save_real_stats")
    clip_model: str | None = option(None, help="local CLIP folder (CLIPModel + CLIPProcessor files)")
    i3d_model: str | None = option(None, help="local I3D weights: pytorch-i3d rgb_imagenet.pt or StyleGAN-V "
                                   "i3d_torchscript.pt")
    i3d_sha256: str | None = option(None, help="expected sha256 of --i3d_model (checked before loading)")
    num_frames: int = option(FVD_NUM_FRAMES, help="FVD clip length, from frame 0")
    sample_rate: int = option(1, help="FVD clip: every n-th frame")
    resolution: int = option(FVD_RESOLUTION, help="FVD frame size after resizing the short side + centre crop")
    clip_frames: int = option(0, help="CLIP score: N evenly spaced frames (0 = all)")
    batch_size: int = option(8, help="videos per I3D batch / frames per CLIP batch")
    subset_size: int | None = option(None, help="use only the first N videos (sorted by path) of each set")
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)")
    json_out: str | None = option(None, help=f"where to write the results (unset: <videos>/{DEFAULT_JSON_NAME})")
    save_real_stats: str | None = option(None, help="also save the real set's I3D mean/covariance to this .npz")
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        if isinstance(self.metrics, str):
            self.metrics = _metric_list(self.metrics)
        self.metrics = list(dict.fromkeys(m.strip() for m in self.metrics if m.strip()))
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"--metrics must be a comma-separated subset of {','.join(METRICS)}, got "
                             f"{','.join(self.metrics) or 'nothing'}.")
        for name, least in (("num_frames", 1), ("sample_rate", 1), ("resolution", 1), ("batch_size", 1),
                            ("clip_frames", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name} must be at least {least}, got {getattr(self, name)}.")


def evaluate_t2v(*args, **kwargs) -> T2VEvaluation:
    """CLIP score and/or FVD of the videos under ``videos`` (recursive); see the module doc.

    ``metrics``: any of ``clip_score`` (needs ``clip_model``) and ``fvd`` (needs ``i3d_model`` and
    ``real``: a folder of real videos or an ``.npz`` from ``save_real_stats``). ``subset_size``
    keeps the first N generated (and real) videos by path. Writes :meth:`T2VEvaluation.to_dict` to
    ``json_out`` (default ``<videos>/eval_t2v.json``). Unreadable videos, and videos too short for
    the FVD clip, are skipped and listed. Takes an :class:`EvalT2VOptions`, or its fields (videos
    positionally).

    Raises ValueError / FileNotFoundError for bad options, all checked before a model is loaded.
    """
    o = EvalT2VOptions.of(*args, **kwargs)
    from ..data.video_io import VideoReader
    from ..models.i3d import load_i3d, min_i3d_input, sha256_of_file
    from ..utils import resolve_device

    # ---- validate everything cheap first
    metrics = tuple(o.metrics)  # checked by EvalT2VOptions
    videos_dir = Path(o.videos)
    generated = _list_videos(videos_dir, "--videos")
    check_output_file(o.json_out or videos_dir / DEFAULT_JSON_NAME, "--json_out", o.overwrite)  # before any scoring
    if o.save_real_stats:
        check_output_file(o.save_real_stats, "--save_real_stats", o.overwrite)
    if o.subset_size:
        generated = generated[:o.subset_size]
    prompt_of: dict[Path, str] = {}
    if "clip_score" in metrics:
        if not o.clip_model:
            raise ValueError("--metrics clip_score needs --clip_model, a local CLIP folder (docs/evaluation.md).")
        if o.prompts is None:
            logger.warning("No --prompts given: prompts are read back from the file names (punctuation, case and "
                           "anything past 80 characters are lost); pass the prompt file given to 'sample' for exact prompts.")
        prompt_of = resolve_prompts(generated, o.prompts)
    real_videos: list[Path] = []
    real_stats = None
    stats_settings = _stats_settings(o.num_frames, o.sample_rate, o.resolution)
    if "fvd" in metrics:
        if not o.i3d_model:
            raise ValueError("--metrics fvd needs --i3d_model, a local I3D weight file (docs/evaluation.md).")
        if not o.real:
            raise ValueError("--metrics fvd needs --real, a folder of real videos or a statistics .npz.")
        min_frames, min_pixels = min_i3d_input()
        if o.num_frames < min_frames or o.resolution < min_pixels:
            raise ValueError(f"FVD needs --num_frames >= {min_frames} and --resolution >= {min_pixels} (the I3D's "
                             f"head); the standard protocol is {FVD_NUM_FRAMES} frames at {FVD_RESOLUTION}.")
        real_path = Path(o.real)
        if real_path.suffix == ".npz":
            if not real_path.is_file():
                raise FileNotFoundError(f"--real {real_path} does not exist; give a folder of videos or a statistics .npz.")
            real_stats = load_real_stats(real_path, stats_settings)
        else:
            real_videos = _list_videos(real_path, "--real")
            if o.subset_size:
                real_videos = real_videos[:o.subset_size]
        if not Path(o.i3d_model).is_file():
            raise FileNotFoundError(f"--i3d_model {o.i3d_model} does not exist; see docs/evaluation.md for the "
                                    "weights.")
    elif o.save_real_stats:
        raise ValueError("--save_real_stats needs --metrics fvd and --real DIR.")
    if o.save_real_stats and real_stats is not None:
        raise ValueError("--save_real_stats needs --real to be a folder of videos, not already an .npz.")

    # ---- load the models
    device = resolve_device(o.device)
    scorer = i3d = None
    if "clip_score" in metrics:
        from ..models.clip import CLIPScorer

        scorer = CLIPScorer.from_folder(o.clip_model, device=device, batch_size=max(o.batch_size, 1))
    if "fvd" in metrics:
        i3d = load_i3d(o.i3d_model, device=device, expected_sha256=o.i3d_sha256)

    summary = T2VEvaluation(settings=dict(
        videos=str(videos_dir), metrics=list(metrics), prompts=str(o.prompts) if o.prompts else "file names",
        real=str(o.real) if o.real else None, clip_model=str(o.clip_model) if o.clip_model else None,
        i3d_model=str(o.i3d_model) if o.i3d_model else None,
        i3d_sha256=sha256_of_file(o.i3d_model) if o.i3d_model and "fvd" in metrics else None,
        clip_frames=o.clip_frames, batch_size=o.batch_size, device=str(device), **stats_settings,
    ))
    generated_features = _I3DFeatures(i3d, device, o.batch_size) if i3d is not None else None

    # ---- generated videos: CLIP score per video, I3D features of the FVD clip
    for path in progress_bar(generated, desc="eval-t2v generated", unit="video"):
        try:
            with VideoReader(path) as reader:
                total = reader.num_frames
                frames = reader.get_frames(range(total))  # (T, H, W, 3) uint8
        except ValueError as err:  # VideoReadError: a bad file, not a bad run
            logger.warning("skipping %s: %s", path, err)
            summary.skipped.append((str(path), str(err)))
            continue
        result = VideoResult(path=str(path), prompt=prompt_of.get(path), total_frames=total)
        if scorer is not None:
            chosen = clip_frame_indices(total, o.clip_frames)
            result.clip_score = float(scorer.frame_scores(frames[chosen], result.prompt).mean())
            result.clip_frames = len(chosen)
        if generated_features is not None:
            indices = fvd_clip_indices(total, o.num_frames, o.sample_rate)
            if indices is None:
                summary.skipped.append((str(path), _too_short(total, o.num_frames, o.sample_rate)))
            else:
                generated_features.add(fvd_preprocess(frames[indices], o.resolution))
                result.in_fvd = True
        summary.videos.append(result)

    # ---- real videos and the Fréchet distance
    if generated_features is not None:
        from ..metrics import frechet_distance, gaussian_statistics

        fake = generated_features.features()
        if real_stats is None:
            real_features = _I3DFeatures(i3d, device, o.batch_size)
            for path in progress_bar(real_videos, desc="eval-t2v real", unit="video"):
                try:
                    with VideoReader(path) as reader:
                        indices = fvd_clip_indices(reader.num_frames, o.num_frames, o.sample_rate)
                        if indices is None:
                            summary.skipped.append((str(path), _too_short(reader.num_frames, o.num_frames,
                                                                          o.sample_rate)))
                            continue
                        clip = reader.get_frames(indices)
                except ValueError as err:
                    logger.warning("skipping %s: %s", path, err)
                    summary.skipped.append((str(path), str(err)))
                    continue
                real_features.add(fvd_preprocess(clip, o.resolution))
            real_array = real_features.features()
            if len(real_array) < 2:
                raise ValueError(f"FVD needs at least 2 usable real videos, got {len(real_array)} under --real "
                                 f"{o.real}.")
            mu_real, sigma_real = gaussian_statistics(real_array)
            num_real = len(real_array)
            if o.save_real_stats:
                with open(o.save_real_stats, "wb") as f:
                    np.savez(f, mu=mu_real, sigma=sigma_real, num_videos=num_real, **stats_settings)
        else:
            mu_real, sigma_real, num_real = real_stats
        if len(fake) < 2:
            raise ValueError(f"FVD needs at least 2 usable generated videos, got {len(fake)} under --videos {videos_dir}.")
        summary.fvd = frechet_distance(*gaussian_statistics(fake), mu_real, sigma_real)
        summary.fvd_num_generated, summary.fvd_num_real = len(fake), num_real

    json_path = Path(o.json_out) if o.json_out else videos_dir / DEFAULT_JSON_NAME
    summary.settings["json_out"] = str(json_path)
    atomic_write_bytes(json_path, json.dumps(summary.to_dict(), indent=2).encode())
    return summary
