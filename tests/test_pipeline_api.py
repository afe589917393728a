"""diffusers-native surface of OpenSoraPlanPipeline: folders (model_index.json, save_pretrained,
from_release), output types, ``frames``, num_videos_per_prompt, callback_on_step_end, and the CLI's
--version and -v/-q after the sub-command."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from opensora_plan import __version__, cli
from opensora_plan.demo.model import default_model_path, load_demo_info
from opensora_plan.models.latte import LatteT2V
from opensora_plan.pipelines import OpenSoraPlanPipeline
from tiny_t2v import TINY_VERSION, build_tiny_t2v

DEMO = default_model_path()


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """``(model_path, t5_path)`` of a tiny model in the released layout."""
    return build_tiny_t2v(tmp_path_factory.mktemp("release"), seed=3)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_release):
    model_path, t5_path = tiny_release
    pipe = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, text_encoder=t5_path,
                                             scheduler="EulerAncestralDiscrete")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, seed=0, **kwargs):
    return pipe("a cat playing the piano", num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="latent", **kwargs).frames


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [DiffusionPipeline, OpenSoraPlanPipeline])
def test_shipped_demo_loads_with_diffusers_from_pretrained_and_draws_the_asked_colour(loader):
    info = load_demo_info(DEMO)
    pipe = loader.from_pretrained(DEMO)
    assert type(pipe) is OpenSoraPlanPipeline and isinstance(pipe.transformer, LatteT2V)
    assert type(pipe.scheduler).__name__ == info["sample_method"] + "Scheduler"
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red circle moving left", num_inference_steps=20, guidance_scale=info["guidance_scale"],
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, *pipe.default_size(), 3) and frames.dtype == np.float32
    brightest = frames[0].reshape(-1, 3)[frames[0].sum(-1).reshape(-1).argmax()]  # the object's colour
    assert brightest[0] > 0.6 and brightest[1] < 0.4 and brightest[2] < 0.4, brightest


def test_save_pretrained_folder_reloads_with_diffusers_and_samples_the_same(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "OpenSoraPlanPipeline" and index["transformer"][1] == "LatteT2V"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.scheduler) is type(tiny_pipe.scheduler)
    torch.testing.assert_close(_latents(reloaded), _latents(tiny_pipe), rtol=0, atol=0)


def test_saved_demo_keeps_its_sampling_defaults_and_samples_the_same_video_through_the_cli(tmp_path):
    """save_pretrained writes the folder's sampling file (as diffusers' files do not): without it a saved demo
    sampled with the release's 50 steps / guidance 7.5 and `sample --model_path` could not read it."""
    pipe = OpenSoraPlanPipeline.from_pretrained(DEMO)
    pipe.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "demo.json").read_text())
    assert saved["version"] == "transformer" and saved["text_encoder"] == "text_encoder"
    assert saved["_saved_from"] == str(DEMO.resolve()) and "stages" not in saved  # no paths into the old folder
    reloaded = OpenSoraPlanPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.sampling_defaults() == pipe.sampling_defaults() == {"num_inference_steps": 50,
                                                                          "guidance_scale": 3.0}
    for folder, out in ((DEMO, "a"), (tmp_path / "saved", "b")):
        assert cli.main(["-q", "sample", "a red circle moving left", "--model_path", str(folder),
                         "--num_sampling_steps", "4", "--save_img_path", str(tmp_path / out)]) in (0, None)
    videos = [next((tmp_path / out).glob("*.mp4")).read_bytes() for out in "ab"]
    assert videos[0] == videos[1]


def test_saved_stage_models_are_listed_for_sample_and_saving_in_place_is_refused(tmp_path):
    pipe = OpenSoraPlanPipeline.from_pretrained(DEMO).load_stages()
    pipe.save_pretrained(tmp_path / "saved")
    stages = json.loads((tmp_path / "saved" / "demo.json").read_text())["stages"]
    assert stages == {"interpolate": {"factor": 2, "model_path": "frame_interpolator"},
                      "upscale": {"scale": 2, "model_path": "upscaler"}}
    for folder, out in ((DEMO, "a"), (tmp_path / "saved", "b")):
        assert cli.main(["-q", "sample", "a red circle moving left", "--model_path", str(folder), "--num_sampling_steps",
                         "2", "--upscale", "2", "--save_img_path", str(tmp_path / out)]) in (0, None)
    assert next((tmp_path / "a").glob("*.mp4")).read_bytes() == next((tmp_path / "b").glob("*.mp4")).read_bytes()
    plain = tmp_path / "plain"  # a pipeline without stage models saved over that folder's copy lists none
    shutil.copytree(tmp_path / "saved", plain)
    OpenSoraPlanPipeline.from_pretrained(DEMO).save_pretrained(plain)
    assert "stages" not in json.loads((plain / "demo.json").read_text())
    reloaded = OpenSoraPlanPipeline.from_pretrained(tmp_path / "saved")
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    with pytest.raises(ValueError, match="the folder this pipeline was loaded from"):
        reloaded.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == before


