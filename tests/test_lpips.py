"""LPIPS in plain torch: key layouts, loading from local files, frozen behaviour, the distance formula."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from opensora_plan.models.lpips import (
    LPIPS,
    SLICE_ENDS,
    VGG16_POOLS,
    load_lpips,
    lpips_state_dict_layouts,
    random_lpips,
)


@pytest.fixture(scope="module")
def reference_lpips() -> LPIPS:
    return random_lpips(seed=3)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    return x, y


def test_state_dict_matches_official_vae_manifest(manifests_dir):
    manifest = json.loads((manifests_dir / "CausalVAE_4x8x8.json").read_text())["loss_state_dict"]
    expected = {k[len("loss.perceptual_loss."):]: v for k, v in manifest.items() if k.startswith("loss.perceptual_loss.")}
    with torch.device("meta"):
        state = LPIPS().state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == expected


def _manual_lpips(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written from its definition with functional ops on torchvision-style 'features.N' weights."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(img):
        h = (img - shift) / scale
        taps = []
        for index in range(SLICE_ENDS[-1]):
            if f"features.{index}.weight" in state:
                h = F.conv2d(h, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1)
            elif index in VGG16_POOLS:
                h = F.max_pool2d(h, 2)
            else:
                h = F.relu(h)
            if index + 1 in SLICE_ENDS:
                taps.append(h)
        return taps

    total = torch.zeros(x.shape[0])
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = state[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


def test_distance_matches_definition(reference_lpips, images):
    x, y = images
    layouts = lpips_state_dict_layouts(reference_lpips)
    state = {**layouts["torchvision"], **layouts["heads"]}
    got = reference_lpips(x, y)
    assert got.shape == (x.shape[0], 1, 1, 1)
    torch.testing.assert_close(got.flatten(), _manual_lpips(state, x, y), rtol=1e-4, atol=1e-6)
    assert torch.all(reference_lpips(x, x) == 0)
    assert torch.all(got > 0)


@pytest.mark.parametrize("layout", ["lpips_safetensors", "torchvision_plus_heads_pth", "vae_checkpoint"])
def test_loads_every_key_layout(tmp_path, reference_lpips, images, layout):
    layouts = lpips_state_dict_layouts(reference_lpips)
    if layout == "lpips_safetensors":
        save_file(layouts["lpips"], tmp_path / "lpips.safetensors")
        paths = [tmp_path / "lpips.safetensors"]
    elif layout == "torchvision_plus_heads_pth":
        # A torchvision vgg16 file also carries the classifier head, which LPIPS ignores.
        vgg = dict(layouts["torchvision"], **{"classifier.0.weight": torch.zeros(4, 2), "classifier.0.bias": torch.zeros(4)})
        torch.save(vgg, tmp_path / "vgg16.pth")
        torch.save(layouts["heads"], tmp_path / "vgg.pth")
        paths = [tmp_path / "vgg16.pth", tmp_path / "vgg.pth"]
    else:
        other = {"encoder.conv_in.conv.weight": torch.zeros(2), "loss.logvar": torch.zeros(())}
        save_file({**layouts["vae"], **other}, tmp_path / "diffusion_pytorch_model.safetensors")
        paths = [tmp_path / "diffusion_pytorch_model.safetensors"]
    loaded = load_lpips(paths if len(paths) > 1 else paths[0])
    x, y = images
    torch.testing.assert_close(loaded(x, y), reference_lpips(x, y), rtol=0, atol=0)


def test_missing_file_error_names_expected_path(tmp_path):
    path = tmp_path / "weights" / "lpips_vgg16.safetensors"
    with pytest.raises(FileNotFoundError, match="lpips_vgg16.safetensors does not exist"):
        load_lpips(path)


def test_missing_heads_error_names_keys(tmp_path, reference_lpips):
    save_file(lpips_state_dict_layouts(reference_lpips)["torchvision"], tmp_path / "vgg16.safetensors")
    with pytest.raises(ValueError, match=r"missing keys 5 \(lin0.model.1.weight"):
        load_lpips(tmp_path / "vgg16.safetensors")


def test_frozen_but_differentiable_wrt_inputs(reference_lpips, images):
    model = random_lpips(seed=1)
    assert not any(p.requires_grad for p in model.parameters())
    container = torch.nn.Sequential(model)
    container.train()
    assert not model.training, "LPIPS must stay in eval mode inside a training model"
    x, y = images
    y = y.clone().requires_grad_(True)
    model(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
