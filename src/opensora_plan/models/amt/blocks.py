"""Small building blocks of AMT: bilinear resize, backward warping, PReLU convolutions, side residual block.

Everything here is plain PyTorch. The numerical conventions (bilinear ``align_corners=False`` resizes,
``align_corners=True`` border warping normalised by ``(W - 1) / 2``) are those the released weights were
trained with, so they are reproduced as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Bilinear resize by a factor (``align_corners=False``), as used throughout AMT."""
    return F.interpolate(x, scale_factor=scale_factor, mode="bilinear", align_corners=False)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward-warp ``image`` (B, C, H, W) by ``flow`` (B, 2, H, W) in pixels (x, y); border padding.

    The base grid is ``linspace(-1, 1)`` and displacements are divided by ``(W - 1) / 2`` and
    ``(H - 1) / 2`` (the align_corners=True convention of the trained model).
    """
    b, _, h, w = flow.shape
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device).view(1, 1, 1, w).expand(b, -1, h, -1)
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device).view(1, 1, h, 1).expand(b, -1, -1, w)
    base = torch.cat([xs, ys], 1).to(image)  # (B, 2, H, W)
    step = torch.cat([flow[:, 0:1] / ((w - 1.0) / 2.0), flow[:, 1:2] / ((h - 1.0) / 2.0)], 1)
    grid = (base + step).permute(0, 2, 3, 1)  # (B, H, W, 2)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def cat_channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors, 1)`` in the memory layout of the first tensor.

    torch.cat falls back to channels-first when any input's layout differs or is ambiguous (grid_sample's
    output, a one-channel map), which would make every later convolution channels-first too."""
    out = torch.cat(tensors, 1)
    if tensors[0].is_contiguous(memory_format=torch.channels_last) and not tensors[0].is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)  # a no-op when torch.cat kept the layout
    return out


def conv_prelu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
               padding: int = 1) -> nn.Sequential:
    """Conv2d followed by a per-channel PReLU (keys ``.0.weight``, ``.0.bias``, ``.1.weight``)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
                         nn.PReLU(out_channels))


class SideResBlock(nn.Module):
    """Residual block whose last ``side_channels`` channels get an extra 3x3 conv + PReLU twice.

    conv+PReLU over all channels -> side conv -> conv+PReLU -> side conv -> conv -> PReLU(input + result).
    """

    def __init__(self, channels: int, side_channels: int):
        super().__init__()
        if not 0 < side_channels < channels:
            raise ValueError(f"side_channels ({side_channels}) must be between 1 and the block width - 1 "
                             f"({channels - 1}); change skip_channels.")
        self.side_channels = side_channels
        self.conv1 = conv_prelu(channels, channels)
        self.conv2 = conv_prelu(side_channels, side_channels)
        self.conv3 = conv_prelu(channels, channels)
        self.conv4 = conv_prelu(side_channels, side_channels)
        self.conv5 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.prelu = nn.PReLU(channels)

    def _side(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        split = x.shape[1] - self.side_channels
        return torch.cat([x[:, :split], conv(x[:, split:])], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._side(self.conv1(x), self.conv2)
        out = self._side(self.conv3(out), self.conv4)
        return self.prelu(x + self.conv5(out))
