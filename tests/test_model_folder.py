"""A model folder's sampling defaults (pipelines/model_folder.py, docs/sampling.md): one file, one reader, and
the precedence flag > folder file > release defaults for `sample` and for the Python pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_t2v import TINY_VERSION, build_tiny_t2v

from opensora_plan.models.step_cache import FAST_CACHE
from opensora_plan.pipelines.model_folder import (
    DEMO_EXAMPLE_PROMPTS,
    RELEASE_SAMPLE_DEFAULTS,
    SAMPLING_CONFIG,
    default_model_path,
    fast_cache_options,
    load_sampling_config,
)
from opensora_plan.pipelines.sample_t2v import SampleOptions, resolve_sample_defaults

FOLDER_FILE = {"version": "17x64x64", "text_encoder": "t5", "sample_method": "EulerDiscrete",
               "num_sampling_steps": 12, "guidance_scale": 4.5, "fps": 12, "cache_fast": {"method": "teacache",
                                                                                          "threshold": 0.7}}


def _folder(tmp_path, config=FOLDER_FILE, name=SAMPLING_CONFIG):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(config))
    return folder


# ----------------------------------------------------------------------------- the file and its reader

def test_the_shipped_demo_is_read_through_its_demo_json():
    config = load_sampling_config(None)
    info = json.loads((default_model_path() / "demo.json").read_text())
    assert config.is_demo and config.path == default_model_path() / "demo.json"
    assert config.sample_defaults() == {"version": info["version"], "sample_method": info["sample_method"],
                                        "text_encoder_name": str(default_model_path() / info["text_encoder"]),
                                        "num_sampling_steps": info["num_sampling_steps"],
                                        "guidance_scale": info["guidance_scale"], "fps": info["fps"]}
    assert config.cache_fast == info["cache_fast"]
    assert config.stages == {name: {**spec, "model_path": str(default_model_path() / spec["model_path"])}
                             for name, spec in info["stages"].items()}


def test_stage_model_defaults_to_the_shipped_demo_interpolation_model():
    from opensora_plan.pipelines.model_folder import stage_model

    assert stage_model("interpolate") == default_model_path() / "interpolation"


def test_the_demo_example_prompts_are_the_demo_vocabulary():
    from opensora_plan.demo.shapes import caption

    assert DEMO_EXAMPLE_PROMPTS == tuple(caption(*c) for c in (
        ("red", "circle", "left"), ("blue", "square", "up"), ("yellow", "triangle", "right"),
        ("green", "circle", "down"), ("white", "square", "left")))
    assert load_sampling_config(None).example_prompts == DEMO_EXAMPLE_PROMPTS


def test_sampling_config_json_wins_over_demo_json_in_the_same_folder(tmp_path):
    folder = _folder(tmp_path, {"fps": 5}, "demo.json")
    _folder(tmp_path, {"fps": 7})
    assert load_sampling_config(folder).fps == 7 and not load_sampling_config(folder).is_demo


def test_a_folder_without_a_file_has_no_config(tmp_path):
    assert load_sampling_config(tmp_path) is None
    assert fast_cache_options(tmp_path) == FAST_CACHE


def test_stages_resolve_their_model_paths_against_the_folder(tmp_path):
    folder = _folder(tmp_path, {"stages": {"interpolate": {"model_path": "amt", "factor": 4},
                                           "upscale": {"model_path": "/abs/rgt"}}})
    assert load_sampling_config(folder).stages == {"interpolate": {"model_path": str(folder / "amt"), "factor": 4},
                                                   "upscale": {"model_path": "/abs/rgt", "scale": 2}}


@pytest.mark.parametrize("config, message", [
    ({"num_sampling_steps": 0}, "num_sampling_steps must be a whole number >= 1"),
    ({"num_sampling_steps": True}, "num_sampling_steps must be a whole number >= 1"),
    ({"guidance_scale": "high"}, "guidance_scale must be a finite number >= 0"),
    ({"fps": 0}, "fps must be a positive number"),
    ({"cache_fast": {"threshold": 0.5}}, 'cache_fast must be an object with a "method"'),
    ({"example_prompts": []}, "example_prompts must be a non-empty list"),
    ({"steps": 20}, r"unknown fields \['steps'\]"),
    ({"stages": {"denoise": {"model_path": "x"}}}, "unknown stage 'denoise'"),
    ({"stages": {"upscale": {"scale": 2}}}, 'stages.upscale must be an object with a "model_path"'),
    ({"stages": {"upscale": {"model_path": "x", "scale": 1}}}, "stages.upscale.scale must be a whole number >= 2"),
    ({"stages": {"interpolate": {"model_path": "x", "scale": 2}}}, r"unknown fields \['scale'\]"),
    ([1, 2], "not an object"),
])
def test_a_bad_field_is_one_line_naming_the_file_and_the_field(tmp_path, config, message):
    with pytest.raises(ValueError, match=message) as err:
        load_sampling_config(_folder(tmp_path, config))
    assert SAMPLING_CONFIG in str(err.value) and "\n" not in str(err.value)


def test_comments_pass_and_demo_json_keeps_its_training_record(tmp_path):
    assert load_sampling_config(_folder(tmp_path, {"_comment": "x", "fps": 6})).fps == 6
    demo = _folder(tmp_path, {"fps": 6, "trained_with": "opensora-plan demo train", "machine": {}}, "demo.json")
    (demo / SAMPLING_CONFIG).unlink()
    assert load_sampling_config(demo).fps == 6


# ----------------------------------------------------------------------------- precedence: sample

def test_sample_a_flag_wins_over_the_folder_file(tmp_path):
    folder = _folder(tmp_path)
    given = {"sample_method": "PNDM", "num_sampling_steps": 3, "guidance_scale": 1.0, "fps": 30.0,
             "version": "v", "text_encoder_name": "/t5"}
    assert resolve_sample_defaults(folder, **given) == {"model_path": folder, **given}
    assert SampleOptions(model_path=str(folder), num_sampling_steps=3).resolve().num_sampling_steps == 3


def test_sample_the_folder_file_wins_over_the_release_defaults(tmp_path):
    folder = _folder(tmp_path)
    resolved = SampleOptions(model_path=str(folder)).resolve()
    assert (resolved.version, resolved.text_encoder_name, resolved.sample_method, resolved.num_sampling_steps,
            resolved.guidance_scale, resolved.fps) == ("17x64x64", str(folder / "t5"), "EulerDiscrete", 12, 4.5, 12)


def test_sample_the_release_defaults_fill_what_the_folder_file_leaves_out(tmp_path):
    partial = _folder(tmp_path, {"num_sampling_steps": 12})
    assert resolve_sample_defaults(partial) == {"model_path": partial, **RELEASE_SAMPLE_DEFAULTS,
                                                "num_sampling_steps": 12}
    assert resolve_sample_defaults(tmp_path / "none") == {"model_path": tmp_path / "none", **RELEASE_SAMPLE_DEFAULTS}


# ----------------------------------------------------------------------------- precedence: Python pipeline

@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    return build_tiny_t2v(tmp_path_factory.mktemp("release"), seed=3)


def _cache_threshold(model_path, t5_path, method="fast", **options):
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    pipe = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, text_encoder=t5_path)
    pipe.enable_cache(method, **options)
    return pipe.transformer.step_cache.options()["threshold"]


def test_pipeline_an_argument_wins_over_the_folder_file(tiny_release, tmp_path):
    model_path, t5_path = tiny_release
    folder = shutil.copytree(model_path, tmp_path / "with_file")
    (folder / SAMPLING_CONFIG).write_text(json.dumps(FOLDER_FILE))
    assert _cache_threshold(folder, t5_path, threshold=0.3) == 0.3


def test_pipeline_the_folder_file_wins_over_the_release_defaults(tiny_release, tmp_path):
    model_path, t5_path = tiny_release
    folder = shutil.copytree(model_path, tmp_path / "with_file")
    (folder / SAMPLING_CONFIG).write_text(json.dumps(FOLDER_FILE))
    assert _cache_threshold(folder, t5_path) == FOLDER_FILE["cache_fast"]["threshold"]


def test_pipeline_the_release_defaults_apply_without_a_folder_file(tiny_release):
    model_path, t5_path = tiny_release
    assert _cache_threshold(model_path, t5_path) == FAST_CACHE["threshold"]


# ----------------------------------------------------------------------------- training previews

def test_previews_read_the_base_models_sampling_config(tmp_path):
    from opensora_plan.train.t2v import PREVIEW_DEFAULTS, preview_defaults

    folder = _folder(tmp_path, {"sample_method": "EulerDiscrete", "guidance_scale": 2.0})
    (folder / "17x64x64").mkdir()
    for pretrained in (folder, folder / "17x64x64"):  # the folder or one of its version folders
        assert preview_defaults(str(pretrained)) == ({**PREVIEW_DEFAULTS, "validation_sample_method": "EulerDiscrete",
                                                      "validation_guidance_scale": 2.0}, str(folder / SAMPLING_CONFIG))


# ----------------------------------------------------------------------------- the shipped demo's upscaler

def test_the_shipped_demo_upscaler_is_the_stage_model_default():
    from opensora_plan.models.rgt import RGTModel
    from opensora_plan.pipelines.model_folder import stage_model

    stage = load_sampling_config(None).stages["upscale"]
    assert stage == {"model_path": str(default_model_path() / "upscaler"), "scale": 2}
    assert stage_model("upscale") == default_model_path() / "upscaler"
    assert RGTModel.from_pretrained(stage["model_path"]).upscale == stage["scale"]
    assert sorted(p.name for p in (default_model_path() / "upscaler").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    assert (default_model_path() / "upscaler" / "diffusion_pytorch_model.safetensors").stat().st_size < 3 * 2**20
