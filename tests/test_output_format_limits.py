"""Issue 23, kind 3: output-format limits. GIF delays are whole centiseconds and browsers play delays under
20 ms as 100 ms, so a GIF above 50 fps keeps every n-th frame (same duration) and says so in one line before
any work; an fps no GIF (or mp4) can hold, or an odd H.264 size, is refused before anything is computed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opensora_plan import cli
from opensora_plan.data.video_io import describe_gif, gif_plan, write_gif


def _delays_ms(path) -> list[int]:
    image = Image.open(path)
    delays = []
    for index in range(image.n_frames):
        image.seek(index)
        delays.append(image.info["duration"])
    return delays


@pytest.mark.parametrize("fps", [60.0, 120.0, 1000.0])
def test_a_fast_gif_keeps_every_nth_frame_and_plays_at_the_right_speed(tmp_path, fps):
    frames = np.random.default_rng(0).integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    delays = _delays_ms(write_gif(tmp_path / "v.gif", frames, fps))  # 1000 fps: was "returned 22"
    assert min(delays) >= 20  # browsers would play 10 ms as 100 ms
    step, gif_fps = gif_plan(fps)
    assert len(delays) == len(frames[::step]) and gif_fps <= 50
    assert sum(delays) / 1000 == pytest.approx(len(frames) / fps, abs=0.011 * len(delays) / 2 + 0.02)


def test_describe_gif_says_what_the_gif_does():
    assert describe_gif(8) is None and describe_gif(50) is None
    assert "keeps every 2nd frame and plays at 30 fps" in describe_gif(60)
    with pytest.raises(ValueError, match="cannot be written as a GIF"):
        describe_gif(0.001)


def test_sample_refuses_an_fps_no_gif_holds_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sample", "a red circle moving left", "--gif", "--fps", "0.001", "--save_img_path",
                     str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be written as a GIF" in err[0]
    assert not out.exists()


def test_sample_gif_at_60_fps_says_so_before_sampling_and_plays_at_30(tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["sample", "a red circle moving left", "--gif", "--fps", "60", "--num_sampling_steps", "2",
                         "--save_img_path", str(out)]) == 0
    notes = [r.getMessage() for r in caplog.records if "--gif:" in r.getMessage()]
    assert len(notes) == 1 and "every 2nd frame and plays at 30 fps" in notes[0]
    (gif,) = out.glob("*.gif")
    delays = _delays_ms(gif)
    assert min(delays) >= 20 and len(delays) == 9  # 17 frames -> every 2nd


def test_an_fps_an_mp4_cannot_hold_is_refused_not_written_at_24(tmp_path, capsys):
    """Found with the GIF limits: 1e-5 fps rounded to a 0 frame rate, which PyAV wrote as 24 fps silently."""
    from opensora_plan.data.video_io import write_video

    with pytest.raises(ValueError, match="lowest frame rate"):
        write_video(tmp_path / "v.mp4", np.zeros((2, 16, 16, 3), np.uint8), 1e-5)
    for argv in (["sample", "a red circle moving left", "--save_img_path", str(tmp_path / "out")],
                 ["interpolate", str(tmp_path / "in.mp4")], ["upscale", str(tmp_path / "in.mp4")]):
        assert cli.main([*argv, "--fps", "0.00001"]) == 1
        assert "lowest frame rate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_upscale_refuses_an_odd_mp4_size_before_the_model_runs(tmp_path, monkeypatch, capsys):
    """Found with the GIF limits: an x3 upscale of an odd-sized video (ffv1 in .mkv allows one) ran the model,
    then failed in the H.264 writer."""
    import json

    import av

    from opensora_plan.models.rgt import RGTModel
    from opensora_plan.pipelines import upscale

    config_file = next((Path(__file__).parent / "fixtures").rglob("rgt_tiny_config.json"))
    config = {**json.loads(config_file.read_text())["network_g"], "upscale": 3}
    RGTModel.from_config(config).save_pretrained(tmp_path / "rgt3")
    with av.open(str(tmp_path / "odd.mkv"), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = 33, 31, "yuv420p"
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((31, 33, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    monkeypatch.setattr(upscale, "upscale_frames", lambda *a, **k: pytest.fail("the model ran"))
    assert cli.main(["upscale", str(tmp_path / "odd.mkv"), "--model_path", str(tmp_path / "rgt3"), "--output",
                     str(tmp_path / "out.mp4")]) == 1
    assert "gives 99x93, and the H.264 output needs even sides" in capsys.readouterr().err
