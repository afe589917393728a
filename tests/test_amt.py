"""AMT frame interpolation: official-weight layout, parity with the official v1.0.0 code, the driver.

Parity fixtures: ``amt_g_config.json`` (config + weight recipe) and ``amt_g_io.safetensors`` (inputs and
official outputs), see tests/fixtures/reference/fixtures/README.md. Every size comes from the stored tensors.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from opensora_plan.models import AMTModel
from opensora_plan.models.amt import build_amt
from opensora_plan.pipelines.interpolate import (
    Padding,
    interpolate_video,
    padding_for,
    to_uint8,
)

IMAGE_ATOL, FLOW_ATOL = 1e-5, 5e-5


# --------------------------------------------------------------------------------------------
# Fixtures: the recipe weights (built once per module) and the stored inputs/outputs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(fixtures_dir):
    return json.loads((fixtures_dir / "amt_g_config.json").read_text())


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return load_file(str(fixtures_dir / "amt_g_io.safetensors"))


def _model_kwargs(config: dict) -> dict:
    return {**config.get("constructor_defaults_used", {}), **config["params"]}


def recipe_weights(keys: dict, base_seed: int) -> tuple[dict, str]:
    """The fixture README's weight recipe -> (state dict, sha256 of the float32 bytes in key order)."""
    state, digest = {}, hashlib.sha256()
    for i, (key, shape) in enumerate(keys.items()):
        r = torch.randn(shape, generator=torch.Generator().manual_seed(base_seed + i), dtype=torch.float32)
        if len(shape) >= 2:
            value = r * (0.7 * math.prod(shape[1:]) ** -0.5)
        elif key.endswith("bias"):
            value = 0.02 * r
        else:
            value = 0.25 + 0.05 * r
        state[key] = value
        digest.update(value.contiguous().numpy().astype("<f4").tobytes())
    return state, digest.hexdigest()


@pytest.fixture(scope="module")
def model(config, manifests_dir):
    keys = config.get("state_dict") or json.loads((manifests_dir / "AMT-G.json").read_text())["state_dict"]
    state, sha = recipe_weights(keys, config["BASE_SEED"])
    assert sha == config["weights_sha256"], "recipe weights differ (key order or this torch's randn)"
    net = AMTModel.from_config(_model_kwargs(config)).eval()
    net.load_state_dict(state, strict=True)
    return net


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def _run(model, io, case: str, **kwargs):
    with torch.no_grad():
        return model(_u8(io[f"in.{case}.img0_u8"]), _u8(io[f"in.{case}.img1_u8"]), io[f"in.{case}.embt"], **kwargs)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def _assert_uint8_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.uint8
    diff = (ours.int() - ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff == 0).float().mean().item() >= 0.999


# --------------------------------------------------------------------------------------------
# Layout and loading
# --------------------------------------------------------------------------------------------


def test_full_size_model_on_meta_matches_the_manifest_key_for_key(manifests_dir):
    manifest = json.loads((manifests_dir / "AMT-G.json").read_text())
    with torch.device("meta"):
        net = build_amt("AMT-G")
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(shapes) == list(manifest["state_dict"])  # same keys, same (official) order
    assert shapes == manifest["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == manifest["total_parameters"]
    for name, count in manifest["parameters_by_module"].items():
        assert sum(p.numel() for p in getattr(net, name).parameters()) == count, name


def test_config_fields_build_the_fixture_model(config, model):
    for key, value in config["params"].items():
        assert model.config[key] == value
    if "num_parameters" in config:
        assert sum(p.numel() for p in model.parameters()) == config["num_parameters"]
    if "num_state_dict_tensors" in config:
        assert len(model.state_dict()) == config["num_state_dict_tensors"]


def test_official_checkpoint_loads_strictly_and_wrong_files_are_one_error(tmp_path, caplog):
    tiny = build_amt("AMT-Tiny").eval()
    config = {k: v for k, v in tiny.config.items() if not k.startswith("_")}
    path = tmp_path / "amt-tiny.pth"
    torch.save({"state_dict": tiny.state_dict(), "epoch": 3}, path)
    with caplog.at_level("INFO"):
        loaded = AMTModel.from_official_checkpoint(path, **config)
    assert "CC BY-NC 4.0" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))

    torch.save(tiny.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="no 'state_dict' entry.*expected the official AMT checkpoint"):
        AMTModel.from_official_checkpoint(tmp_path / "bare.pth", **config)
    broken = dict(tiny.state_dict())
    broken["extra.weight"] = broken.pop("comb_block.0.weight")
    torch.save({"state_dict": broken}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"missing keys 1 \(comb_block.0.weight\); unexpected keys 1 \(extra.weight\)"):
        AMTModel.from_official_checkpoint(tmp_path / "keys.pth", **config)
    (tmp_path / "video.pth").write_bytes(b"\x00\x00\x00 ftypisom not a torch file")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        AMTModel.from_official_checkpoint(tmp_path / "video.pth", **config)
    with pytest.raises(ValueError, match="is a folder"):
        AMTModel.from_official_checkpoint(tmp_path, **config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AMTModel.from_official_checkpoint(tmp_path / "missing.pth", **config)
    with pytest.raises(ValueError, match="shape mismatches"):  # AMT-Tiny weights into AMT-G
        AMTModel.from_official_checkpoint(path)


def test_an_official_file_of_another_size_is_not_said_to_have_a_config(tmp_path):
    """A .pth holds no config: the error names the released size it was checked against."""
    torch.save({"state_dict": build_amt("AMT-Tiny").state_dict()}, tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"does not match AMTModel of the released AMT-G size \(a \.pth carries no "
                       "config") as info:
        AMTModel.from_official_checkpoint(tmp_path / "tiny.pth")
    assert "built from its config" not in str(info.value)


def test_save_pretrained_round_trip(tmp_path):
    tiny = build_amt("AMT-Tiny").eval()
    tiny.save_pretrained(tmp_path / "amt")
    loaded = AMTModel.from_pretrained(tmp_path / "amt")
    assert loaded.config.corr_lvls == tiny.config.corr_lvls
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))


