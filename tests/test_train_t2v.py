"""``opensora-plan train-t2v`` end to end with tiny models: logs, checkpoints, exact resume, stages, --pretrained."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import read_log  # noqa: E402

from opensora_plan import cli  # noqa: E402
from opensora_plan.models.latte import LatteT2V, build_latte  # noqa: E402
from opensora_plan.train.pretrained import load_pretrained_weights  # noqa: E402
from opensora_plan.train.t2v import STAGE_CONFIG_DIR, build_t2v, load_stage_config  # noqa: E402

CAPTIONS = ["a red ball rolls to the left", "waves on a beach", "a green square moves up", "snow falls on a city"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, fixtures_dir):
    """Tiny T5 (width 32), tiny CausalVAE (fixture config, random weights), five mp4 clips + one broken file.

    Returns (root, t5 folder, clip sizes): clips of 1 + (VAE time compression) frames and 4 x (VAE spatial
    compression) pixels, i.e. 2 latent frames of 4 x 4 for any VAE config.
    """
    from opensora_plan.data.video_io import write_video
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.demo.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("t2v_assets")
    t5 = build_tiny_t5(root / "t5", CAPTIONS, d_model=32)
    torch.manual_seed(0)
    vae_config = json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text())
    vae = CausalVAEModel.from_config(vae_config)
    vae.save_pretrained(root / "vae")
    sizes = {"num_frames": 1 + vae.temporal_compression, "max_image_size": 4 * vae.spatial_compression}
    entries = []
    for i in range(5):
        frames = torch.zeros(9, 40, 48, 3, dtype=torch.uint8)
        for t in range(9):  # a moving bright square
            frames[t, 4 + t : 16 + t, 4 + 3 * i : 16 + 3 * i] = 255
        write_video(root / f"clip{i}.mp4", frames, fps=8)
        entries.append({"path": f"clip{i}.mp4", "cap": [CAPTIONS[i % 4], CAPTIONS[(i + 1) % 4]]})
    (root / "broken.mp4").write_bytes(b"not a video")
    entries.append({"path": "broken.mp4", "cap": "never read"})
    (root / "data.json").write_text(json.dumps(entries))
    return root, t5, sizes


def _argv(assets, out: Path, steps: int, *extra: str) -> list[str]:
    root, t5, sizes = assets
    return ["train-t2v", "--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(t5), "--ae_path", str(root / "vae"),
            "--data_path", str(root / "data.json"), "--num_frames", str(sizes["num_frames"]),
            "--max_image_size", str(sizes["max_image_size"]),
            "--use_image_num", "1", "--model_max_length", "16", "--train_batch_size", "2", "--max_train_steps",
            str(steps), "--checkpointing_steps", "2", "--mixed_precision", "no", "--report_to", "none",
            "--learning_rate", "1e-3", "--output_dir", str(out), *extra]


def test_train_t2v_runs_logs_and_resumes_exactly(assets, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli.main(_argv(assets, full, 3, "--use_ema", "--gradient_checkpointing")) == 0
    log = read_log(full)
    assert [r["step"] for r in log] == [1, 2, 3]
    for record in log:
        assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mse", "vb"} <= record.keys()
        assert record["loss"] == pytest.approx(record["mse"] + record["vb"], rel=1e-5)
    # The trained folder loads with the strict loader; the EMA sits beside it.
    model = LatteT2V.from_pretrained(full / "checkpoint-3" / "model")
    assert model.config.video_length == 2 and list(model.config.sample_size) == [4, 4]  # see the assets fixture
    assert model.config.caption_channels == 32
    assert (full / "checkpoint-3" / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    options = json.loads((full / "options.json").read_text())
    assert options["extra"]["use_image_num"] == 1 and options["task_options"]["num_parameters"] > 0

    # Stop after 2 steps, then resume to 3: same losses and weights (VAE sampling, data and noise seeded).
    assert cli.main(_argv(assets, resumed, 2, "--use_ema", "--gradient_checkpointing")) == 0
    assert cli.main(_argv(assets, resumed, 3, "--use_ema", "--gradient_checkpointing",
                          "--resume_from_checkpoint", "latest")) == 0
    assert len(read_log(resumed)) == 3
    for a, b in zip(log, read_log(resumed)):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    for folder in ("model", "ema"):
        wa = load_file(str(full / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        wb = load_file(str(resumed / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_broken_video_is_skipped_and_counted(assets, tmp_path, caplog):
    task, config = build_t2v(_cli_options(assets, tmp_path, 1))
    sample = task.dataset[5]  # the broken entry: replaced by the next usable clip, and reported
    assert sample["skipped"] and "broken.mp4" in sample["skipped"][0]["path"]
    batch = task.collate_fn([sample, task.dataset[0]])
    task.loss("model", batch, 0, task.models)
    report = task.epoch_report()
    assert report["skipped_videos"] == 1 and "broken.mp4" in report["details"]


def _cli_options(assets, out, steps, **extra) -> dict:
    root, t5, sizes = assets
    options = dict(model="LatteT2V-Tiny/122", text_encoder_name=str(t5), ae_path=str(root / "vae"),
                   data_path=str(root / "data.json"), use_image_num=1, **sizes,
                   model_max_length=16, train_batch_size=2, max_train_steps=steps, mixed_precision="no",
                   report_to="none", output_dir=str(out))
    return {**options, **extra}


def test_model_from_config_file_and_caption_width_check(assets, tmp_path):
    config = dict(build_latte("LatteT2V-Tiny/122", caption_channels=32).config)
    (tmp_path / "latte.json").write_text(json.dumps(config))
    task, _ = build_t2v(_cli_options(assets, tmp_path / "out", 1, model=str(tmp_path / "latte.json")))
    assert task.models["model"].config.video_length == 2
    config["caption_channels"] = 48
    (tmp_path / "latte.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="caption_channels=48"):
        build_t2v(_cli_options(assets, tmp_path / "out", 1, model=str(tmp_path / "latte.json")))


def test_stage_configs_carry_the_reference_recipe():
    expected = {  # spec section 6: frames, size, batch per GPU, joint images
        "stage1_17x256x256": (17, 256, 4, 4),
        "stage2_65x256x256": (65, 256, 4, 4),
        "stage3_65x512x512": (65, 512, 2, 16),
    }
    assert sorted(p.stem for p in STAGE_CONFIG_DIR.glob("*.json")) == sorted(expected)
    for name, values in expected.items():
        options = load_stage_config(name)
        assert (options["num_frames"], options["max_image_size"], options["train_batch_size"],
                options["use_image_num"]) == values
        assert options["learning_rate"] == 2e-5 and options["lr_scheduler"] == "constant"
        assert options["gradient_checkpointing"] and options["mixed_precision"] == "bf16"
        assert not any(isinstance(v, str) and "/" in v and k != "model" for k, v in options.items()), "machine path"
    assert load_stage_config("stage3_65x512x512")["enable_tiling"] is True


def test_config_file_values_are_defaults_that_flags_override(tmp_path, monkeypatch):
    import opensora_plan.train.t2v as t2v

    seen = {}
    monkeypatch.setattr(t2v, "train_t2v", lambda options: seen.update(options) or {"step": 0, "skipped_steps": 0,
                                                                                    "output_dir": "x"})
    assert cli.main(["train-t2v", "--config", "stage2_65x256x256", "--train_batch_size", "1",
                     "--no-gradient_checkpointing", "--output_dir", str(tmp_path)]) == 0
    assert seen["train_batch_size"] == 1 and seen["gradient_checkpointing"] is False
    assert seen["num_frames"] == 65 and seen["use_image_num"] == 4  # from the file
    (tmp_path / "bad.json").write_text(json.dumps({"num_frame": 17}))
    with pytest.raises(ValueError, match="num_frame"):
        load_stage_config(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="num_frame"):
        build_t2v({"num_frame": 17})


def test_pretrained_transfers_across_stage_sizes_and_reports_every_key(tmp_path):
    # A "stage 1" model (2 latent frames, 4x4 latents) starts a "stage 2" model (5 frames, 8x8).
    small = build_latte("LatteT2V-Tiny/122", video_length=2, sample_size=(4, 4))
    small.save_pretrained(tmp_path / "stage1")
    big = build_latte("LatteT2V-Tiny/122", video_length=5, sample_size=(8, 8))
    report = load_pretrained_weights(big, tmp_path / "stage1", tmp_path / "report.json")
    assert report["loaded"] == report["model_tensors"] and not report["missing"] and not report["unexpected"]
    assert torch.equal(big.proj_out.weight, small.proj_out.weight)
    assert big.temp_pos_embed.shape[1] == 5  # recomputed for the new video_length, not copied
    assert json.loads((tmp_path / "report.json").read_text())["loaded"] == report["loaded"]

    # Latte's t2v.pt: a dict with "model", DDP prefixes, an extra key, a shape mismatch, a missing key.
    state = {f"module.{k}": v.clone() for k, v in small.state_dict().items()}
    state["module.proj_out.weight"] = torch.zeros(3, 3)
    state["module.x_embedder.proj.weight"] = torch.zeros(1)
    state["module.temp_pos_embed"] = torch.zeros(1, 2, 32)
    del state["module.proj_out.bias"]
    torch.save({"model": state}, tmp_path / "t2v.pt")
    fresh = build_latte("LatteT2V-Tiny/122")
    before = fresh.proj_out.weight.clone()
    report = load_pretrained_weights(fresh, tmp_path / "t2v.pt")
    assert report["missing"] == ["proj_out.bias"]
    assert report["unexpected"] == ["x_embedder.proj.weight"]
    assert list(report["shape_mismatched"]) == ["proj_out.weight"]
    assert report["position_embeddings_recomputed"] == ["temp_pos_embed"]
    assert torch.equal(fresh.proj_out.weight, before)
    assert torch.equal(fresh.pos_embed.proj.weight, small.pos_embed.proj.weight)

    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert load_pretrained_weights(build_latte("LatteT2V-Tiny/122"), tmp_path / "w.safetensors")["loaded"] > 0
    with pytest.raises(FileNotFoundError, match="t2v.pt"):
        load_pretrained_weights(fresh, tmp_path / "nothing.pt")
    save_file({"unrelated.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="none of its 1 tensors fits"):
        load_pretrained_weights(fresh, tmp_path / "other.safetensors")


def test_training_from_cached_features(assets, tmp_path):
    from opensora_plan.data.features import extract_features
    from opensora_plan.train.trainer import train

    root, t5, sizes = assets
    extract_features(root / "data.json", tmp_path / "cache", text_encoder_name=t5, ae_path=root / "vae",
                     use_image_num=1, model_max_length=16, device="cpu", text_dtype="fp32", progress=False, **sizes)
    options = _cli_options(assets, tmp_path / "out", 2, cached_features=str(tmp_path / "cache"))
    del options["text_encoder_name"], options["ae_path"]  # neither encoder is needed with a full cache
    task, config = build_t2v(options)
    assert task.vae is None and task.text_encoder is None
    assert task.models["model"].config.video_length == 2 and task.models["model"].config.caption_channels == 32
    summary = train(task, config)
    assert summary["step"] == 2
    assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path / "out"))


def test_validation_videos_are_written(assets, tmp_path):
    from opensora_plan.train.trainer import train

    options = _cli_options(assets, tmp_path, 1, use_image_num=0, validation_prompts="a red ball rolls",
                           validation_steps=1, validation_sampling_steps=4, report_to="tensorboard")
    train(*build_t2v(options))
    assert (tmp_path / "validation" / "step-1" / "0000-a_red_ball_rolls.mp4").stat().st_size > 0
    with pytest.raises(ValueError, match="validation_sampling_steps"):
        build_t2v({**options, "validation_sampling_steps": 2, "output_dir": str(tmp_path / "other")})


@pytest.mark.parametrize("images", [0, 2])
def test_benchmark_flop_formula_matches_flop_counter(images):
    """benchmarks/train.py's analytic FLOPs = torch's FLOP counter (linear layers) + the attention term."""
    from torch.utils.flop_counter import FlopCounterMode

    from opensora_plan.models.layers import fused_linear_kernels

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train import forward_flops  # noqa: E402 (benchmarks/train.py)

    cfg = dict(size=64, frames=17, batch=2, images=images, caption_tokens=7)
    model = build_latte("LatteT2V-Tiny/122")  # 5 latent frames of 8 x 8
    B, n, L, D, F, N = 2, images, 7, model.inner_dim, 5 + images, 16
    slots = (B, 1 + n) if n else (B,)
    # Plain F.linear: the counter does not see the fused oneDNN inference kernels (models/layers.py).
    with torch.no_grad(), fused_linear_kernels(False), FlopCounterMode(display=False) as counter:
        model(torch.randn(B, 4, F, 8, 8), torch.tensor([3, 9]), encoder_hidden_states=torch.randn(*slots, L, 48),
              encoder_attention_mask=torch.ones(*slots, L), use_image_num=n)
    # The counter does not see CPU SDPA: add scores + weighted sums (spatial, cross, temporal) by hand.
    attention = 2 * model.config.num_layers * (B * F * (2 * N * N * D + 2 * N * L * D) + B * N * 2 * 5 * 5 * D)
    assert forward_flops(cfg, model.config) == counter.get_total_flops() + attention
