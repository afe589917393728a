"""Post-processing stages after the VAE decode: frame interpolation (AMT) then super-resolution (RGT).

``sample --interpolate N --upscale S`` (flags, or the model folder's ``stages``), the pipeline's
``frame_interpolator`` / ``upscaler`` components, ``serve``'s service, the one resolver
(``model_folder.stage_model``: flag > folder file) and the checks that run before any model loads.
Tiny random stage models (AMT-Tiny, a one-block RGT) keep it fast.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from opensora_plan import cli
from opensora_plan.data.video_io import read_video, write_video
from opensora_plan.models.amt import build_amt
from opensora_plan.models.rgt import build_rgt
from opensora_plan.pipelines import OpenSoraPlanPipeline
from opensora_plan.pipelines.model_folder import SAMPLING_CONFIG, stage_model
from opensora_plan.pipelines.sample_t2v import INTERPOLATE_FACTORS, SampleOptions, plan_stages
from tiny_t2v import TINY_VERSION, build_tiny_t2v


def tiny_rgt(scale: int = 2):
    """One residual group of one block, width 32: an RGT small enough for 33 frames on one CPU thread."""
    torch.manual_seed(0)
    return build_rgt(f"RGT-S-x{scale}", depth=[1], num_heads=[2], embed_dim=32, drop_path_rate=0.0).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny T2V release folder + T5, a copy of it whose sampling_config.json lists the stages, AMT-Tiny and RGT
    (x2 and x4) save_pretrained folders."""
    root = tmp_path_factory.mktemp("stages")
    model_path, t5_path = build_tiny_t2v(root)
    torch.manual_seed(0)
    build_amt("AMT-Tiny").eval().save_pretrained(root / "amt")
    tiny_rgt(2).save_pretrained(root / "rgt_x2")
    tiny_rgt(4).save_pretrained(root / "rgt_x4")
    staged = root / "staged"
    shutil.copytree(model_path, staged)
    shutil.copytree(root / "amt", staged / "interpolation")
    shutil.copytree(root / "rgt_x2", staged / "upscaler")
    (staged / SAMPLING_CONFIG).write_text(json.dumps({"stages": {
        "interpolate": {"model_path": "interpolation", "factor": 2}, "upscale": {"model_path": "upscaler", "scale": 2}}}))
    return {"root": root, "model_path": model_path, "t5": t5_path, "staged": staged}


def _sample(setup, out, *extra, model_path=None):
    return cli.main(["-q", "sample", "a cat playing the piano", "--model_path", str(model_path or setup["model_path"]),
                     "--version", TINY_VERSION, "--text_encoder_name", str(setup["t5"]), "--save_img_path", str(out),
                     "--num_sampling_steps", "2", "--sample_method", "DDIM", "--fps", "8", *extra])


def test_the_interpolation_choices_are_the_interpolator_s():
    from opensora_plan.pipelines.interpolate import FACTORS

    assert INTERPOLATE_FACTORS == (1, *FACTORS)


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


def test_sample_with_the_folder_s_interpolation_stage_writes_33_frames_at_twice_the_fps(setup, tmp_path, capsys):
    assert _sample(setup, tmp_path, "--interpolate", "2", model_path=setup["staged"]) == 0
    video, fps = read_video(tmp_path / "0000-a_cat_playing_the_piano.mp4")
    assert tuple(video.shape) == (33, 64, 64, 3) and fps == pytest.approx(16)
    assert "Sampled 1 mp4 video of 33 frames 64x64 at 16 fps (after --interpolate 2) with model " in capsys.readouterr().out


def test_sample_with_an_upscale_model_flag_writes_twice_the_size(setup, tmp_path):
    assert _sample(setup, tmp_path, "--upscale", "2", "--upscale_model", str(setup["root"] / "rgt_x2")) == 0
    video, fps = read_video(tmp_path / "0000-a_cat_playing_the_piano.mp4")
    assert tuple(video.shape) == (17, 128, 128, 3) and fps == pytest.approx(8)


