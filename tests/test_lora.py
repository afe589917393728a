"""LoRA on LatteT2V: exact at scale 0, applied on every inference path, fused == unfused, training only moves
the adapters, exact resume, and the diffusers/peft file layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft", reason="LoRA needs the [lora] extra (peft)")

sys.path.insert(0, str(Path(__file__).parent))
from test_train_t2v import _argv, assets  # noqa: E402,F401  (module fixture: tiny T5, VAE and clips)
from tiny_t2v import tiny_latte  # noqa: E402
from train_helpers import read_log  # noqa: E402

from opensora_plan import cli  # noqa: E402
from opensora_plan.models import lora  # noqa: E402
from opensora_plan.models.latte import build_latte  # noqa: E402


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.video_length, *cfg.sample_size, generator=g)
    return x, torch.tensor([10, 700]), torch.randn(2, 6, cfg.caption_channels, generator=g)


def _forward(model, inputs, grad=False):
    x, t, text = inputs
    with torch.set_grad_enabled(grad):
        return model(x, t, encoder_hidden_states=text, return_dict=False)[0].detach()


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_scale_zero_is_exact_and_nonzero_lora_changes_inference_output():
    model, inputs = tiny_latte(), None
    inputs = _inputs(model)
    base = _forward(model, inputs)
    trainable = lora.add_lora(model, lora.lora_config(4))
    assert trainable and all(".lora_" in n for n in trainable)
    _randomise_adapters(model)
    with_lora = _forward(model, inputs)
    # The no-grad path (stacked QKV GEMM, fused kernels) must apply the adapter, exactly as autograd's path does.
    assert (with_lora - base).abs().max() > 1e-2
    torch.testing.assert_close(with_lora, _forward(model, inputs, grad=True), rtol=1e-5, atol=1e-5)
    lora.set_lora_scale(model, 0.0)
    assert torch.equal(_forward(model, inputs), base)
    lora.set_lora_scale(model, 0.5)
    half = _forward(model, inputs)
    assert 0 < (half - base).abs().max() < (with_lora - base).abs().max()


def test_fused_equals_unfused_and_unfuse_restores():
    model = tiny_latte()
    inputs = _inputs(model)
    lora.add_lora(model, lora.lora_config(4, alpha=8))
    _randomise_adapters(model)
    unfused = _forward(model, inputs)
    lora.fuse_lora(model)
    torch.testing.assert_close(_forward(model, inputs), unfused, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unfuse"):
        lora.set_lora_scale(model, 0.3)
    lora.unfuse_lora(model)
    torch.testing.assert_close(_forward(model, inputs), unfused, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_in_diffusers_layout(tmp_path):
    model = tiny_latte()
    inputs = _inputs(model)
    lora.add_lora(model, lora.lora_config(2, target_modules=["to_q", "to_v", "ff.net.2"]))
    _randomise_adapters(model)
    expected = _forward(model, inputs)
    lora.save_lora(model, tmp_path / "adapter")
    weights = load_file(str(tmp_path / "adapter" / lora.LORA_WEIGHT_NAME))
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    config = json.loads((tmp_path / "adapter" / lora.ADAPTER_CONFIG_NAME).read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2
    assert sorted(config["target_modules"]) == ["ff.net.2", "to_q", "to_v"]

    fresh = tiny_latte()
    lora.load_lora(fresh, tmp_path / "adapter")
    assert torch.equal(_forward(fresh, inputs), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    other = build_latte("LatteT2V-Tiny/122", attention_head_dim=8)  # a narrower transformer
    with pytest.raises(ValueError, match="shape"):
        lora.load_lora(other, tmp_path / "adapter")


def test_bad_lora_options_fail_with_one_clear_error():
    with pytest.raises(ValueError, match="at least 1"):
        lora.lora_config(0)
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.add_lora(tiny_latte(), lora.lora_config(2, target_modules=["to_qq"]))


def _base_model(root: Path) -> Path:
    """A 'pretrained' tiny LatteT2V sized for the training assets (2 latent frames of 4x4, captions 32)."""
    torch.manual_seed(3)
    model = build_latte("LatteT2V-Tiny/122", caption_channels=32, sample_size=[4, 4], video_length=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "base")
    return root / "base"


def test_lora_training_moves_only_adapters_and_resumes_exactly(assets, tmp_path, capsys):  # noqa: F811
    from opensora_plan.train.t2v import build_t2v
    from opensora_plan.train.trainer import train

    base = _base_model(tmp_path)
    lora_flags = ("--pretrained", str(base), "--lora_rank", "4", "--lora_alpha", "4", "--use_ema")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli.main(_argv(assets, full, 3, *lora_flags)) == 0
    ckpt = full / "checkpoint-3"
    for folder in ("model", "ema"):  # adapter only, diffusers/peft layout
        assert sorted(p.name for p in (ckpt / folder).iterdir()) == [lora.ADAPTER_CONFIG_NAME, lora.LORA_WEIGHT_NAME]
    options = json.loads((full / "options.json").read_text())
    assert options["task_options"]["lora"]["rank"] == 4
    assert 0 < options["task_options"]["num_trainable_parameters"] < options["task_options"]["num_parameters"] / 5

    # Only adapter weights change: train the same run in-process and compare the base with --pretrained.
    root, t5, sizes = assets
    task, config = build_t2v(dict(model="LatteT2V-Tiny/122", text_encoder_name=str(t5), ae_path=str(root / "vae"),
                                  data_path=str(root / "data.json"), use_image_num=1, **sizes, model_max_length=16,
                                  train_batch_size=2, max_train_steps=2, mixed_precision="no", report_to="none",
                                  learning_rate=1e-3, output_dir=str(tmp_path / "inproc"), pretrained=str(base),
                                  lora_rank=4))
    before = {k: v.clone() for k, v in task.models["model"].state_dict().items()}
    train(task, config)
    after = task.models["model"].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)

    # 2 steps + resume to 3 == 3 uninterrupted steps (losses, adapter and EMA weights).
    assert cli.main(_argv(assets, resumed, 2, *lora_flags)) == 0
    assert cli.main(_argv(assets, resumed, 3, *lora_flags, "--resume_from_checkpoint", "latest")) == 0
    for a, b in zip(read_log(full), read_log(resumed), strict=True):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    for folder in ("model", "ema"):
        wa = load_file(str(ckpt / folder / lora.LORA_WEIGHT_NAME))
        wb = load_file(str(resumed / "checkpoint-3" / folder / lora.LORA_WEIGHT_NAME))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Resuming with another adapter shape or scaling is refused before any step.
    capsys.readouterr()
    other = ("--pretrained", str(base), "--lora_rank", "4", "--lora_alpha", "8", "--use_ema")
    assert cli.main(_argv(assets, resumed, 4, *other, "--resume_from_checkpoint", "latest")) == 1
    assert "--lora_alpha 8.0 differs from the run's 4.0" in capsys.readouterr().err  # before any model loads


def test_bf16_lora_run_stores_the_frozen_base_in_bf16_and_adapters_in_fp32(assets, tmp_path):  # noqa: F811
    from accelerate.state import AcceleratorState

    from opensora_plan.train.t2v import build_t2v
    from opensora_plan.train.trainer import train

    root, t5, sizes = assets
    task, config = build_t2v(dict(model="LatteT2V-Tiny/122", text_encoder_name=str(t5), ae_path=str(root / "vae"),
                                  data_path=str(root / "data.json"), use_image_num=1, **sizes, model_max_length=16,
                                  train_batch_size=2, max_train_steps=2, mixed_precision="bf16", report_to="none",
                                  learning_rate=1e-3, output_dir=str(tmp_path / "run"),
                                  pretrained=str(_base_model(tmp_path)), lora_rank=4))
    params = dict(task.models["model"].named_parameters())
    assert {p.dtype for n, p in params.items() if ".lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if ".lora_" not in n} == {torch.bfloat16}
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier in-process runs used mixed_precision no
    try:
        assert train(task, config)["step"] == 2
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "model" / lora.LORA_WEIGHT_NAME))
    assert {v.dtype for v in saved.values()} == {torch.float32}


def test_lora_options_are_checked_before_training(assets, tmp_path, capsys):  # noqa: F811
    assert cli.main(_argv(assets, tmp_path / "a", 1, "--lora_rank", "4")) != 0
    assert "give that model with --pretrained" in capsys.readouterr().err
    assert cli.main(_argv(assets, tmp_path / "b", 1, "--lora_alpha", "8")) != 0
    assert "--lora_alpha needs --lora_rank" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pipeline_load_lora_weights_scale_and_fuse(tmp_path):
    from tiny_t2v import TINY_VERSION, build_tiny_t2v

    from opensora_plan.pipelines.pipeline_opensora_plan import OpenSoraPlanPipeline

    model_path, t5 = build_tiny_t2v(tmp_path)
    adapter = tiny_latte()
    lora.add_lora(adapter, lora.lora_config(4))
    _randomise_adapters(adapter)
    lora.save_lora(adapter, tmp_path / "adapter")

    pipe = OpenSoraPlanPipeline.from_release(model_path, TINY_VERSION, text_encoder=t5, scheduler="DDIM")
    pipe.set_progress_bar_config(disable=True)

    def video():
        return pipe("a cat playing the piano", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="pt").frames

    base = video()
    pipe.load_lora_weights(tmp_path / "adapter")
    unfused = video()
    assert (unfused - base).abs().max() > 1e-2
    pipe.set_lora_scale(0.0)
    assert torch.equal(video(), base)
    pipe.set_lora_scale(1.0)
    pipe.fuse_lora()
    torch.testing.assert_close(video(), unfused, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()  # W + dW - dW: back up to float rounding
    torch.testing.assert_close(video(), unfused, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already holds LoRA"):
        pipe.load_lora_weights(tmp_path / "adapter")
