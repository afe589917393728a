"""What a user hits when something is off (issue 23, kinds 7-12): summary lines that say what was written,
a folder of clips taken as a dataset, one-line hints for out-of-domain input, previews at the model's fps,
the web UI's and the CLI's handling of user errors and Ctrl-C, and small wording fixes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_t2v import _cli_options, assets  # noqa: E402,F401 (the tiny T5 / VAE / clips fixture)

from opensora_plan import cli  # noqa: E402


# --------------------------------------------------------------------------------------------
# 8. a folder of clips with same-name .txt captions is a dataset
# --------------------------------------------------------------------------------------------


def _clip_folder(assets, folder: Path, captions=True) -> Path:  # noqa: F811
    """The fixture's five readable clips as <folder>/clipN.mp4 (+ clipN.txt), one in a subfolder."""
    root, _, _ = assets
    for i in range(5):
        target = folder / ("sub" if i == 4 else "") / f"clip{i}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / f"clip{i}.mp4", target)
        if captions:
            target.with_suffix(".txt").write_text(f"  a cat playing\nthe piano {i}\n")
    return folder


def test_data_check_takes_a_folder_of_clips_with_same_name_captions(assets, tmp_path, capsys):  # noqa: F811
    folder = _clip_folder(assets, tmp_path / "clips")
    assert cli.main(["data", "check", str(folder), "--json_out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["entries"] == 5 and report["readable"] == 5 and not report["malformed"]
    from opensora_plan.data.datasets import load_video_entries

    entries = load_video_entries(folder)
    assert [e.path.name for e in entries] == ["clip0.mp4", "clip1.mp4", "clip2.mp4", "clip3.mp4", "clip4.mp4"]
    assert entries[4].path == (folder / "sub" / "clip4.mp4").resolve()
    assert entries[2].captions == ("a cat playing the piano 2",)  # the whole text, white space collapsed


def test_a_clip_without_its_caption_file_is_one_line_naming_it(assets, tmp_path, capsys):  # noqa: F811
    folder = _clip_folder(assets, tmp_path / "clips")
    (folder / "sub" / "clip4.txt").unlink()
    (folder / "clip1.txt").write_text("  \n")
    assert cli.main(["data", "check", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "2 of 5 videos have no caption" in err and "clip1.txt" in err and "sub/clip4.txt" in err
    (folder / "sub" / "clip4.txt").write_text("a dog")
    (folder / "clip1.txt").write_text("a cat")
    assert cli.main(["data", "check", str(folder), "--video_folder", str(tmp_path)]) == 1  # no dead flag
    assert "--video_folder" in capsys.readouterr().err
    assert cli.main(["data", "check", str(folder / "clip0.mp4")]) == 1
    assert f"is a video; give a dataset JSON list, or the folder of videos with same-name .txt captions it sits in " \
           f"({folder})." in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["data", "check", str(empty)]) == 1
    assert "holds no videos" in capsys.readouterr().err


def test_train_t2v_takes_folders_for_training_and_held_out_clips(assets, tmp_path, capsys):  # noqa: F811
    train = _clip_folder(assets, tmp_path / "train")
    held_out = _clip_folder(assets, tmp_path / "held")
    from opensora_plan.train.t2v import train_t2v

    summary = train_t2v(_cli_options(assets, tmp_path / "out", 1, data_path=str(train), use_image_num=0,
                                     validation_data_path=str(held_out), validation_steps=1,
                                     validation_num_timesteps=2))
    assert summary["step"] == 1 and summary["held_out_clips"] == 5
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in log)


def test_train_vae_takes_a_folder_as_data_path(tmp_path, assets):  # noqa: F811
    from opensora_plan.train.vae import video_paths

    folder = _clip_folder(assets, tmp_path / "clips", captions=False)  # captions unused by the VAE
    assert [p.name for p in video_paths(None, folder)] == [f"clip{i}.mp4" for i in range(5)]


def test_a_clip_folder_given_as_a_feature_cache_says_where_it_goes(assets, tmp_path):  # noqa: F811
    from opensora_plan.data.features import CachedFeatureDataset

    with pytest.raises(FileNotFoundError, match="goes to --data_path"):
        CachedFeatureDataset(_clip_folder(assets, tmp_path / "clips"))


# --------------------------------------------------------------------------------------------
# 7. the summary line says what was written
# --------------------------------------------------------------------------------------------


def _sample(tmp_path, capsys, *flags) -> str:
    assert cli.main(["-q", "sample", "a red circle moving left", "--num_sampling_steps", "1", "--save_img_path",
                     str(tmp_path), *flags]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_sample_summary_gives_the_size_written_not_the_version_name(tmp_path, capsys):
    line = _sample(tmp_path / "a", capsys, "--num_frames", "9")
    assert line.startswith("Sampled 1 mp4 video of 9 frames 64x64 at 8 fps with model 17x64x64 "), line
    assert "(1 step)" not in line and "1 step)" in line and "per video" in line


def test_sample_summary_names_a_saved_folder_not_its_transformer_subfolder(tmp_path, capsys):
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    OpenSoraPlanPipeline.from_pretrained(default_model_path()).save_pretrained(tmp_path / "my_demo")
    capsys.readouterr()
    line = _sample(tmp_path / "a", capsys, "--model_path", str(tmp_path / "my_demo"))
    assert " with model my_demo (" in line and "transformer" not in line, line


def test_sample_summary_counts_the_gifs_of_gif(tmp_path, capsys):
    line = _sample(tmp_path / "g", capsys, "--gif")
    assert line.startswith("Sampled 1 mp4 video of 17 frames 64x64 at 8 fps and its GIF with model "), line
    assert sorted(p.suffix for p in (tmp_path / "g").iterdir()) == [".gif", ".mp4"]


def test_sample_summary_says_png_images_for_force_images(tmp_path, capsys):
    line = _sample(tmp_path / "b", capsys, "--force_images")
    assert line.startswith("Sampled 1 png image 64x64 with model "), line
    assert "video" not in line and "per image" in line
    assert [p.suffix for p in (tmp_path / "b").iterdir()] == [".png"]


def test_summary_counts_are_singular_for_one():
    from opensora_plan.utils import plural

    assert plural(1, "video") == "1 video" and plural(2, "video") == "2 videos"
    assert plural(1, "entry", "entries") == "1 entry" and plural(0, "entry", "entries") == "0 entries"


def test_demo_eval_table_says_1_seed(tmp_path):
    from opensora_plan.demo.evaluate import DemoEvalReport

    video = {"prompt": "a red circle moving left", "correct": {"colour": True, "shape": True, "direction": True,
                                                               "background": True}}
    report = DemoEvalReport(videos=[video], settings={"seeds": [0], "sample_method": "DDIM", "num_sampling_steps": 1,
                                                      "guidance_scale": 3.0}, seconds=1.0, denoise_seconds=0.5)
    first = report.table().splitlines()[0]
    assert first.startswith("1 video (1 prompt x 1 seed), DDIM 1 step,"), first


# --------------------------------------------------------------------------------------------
# 11. the web UI and Ctrl-C
# --------------------------------------------------------------------------------------------


def test_ctrl_c_ends_any_command_with_one_line_and_exit_code_130(tmp_path, monkeypatch, capsys):
    import opensora_plan.data.check as check

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(check, "check_dataset", interrupted)
    (tmp_path / "d.json").write_text("[]")
    assert cli.main(["data", "check", str(tmp_path / "d.json")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"


def test_serve_names_port_when_the_port_is_taken_before_loading_a_model(monkeypatch, capsys):
    pytest.importorskip("gradio")
    import socket

    import opensora_plan.ui.service as service

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(service.VideoService, "__init__", no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --port {port} on 127.0.0.1 is not free") and f"--port {port + 1}" in err
    assert "GRADIO_SERVER_PORT" not in err and err.count("\n") == 0


def test_ui_seed_limit_is_the_cli_limit():
    from opensora_plan.options import SEED_LIMIT, check_seed
    from opensora_plan.ui.service import MAX_SEED

    assert MAX_SEED == SEED_LIMIT - 1 and SEED_LIMIT <= 2**53  # a browser's number holds every allowed seed
    check_seed(MAX_SEED)
    with pytest.raises(ValueError):
        check_seed(MAX_SEED + 1)


@pytest.fixture(scope="module")
def page():
    """The demo's page, launched in this process on a free port; yields (app, service)."""
    pytest.importorskip("gradio")
    import socket

    from opensora_plan.ui.app import build_app
    from opensora_plan.ui.service import VideoService

    service = VideoService(device="cpu")
    app = build_app(service)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield app, service
    app.close()


def test_page_progress_shows_on_the_video_not_over_the_seed_box(page):
    app, _ = page
    config = app.get_config_file()
    elem = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    generating = [d for d in config["dependencies"] if "seed" in [elem.get(o) for o in d["outputs"]]]
    assert len(generating) == 2  # the Generate button and Enter in the prompt box
    for dependency in generating:
        assert [elem[c] for c in dependency["show_progress_on"] or []] == ["video"]


def test_page_user_error_is_shown_without_a_traceback_in_the_terminal(page, capfd):
    from gradio_client import Client

    app, service = page
    client = Client(app.local_url, verbose=False)
    capfd.readouterr()
    with pytest.raises(Exception, match="The prompt is empty"):
        client.predict(prompt=" ", negative_prompt="", version=service.version, steps=2, guidance=3.0, seed=0,
                       random_seed=False, scheduler="EulerAncestralDiscrete", cache="none", api_name="/generate")
    terminal = capfd.readouterr()
    assert "Traceback" not in terminal.err + terminal.out


# --------------------------------------------------------------------------------------------
# 12. small things
# --------------------------------------------------------------------------------------------


def test_readme_lists_every_extra_with_its_packages():
    import re
    import tomllib

    root = Path(__file__).parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (root / "README.md").read_text()
    listed = dict(re.findall(r"^- `(\w+)`: (.*(?:\n  .*)*)", readme.split("Extras:", 1)[1], flags=re.M))
    assert sorted(listed) == sorted(extras)
    for extra, requirements in extras.items():
        for requirement in requirements:
            name = re.split(r"[<>=!~\[ ]", requirement)[0]
            if extra != "deepspeed" and extra != "wandb":  # named by the extra itself
                assert name.lower() in listed[extra].lower(), (extra, name)


@pytest.mark.parametrize("prompt", ["https://example.com/x.", "www.example.com/clip.mp4 !", "漂亮的猫。"])
def test_a_prompt_that_cleaning_reduces_to_punctuation_is_refused(prompt, tmp_path, capsys):
    assert cli.main(["sample", prompt, "--save_img_path", str(tmp_path / "out")]) == 1
    assert "empty after caption cleaning" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validation_prompts_and_data_check_use_the_same_rule(tmp_path):
    from opensora_plan.models.text_encoder import emptied_by_cleaning, preprocess_texts

    assert emptied_by_cleaning("https://example.com/x.", preprocess_texts("https://example.com/x.")[0])
    assert not emptied_by_cleaning("a cat. https://example.com", preprocess_texts("a cat. https://example.com")[0])
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "d.json").write_text(json.dumps([{"path": "a.mp4", "cap": "https://example.com/x."}]))
    from opensora_plan.data.check import check_dataset

    report = check_dataset(str(tmp_path / "d.json"), decode=False, progress=False)
    assert [e["caption"] for e in report["captions"]["emptied_by_cleaning"]] == ["https://example.com/x."]


def test_type_errors_name_the_flag_as_every_other_message(tmp_path, capsys):
    from opensora_plan.pipelines.sample_t2v import SampleOptions

    with pytest.raises(ValueError, match=r"^sample: --guidance_scale must be a number, got 'high'\.$"):
        SampleOptions(guidance_scale="high")
    (tmp_path / "c.json").write_text('{"guidance_scale": "high"}')
    assert cli.main(["sample", "a cat", "--config", str(tmp_path / "c.json")]) == 1
    assert "--guidance_scale must be a number" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["sample", "a red circle moving left", "--save_img_path", "/proc/opensora-plan-test/out"],
    ["demo", "make-data", "--out", "/proc/opensora-plan-test", "--num_videos", "1"],
])
def test_an_unwritable_output_path_is_one_sentence_before_any_work(argv, capsys):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc (a folder nobody, root included, can write in)")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot write there" in err and "[Errno" not in err and err.count("\n") == 0


def test_a_raw_system_error_is_printed_as_a_sentence_naming_the_path(tmp_path, monkeypatch, capsys):
    import opensora_plan.data.check as check

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/report.json")

    monkeypatch.setattr(check, "check_dataset", refused)
    assert cli.main(["data", "check", str(tmp_path / "d.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: /data/report.json: permission denied (the system refused this path); check the path and "
                   "that you may read or write there.")


# --------------------------------------------------------------------------------------------
# 10. training previews (and sampling a run) at the base model's fps
# --------------------------------------------------------------------------------------------


def test_previews_and_samples_of_a_run_use_the_base_models_fps(tmp_path, capsys):
    from opensora_plan.data.video_io import read_video
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.demo.shapes import make_dataset
    from opensora_plan.train.t2v import train_t2v

    demo = default_model_path()
    data = make_dataset(out=str(tmp_path / "clips"), num_videos=2, seed=3)
    run = tmp_path / "run"
    train_t2v(dict(model=str(demo / "17x64x64"), pretrained=str(demo / "17x64x64"), ae_path=str(demo / "vae"),
                   text_encoder_name=str(demo / "text_encoder"), data_path=str(data), num_frames=17,
                   max_image_size=64, model_max_length=32, use_image_num=0, train_batch_size=1, max_train_steps=1,
                   checkpointing_steps=1, mixed_precision="no", report_to="none", output_dir=str(run),
                   validation_steps=1, validation_prompts=["a red circle moving left"], validation_sampling_steps=1))
    previews = sorted((run / "validation").rglob("*.mp4"))
    assert previews and all(read_video(p)[1] == pytest.approx(8) for p in previews)  # demo.json: fps 8, not 24
    capsys.readouterr()
    assert cli.main(["-q", "sample", "a red circle moving left", "--model_path", str(run), "--num_sampling_steps", "1",
                     "--save_img_path", str(tmp_path / "out")]) == 0
    assert " at 8 fps " in capsys.readouterr().out
    assert read_video(next((tmp_path / "out").glob("*.mp4")))[1] == pytest.approx(8)


# --------------------------------------------------------------------------------------------
# 9. out-of-domain input gets one line saying so
# --------------------------------------------------------------------------------------------


def test_a_prompt_outside_the_demo_vocabulary_is_named_in_one_warning(tmp_path, caplog, capsys):
    import logging

    with caplog.at_level(logging.WARNING, logger="opensora_plan"):
        _sample(tmp_path / "a", capsys, "--num_frames", "1")  # "a red circle moving left": known, no warning
        assert not [r for r in caplog.records if "outside what this model knows" in r.getMessage()]
        assert cli.main(["-q", "sample", "a dog running on the beach", "--num_sampling_steps", "1", "--num_frames", "1",
                         "--save_img_path", str(tmp_path / "b")]) == 0
    hints = [r.getMessage() for r in caplog.records if "outside what this model knows" in r.getMessage()]
    assert len(hints) == 1 and "'a dog running on the beach'" in hints[0] and "circle/square/triangle" in hints[0]


def test_the_demo_vocabulary_of_the_library_is_the_demos(tmp_path):
    from opensora_plan.demo.shapes import COLOURS, DIRECTIONS, SHAPES
    from opensora_plan.pipelines.model_folder import DEMO_VOCABULARY, load_sampling_config

    assert DEMO_VOCABULARY == (tuple(COLOURS), tuple(SHAPES), tuple(DIRECTIONS))
    demo = load_sampling_config(None)
    assert demo.prompt_hint("A Blue Square, moving up!") is None
    assert "none of circle/square/triangle" in demo.prompt_hint("a blue ball moving up")
    (tmp_path / "sampling_config.json").write_text(json.dumps({"vocabulary": [["cat", "dog"]]}))
    assert load_sampling_config(tmp_path).prompt_hint("a cat") is None
    assert load_sampling_config(tmp_path).prompt_hint("a horse") is not None
    (tmp_path / "sampling_config.json").write_text(json.dumps({"vocabulary": ["cat"]}))
    with pytest.raises(ValueError, match="vocabulary must be a non-empty list of word lists"):
        load_sampling_config(tmp_path)


def test_page_warns_about_a_prompt_outside_the_vocabulary(page):
    _, service = page
    assert service.prompt_hint("a red circle moving left") is None
    assert "outside what this model knows" in service.prompt_hint("a cat")


def _small_clip(path: Path, height: int, width: int, frames: int = 9) -> Path:
    from opensora_plan.data.video_io import write_video

    generator = torch.Generator().manual_seed(0)
    write_video(path, (torch.rand(frames, height, width, 3, generator=generator) * 255).to(torch.uint8), fps=8)
    return path


def test_a_clip_smaller_than_resolution_is_upscaled_with_a_warning(tmp_path, caplog):
    import logging

    from opensora_plan.pipelines.reconstruct import load_clip

    clip = _small_clip(tmp_path / "qcif.mp4", 36, 44)
    with caplog.at_level(logging.WARNING, logger="opensora_plan"):
        video, _ = load_clip(clip, num_frames=9, resolution=64)
    assert tuple(video.shape[-2:]) == (64, 72)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "44x36 upscaled to 78x64" in message and "--resolution 32 to keep its own size" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opensora_plan"):
        load_clip(clip, num_frames=9, resolution=32)  # a downscale is what --resolution is for: no warning
    assert not caplog.records


def test_the_demo_vae_on_other_footage_says_it_is_out_of_its_domain(tmp_path, caplog, capsys):
    import logging

    from opensora_plan.demo.model import default_model_path

    clip = _small_clip(tmp_path / "noise.mp4", 32, 32)
    with caplog.at_level(logging.WARNING, logger="opensora_plan"):
        assert cli.main(["-q", "reconstruct", "--model_path", str(default_model_path() / "vae"), "--video_path",
                         str(clip), "--rec_path", str(tmp_path / "rec.mp4"), "--num_frames", "9", "--resolution",
                         "32"]) == 0
    (message,) = [r.getMessage() for r in caplog.records if "demo model's VAE" in r.getMessage()]
    assert "trained only on synthetic coloured shapes on black" in message


def test_a_model_root_given_as_a_vae_path_names_its_vae_subfolder(tmp_path, capsys):
    from opensora_plan.demo.model import default_model_path

    demo = default_model_path()
    clip = _small_clip(tmp_path / "c.mp4", 32, 32)
    for argv in (["reconstruct", "--model_path", str(demo), "--video_path", str(clip), "--rec_path",
                  str(tmp_path / "r.mp4"), "--num_frames", "9"],
                 ["eval-vae", "--model_path", str(demo), "--video_path", str(tmp_path), "--num_frames", "9"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert f"pass its vae/ subfolder, e.g. --model_path {demo / 'vae'}." in err and err.count("\n") == 0


def test_training_says_once_that_small_clips_are_upscaled(assets, tmp_path, caplog):  # noqa: F811
    import logging

    from opensora_plan.data.datasets import VideoCaptionDataset

    dataset = VideoCaptionDataset(_clip_folder(assets, tmp_path / "clips"), num_frames=5, max_image_size=64)  # 40x48
    with caplog.at_level(logging.WARNING, logger="opensora_plan"):
        dataset.load_clip(0)
        dataset.load_clip(1)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "is 48x40, smaller than --max_image_size 64, so it is upscaled" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opensora_plan"):
        VideoCaptionDataset(tmp_path / "clips", num_frames=5, max_image_size=32).load_clip(0)
    assert not caplog.records


def test_a_model_root_or_a_component_folder_in_the_wrong_flag_names_the_right_folder(tmp_path, capsys):
    from opensora_plan.demo.model import default_model_path

    demo = default_model_path()
    common = ["--ae_path", str(demo / "vae"), "--text_encoder_name", str(demo / "text_encoder"), "--data_path",
              str(tmp_path / "d.json"), "--max_train_steps", "1", "--dry_run"]
    (tmp_path / "d.json").write_text("[]")
    clip = _small_clip(tmp_path / "clips" / "c.mp4", 32, 32)
    cases = [
        (["train-t2v", "--model", str(demo), "--output_dir", str(tmp_path / "a"), *common],
         f"pass one of its transformer folders, e.g. --model {demo / '17x64x64'}."),
        (["sample", "a red circle moving left", "--model_path", str(demo / "vae")],
         f"pass the folder above it, --model_path {demo}."),
        (["train-vae", "--pretrained_model_path", str(demo), "--video_path", str(clip.parent), "--output_dir",
          str(tmp_path / "v"), "--max_train_steps", "1", "--perceptual_weight", "0"],
         f"pass its vae/ subfolder, e.g. --pretrained_model_path {demo / 'vae'}."),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.endswith(expected) and err.count("\n") == 0, err
    from opensora_plan.train.pretrained import read_pretrained_state

    with pytest.raises(FileNotFoundError, match=r"e\.g\. --pretrained .*17x64x64\.$"):
        read_pretrained_state(demo)


def test_dtype_fp16_on_cpu_is_worded_alike_by_sample_upscale_and_interpolate(tmp_path, capsys, caplog):
    """sample casts the weights (it runs, slowly: a warning); upscale and interpolate offer half precision as CUDA
    autocast only (an error). Both say "--dtype fp16 on CPU: <what happens>; use ... fp32 on CPU"."""
    from PIL import Image

    from opensora_plan.data.video_io import write_video

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    write_video(tmp_path / "a.mp4", np.zeros((3, 32, 32, 3), np.uint8), fps=8)
    assert cli.main(["sample", "a red circle moving left", "--dtype", "fp16", "--device", "cpu", "--dry_run",
                     "--save_img_path", str(tmp_path / "out")]) == 0
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--dtype")]
    capsys.readouterr()
    for argv in (["upscale", str(tmp_path / "a.png")], ["interpolate", str(tmp_path / "a.mp4")]):
        assert cli.main([*argv, "--dtype", "fp16", "--device", "cpu", "--output", str(tmp_path / "o")]) == 1
        messages.append(capsys.readouterr().err.strip().removeprefix("error: "))
    assert len(messages) == 3, messages
    for message in messages:
        assert message.startswith("--dtype fp16 on CPU: ") and "fp32 on CPU" in message, message
    assert not (tmp_path / "o").exists()
