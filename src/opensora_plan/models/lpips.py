"""LPIPS perceptual distance (VGG16 variant) in plain torch, with weights read from a local file.

The reference builds LPIPS through torchvision and downloads VGG16 and the LPIPS heads at model
construction (spec 1.7, quirk 8.4). Here the network is written out (no torchvision) and its weights
come from a file the user already has. Accepted key layouts, in any combination (several files are
merged, so torchvision's ``vgg16-397923af.pth`` plus LPIPS' ``vgg.pth`` works):

- torchvision VGG16: ``features.{0,2,5,...,28}.{weight,bias}`` (the ``classifier.*`` head is ignored),
- official LPIPS / taming ``vgg_lpips``: ``net.slice{1..5}.{N}.{weight,bias}``, ``lin{0..4}.model.1.weight``,
  ``scaling_layer.{shift,scale}``,
- an Open-Sora-Plan CausalVAE checkpoint: ``loss.perceptual_loss.*`` (all other keys of that file ignored).

The module is frozen (no gradients to its weights, always in eval mode); gradients still flow to the
inputs, which is what a perceptual training loss needs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .loading import check_state_dict, read_state_dict

logger = logging.getLogger(__name__)

# torchvision ``vgg16().features`` layer list: conv(in, out) at these indices, ReLU after each conv,
# max-pools at 4, 9, 16, 23. LPIPS cuts it into five slices ending at relu1_2, relu2_2, relu3_3,
# relu4_3 and relu5_3 (layers 0-3, 4-8, 9-15, 16-22, 23-29).
VGG16_CONVS = {
    0: (3, 64), 2: (64, 64),
    5: (64, 128), 7: (128, 128),
    10: (128, 256), 12: (256, 256), 14: (256, 256),
    17: (256, 512), 19: (512, 512), 21: (512, 512),
    24: (512, 512), 26: (512, 512), 28: (512, 512),
}
VGG16_POOLS = (4, 9, 16, 23)
SLICE_ENDS = (4, 9, 16, 23, 30)  # exclusive end index of slice1..slice5
FEATURE_CHANNELS = (64, 128, 256, 512, 512)

# LPIPS input normalisation constants (its ScalingLayer): inputs in [-1, 1] -> ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

VAE_PREFIX = "loss.perceptual_loss."


class ScalingLayer(nn.Module):
    """(x - shift) / scale with LPIPS' constants; shift/scale are persistent buffers (1, 3, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """VGG16 convolutional stack as five slices; returns the relu1_2 ... relu5_3 activations.

    Each slice is an ``nn.Sequential`` whose children are named by their torchvision ``features``
    index (``slice2.5`` is ``features.5``), so the official LPIPS key names come out unchanged.
    """

    def __init__(self):
        super().__init__()
        start = 0
        for number, end in enumerate(SLICE_ENDS, start=1):
            layers = nn.Sequential()
            for index in range(start, end):
                if index in VGG16_CONVS:
                    layers.add_module(str(index), nn.Conv2d(*VGG16_CONVS[index], kernel_size=3, padding=1))
                elif index in VGG16_POOLS:
                    layers.add_module(str(index), nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers.add_module(str(index), nn.ReLU(inplace=False))
            setattr(self, f"slice{number}", layers)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for number in range(1, len(SLICE_ENDS) + 1):
            x = getattr(self, f"slice{number}")(x)
            features.append(x)  # (N, C_k, H / 2^(k-1), W / 2^(k-1))
        return features


class NetLinLayer(nn.Module):
    """LPIPS 1x1 head: channel-weighted sum of squared feature differences, no bias.

    Index 0 of ``model`` is a Dropout in the reference, inactive because LPIPS always runs in eval
    mode; an Identity keeps the official key name ``model.1.weight``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # LPIPS normalises each spatial feature vector to unit length across channels.
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS(x, y) for images in [-1, 1]: (N, 3, H, W) x 2 -> (N, 1, 1, 1) distances."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, channels in enumerate(FEATURE_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # Frozen network: stays in eval mode even inside a model put in train mode.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats_x = self.net(self.scaling_layer(x))
        feats_y = self.net(self.scaling_layer(y))
        distance = 0
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2  # (N, C_k, h_k, w_k)
            head = getattr(self, f"lin{k}")
            distance = distance + head(diff).mean(dim=(2, 3), keepdim=True)  # (N, 1, 1, 1)
        return distance