def test_sample_with_both_stages_gif_and_batches(setup, tmp_path, capsys):
    args = ["--interpolate", "2", "--upscale", "2", "--gif", "--batch_size", "2"]
    assert cli.main(["-q", "sample", "--prompt_file", str(_prompts(tmp_path)), "--model_path", str(setup["staged"]),
                     "--version", TINY_VERSION, "--text_encoder_name", str(setup["t5"]), "--save_img_path",
                     str(tmp_path / "out"), "--num_sampling_steps", "2", "--sample_method", "DDIM", "--fps", "8",
                     *args]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Sampled 2 mp4 videos of 33 frames 128x128 at 16 fps \(after --interpolate 2, --upscale 2\) "
                     r"and their 2 GIFs with model ", out), out
    for name in ("0000-a_cat.mp4", "0001-a_dog.mp4"):
        video, fps = read_video(tmp_path / "out" / name)
        assert tuple(video.shape) == (33, 128, 128, 3) and fps == pytest.approx(16)
        gif, _ = read_video((tmp_path / "out" / name).with_suffix(".gif"))
        assert gif.shape[0] == 33


def _prompts(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    return tmp_path / "prompts.txt"


def test_upscale_works_on_images(setup, tmp_path):
    assert _sample(setup, tmp_path, "--force_images", "--upscale", "2", "--upscale_model",
                   str(setup["root"] / "rgt_x2")) == 0
    from PIL import Image

    with Image.open(tmp_path / "0000-a_cat_playing_the_piano.png") as image:
        assert image.size == (128, 128)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every loader of a T2V or stage model fails the test: the errors below come before any model loads."""
    from opensora_plan.models import causalvae, latte, rgt, text_encoder
    from opensora_plan.pipelines import interpolate

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(latte.LatteT2V, "from_pretrained", loaded)
    monkeypatch.setattr(causalvae.CausalVAEModel, "from_pretrained", loaded)
    monkeypatch.setattr(text_encoder, "load_t5", loaded)
    monkeypatch.setattr(interpolate, "load_interpolation_model", loaded)
    monkeypatch.setattr(rgt, "load_rgt", loaded)


@pytest.mark.parametrize("extra, message", [
    (["--interpolate", "2"], "--interpolate 2 needs --interpolate_model here: .* lists no interpolate model"),
    (["--upscale", "4"], "--upscale 4 needs --upscale_model here"),
    (["--upscale", "2", "--upscale_model", "{root}/rgt_x4"], "is an x4 model but --upscale is 2"),
    (["--upscale", "2", "--upscale_model", "{root}/missing"], r"missing does not exist; give --upscale_model"),
    (["--force_images", "--interpolate", "2", "--interpolate_model", "{root}/amt"], "needs videos but --force_images"),
    (["--interpolate_model", "{root}/amt"], "--interpolate_model has no effect without --interpolate"),
    (["--interpolate", "3"], "invalid choice"),
])
def test_stage_errors_come_before_any_model_loads(setup, tmp_path, capsys, no_model_loads, extra, message):
    extra = [e.format(root=setup["root"]) for e in extra]
    try:
        code = _sample(setup, tmp_path / "out", *extra)  # a user error: one line, exit code 1
    except SystemExit as err:  # argparse (invalid choice): its usage, then one line
        code = err.code
    assert code != 0
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "out").exists()


def test_a_flag_wins_over_the_folder_s_stages(setup):
    staged, root = setup["staged"], setup["root"]
    assert stage_model("upscale", None, staged) == staged / "upscaler"
    assert stage_model("upscale", root / "rgt_x4", staged) == root / "rgt_x4"
    # the folder lists an x2 upscaler: with the x4 flag, --upscale 4 passes and --upscale 2 is refused
    opts = dict(prompt="a cat", model_path=str(staged), upscale=4, upscale_model=str(root / "rgt_x4"))
    assert plan_stages(SampleOptions(**opts), staged) == {"upscale": root / "rgt_x4"}
    with pytest.raises(ValueError, match="is an x4 model but --upscale is 2"):
        plan_stages(SampleOptions(**{**opts, "upscale": 2}), staged)
    assert plan_stages(SampleOptions(prompt="a cat", interpolate=2, upscale=2), staged) == {
        "interpolate": staged / "interpolation", "upscale": staged / "upscaler"}


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(setup):
    pipe = OpenSoraPlanPipeline.from_release(setup["staged"], version=TINY_VERSION, text_encoder=setup["t5"],
                                             scheduler="DDIM")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, **kwargs):
    return pipe("a cat", num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                **kwargs).frames


def test_pipeline_components_are_none_until_load_stages_reads_the_folder(pipe, setup):
    assert pipe.frame_interpolator is None and pipe.upscaler is None
    with pytest.raises(ValueError, match="needs a frame_interpolator"):
        _call(pipe, interpolation_factor=2)
    pipe.load_stages()
    assert type(pipe.frame_interpolator).__name__ == "AMTModel" and pipe.upscaler.upscale == 2
    plain = _call(pipe, output_type="pt")  # (1, 17, 3, 64, 64)
    for output_type in ("uint8", "pt", "pil"):  # "np" is "pt" moved to numpy (test_pipeline_api)
        frames = _call(pipe, interpolation_factor=2, upscale_factor=2, output_type=output_type)
        if output_type == "pil":
            assert len(frames[0]) == 33 and frames[0][0].size == (128, 128)
        elif output_type == "pt":
            assert frames.shape == (1, 33, 3, 128, 128)
            # the stages run on [0, 1] frames: a source frame's upscaled mean stays close to the frame's
            assert abs(frames[0, 0].mean() - plain[0, 0].mean()) < 0.1
        else:
            assert tuple(frames.shape) == (1, 33, 128, 128, 3)
    assert _call(pipe, interpolation_factor=4, output_type="np").shape == (1, 65, 64, 64, 3)
    with pytest.raises(ValueError, match="upscaler is an x2 model"):
        _call(pipe, upscale_factor=4)
    with pytest.raises(ValueError, match="output_type='latent' returns the latents undecoded"):
        _call(pipe, interpolation_factor=2, output_type="latent")
    with pytest.raises(ValueError, match="num_frames=1 samples an image"):
        _call(pipe, interpolation_factor=2, num_frames=1)


def test_save_pretrained_keeps_the_stage_components(pipe, tmp_path):
    pipe.load_stages()
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["frame_interpolator"][1] == "AMTModel" and index["upscaler"][1] == "RGTModel"
    reloaded = OpenSoraPlanPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.upscaler.upscale == 2
    torch.testing.assert_close(_call(reloaded, interpolation_factor=2, upscale_factor=2),
                               _call(pipe, interpolation_factor=2, upscale_factor=2), rtol=0, atol=0)


def test_call_defaults_come_from_the_folder_file_else_the_release(setup, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(setup["model_path"], folder)
    bare = OpenSoraPlanPipeline.from_release(folder, version=TINY_VERSION, text_encoder=setup["t5"], scheduler="DDIM")
    assert bare.sampling_defaults() == {"num_inference_steps": 50, "guidance_scale": 7.5}
    (folder / SAMPLING_CONFIG).write_text(json.dumps({"num_sampling_steps": 2, "guidance_scale": 1.0}))
    assert bare.sampling_defaults() == {"num_inference_steps": 2, "guidance_scale": 1.0}
    bare.set_progress_bar_config(disable=True)
    run = lambda **kw: bare("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).frames  # noqa: E731
    torch.testing.assert_close(run(), run(num_inference_steps=2, guidance_scale=1.0), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# serve (the service, no browser)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(setup):
    """(a service of a folder without stages, one of the staged folder with an x4 --upscale_model)."""
    from opensora_plan.ui.service import VideoService

    bare = VideoService(setup["model_path"], version=TINY_VERSION, text_encoder_name=setup["t5"], device="cpu")
    service = VideoService(setup["staged"], version=TINY_VERSION, text_encoder_name=setup["t5"], device="cpu",
                           upscale_model=setup["root"] / "rgt_x4")  # the flag wins over the folder's x2
    return bare, service


def test_service_offers_and_validates_the_stages(services):
    from opensora_plan.ui.service import GenerationRequest

    bare, service = services
    assert bare.interpolation_choices() == [1] and bare.upscale_choices() == [1]
    with pytest.raises(ValueError, match=r"Interpolation 2x is not available; .* \(start serve with --interpolate_model"):
        bare.validate(GenerationRequest("a cat", interpolate=2, scheduler="DDIM"))
    assert service.interpolation_choices() == [1, 2, 4] and service.upscale_choices() == [1, 4]
    with pytest.raises(ValueError, match="Upscaling 2x is not available; choose off or 4x"):
        service.validate(GenerationRequest("a cat", upscale=2, scheduler="DDIM"))
    result = service.generate(GenerationRequest("a cat", num_inference_steps=2, seed=0, scheduler="DDIM",
                                                interpolate=2))
    assert (result.num_frames, result.height, result.width) == (33, 64, 64)
    assert result.fps == pytest.approx(2 * service.defaults["fps"])
    assert read_video(result.mp4)[0].shape[0] == 33


def test_page_shows_the_stage_choices_only_when_the_service_has_them(services):
    pytest.importorskip("gradio")
    from opensora_plan.ui.app import build_app

    def dropdowns(service):
        app = build_app(service)
        return {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None) in ("interpolate", "upscale")}

    bare, service = services
    assert not any(d.visible for d in dropdowns(bare).values())
    shown = dropdowns(service)
    assert [c[0] for c in shown["interpolate"].choices] == ["off", "2x", "4x"] and shown["interpolate"].visible
    assert [c[0] for c in shown["upscale"].choices] == ["off", "4x"] and shown["upscale"].visible


# --------------------------------------------------------------------------------------------
# interpolate (folders) and the judge on post-processed videos
# --------------------------------------------------------------------------------------------


def test_interpolate_folder_skips_bad_videos_and_lists_them(setup, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "good.mp4", torch.zeros(3, 64, 64, 3, dtype=torch.uint8), 8)
    (folder / "broken.mp4").write_bytes(b"not a video")
    write_video(folder / "short.mp4", torch.zeros(1, 64, 64, 3, dtype=torch.uint8), 8)
    args = ["-q", "interpolate", str(folder), "--model_path", str(setup["root"] / "amt"), "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 2 files:" in out
    assert re.search(r"broken\.mp4: ", out) and re.search(r"short\.mp4 has 1 frame", out)
    assert all(line.count(str(folder)) == 1 for line in out.splitlines() if line.startswith("  "))  # path once
    assert read_video(tmp_path / "videos_interp_x2" / "good.mp4")[0].shape[0] == 5
    (folder / "good.mp4").unlink()
    assert cli.main([*args, "--output", str(tmp_path / "none")]) == 1  # nothing written


def test_judge_is_size_and_length_agnostic():
    from opensora_plan.demo.judge import judge_video
    from opensora_plan.demo.shapes import random_clip, render

    clip = random_clip(np.random.default_rng(0), "red", "square", "left", 64)
    small = np.asarray(render(clip, 17, 64))
    big = small.repeat(2, axis=1).repeat(2, axis=2)  # 128x128, as --upscale 2 makes it
    long = np.concatenate([small[:1], np.repeat(small[1:], 2, axis=0)])  # 33 frames
    expected = judge_video(small)
    for frames in (big, long):
        verdict = judge_video(frames)
        assert (verdict.colour, verdict.shape, verdict.direction, verdict.background_clean) == (
            expected.colour, expected.shape, expected.direction, expected.background_clean)


def test_demo_eval_judges_post_processed_videos(setup, tmp_path):
    from opensora_plan.demo.evaluate import evaluate_demo

    report = evaluate_demo(prompts=["a red circle moving left"], seeds=(0,), num_sampling_steps=2, device="cpu",
                           save_dir=tmp_path, progress=False, interpolate=2, upscale=2,
                           interpolate_model=setup["root"] / "amt", upscale_model=setup["root"] / "rgt_x2")
    video, fps = read_video(report.videos[0]["file"])
    assert tuple(video.shape[:3]) == (33, 128, 128) and fps == pytest.approx(2 * 8)
    assert "judged after interpolate x2, then upscale x2" in report.table()
    with pytest.raises(FileNotFoundError, match="missing does not exist; give --interpolate_model"):
        evaluate_demo(prompts=["a red circle moving left"], seeds=(0,), interpolate=2, device="cpu",
                      interpolate_model=tmp_path / "missing")
