"""RGT super-resolution: parity with the official network and test path, loading, tiles, the `upscale` command.

Parity against ``rgt_tiny_*`` (the official code's outputs on CPU float32, random weights; README tolerances:
atol 1e-5 / rtol 1e-4, uint8 within 1 with >= 99.9 % equal). Every size comes from the stored tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from opensora_plan import cli
from opensora_plan.metrics import psnr
from opensora_plan.models import RGTModel
from opensora_plan.models.rgt import build_rgt, recursion_depth, rgt_config, shift_mask
from opensora_plan.pipelines.upscale import (
    auto_tiles,
    plan_outputs,
    tile_size_for_budget,
    upscale_frames,
    upscale_official_chop,
    upscale_tensor,
)

ATOL, RTOL = 1e-5, 1e-4
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    """(model with the fixture weights, fixture tensors, network_g config)."""
    config = json.loads((fixtures_dir / "rgt_tiny_config.json").read_text())["network_g"]
    model = RGTModel.from_config(config).eval()
    model.load_state_dict(load_file(fixtures_dir / "rgt_tiny_weights.safetensors"), strict=True)
    return model, load_file(fixtures_dir / "rgt_tiny_io.safetensors"), config


def as_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 255  # the official drivers' conversion (fixtures README)


def official_state_dict(model: RGTModel) -> dict[str, torch.Tensor]:
    """What an official basicsr file holds: our state dict plus the recomputed index/mask buffers."""
    return {**model.state_dict(), **model.official_buffers()}


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, target", [("in.x_aligned_u8", "out.net_aligned"), ("in.x_big_u8", "out.net_big"),
                                            ("in.x_odd_u8", "out.test_odd")])
def test_forward_matches_official(tiny, source, target):
    model, io, _ = tiny
    with torch.no_grad():
        out = model(as_float(io[source]))
    torch.testing.assert_close(out, io[target], atol=ATOL, rtol=RTOL)


def test_uint8_frames_round_like_basicsr_tensor2img(tiny):
    model, io, _ = tiny
    frames = io["in.x_odd_u8"].permute(0, 2, 3, 1)  # (T, H, W, 3)
    out = upscale_frames(model, frames, progress=False)[0].int()  # (sH, sW, 3)
    expected = io["out.test_odd_hwc_u8"].int()
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1
    assert (out == expected).float().mean() >= 0.999


def test_official_chop_matches_reference_tiled_output(tiny):
    model, io, _ = tiny
    out = upscale_official_chop(model, as_float(io["in.x_chop_u8"]))
    torch.testing.assert_close(out, io["out.test_chop"], atol=ATOL, rtol=RTOL)


def test_shift_masks_and_index_match_the_official_definition():
    # Swin's region labelling at -window and -window/2 from the bottom/right edge, -100 across regions.
    mask = shift_mask(8, 32, 64, 64)
    assert mask.shape == (16, 256, 256) and set(mask.unique().tolist()) == {-100.0, 0.0}
    assert mask[0].abs().sum() == 0  # a window away from the bottom/right edge sees one region
    assert mask[-1].ne(0).any()


def test_recursion_depth_rule():
    assert recursion_depth(16, 16, training=False) == 2  # floor of 2 at test time
    assert recursion_depth(1023, 64, training=False) == 2
    assert recursion_depth(1024, 64, training=False) == 3  # 1/64 once a side reaches 1024
    assert recursion_depth(64, 64, training=True) == 2


def test_sides_below_16_are_refused_with_one_error(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="at least 16 px for a 40x15 frame"):  # width x height, as the CLI prints
        model(torch.rand(1, 3, 15, 40))
    with pytest.raises(ValueError, match="at least 64 px"):  # depth 3 needs the other side >= 64
        model.check_size(1024, 32)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_stores_no_recomputed_buffers(tiny, tmp_path):
    model, io, _ = tiny
    model.save_pretrained(tmp_path / "rgt")
    stored = load_file(tmp_path / "rgt" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in stored if k.endswith(("relative_position_index", "attn_mask_0", "attn_mask_1"))]
    assert any(k.endswith("rpe_biases") for k in stored)
    loaded = RGTModel.from_pretrained(tmp_path / "rgt")
    assert not loaded.training
    x = as_float(io["in.x_big_u8"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_official_checkpoint_loads_with_buffers_module_prefix_and_ema(tiny, tmp_path):
    model, io, config = tiny
    state = {f"module.{k}": v for k, v in official_state_dict(model).items()}
    noise = {k: v + 1 if v.is_floating_point() and "params" in k else v for k, v in state.items()}
    path = tmp_path / "RGT_tiny.pth"
    torch.save({"params": noise, "params_ema": state}, path)  # params_ema is preferred
    loaded = RGTModel.from_official_checkpoint(path, config=config)
    x = as_float(io["in.x_big_u8"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), io["out.net_big"], atol=ATOL, rtol=RTOL)
    assert not loaded.training


def test_official_checkpoint_scale_comes_from_the_keys(tiny, tmp_path):
    model, _, config = tiny
    path = tmp_path / "x2.pth"
    torch.save({"params": official_state_dict(model)}, path)
    scale, other = model.upscale, 4 if model.upscale != 4 else 2
    with pytest.raises(ValueError, match=f"holds x{scale} weights but the config asks for upscale {other}"):
        RGTModel.from_official_checkpoint(path, config=dict(config, upscale=other))
    unscaled = {k: v for k, v in config.items() if k != "upscale"}
    assert RGTModel.from_official_checkpoint(path, config=unscaled).upscale == scale


def test_official_checkpoint_errors_are_one_line(tiny, tmp_path):
    model, _, config = tiny
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match=r"not an official RGT checkpoint .*found \['state_dict'\]"):
        RGTModel.from_official_checkpoint(wrong)
    tampered = official_state_dict(model)
    mask_key = max(k for k in tampered if k.endswith(("attn_mask_0", "relative_position_index")))
    tampered[mask_key] = torch.zeros_like(tampered[mask_key])
    torch.save({"params": tampered}, wrong)
    with pytest.raises(ValueError, match=f"buffer {mask_key} differs"):
        RGTModel.from_official_checkpoint(wrong, config=config)
    extra = dict(official_state_dict(model), **{"extra.weight": torch.zeros(1)})
    torch.save({"params": extra}, wrong)
    with pytest.raises(ValueError, match="unexpected keys 1 \\(extra.weight\\)"):
        RGTModel.from_official_checkpoint(wrong, config=config)


@pytest.mark.parametrize("name", ["RGT_x2", "RGT_x4"])
def test_full_size_build_matches_manifest_key_for_key(manifests_dir, name):
    manifest = json.loads((manifests_dir / f"{name}.json").read_text())
    with torch.device("meta"):
        model = RGTModel.from_config(manifest["network_g"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ours.update({k: list(v) for k, v in model.official_buffer_shapes().items()})
    assert ours == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameters"]
    assert model.upscale == manifest["network_g"]["upscale"]


def test_registry_sizes_build_on_meta():
    with torch.device("meta"):
        small = build_rgt("RGT-S-x3")
    assert len(small.layers) == 6 and small.upscale == 3
    assert rgt_config("RGT-x4")["depth"] == [6] * 8


def test_3conv_residual_connection_has_the_official_keys():
    with torch.device("meta"):
        model = RGTModel(depth=[2], num_heads=[4], embed_dim=64, resi_connection="3conv")
    keys = model.state_dict().keys()
    assert {"layers.0.conv.0.weight", "layers.0.conv.2.weight", "layers.0.conv.4.weight",
            "conv_after_body.4.bias"} <= keys
    with pytest.raises(ValueError, match="resi_connection '2conv' is not one of 1conv, 3conv"):
        RGTModel(depth=[2], num_heads=[4], embed_dim=64, resi_connection="2conv")


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


class _Nearest(torch.nn.Module):
    """A purely local x2 'model': tiles must reproduce it exactly (checks the blending arithmetic)."""

    upscale = 2

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


def test_blended_tiles_of_a_local_model_are_exact():
    x = torch.rand(2, 3, 150, 97)
    torch.testing.assert_close(upscale_tensor(_Nearest(), x, 64, 16), _Nearest()(x), atol=1e-6, rtol=0)


def real_frame() -> torch.Tensor:
    """(1, 3, 256, 256) in [0, 1]: a real frame, tests/data/big_buck_bunny_256.jpg (tests/data/README.md)."""
    from PIL import Image

    with Image.open(DATA / "big_buck_bunny_256.jpg") as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def test_blended_tiles_match_the_whole_frame_above_50_db_on_a_real_frame(tiny):
    model, _, _ = tiny
    # RG-SA attends to a summary of the whole tile, so large tiles are needed for 50 dB (docs/super_resolution.md)
    frame = real_frame()
    with torch.no_grad():
        whole = model(frame).clamp(0, 1)
    tiled = upscale_tensor(model, frame, tile_size=224, tile_overlap=64).clamp(0, 1)  # measured 58.7 dB
    hard_paste = upscale_official_chop(model, frame).clamp(0, 1)  # measured 38.5 dB
    assert psnr(tiled, whole) >= 50
    assert psnr(tiled, whole) > psnr(hard_paste, whole) + 5


def test_auto_tiles_prefers_whole_frames_then_fewer_per_call_then_the_largest_tiles(tiny):
    model, _, _ = tiny
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gb = (weights + 2 * 256 * 256 * 13_000) / 2**30  # room for two 256x256 frames of the fixture model (width 64)
    assert auto_tiles(model, 256, 256, batch_size=4, memory_gb=gb) == (2, None)
    assert auto_tiles(model, 256, 256, batch_size=1, memory_gb=gb) == (1, None)
    batch, tile = auto_tiles(model, 512, 512, batch_size=4, memory_gb=gb)
    assert batch == 1 and tile == 352  # one frame per call in tiles of ~sqrt(2) x 256 px, a multiple of 32
    assert auto_tiles(model, 512, 512, memory_gb=0.001, tile_overlap=64) == (1, 128)  # room for the overlap


def test_tile_size_follows_the_memory_budget():
    sizes = [tile_size_for_budget(gb, scale=2) for gb in (0.5, 2, 8)]
    assert sizes == sorted(sizes) and all(s % 32 == 0 and s >= 64 for s in sizes)
    assert tile_size_for_budget(2, scale=4) <= tile_size_for_budget(2, scale=2)
    # a narrower model (the shipped demo upscaler is 48 wide) needs less memory per pixel: larger tiles
    assert tile_size_for_budget(2, scale=2, embed_dim=48) > tile_size_for_budget(2, scale=2)
    assert tile_size_for_budget(2, scale=2, embed_dim=360) == tile_size_for_budget(2, scale=2)


# --------------------------------------------------------------------------------------------
# upscale command
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rgt") / "rgt"
    tiny[0].save_pretrained(folder)
    return folder


def test_upscale_command_video_and_image(tiny, tiny_dir, tmp_path, capsys):
    from PIL import Image

    from opensora_plan.data.video_io import VideoReader, write_video

    scale = tiny[0].upscale
    rng = np.random.default_rng(0)
    write_video(tmp_path / "clip.mp4", rng.integers(0, 255, (3, 32, 48, 3), dtype=np.uint8), fps=8)
    Image.fromarray(rng.integers(0, 255, (20, 36, 3), dtype=np.uint8)).save(tmp_path / "still.png")
    code = cli.main(["upscale", str(tmp_path / "clip.mp4"), "--model_path", str(tiny_dir), "--output",
                     str(tmp_path / "out" / "big.mp4"), "--scale", str(scale), "--batch_size", "2", "-q"])
    assert code == 0
    with VideoReader(tmp_path / "out" / "big.mp4") as reader:
        assert (reader.num_frames, reader.height, reader.width) == (3, 32 * scale, 48 * scale)
    assert cli.main(["upscale", str(tmp_path / "still.png"), "--model_path", str(tiny_dir), "--output",
                     str(tmp_path / "out"), "--tile_size", "64", "-q"]) == 0
    with Image.open(tmp_path / "out" / "still.png") as image:
        assert image.size == (36 * scale, 20 * scale)


def test_upscale_keeps_a_png_alpha_channel_and_says_a_jpeg_drops_it(tiny, tiny_dir, tmp_path, caplog):
    from PIL import Image

    scale = tiny[0].upscale
    rgba = np.random.default_rng(1).integers(0, 255, (20, 36, 4), dtype=np.uint8)
    rgba[:, :18, 3] = 0  # left half transparent, right half opaque
    rgba[:, 18:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    for name in ("logo.png", "logo.jpg"):
        assert cli.main(["upscale", str(tmp_path / "logo.png"), "--model_path", str(tiny_dir), "--output",
                         str(tmp_path / "out" / name), "-q"]) == 0
    with Image.open(tmp_path / "out" / "logo.png") as image:
        assert image.mode == "RGBA" and image.size == (36 * scale, 20 * scale)
        alpha = np.array(image)[..., 3]
    assert (alpha[:, : 16 * scale] == 0).all() and (alpha[:, 20 * scale:] == 255).all()  # bicubic, edges kept
    with Image.open(tmp_path / "out" / "logo.jpg") as image:
        assert image.mode == "RGB"
    assert "logo.jpg: a JPEG holds no transparency, so the input's alpha channel is dropped" in caplog.text


def test_upscale_refuses_overwrites_and_bad_options_before_loading(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="would overwrite an input"):
        plan_outputs(tmp_path / "a.png", tmp_path / "a.png")
    (tmp_path / "in").mkdir()
    for name in ("x.png", "x.jpg"):
        (tmp_path / "in" / name).write_bytes(b"")
    pairs = plan_outputs(tmp_path / "in", tmp_path / "out")
    assert len({t for _, t in pairs}) == 2
    # The model path does not exist: option errors must come first.
    code = cli.main(["upscale", str(tmp_path / "a.png"), "--model_path", str(tmp_path / "none.pth"), "--output",
                     str(tmp_path / "o"), "--tile_size", "40"])
    assert code != 0 and "--tile_size must be at least 64 px" in capsys.readouterr().err


def test_tile_size_is_any_side_of_at_least_64(tiny):
    """The one constraint (code, error and docs agree): RGT pads its windows, so a 72 px tile works."""
    from opensora_plan.pipelines.upscale import UpscaleOptions

    assert UpscaleOptions("a.png", model_path="m", output="o", tile_size=72).tile_size == 72
    frames = torch.rand(1, 3, 100, 90)
    assert upscale_tensor(tiny[0], frames, tile_size=72, tile_overlap=16).shape[-2:] == (
        100 * tiny[0].upscale, 90 * tiny[0].upscale)


def test_upscale_refuses_a_scale_the_weights_do_not_have(tiny, tiny_dir, tmp_path):
    from PIL import Image

    from opensora_plan.pipelines.upscale import upscale

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="--dtype bf16 on CPU: upscale runs half precision only under CUDA autocast"):
        upscale(str(tmp_path / "a.png"), model_path=str(tiny_dir), output=str(tmp_path / "o"), dtype="bf16",
                device="cpu")
    scale = tiny[0].upscale
    other = 4 if scale != 4 else 2
    with pytest.raises(ValueError, match=f"is an x{scale} model but --scale is {other}"):
        upscale(str(tmp_path / "a.png"), model_path=str(tiny_dir), output=str(tmp_path / "o"), scale=other)


def test_upscale_without_output_writes_beside_the_input(tiny, tiny_dir, tmp_path):
    from PIL import Image

    from opensora_plan.pipelines.upscale import default_output, upscale

    scale = tiny[0].upscale
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "a.PNG")
    (result,) = upscale(str(tmp_path / "a.PNG"), model_path=str(tiny_dir))  # named after the model's scale
    assert result.output_path == str(tmp_path / f"a_sr_x{scale}.png") and (result.height, result.width) == (
        20 * scale, 24 * scale)
    assert default_output(tmp_path / "clip.webm", 3) == tmp_path / "clip_sr_x3.mp4"
    assert default_output(tmp_path, 2) == tmp_path.parent / f"{tmp_path.name}_sr_x2"


def test_upscale_command_without_model_path_uses_the_shipped_demo_upscaler(tmp_path, capsys):
    """No --model_path and no --output: the x2 RGT the shipped demo lists in demo.json's stages, on a 64 px clip
    of the demo's world (as `sample` writes them); <input>_sr_x2.mp4 at 128 px."""
    from opensora_plan.data.video_io import VideoReader, write_video
    from opensora_plan.demo.shapes import random_clip, render
    from opensora_plan.pipelines.model_folder import default_model_path, load_sampling_config

    assert load_sampling_config(None).stages["upscale"] == {"model_path": str(default_model_path() / "upscaler"),
                                                            "scale": 2}
    clip = random_clip(np.random.default_rng(0), "red", "circle", "left", 64)
    write_video(tmp_path / "clip.mp4", render(clip, 3, 64), 8)
    assert cli.main(["-q", "upscale", str(tmp_path / "clip.mp4"), "--scale", "2", "--device", "cpu"]) == 0
    with VideoReader(tmp_path / "clip_sr_x2.mp4") as reader:
        assert (reader.num_frames, reader.height, reader.width) == (3, 128, 128) and reader.fps == pytest.approx(8)