# --------------------------------------------------------------------------------------------
# Loading weights from local files
# --------------------------------------------------------------------------------------------


def _torchvision_to_lpips_key(key: str) -> str | None:
    """``features.N.param`` -> ``net.sliceK.N.param``; ``classifier.*`` -> None (unused by LPIPS)."""
    if key.startswith("classifier."):
        return None
    _, index, param = key.split(".")
    number = next(k for k, end in enumerate(SLICE_ENDS, start=1) if int(index) < end)
    return f"net.slice{number}.{index}.{param}"


def normalize_lpips_keys(state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """Rename a state dict in any accepted layout (module docstring) to this module's key names."""
    if any(k.startswith(VAE_PREFIX) for k in state):
        # A whole CausalVAE checkpoint: only its perceptual-loss tensors matter here.
        state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    renamed: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, value in state.items():
        if key.startswith(("features.", "classifier.")):
            new_key = _torchvision_to_lpips_key(key)
            if new_key is None:
                dropped += 1
                continue
            key = new_key
        renamed[key] = value
    if dropped:
        logger.info("Ignored %d torchvision VGG16 classifier tensors in %s (LPIPS uses the features only)",
                    dropped, source or "the LPIPS weights")
    return renamed


def load_lpips(paths: str | os.PathLike | Sequence[str | os.PathLike], device=None) -> LPIPS:
    """Build a frozen :class:`LPIPS` and fill it from one or more local weight files (merged).

    Raises FileNotFoundError naming the expected path when a file is missing, and ValueError naming
    the missing/unexpected keys when the files do not hold exactly VGG16 features + LPIPS heads.
    The scaling-layer constants may be absent from the files (torchvision/LPIPS files lack them).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("No LPIPS weight file given; pass --lpips_path FILE or use --perceptual_weight 0.")
    merged: dict[str, torch.Tensor] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS weight file {path} does not exist; expected a .safetensors/.pth file with VGG16 "
                f"features and LPIPS heads (torchvision 'features.N.*', LPIPS 'net.sliceK.N.*'/'linK.model.1.weight', "
                f"or an Open-Sora-Plan VAE file with 'loss.perceptual_loss.*'), or train with --perceptual_weight 0."
            )
        merged.update(normalize_lpips_keys(read_state_dict(path), source=str(path)))
    model = LPIPS()
    for name, buffer in model.scaling_layer.named_buffers():
        merged.setdefault(f"scaling_layer.{name}", buffer.clone())
    check_state_dict(model, merged, " + ".join(str(p) for p in paths))
    model.load_state_dict(merged, strict=True)
    if device is not None:
        model.to(device)
    return model


def lpips_state_dict_layouts(model: LPIPS) -> dict[str, dict[str, torch.Tensor]]:
    """The model's weights written in the three accepted layouts (used to save test weights).

    Returns ``{"lpips": ..., "torchvision": features-only VGG16 keys, "heads": lin heads only,
    "vae": loss.perceptual_loss.* keys}``.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torchvision = {}
    for key, value in state.items():
        if key.startswith("net.slice"):
            _, _, index, param = key.split(".")
            torchvision[f"features.{index}.{param}"] = value
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    return {
        "lpips": state,
        "torchvision": torchvision,
        "heads": heads,
        "vae": {VAE_PREFIX + k: v for k, v in state.items()},
    }


def random_lpips(seed: int = 0, dtype: torch.dtype = torch.float32) -> LPIPS:
    """An LPIPS with seeded random weights (tests / smoke runs; the distances mean nothing)."""
    generator = torch.Generator().manual_seed(seed)
    model = LPIPS()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("lin"):
                # Real LPIPS heads are non-negative; keep that so distances are >= 0.
                param.copy_(torch.rand(param.shape, generator=generator) * 0.1)
            elif name.endswith("weight"):
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            else:
                param.zero_()
    return model.to(dtype)