# --------------------------------------------------------------------------------------------
# Parity with the official model
# --------------------------------------------------------------------------------------------


def test_pair0_image_flows_and_features_match_the_official_model(model, io):
    out = _run(model, io, "pair0", return_intermediates=True)
    assert _max_diff(out.imgt_pred, io["out.pair0.imgt_pred"]) <= IMAGE_ATOL
    for i in range(len(out.flow0_pred)):
        assert _max_diff(out.flow0_pred[i], io[f"out.pair0.flow0_pred.{i}"]) <= FLOW_ATOL
        assert _max_diff(out.flow1_pred[i], io[f"out.pair0.flow1_pred.{i}"]) <= FLOW_ATOL
    for i in (1, 2):
        assert _max_diff(out.ft_pred[i], io[f"out.pair0.ft_pred.{i}"]) <= IMAGE_ATOL
    assert torch.equal(_run(model, io, "pair0").imgt_pred, out.imgt_pred)


@pytest.mark.parametrize("case", ["pair0_t03", "pair1"])
def test_other_time_and_a_batch_of_two_match(model, io, case):
    img = "pair0" if case == "pair0_t03" else case
    with torch.no_grad():
        out = model(_u8(io[f"in.{img}.img0_u8"]), _u8(io[f"in.{img}.img1_u8"]), io[f"in.{case}.embt"])
    assert _max_diff(out.imgt_pred, io[f"out.{case}.imgt_pred"]) <= IMAGE_ATOL


def test_scale_factor_half_matches_and_exposes_full_size_flows(model, io):
    scale = io["meta.scale05.scale_factor"].item()
    out = _run(model, io, "scale05", scale_factor=scale, return_intermediates=True)
    assert _max_diff(out.imgt_pred, io["out.scale05.imgt_pred"]) <= IMAGE_ATOL
    # the official eval=False path raises here (bug 12); ours returns full-resolution flows
    assert out.flow0_pred[0].shape[-2:] == io["in.scale05.img0_u8"].shape[-2:]


def test_driver_padding_padded_unpadded_and_uint8_outputs_match(model, io):
    frame0, frame1 = io["in.driver.frame0_hwc_u8"], io["in.driver.frame1_hwc_u8"]
    padding = padding_for(model, *frame0.shape[:2])
    assert list(padding.lrtb) == io["meta.driver.pad_lrtb"].tolist()
    assert list(padding.padded_hw) == io["meta.driver.padded_hw"].tolist()
    padded = padding.pad(_u8(torch.stack([frame0, frame1]).permute(0, 3, 1, 2)))
    assert torch.equal(padded[:1], io["in.driver.padded0"]) and torch.equal(padded[1:], io["in.driver.padded1"])
    with torch.no_grad():
        middle = model(padded[:1], padded[1:], 0.5).imgt_pred
    assert _max_diff(middle, io["out.driver.imgt_pred_padded"]) <= IMAGE_ATOL
    assert _max_diff(padding.unpad(middle), io["out.driver.imgt_pred"]) <= IMAGE_ATOL
    frames = interpolate_video(model, torch.stack([frame0, frame1]), 2, quantize="truncate", progress=False)
    assert frames.shape[0] == 3 and torch.equal(frames[0], frame0)
    _assert_uint8_close(frames[1], io["out.driver.imgt_hwc_u8"])


