"""Building blocks of the CausalVAE 4x8x8 (Open-Sora-Plan v1.0.0), spec sections 1.2-1.4.

Read top to bottom: the causal convolution, normalisation, the residual block, the four
resamplers, the (quirky) mid attention, then the Encoder and Decoder that stack them.
Tensors are video-shaped throughout: (B, C, T, H, W).

Module and attribute names follow the official state dict (``conv_in.conv.weight``,
``down.{l}.block.{j}.norm1``, ``mid.attn_1.q``, ``up.{l}.upsample.conv`` ...), so official
checkpoints load with strict keys.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Primitive layers
# --------------------------------------------------------------------------------------------


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value, value)


class CausalConv3d(nn.Module):
    """3-D convolution that is causal in time: the first frame is repeated ``k_t - 1`` times in front.

    Spatial zero padding ``padding`` is done by the wrapped ``nn.Conv3d`` (its temporal padding is
    forced to 0), so output frame i only sees input frames <= i. The Conv3d is the child ``conv``
    because the official keys end in ``.conv.weight`` / ``.conv.bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0):
        super().__init__()
        kernel_size = _triple(kernel_size)
        padding = (0,) + _triple(padding)[1:]
        self.time_pad = kernel_size[0] - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=_triple(stride), padding=padding)
        nn.init.zeros_(self.conv.bias)  # the reference zero-initialises conv biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if self.time_pad:
            # Replicate-first padding (spec 1.2): one concatenation of an expanded view, no per-channel copies.
            first = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat((first, x), dim=2)  # (B, C, T + k_t - 1, H, W)
        return self.conv(x)


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) applied to the 5-D tensor.

    Statistics pool over (channels in group x T x H x W), i.e. over *all frames*: part of the trained
    model (spec 8.2), and the reason the VAE is not strictly causal in time.
    """
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock3D(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> dropout -> conv3, plus a (1x1x1 ``nin_shortcut``) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, T, H, W)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class SpatialDownsample2x(nn.Module):
    """Zero-pad right/bottom by one pixel, then a (1,3,3) stride-(1,2,2) conv: H, W -> H/2, W/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        x = F.pad(x, (0, 1, 0, 1))  # asymmetric pad as in the reference (no left/top pad)
        return self.conv(x)  # (B, C, T, H/2, W/2)


class TimeDownsample2x(nn.Module):
    """Prepend two copies of frame 0, then average windows of 3 frames with stride 2: T -> (T-1)//2 + 1.

    No parameters. Frame 0 of the output is frame 0 of the input (average of three copies).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        first = x[:, :, :1].expand(-1, -1, 2, -1, -1)
        x = torch.cat((first, x), dim=2)  # (B, C, T + 2, H, W)
        # The reference's AvgPool3d((3,1,1), stride (2,1,1)) written as strided slices: same sum order
        # and division (bit-identical in fp32), and it also runs in bf16 on CPU, where avg_pool3d does not.
        return (x[:, :, 0:-2:2] + x[:, :, 1:-1:2] + x[:, :, 2::2]) / 3  # (B, C, (T-1)//2+1, H, W)


class SpatialUpsample2x(nn.Module):
    """Nearest-neighbour x2 in H and W (per frame), then a (1,3,3) conv with spatial padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (1, 3, 3), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        # Nearest (1,2,2) on the 5-D tensor copies the same values as the reference's per-frame 2-D resize.
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)  # (B, C, T, 2H, 2W)


class TimeUpsample2x(nn.Module):
    """Keep frame 0; resample frames 1..T-1 to twice as many (linear, half-pixel, edge-clamped).

    T -> 1 + 2(T-1); a single frame passes through unchanged. No parameters.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if x.shape[2] == 1:
            return x
        first, rest = x[:, :, :1], x[:, :, 1:]
        rest = F.interpolate(rest, scale_factor=(2, 1, 1), mode="trilinear", align_corners=False)
        return torch.cat((first, rest), dim=2)  # (B, C, 1 + 2(T-1), H, W)


class AttnBlock3D(nn.Module):
    """Single-head self-attention over H*W with 1x1x1 q/k/v/proj_out convs, residual.

    Reference quirk reproduced on purpose (spec 1.2 / 8.1, part of the trained weights): the
    (B, C, T, H, W) tensors are *reshaped* (not permuted) to (B*T, C, H*W), so for T > 1 each of the
    B*T attention items holds C consecutive rows of the channel-major (C, T) index, not one frame.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        normed = self.norm(x)

        def items(conv: CausalConv3d) -> torch.Tensor:
            # The reshape below is the quirk: (B, C, T, H, W) -> (B*T, C, H*W) without a permute.
            return conv(normed).reshape(b * t, c, h * w).transpose(1, 2)  # (B*T, H*W, C)

        # softmax(q k^T / sqrt(C)) v, with SDPA's default scale C^-1/2 = the reference's scale.
        out = F.scaled_dot_product_attention(items(self.q), items(self.k), items(self.v))  # (B*T, H*W, C)
        out = out.transpose(1, 2).reshape(b, c, t, h, w)  # straight reshape back, as the reference
        return x + self.proj_out(out)


