"""Automatic checks of a generated "shapes" video: colour, shape, direction, clean background.

Each check reads pixels only (no model), so it scores any video, ground truth included:
- colour: hue/saturation of the object's mean colour (white = unsaturated);
- shape: fill ratio of the object's mask in its bounding box (square ~1, circle ~pi/4, triangle ~1/2);
  when ``diamond`` is a candidate also the height of the mask's centroid in its box (triangle ~2/3 down,
  diamond ~1/2);
- direction: displacement of the object's centroid between the first and last frames;
- background: share of non-object pixels that are (near) black.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from opensora_plan.demo.shapes import ALL_COLOURS, ALL_SHAPES, COLOURS, DIRECTIONS, SHAPES

OBJECT_LEVEL = 96  # a pixel whose brightest channel exceeds this belongs to the object
DARK_LEVEL = 48  # a background pixel counts as black below this
DEMO_SIZE = 64  # the demo's frame side: pixel thresholds below are set for it and scale with the frame
HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "blue": 240.0, "magenta": 300.0}


@dataclass
class Verdict:
    colour: str | None
    shape: str | None
    direction: str | None
    background_clean: bool
    fill_ratio: float
    displacement: tuple[float, float]  # (dx, dy) in pixels, first -> last frame

    def matches(self, colour: str, shape: str, direction: str) -> dict[str, bool]:
        return {
            "colour": self.colour == colour,
            "shape": self.shape == shape,
            "direction": self.direction == direction,
            "background": self.background_clean,
        }


def _classify_colour(rgb: np.ndarray, colours=COLOURS) -> str:
    h, s, _ = colorsys.rgb_to_hsv(*(rgb / 255.0))
    if s < 0.35:
        return "white"
    hue = h * 360.0
    hues = {name: HUES[name] for name in colours if name in HUES}
    return min(hues, key=lambda name: min(abs(hue - hues[name]), 360 - abs(hue - hues[name])))


def _classify_shape(fill: float, centre_y: float, shapes=SHAPES) -> str:
    """``fill``: mask area / bounding box; ``centre_y``: the centroid's height in the box (0 top, 1 bottom)."""
    if fill >= 0.9:
        return "square"
    if "diamond" in shapes:
        # The demo VAE rounds a diamond's corners: decoded, its fill is 0.65-0.78 (median 0.71) against
        # 0.76-0.82 for circles and 0.57-0.63 for triangles, whose mass sits ~2/3 down the box where the
        # others' is centred (0.49-0.55 vs 0.60-0.64; 60 decoded clips of each, benchmarks/lora_new_word.py).
        if centre_y >= 0.575:
            return "triangle"
        return "diamond" if fill < 0.755 else "circle"
    if fill >= 0.64:
        return "circle"
    return "triangle"


def judge_video(frames: np.ndarray, min_travel: float = 0.1, colours=COLOURS, shapes=SHAPES) -> Verdict:
    """Score uint8 frames (T, H, W, 3). ``min_travel``: smallest centroid travel, as a share of the
    frame width, that counts as motion. ``colours``: the names the colour is chosen from (default the
    demo's five; add ``"magenta"`` of :data:`~opensora_plan.demo.shapes.NEW_COLOURS` to judge that word);
    ``shapes`` likewise (add ``"diamond"``). Any size and length (e.g. after ``--upscale`` / ``--interpolate``):
    travel is a share of the width, the pixel thresholds (smallest object, halo margin) scale with the frame side."""
    unknown = [c for c in colours if c not in ALL_COLOURS]
    if unknown:
        raise ValueError(f"judge_video cannot tell colours {unknown}; it knows {', '.join(ALL_COLOURS)}.")
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown:
        raise ValueError(f"judge_video cannot tell shapes {unknown}; it knows {', '.join(ALL_SHAPES)}.")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got shape {frames.shape}.")
    t, height, width, _ = frames.shape
    scale = max(height, width) / DEMO_SIZE  # 1 at the demo's 64 px, 2 after --upscale 2
    masks = frames.max(axis=-1) > OBJECT_LEVEL  # (T, H, W)
    areas = masks.reshape(t, -1).sum(axis=1)
    present = areas >= 4 * max(scale, 1) ** 2
    if not present.any():
        return Verdict(None, None, None, bool((frames < DARK_LEVEL).all()), 0.0, (0.0, 0.0))

    colour = _classify_colour(frames[masks].astype(np.float64).mean(axis=0), colours)

    fills = []
    centroids = []
    heights = []
    for m in masks[present]:
        ys, xs = np.nonzero(m)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
        centroids.append((xs.mean(), ys.mean()))
        heights.append((ys.mean() - ys.min() + 0.5) / (ys.max() - ys.min() + 1))
    fill = float(np.median(fills))
    shape = _classify_shape(fill, float(np.median(heights)), shapes)

    k = max(1, len(centroids) // 4)  # average a few frames at each end against flicker
    first = np.mean(centroids[:k], axis=0)
    last = np.mean(centroids[-k:], axis=0)
    dx, dy = (last - first).tolist()
    direction = None
    if max(abs(dx), abs(dy)) >= min_travel * width:
        unit = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
        direction = next(name for name, u in DIRECTIONS.items() if u == unit)

    # Background: pixels away from the object (a 2-px margin at 64 px tolerates codec/decoder halos).
    margin = max(2, round(2 * scale))
    grown = masks.copy()
    for axis in (1, 2):
        for shift in [s for s in range(-margin, margin + 1) if s]:
            grown |= np.roll(masks, shift, axis=axis)
    background = frames.max(axis=-1)[~grown]
    clean = bool(background.size == 0 or (background < DARK_LEVEL).mean() >= 0.98)
    return Verdict(colour, shape, direction, clean, fill, (dx, dy))