def test_whole_video_recursive_doubling_matches_float_and_uint8(model, io):
    video = io["in.video.frames_thwc_u8"]
    assert list(padding_for(model, *video.shape[1:3]).lrtb) == io["meta.video.pad_lrtb"].tolist()
    floats = interpolate_video(model, _u8(video).permute(0, 3, 1, 2), 2, progress=False)  # n = 1
    assert floats.shape[0] == 2 * (video.shape[0] - 1) + 1
    assert torch.equal(floats[0::2], _u8(video).permute(0, 3, 1, 2))
    assert _max_diff(floats[1::2], io["out.video_n1.interp_frames"]) <= IMAGE_ATOL
    frames = interpolate_video(model, video, 4, quantize="truncate", batch_size=2, progress=False)  # n = 2
    _assert_uint8_close(frames, io["out.video_n2.frames_thwc_u8"])


# --------------------------------------------------------------------------------------------
# Fixes and the chunked correlation
# --------------------------------------------------------------------------------------------


def test_chunked_correlation_equals_the_whole_volume(model, io):
    whole = _run(model, io, "pair0", return_intermediates=True)
    model.set_correlation_chunk(37)  # not a divisor of the 1/8 pixel count: a ragged last chunk
    try:
        chunked = _run(model, io, "pair0", return_intermediates=True)
    finally:
        model.set_correlation_chunk(None)
    assert _max_diff(chunked.imgt_pred, whole.imgt_pred) <= 1e-6
    assert _max_diff(chunked.flow0_pred[0], whole.flow0_pred[0]) <= 1e-5


def test_small_frames_are_padded_to_the_pyramid_minimum_and_stay_finite(model):
    side = model.min_size // 2  # all-NaN in the official code
    frames = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at least"):
        model(frames[:1], frames[1:], 0.5)
    out = interpolate_video(model, frames, 2, progress=False)
    assert out.shape == (3, 3, side, side) and torch.isfinite(out).all()


def test_uint8_output_is_rounded_by_default_and_truncated_for_parity():
    x = torch.tensor([0.0, 0.6 / 255, 0.999 / 255, 254.6 / 255, 1.2]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 1, 1, 255, 255]
    assert to_uint8(x, "truncate")[0, 0, :, 0].tolist() == [0, 0, 0, 254, 255]


def test_padding_is_centred_with_the_extra_pixel_at_the_end():
    padding = Padding.for_size(121, 131, 16)
    assert padding.lrtb == (6, 7, 3, 4) and padding.padded_hw == (128, 144)
    assert Padding.for_size(64, 64, 16, 128).lrtb == (32, 32, 32, 32)


# --------------------------------------------------------------------------------------------
# The interpolate command
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A save_pretrained AMT-Tiny folder and a 3-frame 64x64 mp4 at 8 fps."""
    from opensora_plan.data.video_io import write_video

    root = tmp_path_factory.mktemp("amt_cli")
    torch.manual_seed(0)
    build_amt("AMT-Tiny").save_pretrained(root / "amt")
    frames = (torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    write_video(root / "clip.mp4", frames, 8)
    return root


def test_interpolate_command_writes_factor_times_frames_at_factor_times_fps(tiny_setup, capsys):
    from opensora_plan import cli
    from opensora_plan.data.video_io import VideoReader

    out = tiny_setup / "out.mp4"
    assert cli.main(["-q", "interpolate", str(tiny_setup / "clip.mp4"), "--model_path", str(tiny_setup / "amt"),
                     "--factor", "4", "--output", str(out), "--batch_size", "2"]) == 0
    assert "3 -> 9 frames at 32 fps" in capsys.readouterr().out
    with VideoReader(out) as reader:
        assert len(reader) == 9 and reader.fps == pytest.approx(32)


def test_interpolate_command_without_model_path_uses_the_shipped_demo_model(tmp_path, capsys):
    """No --model_path: the interpolation model the shipped demo lists in demo.json's stages (a rendered clip of
    the demo's world, as `sample` writes them)."""
    import numpy as np

    from opensora_plan import cli
    from opensora_plan.data.video_io import VideoReader, write_video
    from opensora_plan.demo.shapes import random_clip, render
    from opensora_plan.pipelines.model_folder import default_model_path, load_sampling_config

    stage = load_sampling_config(None).stages["interpolate"]
    assert stage == {"model_path": str(default_model_path() / "interpolation"), "factor": 2}
    clip = random_clip(np.random.default_rng(0), "red", "circle", "left", 64)
    write_video(tmp_path / "clip.mp4", render(clip, 5, 64), 8)
    assert cli.main(["-q", "interpolate", str(tmp_path / "clip.mp4"), "--device", "cpu"]) == 0
    assert "5 -> 9 frames at 16 fps" in capsys.readouterr().out
    with VideoReader(tmp_path / "clip_interp_x2.mp4") as reader:
        assert len(reader) == 9 and reader.fps == pytest.approx(16)


