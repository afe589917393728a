"""The synthetic "shapes" world and the pixel judge that scores generated videos."""

import itertools
import json

import numpy as np
import pytest

from opensora_plan.demo.judge import judge_video
from opensora_plan.demo.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    all_prompts,
    parse_caption,
    random_clip,
    render,
)


def test_vocabulary_has_all_60_prompts_in_canonical_form():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 60
    assert "a red circle moving left" in prompts
    assert parse_caption("a red circle moving left") == ("red", "circle", "left")
    with pytest.raises(ValueError, match="names no shape"):
        parse_caption("a red blob moving left")


@pytest.mark.parametrize("size", [64, 96])
def test_judge_recognises_every_rendered_combination(size):
    rng = np.random.default_rng(0)
    for colour, shape, direction in itertools.product(COLOURS, SHAPES, DIRECTIONS):
        clip = random_clip(rng, colour, shape, direction, size)
        frames = render(clip, num_frames=17, size=size)
        verdict = judge_video(frames)
        assert verdict.matches(colour, shape, direction) == {
            "colour": True, "shape": True, "direction": True, "background": True,
        }, (colour, shape, direction, verdict)


def test_motion_is_visible_and_shape_stays_in_frame():
    rng = np.random.default_rng(1)
    for direction in DIRECTIONS:
        clip = random_clip(rng, "white", "square", direction, 64)
        frames = render(clip, 17, 64)
        assert clip.distance >= 64 / 4
        # The whole shape stays inside the frame: it never touches the border.
        masks = frames.max(-1) > 0
        border = masks[:, 0, :].any() or masks[:, -1, :].any() or masks[:, :, 0].any() or masks[:, :, -1].any()
        assert not border


def test_judge_rejects_noise_background_and_static_object():
    rng = np.random.default_rng(2)
    clip = random_clip(rng, "red", "circle", "left", 64)
    frames = render(clip, 17, 64)
    noisy = frames.copy()
    noisy[..., 2] = np.maximum(noisy[..., 2], rng.integers(0, 255, noisy.shape[:3], dtype=np.uint8))
    assert not judge_video(noisy).background_clean
    static = np.repeat(frames[:1], 17, axis=0)
    assert judge_video(static).direction is None


def test_make_dataset_writes_videos_and_trainer_json(tmp_path):
    pytest.importorskip("av")
    from opensora_plan.data.video_io import read_video
    from opensora_plan.demo.shapes import make_dataset

    data_json = make_dataset(tmp_path, num_videos=6, num_frames=17, size=64, seed=3)
    entries = json.loads(data_json.read_text())
    assert len(entries) == 6
    for entry in entries:
        frames, fps = read_video(tmp_path / entry["path"])
        assert tuple(frames.shape) == (17, 64, 64, 3)
        colour, shape, direction = parse_caption(entry["cap"][0])
        assert entry["cap"][0] == f"a {colour} {shape} moving {direction}"
        # After H.264 the judge still reads the clip right.
        assert all(judge_video(np.asarray(frames)).matches(colour, shape, direction).values())


def test_new_colour_is_drawn_judged_and_kept_out_of_the_demo_vocabulary(tmp_path):
    """magenta (NEW_COLOURS) for the LoRA demo: rendered, judged when asked for, absent from the 60 prompts."""
    from opensora_plan.data.video_io import read_video
    from opensora_plan.demo.shapes import ALL_COLOURS, NEW_COLOURS, make_dataset

    assert "magenta" in NEW_COLOURS and "magenta" not in COLOURS and not any("magenta" in p for p in all_prompts())
    assert all_prompts(["magenta"])[0] == "a magenta circle moving left" and len(all_prompts(["magenta"])) == 12
    assert parse_caption("a magenta square moves up") == ("magenta", "square", "up")
    rng = np.random.default_rng(4)
    for shape, direction in itertools.product(SHAPES, DIRECTIONS):
        frames = render(random_clip(rng, "magenta", shape, direction, 64), 17, 64)
        assert all(judge_video(frames, colours=ALL_COLOURS).matches("magenta", shape, direction).values())
        assert judge_video(frames).colour in ("red", "blue")  # the demo's five only: the nearest hue
    data_json = make_dataset(tmp_path, num_videos=3, seed=5, colours=["magenta"], paraphrases=False)
    for entry in json.loads(data_json.read_text()):
        assert entry["cap"][0].startswith("a magenta ") and len(entry["cap"]) == 1
        frames = np.asarray(read_video(tmp_path / entry["path"])[0])
        assert judge_video(frames, colours=[*COLOURS, "magenta"]).colour == "magenta"
    with pytest.raises(ValueError, match="not drawable"):
        make_dataset(tmp_path / "x", num_videos=1, colours=["purple"])
    with pytest.raises(ValueError, match="cannot tell colours"):
        judge_video(frames, colours=["purple"])


def test_new_shape_is_drawn_and_told_apart_only_when_asked_for(tmp_path):
    """diamond (NEW_SHAPES): rendered, judged as such when a candidate; the demo's 60 prompts never name it."""
    from opensora_plan.demo.shapes import ALL_SHAPES, NEW_SHAPES, make_dataset

    assert "diamond" in NEW_SHAPES and not any("diamond" in p for p in all_prompts())
    assert len(all_prompts(shapes=["diamond"])) == 20 and parse_caption("a red diamond moving up")[1] == "diamond"
    rng = np.random.default_rng(6)
    for colour, shape, direction in itertools.product(COLOURS, ALL_SHAPES, DIRECTIONS):
        frames = render(random_clip(rng, colour, shape, direction, 64), 17, 64)
        verdict = judge_video(frames, shapes=ALL_SHAPES)
        assert all(verdict.matches(colour, shape, direction).values()), (colour, shape, direction, verdict)
        if shape != "diamond":  # the default judge (the demo's three shapes) is unchanged for them
            assert judge_video(frames).shape == shape
    data_json = make_dataset(tmp_path, num_videos=2, seed=7, shapes=["diamond"])
    assert all(" diamond " in e["cap"][0] for e in json.loads(data_json.read_text()))
    with pytest.raises(ValueError, match="not drawable"):
        make_dataset(tmp_path / "x", num_videos=1, shapes=["star"])
    with pytest.raises(ValueError, match="cannot tell shapes"):
        judge_video(frames, shapes=["star"])


def test_crimson_is_drawn_and_judged_as_the_demo_red():
    from opensora_plan.demo.shapes import JUDGED_AS, NEW_COLOURS

    assert "crimson" in NEW_COLOURS and JUDGED_AS["crimson"] == "red"
    frames = render(random_clip(np.random.default_rng(8), "crimson", "square", "up", 64), 17, 64)
    assert judge_video(frames).matches("red", "square", "up") == {
        "colour": True, "shape": True, "direction": True, "background": True}
