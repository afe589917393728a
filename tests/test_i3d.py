"""The Kinetics-400 I3D used for FVD: checkpoint layout, TF padding rule, loading paths, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opensora_plan.models.i3d import (
    InceptionI3d,
    TorchScriptI3D,
    _same_padding,
    load_i3d,
    min_i3d_input,
    sha256_of_file,
)
from tiny_eval_models import random_i3d, save_tiny_i3d_torchscript

MANIFEST = Path(__file__).parent / "data" / "i3d_rgb_state_dict_shapes.json"


@pytest.fixture(scope="module")
def full_i3d() -> InceptionI3d:
    torch.manual_seed(0)
    model = random_i3d(seed=0, width_divisor=1)
    with torch.no_grad():  # non-trivial batch-norm statistics, so loading them is actually checked
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model


def clip_224(batch: int = 1, frames: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, 224, 224, generator=generator) * 2 - 1


def test_state_dict_matches_the_pytorch_i3d_rgb_checkpoint_keys_and_shapes(full_i3d):
    manifest = json.loads(MANIFEST.read_text())
    expected = {k: tuple(v) for k, v in manifest["keys"].items()}
    ours = {k: tuple(v.shape) for k, v in full_i3d.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(ours.keys() - expected.keys()) == []
    assert sorted(expected.keys() - ours.keys()) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}
    num_parameters = sum(p.numel() for p in full_i3d.parameters())
    assert num_parameters == manifest["num_parameters"]


@pytest.mark.parametrize("size,kernel,stride", [(224, 7, 2), (16, 7, 2), (112, 3, 2), (56, 3, 1), (17, 3, 2),
                                                 (4, 2, 2), (7, 2, 2), (8, 3, 2), (9, 7, 2)])
def test_same_padding_is_tensorflows(size, kernel, stride):
    # TF "SAME": output ceil(n / s); total padding max((out - 1) * s + k - n, 0), the extra pixel after.
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    assert _same_padding(size, kernel, stride) == (total // 2, total - total // 2)


def test_sixteen_frames_at_224_pool_to_one_position_and_give_400_logits():
    model = InceptionI3d(width_divisor=16)
    video = clip_224(batch=2)
    pooled = model.pooled_features(video)
    assert pooled.shape == (2, model.feature_channels, 1, 1, 1)
    logits = model(video)
    assert logits.shape == (2, 400)
    torch.testing.assert_close(logits, model.logits(pooled).flatten(1))
    # The batch does not mix: each clip's logits are those it gets alone (eval-mode batch norm).
    torch.testing.assert_close(logits[1:], model(video[1:]), rtol=1e-4, atol=1e-5)


def test_network_stays_in_eval_mode_and_frozen():
    model = InceptionI3d(width_divisor=16).train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_too_small_input_is_one_clear_error():
    frames, pixels = min_i3d_input()
    assert (frames, pixels) == (9, 193)
    model = InceptionI3d(width_divisor=16)
    with pytest.raises(ValueError, match="at least 9 frames of 193x193"):
        model(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="\\(B, 3, T, H, W\\)"):
        model(torch.zeros(3, 16, 224, 224))


def test_load_i3d_reads_an_old_style_checkpoint_without_batch_counters(full_i3d, tmp_path):
    # rgb_imagenet.pt predates num_batches_tracked; DataParallel files carry a "module." prefix.
    state = {f"module.{k}": v for k, v in full_i3d.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(state, path)
    loaded = load_i3d(path, expected_sha256=sha256_of_file(path))
    assert isinstance(loaded, InceptionI3d)
    video = clip_224(batch=2)
    expected = full_i3d(video)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # clips are told apart: a real comparison
    torch.testing.assert_close(loaded(video), expected, rtol=0, atol=0)


def test_load_i3d_names_missing_unexpected_and_misshaped_keys(full_i3d, tmp_path):
    state = dict(full_i3d.state_dict())
    del state["Mixed_4c.b2b.bn.running_var"]
    state["Mixed_5c.b9.conv3d.weight"] = torch.zeros(1)
    state["logits.conv3d.bias"] = torch.zeros(101)  # a UCF-101 head is not the Kinetics-400 I3D
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_i3d(path)
    message = str(err.value)
    for fragment in ("Mixed_4c.b2b.bn.running_var", "Mixed_5c.b9.conv3d.weight", "logits.conv3d.bias"):
        assert fragment in message


def test_load_i3d_checks_the_file_and_its_checksum(tmp_path):
    with pytest.raises(FileNotFoundError, match="rgb_imagenet.pt"):
        load_i3d(tmp_path / "missing.pt")
    path = tmp_path / "weights.pt"
    torch.save(InceptionI3d(width_divisor=16).state_dict(), path)
    with pytest.raises(ValueError, match="sha256"):
        load_i3d(path, expected_sha256="0" * 64)


def test_torchscript_file_is_called_with_stylegan_v_arguments(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    net = save_tiny_i3d_torchscript(path)
    loaded = load_i3d(path)
    assert isinstance(loaded, TorchScriptI3D)
    # rescale=False, resize=False, return_features=True: the raw logits of the [-1, 1] input.
    video = clip_224()
    torch.testing.assert_close(loaded(video), net(video), rtol=1e-5, atol=1e-5)
