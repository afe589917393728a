"""The two image encoders of AMT: the correlation encoder (RAFT's "large" feature encoder) and the
context pyramid of the decoders."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_prelu


class InstanceNorm(nn.Module):
    """Instance normalisation without affine weights or running statistics (``nn.InstanceNorm2d()``'s computation).

    Two passes (mean, then the mean of squared deviations): as accurate as the built-in in float32 and, unlike it,
    it keeps a channels-last input channels-last without a copy (the built-in reshapes to a batch norm, which
    copies such an input); also faster on CPU in either layout.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean((2, 3), keepdim=True)  # (N, C, H, W)
        var = (centred * centred).mean((2, 3), keepdim=True)  # (N, C, 1, 1), biased like the built-in
        return centred * torch.rsqrt(var + self.eps)


class ResidualBlock(nn.Module):
    """conv3x3 (stride s) -> IN -> ReLU -> conv3x3 -> IN -> ReLU, plus a 1x1 strided shortcut when s = 2.

    Instance norms without affine weights or running statistics: nothing in the state dict, and the same
    computation in train and eval mode.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm1 = InstanceNorm()
        self.norm2 = InstanceNorm()
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                                            InstanceNorm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return self.relu(x + y)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(in_channels, out_channels, stride), ResidualBlock(out_channels, out_channels))


class CorrelationEncoder(nn.Module):
    """Frames (N, 3, H, W) -> correlation features (N, feature_dim, H/8, W/8).

    7x7 stride-2 stem, then stages of widths ``channels = (c1, c2, c3)``: c1 (stride 1), c2 (stride 2),
    c3 (stride 2), c3 (stride 1), and a 1x1 projection. AMT-G: (64, 112, 160) -> 128.
    """

    def __init__(self, channels: tuple[int, int, int] = (64, 112, 160), feature_dim: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c1, 7, stride=2, padding=3)
        self.norm1 = InstanceNorm()
        self.relu1 = nn.ReLU(inplace=True)
        self.layer1 = _stage(c1, c1, 1)
        self.layer2 = _stage(c1, c2, 2)
        self.layer3 = _stage(c2, c3, 2)
        self.layer3_2 = _stage(c3, c3, 1)
        self.conv2 = nn.Conv2d(c3, feature_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))  # (N, c1, H/2, W/2)
        x = self.layer3_2(self.layer3(self.layer2(self.layer1(x))))  # (N, c3, H/8, W/8)
        return self.conv2(x)  # (N, feature_dim, H/8, W/8)


class ContextPyramid(nn.Module):
    """One frame (B, 3, H, W) -> features at 1/2, 1/4, 1/8, 1/16 with ``channels`` widths.

    Each level: stride-2 conv (7x7 at the first level, 3x3 after) + PReLU, then 3x3 conv + PReLU.
    """

    def __init__(self, channels: tuple[int, ...] = (84, 96, 112, 128)):
        super().__init__()
        self.num_levels = len(channels)
        previous = 3
        for index, width in enumerate(channels, 1):
            kernel = 7 if index == 1 else 3
            level = nn.Sequential(conv_prelu(previous, width, kernel, 2, kernel // 2), conv_prelu(width, width))
            self.add_module(f"pyramid{index}", level)
            previous = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index in range(1, self.num_levels + 1):
            x = getattr(self, f"pyramid{index}")(x)  # (B, C_i, H/2^i, W/2^i)
            features.append(x)
        return features
