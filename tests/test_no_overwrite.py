"""Issue 23, kind 6: no command replaces an existing file silently. A rerun that would write over a file of an
earlier run is refused before any model loads, naming --overwrite (which replaces it); the web UI, which cannot
ask, picks a free name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opensora_plan import cli
from opensora_plan.pipelines.outputs import free_path

DEMO = Path(cli.__file__).parent / "assets" / "demo"


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_sample_rerun_with_another_seed_does_not_replace_the_first_video(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["-q", "sample", "x", "--num_sampling_steps", "2", "--save_img_path", str(out), "--gif"]
    assert cli.main([*base, "--seed", "1"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["0000-x.gif", "0000-x.mp4"]
    capsys.readouterr()
    assert cli.main([*base, "--seed", "2"]) == 1
    line = _one_error(capsys)
    assert "0000-x.mp4" in line and "already exists" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # nothing replaced
    assert cli.main([*base, "--seed", "2", "--overwrite"]) == 0
    assert (out / "0000-x.mp4").read_bytes() != first["0000-x.mp4"]


def test_reconstruct_refuses_an_existing_output_before_loading_the_vae(tmp_path, capsys):
    from opensora_plan.data.video_io import write_video

    video = write_video(tmp_path / "in.mp4", np.zeros((9, 64, 64, 3), np.uint8), 8)
    rec = tmp_path / "rec.mp4"
    rec.write_bytes(b"an earlier result")
    argv = ["reconstruct", "--model_path", str(DEMO / "vae"), "--video_path", str(video), "--rec_path", str(rec),
            "--num_frames", "9", "--resolution", "64", "--device", "cpu"]
    assert cli.main(argv) == 1
    assert "--overwrite" in _one_error(capsys) and rec.read_bytes() == b"an earlier result"
    assert cli.main([*argv, "--overwrite"]) == 0 and rec.read_bytes() != b"an earlier result"


@pytest.mark.parametrize("command", ["data check", "demo make-data"])
def test_reports_and_datasets_are_not_replaced(tmp_path, capsys, command):
    if command == "data check":
        data = tmp_path / "data.json"
        data.write_text("[]")
        target = tmp_path / "report.json"
        argv = ["data", "check", str(data), "--json_out", str(target)]
    else:
        target = tmp_path / "d" / "data.json"
        argv = ["demo", "make-data", "--out", str(tmp_path / "d"), "--num_videos", "1", "--num_frames", "5",
                "--size", "32"]
    target.parent.mkdir(exist_ok=True)
    target.write_text("earlier")
    cli.main(argv)
    assert "--overwrite" in _one_error(capsys) and target.read_text() == "earlier"


def test_the_web_ui_picks_a_free_name(tmp_path):
    (tmp_path / "0001-x.mp4").write_bytes(b"")
    assert free_path(tmp_path / "0001-x.mp4") == tmp_path / "0001-x-2.mp4"
    (tmp_path / "0002-x.gif").write_bytes(b"")  # a GIF of an earlier session beside a free mp4 name
    assert free_path(tmp_path / "0002-x.mp4", companions=(".gif",)) == tmp_path / "0002-x-2.mp4"
    assert free_path(tmp_path / "0003-x.mp4", companions=(".gif",)) == tmp_path / "0003-x.mp4"


def test_every_writing_command_offers_overwrite():
    """Each options class of a command that writes files has --overwrite (one help text, default off)."""
    import importlib

    from opensora_plan.options import option_fields
    from opensora_plan.pipelines.outputs import OVERWRITE_HELP

    writers = [("opensora_plan.pipelines.sample_t2v", "SampleOptions"),
               ("opensora_plan.pipelines.reconstruct", "ReconstructOptions"),
               ("opensora_plan.pipelines.interpolate", "InterpolateOptions"),
               ("opensora_plan.pipelines.upscale", "UpscaleOptions"),
               ("opensora_plan.pipelines.evaluate_vae", "EvalVAEOptions"),
               ("opensora_plan.pipelines.evaluate_t2v", "EvalT2VOptions"),
               ("opensora_plan.data.check", "DataCheckOptions"),
               ("opensora_plan.demo.evaluate", "DemoEvalOptions"),
               ("opensora_plan.demo.shapes", "MakeDataOptions"),
               ("opensora_plan.models.causalvae.inflate", "InflateOptions")]
    for module, name in writers:
        fields = {f.name: f for f in option_fields(getattr(importlib.import_module(module), name))}
        assert "overwrite" in fields and fields["overwrite"].default is False, name
        assert fields["overwrite"].metadata["option"]["help"] == OVERWRITE_HELP, name
