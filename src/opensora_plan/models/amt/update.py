"""The update block: (feature, flow pair, correlation samples) -> residual updates of the feature and flows.

RAFT's motion encoder + heads without the recurrence (the convolution pair is named ``gru`` in the
checkpoints but keeps no hidden state). A block with ``scale_factor`` s runs at 1/s of its level's
resolution: the feature is down-sampled on entry and both deltas are up-sampled on exit (the flow delta
also multiplied by s, since flows are in pixels).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import resize


def _conv_pair(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """3x3 conv -> LeakyReLU(0.1) -> 3x3 conv (keys ``.0`` and ``.2``)."""
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                         nn.Conv2d(hidden, out_channels, 3, padding=1))


class UpdateBlock(nn.Module):
    def __init__(self, feature_dim: int, corr_channels: int, hidden_dim: int = 192, flow_dim: int = 64,
                 corr_dim: int = 256, corr_dim2: int = 192, fc_dim: int = 188, scale_factor: float | None = None):
        super().__init__()
        self.scale_factor = scale_factor
        self.convc1 = nn.Conv2d(corr_channels, corr_dim, 1)
        self.convc2 = nn.Conv2d(corr_dim, corr_dim2, 3, padding=1)
        self.convf1 = nn.Conv2d(4, flow_dim * 2, 7, padding=3)
        self.convf2 = nn.Conv2d(flow_dim * 2, flow_dim, 3, padding=1)
        self.conv = nn.Conv2d(flow_dim + corr_dim2, fc_dim, 3, padding=1)
        self.gru = _conv_pair(fc_dim + 4 + feature_dim, hidden_dim, hidden_dim)
        self.feat_head = _conv_pair(hidden_dim, hidden_dim, feature_dim)
        self.flow_head = _conv_pair(hidden_dim, hidden_dim, 4)
        self.lrelu = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, feature: torch.Tensor, flow: torch.Tensor, corr: torch.Tensor, corr_upsample: float | None = None):
        """feature (B, C, s*h, s*w), flow (B, 4, h, w), corr (B, K, h, w) -> deltas (B, C, s*h, s*w), (B, 4, s*h, s*w).

        ``corr_upsample`` u: ``corr`` is at 1/u of the flow's resolution and is bilinearly up-sampled by u (the
        official "high" blocks). The up-sampling is applied after the 1x1 ``convc1`` instead of before: both are
        linear and the bilinear weights sum to 1, so the result is the same (to float rounding) with the 1x1
        convolution on u^2 times fewer pixels and fewer channels to up-sample (K=392 -> corr_dim=256 for AMT-G).
        """
        if self.scale_factor is not None:
            feature = resize(feature, 1 / self.scale_factor)  # (B, C, h, w)
        cor = self.convc1(corr)  # (B, corr_dim, h/u, w/u)
        if corr_upsample is not None:
            cor = resize(cor, corr_upsample)  # (B, corr_dim, h, w)
        cor = self.lrelu(self.convc2(self.lrelu(cor)))  # (B, corr_dim2, h, w)
        flo = self.lrelu(self.convf2(self.lrelu(self.convf1(flow))))  # (B, flow_dim, h, w)
        motion = self.lrelu(self.conv(torch.cat([cor, flo], dim=1)))  # (B, fc_dim, h, w)
        hidden = self.gru(torch.cat([motion, flow, feature], dim=1))  # (B, hidden_dim, h, w)
        delta_feature, delta_flow = self.feat_head(hidden), self.flow_head(hidden)
        if self.scale_factor is not None:
            delta_feature = resize(delta_feature, self.scale_factor)
            delta_flow = self.scale_factor * resize(delta_flow, self.scale_factor)
        return delta_feature, delta_flow