def test_distilled_student_loads_in_python_with_its_own_defaults_and_saves_to_a_folder_sample_reads(tmp_path):
    """from_release takes the student's version, scheduler and VAE (``../vae``) from its sampling file; the saved
    folder keeps them (and the baked-guidance record) and `sample` writes the same video from both folders."""
    student = DEMO / "student"
    pipe = OpenSoraPlanPipeline.from_release(student, text_encoder=DEMO / "text_encoder")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.sampling_defaults() == {"num_inference_steps": 4, "guidance_scale": 1.0}
    pipe.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "sampling_config.json").read_text())
    assert saved["sample_method"] == "LCM" and "_distillation" in saved and "vae" not in saved
    assert OpenSoraPlanPipeline.from_pretrained(tmp_path / "saved").sampling_defaults() == pipe.sampling_defaults()
    for folder, out in ((student, "a"), (tmp_path / "saved", "b")):
        assert cli.main(["-q", "sample", "a red circle moving left", "--model_path", str(folder),
                         "--save_img_path", str(tmp_path / out)]) in (0, None)
    assert next((tmp_path / "a").glob("*.mp4")).read_bytes() == next((tmp_path / "b").glob("*.mp4")).read_bytes()


def test_saved_release_pipeline_gets_a_sampling_file_naming_its_own_folders(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "sampling_config.json").read_text())
    assert config == {"version": "transformer", "text_encoder": "text_encoder"}
    assert cli.main(["-q", "sample", "a cat", "--model_path", str(tmp_path / "saved"), "--num_sampling_steps", "2",
                     "--sample_method", "DDIM", "--save_img_path", str(tmp_path / "out")]) in (0, None)
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1


def test_from_release_names_the_missing_version_and_what_is_there(tiny_release):
    model_path, t5_path = tiny_release
    with pytest.raises(FileNotFoundError, match=rf"65x512x512 does not exist.*found: {TINY_VERSION}, vae"):
        OpenSoraPlanPipeline.from_release(model_path, version="65x512x512", text_encoder=t5_path)


def test_from_release_without_text_encoder_needs_embeddings(tiny_release):
    model_path, _ = tiny_release
    pipe = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    with pytest.raises(ValueError, match="text encoder was released or never loaded"):
        pipe("a cat", num_inference_steps=4)


def test_loader_rejects_diffusers_options_it_cannot_honour(tiny_release):
    model_path, _ = tiny_release
    with pytest.raises(ValueError, match="device_map='auto' is not supported"):
        LatteT2V.from_pretrained(model_path / TINY_VERSION, device_map="auto")


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def test_output_types_are_one_decode_in_diffusers_formats(tiny_pipe):
    run = lambda output_type: tiny_pipe(  # noqa: E731
        "a cat playing the piano", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type=output_type).frames
    frames, height, width = tiny_pipe.default_size()
    uint8, as_np, as_pt, as_pil = run("uint8"), run("np"), run("pt"), run("pil")
    assert uint8.dtype == torch.uint8 and uint8.shape == (1, frames, height, width, 3)
    assert as_np.dtype == np.float32 and as_np.shape == (1, frames, height, width, 3)
    assert 0.0 <= as_np.min() and as_np.max() <= 1.0
    assert as_pt.dtype == torch.float32 and as_pt.shape == (1, frames, 3, height, width)
    np.testing.assert_allclose(as_pt.permute(0, 1, 3, 4, 2).numpy(), as_np, atol=1e-6)
    # uint8 truncates (the reference); np * 255 lies within one level above it
    diff = as_np * 255 - uint8.numpy()
    assert diff.min() >= -1e-3 and diff.max() < 1 + 1e-3
    assert len(as_pil) == 1 and len(as_pil[0]) == frames and as_pil[0][0].size == (width, height)
    np.testing.assert_allclose(np.asarray(as_pil[0][3]), np.round(as_np[0, 3] * 255), atol=1)


def test_video_is_a_warning_alias_of_frames(tiny_pipe):
    out = tiny_pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    with pytest.warns(FutureWarning, match="renamed to .frames"):
        assert out.video is out.frames


# --------------------------------------------------------------------------------------------
# Batches and callbacks
# --------------------------------------------------------------------------------------------


