"""The embedded demo model: shipped weights, the demo commands, the training recipe and the evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_plan import cli
from opensora_plan.demo.evaluate import DemoEvalReport, evaluate_demo, select_prompts
from opensora_plan.demo.judge import judge_video
from opensora_plan.demo.shapes import COLOURS, DIRECTIONS, SHAPES, parse_caption
from opensora_plan.demo.model import default_model_path, load_demo_info, sample_defaults
from opensora_plan.pipelines.model_folder import load_sampling_config
from opensora_plan.demo.train import DemoRecipe, copy_shipped_stages, train_demo

SHIPPED = default_model_path()


# --------------------------------------------------------------------------------------------
# the shipped model
# --------------------------------------------------------------------------------------------


def test_shipped_demo_has_the_release_layout_in_safetensors_within_25_mb():
    info = load_demo_info(SHIPPED)
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert (SHIPPED / info["version"] / "diffusion_pytorch_model.safetensors").is_file()
    assert (SHIPPED / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (SHIPPED / info["text_encoder"] / "model.safetensors").is_file()
    assert (SHIPPED / info["text_encoder"] / "spiece.model").is_file()
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


def test_shipped_demo_names_its_interpolation_model_a_small_amt_folder():
    from opensora_plan.models.amt import AMTModel

    stage = load_sampling_config(None).stages["interpolate"]
    folder = Path(stage["model_path"])
    assert folder.parent == SHIPPED and stage["factor"] == 2
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 5 * 10**6  # issue 19: small shipped weights
    model = AMTModel.from_pretrained(folder)  # strict keys
    assert model.check_size(64, 64) is None  # handles the demo's 64x64 frames without padding


def test_shipped_demo_loads_strictly_and_samples_a_video():
    from opensora_plan.demo.evaluate import load_demo_pipeline

    pipe, info = load_demo_pipeline(device="cpu")  # strict loaders: a missing/unexpected key raises
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = pipe.default_size()
    video = pipe("a red circle moving left", num_inference_steps=3, guidance_scale=info["guidance_scale"],
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.dtype == torch.uint8 and tuple(video.shape) == (1, frames, height, width, 3)


def test_sample_defaults_use_the_shipped_demo_unless_a_real_checkpoint_or_value_is_given(tmp_path):
    info = load_demo_info(SHIPPED)
    opts = sample_defaults()
    assert opts["model_path"] == str(SHIPPED) and opts["version"] == info["version"]
    assert opts["text_encoder_name"] == str(SHIPPED / info["text_encoder"])
    assert (opts["guidance_scale"], opts["num_sampling_steps"]) == (info["guidance_scale"], info["num_sampling_steps"])
    assert sample_defaults(guidance_scale=9.0, version=None)["guidance_scale"] == 9.0  # given values win
    release = sample_defaults(tmp_path)  # a folder without demo.json: the release's defaults
    assert (release["version"], release["guidance_scale"], release["sample_method"]) == ("65x512x512", 7.5, "PNDM")
    with pytest.raises(ValueError, match="unknown options"):
        sample_defaults(steps=3)
    with pytest.warns(UserWarning, match="DDIM clips the predicted latents"):  # wrong colours on the demo
        sample_defaults(sample_method="DDIM")


def test_sample_command_writes_an_mp4_with_the_shipped_demo(tmp_path):
    info = load_demo_info(SHIPPED)
    code = cli.main(["sample", "--model_path", str(SHIPPED), "--version", info["version"],
                     "--text_encoder_name", str(SHIPPED / info["text_encoder"]), "--text_prompt",
                     "a red circle moving left", "--num_sampling_steps", "2",
                     "--save_img_path", str(tmp_path), "--device", "cpu"])
    assert code == 0
    (mp4,) = tmp_path.glob("*.mp4")
    assert mp4.stat().st_size > 0


# --------------------------------------------------------------------------------------------
# demo make-data
# --------------------------------------------------------------------------------------------


def test_make_data_command_writes_judgeable_videos_and_the_trainer_json(tmp_path):
    from opensora_plan.data.datasets import load_video_entries
    from opensora_plan.data.video_io import read_video

    assert cli.main(["demo", "make-data", "--out", str(tmp_path), "--num_videos", "3", "--seed", "1"]) == 0
    entries = load_video_entries(tmp_path / "data.json")  # the trainer's own reader
    assert len(entries) == 3
    for entry in entries:
        assert "a {} {} moving {}".format(*parse_caption(entry.captions[0])) == entry.captions[0]
        frames, _ = read_video(entry.path)
        assert tuple(frames.shape) == (17, 64, 64, 3)
        verdict = judge_video(frames.numpy())  # survives the mp4 round trip
        assert verdict.matches(*parse_caption(entry.captions[0])) == dict.fromkeys(
            ("colour", "shape", "direction", "background"), True)


def test_make_data_lossless_writes_the_rendered_frames_exactly(tmp_path):
    from opensora_plan.data.video_io import read_video
    from opensora_plan.demo.shapes import random_clip, render

    assert cli.main(["demo", "make-data", "--out", str(tmp_path), "--num_videos", "1", "--num_frames", "5",
                     "--seed", "3", "--lossless"]) == 0
    clip = random_clip(np.random.default_rng(3), "red", "circle", next(iter(DIRECTIONS)), 64)  # combination 0
    frames, _ = read_video(tmp_path / "videos" / "00000.mp4")
    assert np.array_equal(frames.numpy(), render(clip, 5, 64))


# --------------------------------------------------------------------------------------------
# demo eval
# --------------------------------------------------------------------------------------------


def test_select_prompts_spreads_a_subset_over_the_whole_vocabulary():
    subset = select_prompts(12)
    assert len(set(subset)) == 12
    labels = [parse_caption(p) for p in subset]
    assert {c for c, _, _ in labels} == set(COLOURS)
    assert {s for _, s, _ in labels} == set(SHAPES)
    assert {d for _, _, d in labels} == set(DIRECTIONS)
    assert len(select_prompts()) == len(select_prompts(100)) == 60
    with pytest.raises(ValueError, match="at least 1"):
        select_prompts(0)


def test_eval_report_counts_each_attribute_and_all_correct():
    right = dict.fromkeys(("colour", "shape", "direction", "background"), True)
    report = DemoEvalReport(settings={"seeds": [0], "sample_method": "DDIM", "num_sampling_steps": 1,
                                      "guidance_scale": 1.0})
    report.videos = [{"prompt": "p", "correct": right},
                     {"prompt": "p", "correct": {**right, "shape": False}},
                     {"prompt": "q", "correct": {**right, "direction": False, "shape": False}},
                     {"prompt": "q", "correct": right}]
    acc = report.accuracy()
    assert acc == {"colour": 1.0, "shape": 0.5, "direction": 0.75, "background": 1.0, "all": 0.5}
    assert not report.meets_targets()
    assert "shape" in report.table() and "50.0%" in report.table()


def test_eval_rejects_a_prompt_outside_the_vocabulary_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match="names no shape"):
        evaluate_demo(tmp_path / "missing", prompts=["a red blob moving left"])


def test_load_demo_info_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo.json"):
        load_demo_info(tmp_path)


# --------------------------------------------------------------------------------------------
# demo train (the recipe, on a micro budget)
# --------------------------------------------------------------------------------------------


def _tiny_recipe() -> DemoRecipe:
    # 5 frames at 32 px: latents 2 x 4 x 4; one VAE step on single frames; 2 T2V steps.
    return DemoRecipe.micro()


@pytest.mark.slow
def test_demo_train_micro_budget_builds_a_model_the_sample_command_uses(tmp_path):
    recipe = _tiny_recipe()
    report = train_demo(tmp_path, recipe)
    saved = json.loads((tmp_path / "demo_train_report.json").read_text())
    assert set(saved["seconds"]) >= {"data", "t5", "vae", "extract", "t2v", "assemble", "total"}
    assert saved["machine"]["cpu_count"] >= 1 and report["model_bytes"] > 0
    model = tmp_path / "model"
    info = load_demo_info(model)
    assert info["version"] == recipe.version
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(saved["vae_check"]["scaling_factor"])
    out = tmp_path / "videos"
    assert cli.main(["sample", "--model_path", str(model), "--version", info["version"], "--text_encoder_name",
                     str(model / "text_encoder"), "--text_prompt", "a blue square moving up",
                     "--num_sampling_steps", "2", "--sample_method", "DDIM", "--save_img_path", str(out),
                     "--device", "cpu", "--interpolate", "2"]) == 0  # the stage models assemble copied in
    (video,) = out.glob("*.mp4")
    from opensora_plan.data.video_io import read_video

    assert read_video(video)[0].shape[0] == 2 * (recipe.num_frames - 1) + 1
    assert info["stages"]["interpolate"]["model_path"] == "interpolation" and (model / "interpolation").is_dir()


def test_a_freshly_assembled_demo_folder_carries_the_shipped_stage_models(tmp_path):
    """demo train's assemble step copies the shipped interpolation / upscaler models and their stages entries:
    a new demo folder (here: the shipped T2V parts with a demo.json as assemble writes it before the copy)
    samples with --interpolate 2 --upscale 2 like the shipped one."""
    import shutil

    shipped = default_model_path()
    model = tmp_path / "model"
    for part in ("17x64x64", "vae", "text_encoder"):
        shutil.copytree(shipped / part, model / part)
    info = {k: v for k, v in json.loads((shipped / "demo.json").read_text()).items()
            if k in ("version", "text_encoder", "sample_method", "num_sampling_steps", "guidance_scale", "fps")}
    (model / "interpolation").mkdir()
    (model / "interpolation" / "stale.txt").write_text("replaced by the copy")
    fields = copy_shipped_stages(model)
    assert fields["stages"] == json.loads((shipped / "demo.json").read_text())["stages"]
    assert set(fields) == {"stages", "interpolation_trained_with", "upscaler_trained_with", "stages_note"}
    for entry in fields["stages"].values():
        copied = sorted(p.relative_to(model) for p in (model / entry["model_path"]).rglob("*"))
        assert copied == sorted(p.relative_to(shipped) for p in (shipped / entry["model_path"]).rglob("*"))
        for rel in copied:
            if (shipped / rel).is_file():
                assert (model / rel).read_bytes() == (shipped / rel).read_bytes()
    (model / "demo.json").write_text(json.dumps({**info, **fields}))
    assert load_sampling_config(model).stages["interpolate"]["model_path"] == str(model / "interpolation")
    out = tmp_path / "videos"
    assert cli.main(["-q", "sample", "a red circle moving left", "--model_path", str(model), "--num_sampling_steps",
                     "2", "--interpolate", "2", "--upscale", "2", "--save_img_path", str(out)]) == 0
    (video,) = out.glob("*.mp4")
    from opensora_plan.data.video_io import read_video

    frames = read_video(video)[0]
    assert frames.shape == (33, 128, 128, 3)


def test_demo_train_rejects_unknown_stages_and_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="Unknown demo stage"):
        train_demo(tmp_path, _tiny_recipe(), stages=("data", "finetune"))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        train_demo(tmp_path, DemoRecipe(num_frames=16))


# --------------------------------------------------------------------------------------------
# measured quality of the shipped model (slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_eval_command_judges_a_subset_of_the_shipped_model(tmp_path):
    out = tmp_path / "eval.json"
    assert cli.main(["demo", "eval", "--num_prompts", "12", "--seeds", "0", "1", "--json_out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["videos"]) == 24 and len({v["prompt"] for v in result["videos"]}) == 12
    for video in result["videos"]:
        assert set(video["correct"]) == {"colour", "shape", "direction", "background"}
    for name, value in result["accuracy"].items():  # recomputed from the verdicts
        expected = np.mean([all(v["correct"].values()) if name == "all" else v["correct"][name]
                            for v in result["videos"]])
        assert value == pytest.approx(expected), name


@pytest.mark.slow
def test_shipped_demo_meets_the_issue_targets_over_all_60_prompts():
    report = evaluate_demo(seeds=(0,), progress=False)
    acc = report.accuracy()
    assert acc["colour"] >= 0.95 and acc["direction"] >= 0.90 and acc["shape"] >= 0.80, acc


def test_eval_applies_a_lora_and_judges_a_new_colour(tmp_path):
    """demo eval --colours magenta --lora: the prompts of the new colour, the adapter applied (other videos)."""
    pytest.importorskip("peft")
    from opensora_plan.demo.evaluate import evaluate_demo, select_prompts
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.models.lora import add_lora, lora_config, save_lora

    transformer = LatteT2V.from_pretrained(default_model_path() / "17x64x64")
    add_lora(transformer, lora_config(4))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))  # a strong, non-zero update
    save_lora(transformer, tmp_path / "adapter")
    prompts = select_prompts(1, colours=["magenta"])
    assert prompts == ["a magenta circle moving left"]
    kwargs = dict(prompts=prompts, seeds=(0,), num_sampling_steps=2, progress=False)
    base = evaluate_demo(save_dir=tmp_path / "base", **kwargs)
    tuned = evaluate_demo(save_dir=tmp_path / "tuned", lora=tmp_path / "adapter", **kwargs)
    assert base.settings["lora"] is None and tuned.settings["lora"] == str(tmp_path / "adapter")
    base_file, tuned_file = base.videos[0]["file"], tuned.videos[0]["file"]
    assert open(base_file, "rb").read() != open(tuned_file, "rb").read()
