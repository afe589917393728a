"""One place for every option (opensora_plan/options.py): the CLI is generated from the options dataclasses.

Every command's --help lists every field; a flag not given takes the dataclass default (argparse holds none);
--config files (JSON or YAML) sit between the defaults and the command line; unknown keys and bad values are
one error line; a run's options.json fed back as --config reproduces the run's options.
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from opensora_plan import cli
from opensora_plan.options import Options, option, option_fields, options_from_args, read_options_file


def _classes():
    from opensora_plan.data.check import DataCheckOptions
    from opensora_plan.data.features import ExtractOptions
    from opensora_plan.demo.evaluate import DemoEvalOptions
    from opensora_plan.demo.shapes import MakeDataOptions
    from opensora_plan.demo.train import DemoTrainOptions
    from opensora_plan.models.causalvae.inflate import InflateOptions
    from opensora_plan.pipelines.evaluate_t2v import EvalT2VOptions
    from opensora_plan.pipelines.evaluate_vae import EvalVAEOptions
    from opensora_plan.pipelines.interpolate import InterpolateOptions
    from opensora_plan.pipelines.reconstruct import ReconstructOptions
    from opensora_plan.pipelines.sample_t2v import SampleOptions
    from opensora_plan.train.sr import SRTrainOptions
    from opensora_plan.pipelines.upscale import UpscaleOptions
    from opensora_plan.train.t2v import T2VTrainOptions
    from opensora_plan.train.vae import VAETrainOptions
    from opensora_plan.train.vfi import VFITrainOptions
    from opensora_plan.ui.app import ServeOptions

    # (command words, options class, the smallest valid command line)
    return [
        (["sample"], SampleOptions, []),
        (["train-t2v"], T2VTrainOptions, ["--output_dir", "out", "--max_train_steps", "3"]),
        (["train-vae"], VAETrainOptions, ["--output_dir", "out"]),
        (["reconstruct"], ReconstructOptions, ["--model_path", "m", "--video_path", "v", "--rec_path", "r"]),
        (["interpolate"], InterpolateOptions, ["in.mp4", "--model_path", "m"]),
        (["upscale"], UpscaleOptions, ["in.mp4", "--model_path", "m"]),
        (["eval-vae"], EvalVAEOptions, ["--model_path", "m", "--video_path", "v"]),
        (["eval-t2v"], EvalT2VOptions, ["--videos", "v"]),
        (["extract"], ExtractOptions, ["--data_path", "d", "--out", "o", "--ae_path", "vae"]),
        (["data", "check"], DataCheckOptions, ["data.json"]),
        (["serve"], ServeOptions, []),
        (["demo", "make-data"], MakeDataOptions, ["--out", "o"]),
        (["demo", "train"], DemoTrainOptions, ["--out", "o"]),
        (["demo", "eval"], DemoEvalOptions, []),
        (["convert", "inflate-2d-vae"], InflateOptions, ["--vae_2d_path", "a", "--output_dir", "b"]),
        (["train-vfi"], VFITrainOptions, ["--output_dir", "out", "--max_train_steps", "3"]),
        (["train-sr"], SRTrainOptions, ["--output_dir", "out", "--max_train_steps", "3"]),
    ]


COMMANDS = _classes()
IDS = [" ".join(words) for words, _, _ in COMMANDS]


def _help(capsys, words) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _spelling(f: dataclasses.Field) -> str:
    meta = f.metadata["option"]
    return f.name if meta["positional"] else meta["flag"] or f"--{f.name}"


@pytest.mark.parametrize("words, cls, required", COMMANDS, ids=IDS)
def test_help_lists_every_field_with_its_default(capsys, words, cls, required):
    text = _help(capsys, words)
    flat = " ".join(text.split())  # argparse wraps lines
    for f in option_fields(cls):
        assert re.search(rf"(^|[\s\[]){re.escape(_spelling(f))}\b", text), f"{_spelling(f)} missing from {words} --help"
        default = f.default
        meta = f.metadata["option"]
        if isinstance(default, (int, float, str)) and not isinstance(default, bool) and default != "" \
                and meta["show_default"]:
            assert f"(default: {default})" in flat, f"{f.name}: default {default!r} not shown"
    for hidden in getattr(cls, "NOT_OPTIONS", ()):
        assert f"--{hidden} " not in text and f"--{hidden}\n" not in text


@pytest.mark.parametrize("words, cls, required", COMMANDS, ids=IDS)
def test_a_flag_not_given_takes_the_dataclass_default_and_argparse_holds_none(words, cls, required):
    args = cli.build_parser().parse_args([*words, *required])
    given = {f.name for f in option_fields(cls) if hasattr(args, f.name)}
    required_names = {f.name for f in option_fields(cls) if f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING}
    assert given <= required_names | {"ae_path", "model_path"}, f"argparse filled in {given - required_names}"
    built = options_from_args(cls, args)
    defaults = cls.defaults()
    for name, value in defaults.items():
        if name not in given:
            assert getattr(built, name) == value, name


def test_cli_declares_no_option_itself():
    source = Path(cli.__file__).read_text()
    # only the logging flags and the package --version; every command's flags come from its options class
    assert re.findall(r"add_argument\(\s*\"(--?[\w-]+)\"", source) == ["--version", "-v", "-q"]


def test_release_sampling_defaults_live_in_the_sampling_code():
    import opensora_plan.demo.model as demo_model
    from opensora_plan.pipelines.sample_t2v import RELEASE_SAMPLE_DEFAULTS, SampleOptions

    assert not hasattr(demo_model, "RELEASE_SAMPLE_DEFAULTS")
    assert RELEASE_SAMPLE_DEFAULTS["sample_method"] == "PNDM" and RELEASE_SAMPLE_DEFAULTS["guidance_scale"] == 7.5
    resolved = SampleOptions(model_path="/a/release/folder").resolve()  # no demo.json: the release's settings
    assert {k: getattr(resolved, k) for k in RELEASE_SAMPLE_DEFAULTS} == RELEASE_SAMPLE_DEFAULTS
    assert SampleOptions(model_path="/x", num_sampling_steps=7).resolve().num_sampling_steps == 7


def test_one_token_limit_and_one_frame_rule():
    from opensora_plan.models.text_encoder import MODEL_MAX_LENGTH
    from opensora_plan.train.t2v import T2VTrainOptions
    from opensora_plan.utils import valid_num_frames

    assert MODEL_MAX_LENGTH == 300 and T2VTrainOptions.defaults()["model_max_length"] == MODEL_MAX_LENGTH
    assert [n for n in range(0, 20) if valid_num_frames(n)] == [1, 5, 9, 13, 17]
    assert valid_num_frames(65) and not valid_num_frames(64) and valid_num_frames(7, temporal_compression=2)
    import io
    import tokenize

    def numbers(path: Path) -> list[str]:  # number literals in the code (not in comments or docstrings)
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        return [t.string for t in tokens if t.type == tokenize.NUMBER]

    src = Path(cli.__file__).parent
    literal = [p.name for p in src.rglob("*.py") if "300" in numbers(p)]
    assert literal == ["text_encoder.py"], f"the 300-token limit written as a literal in {literal}"


# --------------------------------------------------------------------------------------------
# --config files
# --------------------------------------------------------------------------------------------


def _capture(monkeypatch, module, name):
    seen = {}

    def fake(options):
        seen["options"] = options
        return {"step": 0, "skipped_steps": 0, "output_dir": "x"}

    monkeypatch.setattr(module, name, fake)
    return seen


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_config_file_sits_between_defaults_and_flags(tmp_path, monkeypatch, suffix):
    import opensora_plan.train.t2v as t2v

    seen = _capture(monkeypatch, t2v, "train_t2v")
    values = {"learning_rate": 1e-4, "num_frames": 65, "train_batch_size": 4, "max_train_steps": 9,
              "lora_target_modules": None, "gradient_checkpointing": True}
    path = tmp_path / f"stage{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:  # YAML 1.1 reads 1e-4 as text: the field type turns it into the float it means
        path.write_text("learning_rate: 1e-4\nnum_frames: 65\ntrain_batch_size: 4\nmax_train_steps: 9\n"
                        "lora_target_modules: null\ngradient_checkpointing: true\n# a comment\n")
    assert cli.main(["train-t2v", "--config", str(path), "--num_frames", "17", "--no-gradient_checkpointing",
                     "--output_dir", str(tmp_path / "run")]) == 0
    options = seen["options"]
    assert options.learning_rate == 1e-4 and isinstance(options.learning_rate, float)  # file over default
    assert options.train_batch_size == 4 and options.max_train_steps == 9
    assert options.num_frames == 17 and options.gradient_checkpointing is False  # flags over file
    assert options.adam_weight_decay == t2v.T2VTrainOptions.defaults()["adam_weight_decay"]  # untouched default


def test_train_vae_takes_a_config_file_too(tmp_path, monkeypatch):
    import opensora_plan.train.vae as vae

    seen = _capture(monkeypatch, vae, "train_vae")
    (tmp_path / "vae.yaml").write_text("resolution: 128\nkl_weight: 1.0e-5\nlpips_path: [a.pth, b.pth]\n"
                                       "checkpointing_steps: 7\n")
    assert cli.main(["train-vae", "--config", str(tmp_path / "vae.yaml"), "--output_dir", str(tmp_path / "r"),
                     "--checkpointing_steps", "3"]) == 0
    options = seen["options"]
    assert (options.resolution, options.kl_weight, options.lpips_path) == (128, 1e-5, ["a.pth", "b.pth"])
    assert options.checkpointing_steps == 3  # the flag wins
    assert vae.VAETrainOptions.defaults()["checkpointing_steps"] == 2000  # the VAE's own default, stated once


def test_shipped_stage_names_still_work_and_parse_with_the_class():
    from opensora_plan.train.t2v import T2VTrainOptions

    from opensora_plan.train.t2v import STAGE_CONFIG_DIR

    values = read_options_file(T2VTrainOptions, "stage3_65x512x512")
    assert values["num_frames"] == 65 and values["enable_tiling"] is True
    for path in sorted(STAGE_CONFIG_DIR.glob("*.json")):  # every shipped stage is a valid options file
        T2VTrainOptions(output_dir="x", **read_options_file(T2VTrainOptions, path.stem))


def _one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(err.splitlines()) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("text, suffix, pattern", [
    ('{"num_frame": 17}', ".json", r"unknown option 'num_frame' for train-t2v; did you mean 'num_frames'\?"),
    ("learning_rat: 1.0e-4\n", ".yaml", r"unknown option 'learning_rat'.*did you mean 'learning_rate'\?"),
    ("zzz_qqq: 1\n", ".yml", r"unknown option 'zzz_qqq'.*train-t2v --help"),
    ('{"num_frames": "many"}', ".json", r"--num_frames must be a whole number, got 'many'"),
    ("- a\n- b\n", ".yaml", r"holds a list; expected a mapping"),
    ("a: [1\n", ".yaml", r"is not valid YAML"),
])
def test_bad_config_files_are_one_error_line(tmp_path, capsys, text, suffix, pattern):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert cli.main(["train-t2v", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 1
    _one_error_line(capsys, pattern)
    assert not (tmp_path / "run").exists()


def test_missing_config_and_missing_required_option_are_one_line(tmp_path, capsys):
    assert cli.main(["train-t2v", "--config", str(tmp_path / "nope.yaml")]) == 1
    _one_error_line(capsys, r"--config .*nope\.yaml is neither a file nor a shipped config \(stage1_17x256x256")
    (tmp_path / "c.yaml").write_text("num_frames: 17\n")
    assert cli.main(["train-t2v", "--config", str(tmp_path / "c.yaml"), "--max_train_steps", "2"]) == 1
    _one_error_line(capsys, r"train-t2v needs --output_dir; pass it on the command line or in the --config file")


@pytest.mark.parametrize("argv, pattern", [
    (["train-t2v", "--output_dir", "{tmp}/r", "--max_train_steps", "1", "--cfg_dropout", "2"], r"--cfg_dropout"),
    (["train-t2v", "--output_dir", "{tmp}/r", "--max_train_steps", "1", "--num_frames", "16"], r"1 \+ 4k"),
    (["train-t2v", "--output_dir", "{tmp}/r", "--max_train_steps", "0"], r"--max_train_steps must be at least 1"),
    (["train-vae", "--output_dir", "{tmp}/r", "--learning_rate", "0"], r"--learning_rate must be positive"),
    (["sample", "a cat", "--batch_size", "0"], r"--batch_size must be at least 1"),
    (["sample", "a cat", "--num_sampling_steps", "0"], r"--num_sampling_steps must be at least 1"),
    (["reconstruct", "--model_path", "m", "--video_path", "v", "--rec_path", "r", "--num_frames", "0"],
     r"--num_frames must be at least 1"),
    (["extract", "--data_path", "d", "--out", "o", "--ae_path", "a", "--num_frames", "8"], r"1 \+ 4k"),
    (["demo", "make-data", "--out", "{tmp}/d", "--num_videos", "0"], r"--num_videos must be at least 1"),
    (["serve", "--port", "0"], r"--port must be between 1 and 65535"),
    (["eval-t2v", "--videos", "v", "--metrics", "fvd,nope"], r"--metrics must be a comma-separated subset"),
])
def test_validation_errors_are_one_line_before_any_work(tmp_path, capsys, argv, pattern):
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    _one_error_line(capsys, pattern)
    assert list(tmp_path.iterdir()) == []


def test_options_object_reads_like_the_old_option_dict():
    from opensora_plan.train.t2v import T2V_DEFAULTS, T2VTrainOptions

    options = T2VTrainOptions(output_dir="o", max_train_steps=2)
    assert dict(options)["num_frames"] == options["num_frames"] == 17
    assert set(T2V_DEFAULTS) == set(options.keys()) and T2V_DEFAULTS["output_dir"] is None
    with pytest.raises(ValueError, match="unknown option 'num_frame'.*'num_frames'"):
        T2VTrainOptions.from_mapping({"output_dir": "o", "max_train_steps": 1, "num_frame": 17})


def test_a_new_option_is_one_field(tmp_path):
    """The machinery itself: bool flags, lists, choices, Optional, positional, custom converters, --no_ flags."""

    @dataclasses.dataclass
    class Toy(Options):
        COMMAND = "toy"
        CONFIG = True
        name: str = option(positional=True, help="a name")
        size: int = option(3, help="a size")
        ratio: float | None = option(None, help="a ratio")
        tags: list[str] | None = option(None, help="tags")
        mode: str = option("a", choices=["a", "b"], help="a mode")
        fast: bool = option(False, help="go fast")
        clean: bool = option(True, flag="--no_clean", help="do not clean")

    parser = argparse.ArgumentParser()
    from opensora_plan.options import add_options

    add_options(parser, Toy)
    (tmp_path / "toy.yaml").write_text("size: 5\nfast: true\n")
    args = parser.parse_args(["x", "--tags", "p", "q", "--no_clean", "--config", str(tmp_path / "toy.yaml"),
                              "--size", "7"])
    toy = options_from_args(Toy, args)
    assert (toy.name, toy.size, toy.ratio, toy.tags, toy.mode, toy.fast, toy.clean) == ("x", 7, None, ["p", "q"],
                                                                                       "a", True, False)
    assert "(default: 3)" in parser.format_help() and "--fast, --no-fast" in parser.format_help()


# --------------------------------------------------------------------------------------------
# round trip: a run's options.json is a config file
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, fixtures_dir):
    from opensora_plan.data.video_io import write_video
    from opensora_plan.demo.tiny_t5 import build_tiny_t5
    from opensora_plan.models.causalvae import CausalVAEModel

    root = tmp_path_factory.mktemp("options_run")
    captions = ["a red ball", "waves on a beach"]
    t5 = build_tiny_t5(root / "t5", captions, d_model=32)
    torch.manual_seed(0)
    vae = CausalVAEModel.from_config(json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text()))
    vae.save_pretrained(root / "vae")
    frames = 1 + vae.temporal_compression
    for i in range(2):
        video = torch.zeros(frames, 32, 32, 3, dtype=torch.uint8)
        video[:, 8:20, 4 + 4 * i: 16 + 4 * i] = 255
        write_video(root / f"clip{i}.mp4", video, fps=8)
    (root / "data.json").write_text(json.dumps([{"path": f"clip{i}.mp4", "cap": captions[i]} for i in range(2)]))
    return root, t5, frames, 4 * vae.spatial_compression


def test_a_runs_options_json_fed_back_as_config_gives_the_same_options(tiny_run_inputs, tmp_path):
    root, t5, frames, size = tiny_run_inputs
    first, second = tmp_path / "first", tmp_path / "second"
    argv = [
            "train-t2v", "--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(t5), "--ae_path",
            str(root / "vae"), "--data_path", str(root / "data.json"), "--num_frames", str(frames),
            "--max_image_size", str(size), "--model_max_length", "8", "--max_train_steps", "1",
            "--mixed_precision", "no", "--report_to", "none", "--learning_rate", "3e-4", "--cfg_dropout", "0.2",
            "--use_ema", "--ema_decay", "0.9"]
    assert cli.main([*argv, "--output_dir", str(first)]) == 0
    assert cli.main(["train-t2v", "--config", str(first / "options.json"), "--output_dir", str(second)]) == 0
    a, b = (json.loads((run / "options.json").read_text()) for run in (first, second))
    for record in (a, b):
        record.pop("output_dir")
    assert a["extra"]["learning_rate"] == 3e-4 and a["extra"]["cfg_dropout"] == 0.2 and a["ema_decay"] == 0.9
    assert a == b


def test_a_vae_runs_options_json_fed_back_as_config_gives_the_same_options(tmp_path, fixtures_dir):
    from opensora_plan.data.video_io import write_video

    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(2):
        write_video(clips / f"c{i}.mp4", torch.full((3, 40, 48, 3), 60 * (i + 1), dtype=torch.uint8), fps=8)
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["train-vae", "--video_path", str(clips), "--model_config",
            str(fixtures_dir / "causalvae_tiny_config" / "config.json"), "--num_frames", "1", "--resolution", "32",
            "--perceptual_weight", "0", "--kl_weight", "1e-4", "--max_train_steps", "1", "--checkpointing_steps",
            "1", "--mixed_precision", "no", "--report_to", "none"]
    assert cli.main([*argv, "--output_dir", str(first)]) == 0
    assert cli.main(["train-vae", "--config", str(first / "options.json"), "--output_dir", str(second)]) == 0
    a, b = (json.loads((run / "options.json").read_text()) for run in (first, second))
    for record in (a, b):
        record.pop("output_dir")
    assert a["extra"]["kl_weight"] == 1e-4 and a["extra"]["resolution"] == 32 and a["checkpointing_steps"] == 1
    assert a == b


# ---- QA pass on the options machinery (the numbers are the QA report's findings)


@pytest.mark.parametrize("key, expected", [("max_train_steps", "a whole number"), ("seed", "a whole number"),
                                           ("output_dir", "text")])
def test_null_for_an_option_that_has_a_value_is_one_line(tmp_path, capsys, key, expected):  # QA 2
    from opensora_plan.train.t2v import T2VTrainOptions

    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: null\n")
    argv = ["train-t2v", "--config", str(path), "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1"]
    argv = [a for i, a in enumerate(argv) if not (a == f"--{key}" or (i and argv[i - 1] == f"--{key}"))]
    assert cli.main(argv) == 1
    _one_error_line(capsys, rf"{key}: null is not allowed; expected {expected}")
    values = {"output_dir": "o", "max_train_steps": 1, key: None}
    with pytest.raises(ValueError, match=rf"{key}: null is not allowed"):
        T2VTrainOptions(**values)
    # null for an option whose default is None means "unset"
    path.write_text("checkpoints_total_limit: null\nresume_from_checkpoint: null\n")
    assert read_options_file(T2VTrainOptions, path) == {"checkpoints_total_limit": None, "resume_from_checkpoint": None}


@pytest.mark.parametrize("words, cls, required", COMMANDS, ids=IDS)
def test_every_float_option_refuses_nan_and_inf(words, cls, required):  # QA 4
    floats = [f.name for f in option_fields(cls) if _base_type_of(cls, f.name) is float]
    base = {f.name: "x" for f in option_fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    base.update({k: v for k, v in {"max_train_steps": 1}.items() if k in base})
    for name in floats:
        for bad in (float("nan"), float("inf"), "-inf", 1e400):
            with pytest.raises(ValueError, match=rf"--{name} must be ") as err:
                cls(**{**base, name: bad})
            if name in cls.NONFINITE_OK:  # its own check's message, the same words as for a negative value
                with pytest.raises(ValueError) as negative:
                    cls(**{**base, name: -1.0})
                assert str(err.value).rpartition(", got")[0] == str(negative.value).rpartition(", got")[0]
            else:
                assert "must be a finite number" in str(err.value)


@pytest.mark.parametrize("change, pattern", [
    ({"learning_rate": -1.0}, r"--learning_rate must be positive"),
    ({"adam_beta1": 1.0}, r"--adam_beta1 must be in \[0, 1\)"),
    ({"adam_beta2": -0.1}, r"--adam_beta2 must be in \[0, 1\)"),
    ({"adam_epsilon": 0.0}, r"--adam_epsilon must be positive"),
    ({"max_grad_norm": 0.0}, r"--max_grad_norm must be positive"),
    ({"learning_rate": "nan"}, r"--learning_rate must be a finite number"),
    ({"model_max_length": 513}, r"--model_max_length 513 is more than T5's tokenizer handles \(512"),
    ({"seed": -5}, r"--seed must be a whole number from 0 to"),
    ({"seed": 99999999999999999999}, r"--seed must be a whole number from 0 to"),
    ({"checkpoints_total_limit": 0}, r"--checkpoints_total_limit must be at least 1"),
    ({"ema_decay": 0.99}, r"--ema_decay 0.99 has no effect without --use_ema"),
    ({"validation_prompts": "a cat"}, r"--validation_prompts has no effect without --validation_steps"),
])
def test_train_t2v_refuses_values_torch_would_refuse_before_writing(tmp_path, capsys, change, pattern):  # QA 4, 5, 11, 20
    argv = ["train-t2v", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--dry_run"]
    for key, value in change.items():
        argv += [f"--{key}", str(value)]
    assert cli.main(argv) == 1
    _one_error_line(capsys, pattern)
    assert list(tmp_path.iterdir()) == []


def test_seed_rule_is_shared_by_every_command():  # QA 11
    from opensora_plan.demo.evaluate import DemoEvalOptions
    from opensora_plan.demo.shapes import MakeDataOptions
    from opensora_plan.pipelines.sample_t2v import SampleOptions
    from opensora_plan.train.vae import VAETrainOptions

    for build in (lambda s: SampleOptions(seed=s), lambda s: VAETrainOptions(output_dir="o", seed=s),
                  lambda s: MakeDataOptions(out="o", seed=s), lambda s: DemoEvalOptions(seeds=[0, s])):
        with pytest.raises(ValueError, match=r"must be a whole number from 0 to 9007194959773695, got -1"):
            build(-1)
        with pytest.raises(ValueError, match=r"from 0 to .*got 9223372036854775807"):
            build(2**63 - 1)


@pytest.mark.parametrize("values, pattern", [
    ({"num_sampling_steps": "5"}, r"sample: --num_sampling_steps must be a whole number, got '5'"),
    ({"num_sampling_steps": 5.5}, r"--num_sampling_steps must be a whole number, got 5.5"),
    ({"gif": "no"}, r"--gif must be true or false, got 'no'"),
    ({"seed": True}, r"--seed must be a whole number, got True"),
    ({"guidance_scale": "high"}, r"--guidance_scale must be a number, got 'high'"),
    ({"save_img_path": 3}, r"--save_img_path must be text, got 3"),
])
def test_python_options_classes_check_types_as_config_files_do(values, pattern):  # QA 6
    from opensora_plan.pipelines.sample_t2v import SampleOptions

    with pytest.raises(ValueError, match=pattern):
        SampleOptions(**values)


def test_python_options_convert_to_the_field_types():  # QA 6
    from opensora_plan.pipelines.sample_t2v import SampleOptions
    from opensora_plan.train.vae import VAETrainOptions

    o = SampleOptions(guidance_scale=7, save_img_path=Path("out"), tile_overlap_factor="0.5")
    assert o.guidance_scale == 7.0 and type(o.guidance_scale) is float and o.save_img_path == "out"
    assert o.tile_overlap_factor == 0.5
    v = VAETrainOptions(output_dir="o", lpips_path=("a", "b"))
    assert v.lpips_path == ["a", "b"]


def test_every_entry_point_takes_a_dict_and_names_the_command_once(tmp_path):  # QA 7
    from opensora_plan.pipelines.sample_t2v import sample_t2v
    from opensora_plan.train.t2v import train_t2v
    from opensora_plan.train.vae import train_vae

    for run, command, base in ((sample_t2v, "sample", {}), (train_vae, "train-vae", {"output_dir": str(tmp_path)}),
                               (train_t2v, "train-t2v", {"output_dir": str(tmp_path), "max_train_steps": 1})):
        with pytest.raises(ValueError) as err:
            run({**base, "bogus": 1})
        assert str(err.value).startswith(f"unknown option 'bogus' for {command};"), err.value
        assert str(err.value).count(command) == 1 + ("--help" in str(err.value))
    with pytest.raises(ValueError, match="--seed must be a whole number"):
        sample_t2v({"seed": -1})
    with pytest.raises(ValueError, match="--learning_rate must be positive"):
        train_vae({"output_dir": str(tmp_path / "r"), "learning_rate": 0.0})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, flag", [(["sample", "a cat"], "--memory_gb"), (["serve"], "--memory_gb"),
                                           (["upscale", "x.png"], "--sr_memory_gb")])
def test_a_memory_budget_gets_one_message_for_every_bad_value(tmp_path, capsys, command, flag):
    """nan and inf were "sample: --memory_gb must be a finite number", -1 "--memory_gb must be a positive number of
    GiB": one rule, one message."""
    for text in ("nan", "inf", "-1", "0"):
        assert cli.main([*command, flag, text]) == 1
        _one_error_line(capsys, rf"^error: {flag} must be a positive number of GiB, got {text}(\.0)?\.$")


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "-1"])
def test_sample_refuses_a_non_finite_vae_memory_budget_up_front(tmp_path, capsys, text):  # QA 3, 8
    from opensora_plan.pipelines.sample_t2v import SampleOptions

    with pytest.raises(SystemExit):
        cli.main(["sample", "a cat", "--vae_memory_gb", text, "--save_img_path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "expected a finite number of GiB >= 0 (0: never chunk) or 'auto'" in err and "positive" not in err
    with pytest.raises(ValueError, match=r"--vae_memory_gb must be a finite number of GiB >= 0 \(0: never chunk\)"):
        SampleOptions(vae_memory_gb=float(text))
    assert list(tmp_path.iterdir()) == []


def test_vae_memory_gb_zero_means_never_in_the_api_and_the_cli():  # QA 8
    from opensora_plan.pipelines.sample_t2v import SampleOptions

    assert SampleOptions(vae_memory_gb=0).vae_memory_gb is None
    assert SampleOptions(vae_memory_gb=0.0).vae_memory_gb is None
    args = cli.build_parser(["sample"]).parse_args(["sample", "--vae_memory_gb", "0"])
    assert options_from_args(SampleOptions, args).vae_memory_gb is None
    assert SampleOptions(vae_memory_gb=1.5).vae_memory_gb == 1.5


@pytest.mark.parametrize("size", [7, 18, 21])
def test_demo_make_data_refuses_a_size_the_renderer_cannot_draw_before_writing(tmp_path, capsys, size):  # QA 12
    assert cli.main(["demo", "make-data", "--out", str(tmp_path / "dd"), "--num_videos", "2", "--size", str(size)]) == 1
    _one_error_line(capsys, rf"--size must be an even number of pixels >= 20 .*got {size}")
    assert list(tmp_path.iterdir()) == []


def test_quiet_hides_every_progress_bar(tmp_path, capsys):  # QA 1
    from opensora_plan.demo.shapes import make_dataset
    from opensora_plan.utils import progress_bar, progress_disabled

    data = make_dataset(tmp_path / "d", num_videos=2, num_frames=5, size=20)
    assert cli.main(["data", "check", str(data)]) == 0
    assert "data check:" in capsys.readouterr().err  # the bar, without -q
    assert cli.main(["data", "check", str(data), "-q"]) == 0
    assert "data check:" not in capsys.readouterr().err
    assert not progress_disabled()  # main() restores the environment for the next caller
    os.environ["TQDM_DISABLE"] = "1"
    try:
        assert progress_bar(range(3), disable=False).disable  # explicit disable=False cannot bring a bar back
    finally:
        del os.environ["TQDM_DISABLE"]


@pytest.mark.slow
def test_quiet_training_prints_no_bar_and_no_deepspeed_warning(tmp_path):  # QA 1
    import subprocess
    import sys

    from opensora_plan.demo.shapes import make_dataset

    make_dataset(tmp_path / "d", num_videos=2, num_frames=9, size=32)
    config = Path(cli.__file__).parent / "assets" / "demo" / "vae" / "config.json"
    argv = [sys.executable, "-m", "opensora_plan", "train-vae", "--output_dir", str(tmp_path / "run"),
            "--max_train_steps", "1", "--video_path", str(tmp_path / "d" / "videos"), "--model_config", str(config),
            "--num_frames", "9", "--resolution", "32", "--perceptual_weight", "0", "--mixed_precision", "no",
            "--report_to", "none", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # no bar, no "first step" line, no DeepSpeed accelerator warning
    assert done.stdout.startswith("trained to step 1")


@pytest.mark.parametrize("text, suffix, pattern", [
    ("", ".yaml", r"holds nothing; expected a mapping of option names to values"),
    ("# only a comment\n", ".yml", r"holds nothing; expected a mapping"),
    ("- a\n- b\n", ".yml", r"holds a list; expected a mapping of option names to values"),
    ("17\n", ".yaml", r"holds a single number; expected a mapping"),
    ('max_train_steps = 1\n', ".toml", r"suffix '.toml'.*use .json, .yaml or .yml"),
])
def test_empty_list_and_unknown_format_config_files_are_one_line(tmp_path, capsys, text, suffix, pattern):  # QA 18
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert cli.main(["train-t2v", "--config", str(path), "--output_dir", str(tmp_path / "run"),
                     "--max_train_steps", "1"]) == 1
    line = _one_error_line(capsys, pattern)
    assert "NoneType" not in line


def test_repeated_config_is_refused(tmp_path, capsys):  # QA 19
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    (tmp_path / "b.yml").write_text("seed: 2\n")
    with pytest.raises(SystemExit):
        cli.main(["train-t2v", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yml"),
                  "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1"])
    assert "--config given twice" in capsys.readouterr().err


def _vae_run_record(tmp_path, **changes) -> Path:
    from opensora_plan.train.vae import VAETrainOptions

    values = {**VAETrainOptions(output_dir=str(tmp_path / "old")).loop_config().to_dict(), "extra": {"num_frames": 9}}
    values.update(task="VAETrainTask", task_options={}, world_size=1, **changes)
    path = tmp_path / "options.json"
    path.write_text(json.dumps(values))
    return path


def test_a_run_record_of_another_command_says_which_command_wrote_it(tmp_path, capsys):  # QA 16
    path = _vae_run_record(tmp_path)
    assert cli.main(["train-t2v", "--config", str(path), "--max_train_steps", "1"]) == 1
    _one_error_line(capsys, r"options.json written by train-vae; use it with `opensora-plan train-vae --config`")
    assert cli.main(["sample", "a cat", "--config", str(path)]) == 1
    _one_error_line(capsys, r"written by train-vae")


def test_train_vae_keys_it_does_not_offer(tmp_path, capsys):  # QA 15
    from opensora_plan.train.vae import VAETrainOptions

    assert read_options_file(VAETrainOptions, _vae_run_record(tmp_path))["num_frames"] == 9  # fixed values pass
    path = _vae_run_record(tmp_path, use_ema=True)  # edited
    with pytest.raises(ValueError, match=r"train-vae does not offer --use_ema; its value must stay False"):
        read_options_file(VAETrainOptions, path)
    (tmp_path / "hand.yaml").write_text("lr_scheduler: cosine\n")
    with pytest.raises(ValueError, match=r"train-vae does not offer --lr_scheduler"):
        read_options_file(VAETrainOptions, tmp_path / "hand.yaml")


@pytest.mark.parametrize("words, cls, required", [c for c in COMMANDS if c[0][0] in (
    "sample", "reconstruct", "extract", "eval-vae", "eval-t2v", "data")], ids=lambda c: str(c))
def test_every_command_that_runs_takes_a_config_file(tmp_path, words, cls, required):  # QA 10
    assert cls.CONFIG
    name = next(f.name for f in option_fields(cls) if not f.metadata["option"]["positional"]
                and f.metadata["option"]["choices"] is None and _base_type_of(cls, f.name) is int)
    (tmp_path / "c.yaml").write_text(f"{name}: 5\n")
    args = cli.build_parser(words).parse_args(words + required + ["--config", str(tmp_path / "c.yaml")])
    assert getattr(options_from_args(cls, args), name) == 5


def _base_type_of(cls, name):
    import typing

    from opensora_plan.options import _base_type

    return _base_type(typing.get_type_hints(cls)[name])[0]


@pytest.mark.parametrize("argv, shown, hint", [
    (["train-t2v", "--output_dir", "o", "--max_train 1"], "opensora-plan train-t2v", None),
    (["train-t2v", "--output_dir", "o", "--max_train", "1"], "opensora-plan train-t2v", "--max_train_steps"),
    (["sample", "a cat", "--num_sampling_step", "3"], "opensora-plan sample", "--num_sampling_steps"),
    (["data", "check", "d.json", "--num_frame", "17"], "opensora-plan data check", "--num_frames"),
])
def test_unknown_or_abbreviated_flags_get_the_subcommands_usage(capsys, argv, shown, hint):  # QA 22, 25
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(f"usage: {shown} "), err
    assert f"{shown}: error: unrecognized arguments" in err
    if hint:
        assert f"did you mean {hint}?" in err


def test_a_renamed_flag_or_config_key_names_the_new_option(tmp_path, capsys):
    """train-sr's --ae_path became --degradation_vae: the old name points there, not to a look-alike (--data_path)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train-sr", "--ae_path", "vae", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--ae_path is now --degradation_vae" in err and "--data_path" not in err
    config = tmp_path / "c.json"
    config.write_text('{"ae_path": "vae"}')
    assert cli.main(["train-sr", "--config", str(config), "--output_dir", str(tmp_path / "run")]) == 1
    _one_error_line(capsys, r"option 'ae_path', which train-sr now calls 'degradation_vae'")
    assert not (tmp_path / "run").exists()


def test_boolean_flags_show_their_default_in_help(capsys):  # QA 26
    help_text = " ".join(_help(capsys, ["sample"]).split())
    assert re.search(r"--gif, --no-gif also write <name>.gif beside each mp4 \(default: off\)", help_text)
    assert re.search(r"--no_clean_caption .*\(default: off, i\.e\. clean_caption on\)", help_text)
    help_text = " ".join(_help(capsys, ["train-t2v"]).split())
    assert re.search(r"--use_ema, --no-use_ema keep an EMA of the weights \(saved as ema/\) \(default: off\)", help_text)


def test_a_folder_holding_a_run_is_refused_without_resume(tmp_path, capsys, monkeypatch):  # QA 13
    run = tmp_path / "run"
    run.mkdir()
    (run / "options.json").write_text("{}")
    for command in (["train-t2v", "--max_train_steps", "1"], ["train-vae"]):
        assert cli.main(command + ["--output_dir", str(run)]) == 1
        _one_error_line(capsys, r"--output_dir .*run already holds a run \(options.json\); use --resume_from_checkpoint "
                                r"latest to continue it, or another --output_dir")
    (run / "options.json").unlink()
    (run / "checkpoint-2").mkdir()
    assert cli.main(["train-vae", "--output_dir", str(run)]) == 1
    _one_error_line(capsys, r"already holds a run \(checkpoint-2\)")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"]


def test_options_json_records_paths_absolute(tmp_path, monkeypatch):  # QA 14
    from opensora_plan.train.trainer import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text("[]")
    out = absolute_paths({"output_dir": "runs/x", "data_path": "data.json", "model": "17x256x256",
                          "resume_from_checkpoint": "latest", "lpips_path": ["data.json"], "num_frames": 17})
    assert out == {"output_dir": str(tmp_path / "runs" / "x"), "data_path": str(tmp_path / "data.json"),
                   "model": "17x256x256", "resume_from_checkpoint": "latest",
                   "lpips_path": [str(tmp_path / "data.json")], "num_frames": 17}


@pytest.mark.parametrize("argv, pattern", [
    (["demo", "eval", "--num_sampling_steps", "0"], r"--num_sampling_steps must be at least 1, got 0"),
    (["demo", "eval", "--num_prompts", "61"], r"--num_prompts must be from 1 to 60 .*got 61; leave it out"),
    (["demo", "eval", "--num_prompts", "21", "--shapes", "diamond"], r"--num_prompts must be from 1 to 20"),
    (["demo", "eval", "--cache", "bogus"], r"bogus"),
    (["demo", "eval", "--lora_scale", "0.5"], r"--lora_scale has no effect without --lora"),
    (["reconstruct", "--model_path", "m", "--video_path", "v", "--rec_path", "r", "--seed", "3"],
     r"--seed 3 has no effect without --sample"),
    (["reconstruct", "--model_path", "m", "--video_path", "v", "--rec_path", "r", "--temporal_context", "2"],
     r"--temporal_context is used only by --temporal_mode approximate"),
    (["train-vae", "--output_dir", "{tmp}/r", "--model_config", "c.json", "--pretrained_model_path", "p"],
     r"--model_config has no effect with --pretrained_model_path"),
    (["data", "check", "d.json", "--num_frames", "18"], r"--num_frames 18 is not a length the CausalVAE accepts"),
])
def test_values_without_effect_and_out_of_range_are_refused_before_work(tmp_path, capsys, argv, pattern):  # QA 9, 20, 21
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    _one_error_line(capsys, pattern)
    assert list(tmp_path.iterdir()) == []


def test_demo_eval_zero_steps_is_not_the_default_in_the_library():  # QA 9
    from opensora_plan.demo.evaluate import evaluate_demo

    with pytest.raises(ValueError, match="num_sampling_steps must be at least 1, got 0"):
        evaluate_demo(prompts=["a red circle moving left"], seeds=(0,), num_sampling_steps=0, device="cpu")


@pytest.mark.parametrize("argv, flag", [
    (["reconstruct", "--model_path", "{tmp}/nope", "--video_path", "{tmp}/v.mp4", "--rec_path", "{tmp}/r"],
     "--model_path"),
    (["eval-vae", "--model_path", "{tmp}/nope", "--video_path", "{tmp}"], "--model_path"),
])
def test_a_missing_vae_folder_names_the_flag_and_the_kind(tmp_path, capsys, argv, flag):  # QA 28
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    line = _one_error_line(capsys, rf"{flag} .*nope does not exist; expected a CausalVAE folder with config.json and "
                                   r"diffusion_pytorch_model.safetensors \(e.g. the vae/ folder")
    assert "version folder" not in line


def test_sampling_docs_match_the_help(capsys):  # QA 29, 30
    docs = (Path(__file__).parents[1] / "docs" / "sampling.md").read_text()
    assert "--text_prompt prompts.txt" not in docs and "--prompt_file prompts.txt" in docs
    help_text = " ".join(_help(capsys, ["sample"]).split())
    assert "a release folder: 24)" in help_text and "24.0" not in help_text
    assert "| `--fps` | the demo's `demo.json` (8) | 24 |" in docs
    assert "(unset: cuda when available)" in help_text and "| `--device` | unset: cuda when available |" in docs
    assert "0: never" in help_text and "`0`: never" in docs
    assert "| `--config` |" in docs


@pytest.mark.parametrize("command, module, cls, doc", [
    ("interpolate", "opensora_plan.pipelines.interpolate", "InterpolateOptions", "interpolation.md"),
    ("upscale", "opensora_plan.pipelines.upscale", "UpscaleOptions", "super_resolution.md"),
])
def test_file_command_docs_list_every_flag_of_the_options_class(command, module, cls, doc):
    """The flag tables of docs/interpolation.md and docs/super_resolution.md against the options classes."""
    import importlib
    import re

    from opensora_plan.options import option_fields

    options = getattr(importlib.import_module(module), cls)
    rows = [line for line in (Path(__file__).parents[1] / "docs" / doc).read_text().splitlines()
            if line.startswith("| `--")]
    documented = {flag for row in rows for flag in re.findall(r"`(--\w+)`", row.split("|")[1])}
    flags = {f.metadata["option"]["flag"] or f"--{f.name}" for f in option_fields(options)
             if not f.metadata["option"]["positional"]} | {"--config"}
    assert documented == flags


def test_upscale_factors_agree_between_sample_upscale_and_the_docs():
    from opensora_plan.options import option_fields
    from opensora_plan.pipelines.sample_t2v import UPSCALE_FACTORS
    from opensora_plan.pipelines.upscale import UpscaleOptions

    scale = next(f for f in option_fields(UpscaleOptions) if f.name == "scale").metadata["option"]["choices"]
    assert [1, *scale] == list(UPSCALE_FACTORS) == [1, 2, 3, 4]
    docs = Path(__file__).parents[1] / "docs"
    assert "--upscale 2|3|4" in (docs / "sampling.md").read_text()
    assert "| `--scale` | the model's | 2, 3 or 4:" in (docs / "super_resolution.md").read_text()


def test_a_warm_up_with_the_constant_schedule_is_said(tmp_path, caplog):  # QA 6: it was silently ignored
    from opensora_plan.train.trainer import TrainConfig

    with caplog.at_level("WARNING"):
        TrainConfig(output_dir=str(tmp_path), max_train_steps=1, lr_warmup_steps=50)
    assert "--lr_warmup_steps 50 has no effect with --lr_scheduler constant" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        TrainConfig(output_dir=str(tmp_path), max_train_steps=1, lr_warmup_steps=50,
                    lr_scheduler="constant_with_warmup")
    assert "no effect" not in caplog.text


def test_ema_with_fsdp2_is_refused_with_the_options(tmp_path):  # QA 7: it failed after the models loaded
    from opensora_plan.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="--use_ema with --sharding fsdp2 is not supported"):
        TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=1, use_ema=True, sharding="fsdp2")
    assert not (tmp_path / "run").exists()