def test_num_videos_per_prompt_gives_each_generator_its_own_video(tiny_pipe):
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = tiny_pipe("a cat playing the piano", num_inference_steps=2, generator=gens, output_type="latent",
                     num_videos_per_prompt=2).frames
    assert both.shape[0] == 2 and not torch.allclose(both[0], both[1])
    for i, seed in enumerate((5, 6)):  # each equals the same prompt sampled alone with that seed
        torch.testing.assert_close(both[i:i + 1], _latents(tiny_pipe, seed), atol=1e-3, rtol=1e-3)  # batch-size matmul noise
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        tiny_pipe("a cat", num_inference_steps=2, generator=gens[:1], num_videos_per_prompt=2)
    with pytest.raises(ValueError, match="num_videos_per_prompt must be an integer >= 1"):
        tiny_pipe("a cat", num_inference_steps=2, num_videos_per_prompt=0)


def test_callback_on_step_end_sees_every_step_and_can_replace_latents_or_stop(tiny_pipe):
    seen = []

    def record(pipe, step_index, timestep, tensors):
        seen.append((step_index, int(timestep), tuple(tensors)))
        return {}

    _latents(tiny_pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    timesteps = [int(t) for t in tiny_pipe.scheduler.timesteps]
    assert seen == [(i, t, ("latents", "prompt_embeds")) for i, t in enumerate(timesteps)]

    zeroed = _latents(tiny_pipe, callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros_like(k["latents"])})
    assert torch.equal(zeroed, torch.zeros_like(zeroed))

    steps = []

    def stop_after_first(pipe, step_index, timestep, tensors):
        steps.append(step_index)
        pipe._interrupt = True
        return {}

    tiny_pipe("a cat", num_inference_steps=4, callback_on_step_end=stop_after_first, output_type="latent")
    assert steps == [0]
    with pytest.raises(ValueError, match=r"\['noise'\] are not available"):
        _latents(tiny_pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_version_and_log_flags_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"opensora-plan {__version__}"
    parser = cli.build_parser()
    assert parser.parse_args(["sample", "a cat", "-v"]).verbose
    assert parser.parse_args(["data", "check", "x.json", "-q"]).quiet
    assert parser.parse_args(["-v", "demo", "eval"]).verbose  # before the sub-command still works
    assert parser.parse_args(["sample", "a cat", "--version", "17x64x64"]).version == "17x64x64"  # the model's
    with pytest.raises(SystemExit):
        cli.main(["sample", "a cat", "-v", "-q"])
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_makes_openmp_threads_wait_passively_unless_told_otherwise(monkeypatch, given, expected):
    # Spinning OpenMP threads collapse on a shared machine (README, "Threads on a shared machine").
    monkeypatch.setenv("OMP_WAIT_POLICY", "recorded")  # so that the test's change is undone afterwards
    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY")
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == expected


def test_lcm_beyond_its_timestep_grid_is_one_error_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sample", "a red circle moving left", "--model_path", str(DEMO / "student"),
                     "--num_sampling_steps", "51", "--save_img_path", str(out)]) == 1
    assert "LCM samples on its 50-point timestep grid: at most 50 steps, got 51" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_student_uses_its_teachers_stage_models():
    from pathlib import Path

    from opensora_plan.pipelines.model_folder import stage_model

    for stage, flag, folder in (("upscale", "upscale_model", "upscaler"),
                                ("interpolate", "interpolation_model", "interpolation")):
        assert Path(stage_model(stage, None, DEMO / "student", flag)).resolve() == (DEMO / folder).resolve()


def test_sample_failing_on_bad_stage_weights_leaves_no_empty_output_folder(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("{}")
    out = tmp_path / "out"
    assert cli.main(["sample", "a red circle moving left", "--num_sampling_steps", "2", "--upscale", "2",
                     "--upscale_model", str(junk), "--save_img_path", str(out)]) == 1
    assert "is not an official RGT checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_from_pretrained_of_a_missing_local_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} is not a folder"):
        OpenSoraPlanPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no model_index.json.*use OpenSoraPlanPipeline.from_release"):
        OpenSoraPlanPipeline.from_pretrained(DEMO / "student")


def test_top_level_package_exports_the_pipeline_lazily():
    import subprocess
    import sys

    import opensora_plan

    light = subprocess.run([sys.executable, "-c", "import sys, opensora_plan; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"  # `import opensora_plan` alone stays cheap
    from opensora_plan import OpenSoraPlanPipeline as top_level

    assert top_level is OpenSoraPlanPipeline and "OpenSoraPlanPipeline" in opensora_plan.__all__
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        opensora_plan.Nope  # noqa: B018


def test_save_pretrained_onto_an_existing_file_names_it_and_writes_nothing(tiny_pipe, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match=f"{target} is an existing file"):
        tiny_pipe.save_pretrained(target)
    assert target.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [target]
