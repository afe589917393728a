"""The coarse-to-fine decoders of AMT (1/16 -> 1/8 -> 1/4 -> 1/2 -> 1/1) and the multi-field combination."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import SideResBlock, cat_channels, conv_prelu, resize, warp


def _decoder_block(in_channels: int, width: int, side_channels: int, out_channels: int) -> nn.Sequential:
    """conv+PReLU -> side residual block -> 4x4 stride-2 transposed conv (doubles the resolution)."""
    return nn.Sequential(conv_prelu(in_channels, width), SideResBlock(width, side_channels),
                         nn.ConvTranspose2d(width, out_channels, 4, 2, 1))


class InitDecoder(nn.Module):
    """1/16 features of both frames + a constant map of t -> flows t->0, t->1 and a feature at 1/8."""

    def __init__(self, in_channels: int, out_channels: int, side_channels: int):
        super().__init__()
        self.convblock = _decoder_block(2 * in_channels + 1, 2 * in_channels, side_channels, out_channels + 4)

    def forward(self, f0: torch.Tensor, f1: torch.Tensor, embt: torch.Tensor):
        t_map = embt.repeat(1, 1, *f0.shape[2:])  # (B, 1, h, w)
        out = self.convblock(cat_channels([f0, f1, t_map]))  # (B, 4 + C_out, 2h, 2w)
        flow0, flow1 = torch.chunk(out[:, :4], 2, 1)
        return flow0, flow1, out[:, 4:]


class IntermediateDecoder(nn.Module):
    """Feature + both context features warped by the current flows -> flows and feature at twice the resolution.

    The decoded flows are residuals on top of the 2x up-sampled input flows (times 2: pixels double).
    """

    def __init__(self, in_channels: int, out_channels: int, side_channels: int):
        super().__init__()
        self.convblock = _decoder_block(3 * in_channels + 4, 3 * in_channels, side_channels, out_channels + 4)

    def forward(self, ft: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor, flow0: torch.Tensor, flow1: torch.Tensor):
        x = cat_channels([ft, warp(f0, flow0), warp(f1, flow1), flow0, flow1])  # (B, 3C + 4, h, w)
        out = self.convblock(x)  # (B, 4 + C_out, 2h, 2w)
        delta0, delta1 = torch.chunk(out[:, :4], 2, 1)
        return delta0 + 2.0 * resize(flow0, 2.0), delta1 + 2.0 * resize(flow1, 2.0), out[:, 4:]


class MultiFlowDecoder(nn.Module):
    """The last decoder (1/2 -> 1/1): num_flows flow pairs, blend masks (sigmoid) and residual images."""

    def __init__(self, in_channels: int, side_channels: int, num_flows: int):
        super().__init__()
        self.num_flows = num_flows
        self.convblock = _decoder_block(3 * in_channels + 4, 3 * in_channels, side_channels, 8 * num_flows)

    def forward(self, ft: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor, flow0: torch.Tensor, flow1: torch.Tensor):
        n = self.num_flows
        x = cat_channels([ft, warp(f0, flow0), warp(f1, flow1), flow0, flow1])  # (B, 3C + 4, h, w)
        delta0, delta1, mask, residual = torch.split(self.convblock(x), [2 * n, 2 * n, n, 3 * n], 1)
        flow0 = delta0 + 2.0 * resize(flow0, 2.0).repeat(1, n, 1, 1)  # (B, 2n, 2h, 2w)
        flow1 = delta1 + 2.0 * resize(flow1, 2.0).repeat(1, n, 1, 1)
        return flow0, flow1, torch.sigmoid(mask), residual


def combine_candidates(comb_block: nn.Module, img0: torch.Tensor, img1: torch.Tensor, flow0: torch.Tensor,
                       flow1: torch.Tensor, mask: torch.Tensor, residual: torch.Tensor,
                       mean: torch.Tensor) -> torch.Tensor:
    """num_flows candidate frames (warp both mean-removed frames, blend, add the mean and the residual) ->
    their average plus ``comb_block`` of all candidates (3 * num_flows channels, candidate-major).

    img0/img1 (B, 3, H, W); flow0/flow1 (B, 2n, H, W); mask (B, n, H, W); residual (B, 3n, H, W); mean (B, 1, 1, 1).
    """
    b, c, h, w = flow0.shape
    n = c // 2
    warped0 = warp(img0.repeat_interleave(n, 0), flow0.reshape(b * n, 2, h, w))  # (B*n, 3, H, W)
    warped1 = warp(img1.repeat_interleave(n, 0), flow1.reshape(b * n, 2, h, w))
    mask = mask.reshape(b * n, 1, h, w)
    candidates = (mask * warped0 + (1 - mask) * warped1 + mean.repeat_interleave(n, 0)
                  + residual.reshape(b * n, 3, h, w))
    candidates = candidates.reshape(b, n, 3, h, w)
    stacked = candidates.view(b, 3 * n, h, w)
    if img0.is_contiguous(memory_format=torch.channels_last) and not img0.is_contiguous():
        stacked = stacked.contiguous(memory_format=torch.channels_last)  # comb_block's 7x7 convs in the model's layout
    return candidates.mean(1) + comb_block(stacked)  # (B, 3, H, W)
