"""Synthetic captioned videos: one coloured shape on black, moving in a straight line.

Caption form: ``a {colour} {shape} moving {direction}``. Every combination of the vocabulary
(5 colours x 3 shapes x 4 directions = 60) is a valid prompt for the demo model. :data:`NEW_COLOURS`
and :data:`NEW_SHAPES` are words the demo model never saw, for fine-tuning it on a new word
(docs/training.md).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from opensora_plan.options import Options, option
from opensora_plan.pipelines.outputs import OVERWRITE_HELP, check_targets

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
# Not in the demo's training data: clips of these teach the shipped model a new word (LoRA demo).
# The demo VAE only reproduces its five colours: it decodes magenta as blue-purple or red (a LoRA on the
# transformer cannot change that), crimson as red. The judge expects JUDGED_AS[word] for a word's videos.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"magenta": (255, 0, 255), "crimson": (220, 20, 60)}
JUDGED_AS = {"crimson": "red"}
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("diamond",)  # a square standing on a corner; not in the demo's training data either
ALL_SHAPES = SHAPES + NEW_SHAPES
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Paraphrases used for training only; the canonical form is always one of them.
TEMPLATES = (
    "a {colour} {shape} moving {direction}",
    "a {colour} {shape} moves {direction}",
    "{colour} {shape} moving {direction} on a black background",
)


def caption(colour: str, shape: str, direction: str, template: str = TEMPLATES[0]) -> str:
    return template.format(colour=colour, shape=shape, direction=direction)


def all_prompts(colours: list[str] | None = None, shapes: list[str] | None = None) -> list[str]:
    """The 60 canonical prompts, in a fixed order; ``colours`` / ``shapes`` replace the demo's vocabulary
    (e.g. ``shapes=["diamond"]``: the 20 prompts of that word)."""
    return [caption(c, s, d) for c, s, d in itertools.product(colours or COLOURS, shapes or SHAPES, DIRECTIONS)]


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, direction) named in a caption; ValueError when one is missing."""
    words = text.lower().replace(",", " ").split()
    found = []
    for vocab, name in ((ALL_COLOURS, "colour"), (ALL_SHAPES, "shape"), (DIRECTIONS, "direction")):
        hits = [w for w in words if w in vocab]
        if not hits:
            raise ValueError(f"caption {text!r} names no {name}; expected one of {', '.join(vocab)}.")
        found.append(hits[0])
    return found[0], found[1], found[2]


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    direction: str
    start: tuple[float, float]  # centre (x, y) at frame 0, pixels
    radius: float  # half the shape's extent, pixels
    distance: float  # total displacement over the clip, pixels


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` centred at (cx, cy) with half-extent ``radius``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":  # apex up, base at the bottom of the bounding box
        inside_y = (dy >= -radius) & (dy <= radius)
        half_width = radius * (dy + radius) / (2 * radius)
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "diamond":  # corners up, down, left and right
        return np.abs(dx) + np.abs(dy) <= radius
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(ALL_SHAPES)}.")


def render(clip: Clip, num_frames: int, size: int) -> np.ndarray:
    """uint8 frames (T, size, size, 3) of ``clip``."""
    ux, uy = DIRECTIONS[clip.direction]
    colour = np.array(ALL_COLOURS[clip.colour], dtype=np.uint8)
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    for i in range(num_frames):
        f = i / max(num_frames - 1, 1)
        cx = clip.start[0] + ux * clip.distance * f
        cy = clip.start[1] + uy * clip.distance * f
        frames[i][shape_mask(clip.shape, size, cx, cy, clip.radius)] = colour
    return frames


# The smallest frame random_clip can fit a moving shape in: radius <= 0.25 size and distance <= 0.4 size
# leave 0.1 size for the start range, which needs 2 px (1 px margin each side); H.264 needs even sizes.
MIN_SIZE = 20


def random_clip(rng: np.random.Generator, colour: str, shape: str, direction: str, size: int) -> Clip:
    """Random size, speed and start such that the shape stays inside the frame the whole time."""
    # Large objects (23-32 px across at 64 px, 3-4 latent pixels at 8x VAE compression): a small one on
    # black is ~5% of the pixels, too little signal for a VAE trained from scratch in minutes.
    radius = rng.uniform(0.18, 0.25) * size
    distance = rng.uniform(0.28, 0.4) * size  # at least a quarter of the frame, as the demo spec asks
    ux, uy = DIRECTIONS[direction]
    lo, hi = radius + 1, size - radius - 1

    def axis_start(u: int) -> float:
        if u == 0:
            return rng.uniform(lo, hi)
        # moving +: start in [lo, hi - distance]; moving -: start in [lo + distance, hi]
        return rng.uniform(lo, hi - distance) if u > 0 else rng.uniform(lo + distance, hi)

    return Clip(colour, shape, direction, (axis_start(ux), axis_start(uy)), radius, distance)


@dataclass
class MakeDataOptions(Options):
    """Every option of ``opensora-plan demo make-data`` / :func:`make_dataset`."""

    COMMAND: ClassVar[str] = "demo make-data"

    out: str = option(help="output folder (videos/ and data.json)")
    num_videos: int = option(360, help="videos; the combinations are cycled")
    num_frames: int = option(17, help="frames per video")
    size: int = option(64, help="frame size in pixels, square")
    fps: int = option(8, help="frames per second of the mp4 files")
    seed: int = option(0, help="seed of positions, sizes and speeds")
    paraphrases: bool = option(True, flag="--no_paraphrases", help="only the canonical caption per video")
    lossless: bool = option(False, help="bit-exact RGB H.264 (libx264rgb, crf 0) instead of yuv420p crf 18, whose "
                            "halved colour resolution blurs every edge: for training frame models (train-vfi)")
    colours: list[str] | None = option(None, help="colours to draw (unset: the demo's five; magenta and crimson are "
                                       "words the shipped demo never saw, for fine-tuning)", show_default=False)
    shapes: list[str] | None = option(None, help="shapes to draw (unset: circle square triangle; diamond is a word "
                                      "the shipped demo never saw)", show_default=False)
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        self.require_at_least(1, "num_videos", "num_frames", "size", "fps")
        if self.size < MIN_SIZE or self.size % 2:
            raise ValueError(f"--size must be an even number of pixels >= {MIN_SIZE} (a moving shape has to fit, and "
                             f"H.264 needs even sizes), got {self.size}.")
        for name, given, known in (("colours", self.colours, ALL_COLOURS), ("shapes", self.shapes, ALL_SHAPES)):
            if given is not None:
                unknown = [v for v in given if v not in known]
                if unknown or not given:
                    raise ValueError(f"--{name} {' '.join(unknown or given) or '(none)'}: not drawable; use some of "
                                     f"{', '.join(known)}.")


def make_dataset(*args, **kwargs) -> Path:
    """Write ``num_videos`` mp4 clips and ``data.json`` (the trainer's JSON format) under ``out``.

    ``colours`` / ``shapes``: what to draw (default: the demo's five colours and three shapes;
    :data:`NEW_COLOURS` / :data:`NEW_SHAPES` are allowed). Combinations (colours x shapes x 4
    directions) are cycled so every one appears ``num_videos // combinations`` times or more.
    Returns the JSON path. Takes a :class:`MakeDataOptions`, or its fields (out, num_videos, ... positionally).
    """
    o = MakeDataOptions.of(*args, **kwargs)
    colours = list(COLOURS) if o.colours is None else list(o.colours)
    shapes = list(SHAPES) if o.shapes is None else list(o.shapes)
    from opensora_plan.data.video_io import write_video

    out = Path(o.out)
    width = max(5, int(math.log10(max(o.num_videos, 1))) + 1)
    names = [f"videos/{i:0{width}d}.mp4" for i in range(o.num_videos)]
    check_targets([], [out / "data.json", *(out / name for name in names)], o.overwrite, flag="--out")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(o.seed)
    combos = list(itertools.product(colours, shapes, DIRECTIONS))
    entries = []
    for i, rel in enumerate(names):
        colour, shape, direction = combos[i % len(combos)]
        clip = random_clip(rng, colour, shape, direction, o.size)
        write_video(out / rel, render(clip, o.num_frames, o.size), fps=o.fps, lossless=o.lossless)
        caps = [caption(colour, shape, direction, t) for t in (TEMPLATES if o.paraphrases else TEMPLATES[:1])]
        entries.append({"path": rel, "cap": caps})
    data_json = out / "data.json"
    data_json.write_text(json.dumps(entries, indent=1))
    return data_json
