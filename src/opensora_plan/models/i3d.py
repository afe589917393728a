"""Inception-v1 I3D (Carreira & Zisserman 2017), RGB, Kinetics-400: the feature network of FVD.

FVD (Unterthiner et al. 2018) compares the distributions of I3D "logits" (the 400 pre-softmax
class scores) of real and generated clips. The network here is the RGB I3D of DeepMind's
``kinetics-i3d`` / TF-Hub ``i3d-kinetics-400`` in the layout of the ``pytorch-i3d`` port
(``InceptionI3d``, checkpoint ``rgb_imagenet.pt``), which is the layout most FVD code loads
(VideoGPT's ``i3d_pretrained_400.pt`` uses the same keys). Its state-dict keys are those files'
keys, e.g. ``Conv3d_1a_7x7.conv3d.weight (64, 3, 7, 7, 7)``, ``Mixed_3b.b1b.bn.running_var (128,)``,
``logits.conv3d.bias (400,)``; ``tests/data/i3d_rgb_state_dict_shapes.json`` lists all of them.

StyleGAN-V's ``i3d_torchscript.pt`` (a TorchScript export of the TF-Hub model) is the other common
file; :func:`load_i3d` loads it with ``torch.jit.load`` and calls it the way StyleGAN-V does.

Architecture notes (they matter for matching the TF numbers):

* every convolution and max-pool uses TensorFlow's "SAME" padding, computed from the input size
  (the extra pixel goes after, not before, when the padding is odd);
* max-pools pad with zeros: they always follow a ReLU, so zero padding equals TF's "ignore padding";
* BatchNorm eps is 1e-3 (TF's value); the network is always in eval mode (running statistics);
* the head is ``AvgPool3d((2, 7, 7), stride 1)`` -> dropout (identity in eval) -> 1x1x1 conv with
  bias -> mean over the remaining positions. For 16 frames at 224x224 the pooled map is exactly
  ``(1, 1, 1)``, so the output is the TF-Hub model's logits.

Input: float ``(B, 3, T, H, W)`` RGB in ``[-1, 1]``; output ``(B, num_classes)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loading import check_state_dict, read_state_dict

logger = logging.getLogger(__name__)

# The Inception modules: name -> output channels of its branches, in the order
# (b0 1x1, b1a 1x1, b1b 3x3x3, b2a 1x1, b2b 3x3x3, b3b 1x1 after a 3x3x3 max-pool).
# The module's output has b0 + b1b + b2b + b3b channels.
INCEPTION_BRANCHES = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, part of the trained network
HEAD_POOL = (2, 7, 7)  # the Logits endpoint's average pool (time, height, width)
TEMPORAL_STRIDE, SPATIAL_STRIDE = 8, 32  # total downsampling before the head
NUM_CLASSES = 400  # Kinetics-400

# StyleGAN-V's call: inputs already in [-1, 1] at 224x224, features = the 400 pre-softmax logits.
TORCHSCRIPT_KWARGS = dict(rescale=False, resize=False, return_features=True)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one dimension of length ``size``."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    (pt0, pt1), (ph0, ph1), (pw0, pw1) = (
        _same_padding(size, k, s) for size, k, s in zip(x.shape[2:], kernel, stride)
    )
    return F.pad(x, (pw0, pw1, ph0, ph1, pt0, pt1))


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class Unit3D(nn.Module):
    """SAME-padded Conv3d -> BatchNorm3d -> ReLU (the logits layer: conv with bias only)."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, activation: bool = True):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding (zeros: the input is post-ReLU, so zeros never win)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1."""

    def __init__(self, in_channels: int, branches: tuple[int, ...]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = branches
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class InceptionI3d(nn.Module):
    """RGB Inception-v1 I3D: ``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, num_classes)`` logits.

    ``width_divisor`` divides every channel count (floor, at least 1): only for tests and smoke runs
    with a small random network; real weights need the default 1. Frozen and always in eval mode.
    Needs ``T >= 9`` frames and ``H, W >= 193`` pixels (the head's (2, 7, 7) pool must fit).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, width_divisor: int = 1):
        super().__init__()
        w = lambda c: max(1, c // width_divisor)  # noqa: E731
        self.Conv3d_1a_7x7 = Unit3D(in_channels, w(64), kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(w(64), w(64))
        self.Conv3d_2c_3x3 = Unit3D(w(64), w(192), kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = w(192)
        for name, branches in INCEPTION_BRANCHES.items():
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            module = InceptionModule(channels, tuple(w(c) for c in branches))
            setattr(self, name, module)  # registration order = forward order
            channels = module.out_channels
        self.feature_channels = channels  # 1024 at full width
        self.logits = Unit3D(channels, num_classes, batch_norm=False, activation=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionI3d":
        # A fixed feature network: batch norm always uses the running statistics.
        return super().train(False)

    def pooled_features(self, video: torch.Tensor) -> torch.Tensor:
        """The Mixed_5c map after the head's (2, 7, 7) average pool: ``(B, 1024, ceil(T/8) - 1, ceil(H/32) - 6, ceil(W/32) - 6)``."""
        check_i3d_input(video)
        x = video
        for module in self.children():
            if module is self.logits:
                break
            x = module(x)  # stem (B, 64, T/2, H/4, W/4) ... Mixed_5c (B, 1024, T/8, H/32, W/32)
        return F.avg_pool3d(x, HEAD_POOL, stride=1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.logits(self.pooled_features(video))  # (B, num_classes, t, h, w); dropout is identity in eval
        return x.mean(dim=(2, 3, 4))  # (B, num_classes): logits averaged over the remaining positions


def min_i3d_input() -> tuple[int, int]:
    """Smallest (frames, pixels) the head's pool fits: ceil(T/8) >= 2, ceil(H/32) >= 7."""
    return (HEAD_POOL[0] - 1) * TEMPORAL_STRIDE + 1, (HEAD_POOL[1] - 1) * SPATIAL_STRIDE + 1


def check_i3d_input(video: torch.Tensor) -> None:
    """Raise ValueError unless ``video`` is ``(B, 3, T, H, W)`` in [-1, 1] and large enough for the I3D head."""
    min_frames, min_pixels = min_i3d_input()
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"I3D expects RGB videos (B, 3, T, H, W), got shape {tuple(video.shape)}.")
    frames, height, width = video.shape[2:]
    if frames < min_frames or min(height, width) < min_pixels:
        raise ValueError(
            f"I3D needs at least {min_frames} frames of {min_pixels}x{min_pixels} pixels, got {frames} frames of "
            f"{width}x{height}; FVD's protocol is 16 frames at 224x224."
        )
    from ..metrics import check_value_range

    check_value_range(video, -1.0, 1.0, "I3D (FVD)")  # 0-255 frames would give other features silently


# --------------------------------------------------------------------------------------------
# Loading weights from a local file
# --------------------------------------------------------------------------------------------


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's ``i3d_torchscript.pt`` behind the same interface as :class:`InceptionI3d`."""

    def __init__(self, detector: torch.jit.ScriptModule):
        super().__init__()
        self.detector = detector.eval()

    def train(self, mode: bool = True) -> "TorchScriptI3D":
        return super().train(False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        check_i3d_input(video)
        return self.detector(video, **TORCHSCRIPT_KWARGS)  # (B, 400)


def sha256_of_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (a zip with a ``code/`` folder), False for a plain state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def normalize_i3d_state_dict(state: dict[str, torch.Tensor], model: InceptionI3d) -> dict[str, torch.Tensor]:
    """Strip a ``module.`` (DataParallel) prefix; fill BatchNorm ``num_batches_tracked`` counters that
    files saved before PyTorch 0.4.1 (``rgb_imagenet.pt``) do not have. Other keys are left alone."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = dict(state)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.zeros_like(value))
    return state


def load_i3d(path: str | os.PathLike, device: str | torch.device | None = None,
             expected_sha256: str | None = None) -> nn.Module:
    """The Kinetics-400 I3D from a local file, frozen, on ``device``: video in [-1, 1] -> ``(B, 400)``.

    ``path`` is either a state dict in the ``pytorch-i3d`` layout (``rgb_imagenet.pt``,
    ``i3d_pretrained_400.pt``, ``.pt``/``.pth``/``.safetensors``) loaded strictly into
    :class:`InceptionI3d`, or StyleGAN-V's TorchScript ``i3d_torchscript.pt`` (``torch.jit.load``).
    Nothing is downloaded. ``expected_sha256`` (hex), when given, is checked first.

    Raises FileNotFoundError for a missing file, ValueError for a checksum mismatch or a state dict
    whose keys/shapes are not the I3D's (naming the keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D weight file {path} does not exist; pass --i3d_model with pytorch-i3d's rgb_imagenet.pt (or "
            "another InceptionI3d state dict) or StyleGAN-V's i3d_torchscript.pt (docs/evaluation.md)."
        )
    if expected_sha256:
        actual = sha256_of_file(path)
        if actual != expected_sha256.lower():
            raise ValueError(f"I3D weight file {path} has sha256 {actual}, expected {expected_sha256}; check the file.")
    if is_torchscript_file(path):
        model: nn.Module = TorchScriptI3D(torch.jit.load(str(path), map_location="cpu"))
    else:
        model = InceptionI3d()
        state = normalize_i3d_state_dict(read_state_dict(path), model)
        check_state_dict(model, state, str(path))
        model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.to(device) if device is not None else model