@pytest.mark.parametrize("extra, pattern", [
    (["--fps", "0"], "--fps must be positive"),
    (["--model_path", "{root}/amt", "--output", "{root}/clip.mp4"], "would overwrite an input"),
    (["--model_path", "{root}/amt", "--factor", "3"], "invalid choice"),
    (["--model_path", "{root}/amt", "--scale_factor", "0.3"], "--scale_factor must be 16/k"),
    (["--model_path", "{root}/nope.pth"], "does not exist"),
])
def test_interpolate_command_errors_are_one_line_before_the_model_loads(tiny_setup, capsys, extra, pattern):
    from opensora_plan import cli

    argv = ["interpolate", str(tiny_setup / "clip.mp4"), *[a.format(root=tiny_setup) for a in extra]]
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own errors (an unknown choice)
        code = exit_info.code
    assert code != 0
    err = capsys.readouterr().err
    assert pattern in err.strip().splitlines()[-1]  # one error line (argparse prints its usage above it)


def test_interpolate_folder_mode_writes_one_video_per_input_beside_the_folder(tiny_setup):
    import shutil

    from opensora_plan.pipelines.interpolate import interpolate

    folder = tiny_setup / "videos"
    folder.mkdir(exist_ok=True)
    shutil.copy(tiny_setup / "clip.mp4", folder / "one.mp4")
    shutil.copy(tiny_setup / "clip.mp4", folder / "two.mp4")
    results = interpolate(str(folder), model_path=str(tiny_setup / "amt"), quantize="truncate")
    assert [r.output_path for r in results] == [str(tiny_setup / "videos_interp_x2" / n) for n in ("one.mp4", "two.mp4")]
    assert all(r.num_frames_out == 2 * (r.num_frames_in - 1) + 1 for r in results)
    with pytest.raises(ValueError, match="is the input folder"):
        interpolate(str(folder), model_path=str(tiny_setup / "amt"), output=str(folder))


def test_interpolate_refuses_existing_outputs_bad_suffixes_unwritable_folders_and_other_models(tiny_setup, tmp_path,
                                                                                              capsys):
    import shutil

    from opensora_plan import cli

    shutil.copy(tiny_setup / "clip.mp4", tmp_path / "v.mp4")
    model = ["--model_path", str(tiny_setup / "amt")]

    def last_error(argv) -> str:
        assert cli.main(["-q", "interpolate", str(tmp_path / "v.mp4"), *argv]) != 0
        return capsys.readouterr().err.strip().splitlines()[-1]

    for output in ([], ["--output", str(tmp_path / "o4.mp4")]):  # the default <input>_interp_x2.mp4 and a given name
        assert cli.main(["-q", "interpolate", str(tmp_path / "v.mp4"), *model, *output]) == 0
        err = last_error([*model, *output])
        assert "already exists" in err and "--overwrite" in err
        assert cli.main(["-q", "interpolate", str(tmp_path / "v.mp4"), *model, *output, "--overwrite"]) == 0
    assert "would overwrite an input" in last_error([*model, "--output", str(tmp_path / "v.mp4"), "--overwrite"])
    # one suffix rule with upscale: not a folder named o.avi/
    assert "--output" in last_error([*model, "--output", str(tmp_path / "o.avi")]) and "must end in .mp4" in (
        last_error([*model, "--output", str(tmp_path / "o.avi")]))
    assert not (tmp_path / "o.avi").exists()
    # checked before the model loads (the model path does not exist)
    assert "cannot write there" in last_error(["--model_path", str(tmp_path / "none.pth"), "--output", "/proc/x.mp4"])
    rgt = tmp_path / "rgt"
    rgt.mkdir()
    (rgt / "config.json").write_text('{"_class_name": "RGTModel"}')
    assert last_error(["--model_path", str(rgt), "--overwrite"]) == (
        f"error: --model_path {rgt} is an RGTModel folder (super-resolution); interpolate needs an AMT model "
        "(amt-g.pth or an AMTModel folder).")


def test_interpolate_folder_lists_each_skipped_file_once_with_its_path_once(tiny_setup, tmp_path, capsys):
    import shutil

    from opensora_plan import cli
    from opensora_plan.data.video_io import write_video

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(tiny_setup / "clip.mp4", folder / "good.mp4")
    write_video(folder / "one.mp4", torch.zeros(1, 64, 64, 3, dtype=torch.uint8), 8)
    assert cli.main(["-q", "interpolate", str(folder), "--model_path", str(tiny_setup / "amt")]) == 0
    captured = capsys.readouterr()
    assert "one.mp4" not in captured.err
    lines = [line for line in captured.out.splitlines() if "one.mp4" in line]
    assert len(lines) == 1 and lines[0].count("one.mp4") == 1 and "1 frame;" in lines[0]
