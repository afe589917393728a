"""What a user hits when something is off (issue 23, kinds 7-12): summary lines that say what was written,
a folder of clips taken as a dataset, one-line hints for out-of-domain input, previews at the model's fps,
the web UI's and the CLI's handling of user errors and Ctrl-C, and small wording fixes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

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