# --------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------


class _BlockStack(nn.Module):
    """Runs residual/attention blocks, through activation checkpointing when the model enabled it
    (``CausalVAEModel.enable_gradient_checkpointing()``; diffusers sets the two attributes)."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h)
        return block(h)


class Encoder(_BlockStack):
    """(B, 3, T, H, W) pixels -> (B, 2*z, T', H', W') moments before ``quant_conv`` (spec 1.3).

    Level ``l`` has ``num_res_blocks`` ResnetBlock3D to ``hidden_size * hidden_size_mult[l]`` channels,
    then optionally SpatialDownsample2x (``down.{l}.downsample``) and TimeDownsample2x
    (``down.{l}.time_downsample``, no parameters).
    """

    def __init__(self, hidden_size: int, hidden_size_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, dropout: float,
                 spatial_downsample: Sequence[bool], temporal_downsample: Sequence[bool]):
        super().__init__()
        self.conv_in = CausalConv3d(3, hidden_size, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = hidden_size
        for level, mult in enumerate(hidden_size_mult):
            block_out = hidden_size * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock3D(block_in, block_out, dropout))
                block_in = block_out
            if spatial_downsample[level]:
                down.downsample = SpatialDownsample2x(block_in)
            if temporal_downsample[level]:
                down.time_downsample = TimeDownsample2x()
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock3D(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock3D(block_in)
        self.mid.block_2 = ResnetBlock3D(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = CausalConv3d(block_in, 2 * z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W)
        h = self.conv_in(x)  # (B, hidden, T, H, W)
        for down in self.down:
            for block in down.block:
                h = self._run(block, h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)  # (B, C, T, H/2, W/2)
            if hasattr(down, "time_downsample"):
                h = down.time_downsample(h)  # (B, C, (T-1)//2+1, H, W)
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = self._run(block, h)  # (B, C_top, t, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, t, h, w)


class Decoder(_BlockStack):
    """(B, z, t, h, w) latents (after ``post_quant_conv``) -> (B, 3, T, H, W) pixels (spec 1.4).

    Levels run from the last to the first; each has ``num_res_blocks + 1`` ResnetBlock3D, then
    optionally SpatialUpsample2x (``up.{l}.upsample``) and TimeUpsample2x (``up.{l}.time_upsample``).
    ``up.{l}`` is stored at the index of its level (the reference builds the list in reverse and
    inserts at the front), so ``up.{L-1}`` is applied first. No tanh/clamp at the output.
    """

    def __init__(self, hidden_size: int, hidden_size_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, dropout: float,
                 spatial_upsample: Sequence[bool], temporal_upsample: Sequence[bool]):
        super().__init__()
        block_in = hidden_size * hidden_size_mult[-1]
        self.conv_in = CausalConv3d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock3D(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock3D(block_in)
        self.mid.block_2 = ResnetBlock3D(block_in, block_in, dropout)
        ups = []
        for level in reversed(range(len(hidden_size_mult))):
            block_out = hidden_size * hidden_size_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock3D(block_in, block_out, dropout))
                block_in = block_out
            if spatial_upsample[level]:
                up.upsample = SpatialUpsample2x(block_in)
            if temporal_upsample[level]:
                up.time_upsample = TimeUpsample2x()
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = CausalConv3d(block_in, 3, 3, padding=1)

    def trunk(self, z: torch.Tensor) -> torch.Tensor:  # (B, z, t, h, w)
        """conv_in and the mid block (incl. the frame-mixing attention), at latent resolution."""
        h = self.conv_in(z)  # (B, C_top, t, h, w)
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = self._run(block, h)
        return h

    def up_path(self, h: torch.Tensor) -> torch.Tensor:  # (B, C_top, t, h, w)
        """The up levels and the output conv: where nearly all decode memory and compute go."""
        for up in reversed(self.up):
            for block in up.block:
                h = self._run(block, h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)  # (B, C, T, 2H, 2W)
            if hasattr(up, "time_upsample"):
                h = up.time_upsample(h)  # (B, C, 1 + 2(T-1), H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, T, H, W)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, z, t, h, w)
        return self.up_path(self.trunk(z))  # (B, 3, T, H, W)