def test_upscale_folder_skips_bad_files_lists_each_once_and_exits_1_only_when_nothing_was_written(
        tiny_dir, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "f2"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(folder / "small.png")  # below RGT's 16 px
    (folder / "z.mp4").write_bytes(b"not a video")
    argv = ["-q", "upscale", str(folder), "--model_path", str(tiny_dir), "--output", str(tmp_path / "up")]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "up" / "a.png").is_file() and "skipped 2 files:" in captured.out
    skipped = [line for line in captured.out.splitlines() if line.startswith("  ")]
    assert len(skipped) == 2 and all(line.count(str(folder)) == 1 for line in skipped)
    assert any("small.png" in line and "16" in line for line in skipped)
    assert "z.mp4" not in captured.err  # listed once, in the summary only
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "z.mp4").write_bytes(b"not a video")
    assert cli.main(["-q", "upscale", str(bad), "--model_path", str(tiny_dir), "--output", str(tmp_path / "up2")]) == 1


def test_upscale_refuses_existing_outputs_without_overwrite_and_inputs_always(tiny_dir, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "--model_path", str(tiny_dir), "--output", str(tmp_path / "o.png")]
    assert cli.main(argv) == 0
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "o.png already exists" in err and "--overwrite" in err
    assert cli.main([*argv, "--overwrite"]) == 0
    with pytest.raises(ValueError, match="would overwrite an input"):
        plan_outputs(tmp_path / "a.png", tmp_path / "a.png", overwrite=True)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "in" / "b.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        plan_outputs(tmp_path / "in", tmp_path / "out")


def test_upscale_refuses_an_unwritable_output_and_a_model_of_another_kind_before_loading(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    amt = tmp_path / "amt"
    amt.mkdir()
    (amt / "config.json").write_text(json.dumps({"_class_name": "AMTModel"}))  # nothing else: nothing may load
    code = cli.main(["upscale", str(tmp_path / "a.png"), "--model_path", str(amt), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert f"--model_path {amt} is an AMTModel folder (frame interpolation); upscale needs an RGT model" in err[0]
    rgt = tmp_path / "rgt"
    rgt.mkdir()
    (rgt / "config.json").write_text(json.dumps({"_class_name": "RGTModel"}))
    code = cli.main(["upscale", str(tmp_path / "a.png"), "--model_path", str(rgt), "--output", "/proc/x.png"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "/proc" in err[0] and "cannot write there" in err[0]
