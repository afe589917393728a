"""Lossless low-memory CausalVAE decoding: the up path streamed over frame chunks (not in the reference).

A full decode holds several activations of the whole video at full resolution. This module computes
the *same* output (up to float rounding) while the compute device only ever holds a few frames of one
stage. Three things make a stage streamable without changing its result:

* **Causal convolutions** see frames ``i - k_t + 1 .. i`` (replicate-first padding in front). Each
  chunk is convolved after the last ``k_t - 1`` input frames of the previous chunk (the *carry*); the
  first chunk gets the replicated first frame, exactly as ``CausalConv3d`` pads.
* **GroupNorm** pools its statistics over *all* frames (spec 8.2). Each norm's per-(sample, group)
  mean and variance are accumulated over the chunks of its input in a first pass (chunk means and
  sums of squared deviations merged with Chan's formula in float64, so no ``E[x^2] - E[x]^2``
  cancellation), and the chunks are normalised with them in a second pass.
* **TimeUpsample2x** interpolates frames 1.. linearly: an output frame needs the input frames
  before and after it, so each chunk is interpolated with one frame of context on both sides and
  the last frame waits for the next chunk.

The decoder trunk (``conv_in`` and the mid block) runs on all frames at once, at latent resolution:
the mid ``AttnBlock3D`` reshapes (B, C, T, H, W) to (B*T, C, H*W) without permuting (reference
quirk, spec 8.1), so every attention item mixes frames and cannot be chunked; at latent resolution
it is a small fraction of the decode (512 values per latent voxel against 32768 for one level-0
activation of the release config).

Trade-off (time vs memory). A norm's statistics need its whole input before its output can be
formed, so something the size of a whole activation has to exist between stages. Here a *stage* is
one ResnetBlock3D (two norms), a time upsampling, or the output head, and each stage's output is kept
as a list of frame chunks on ``offload_device`` (host memory by default), freed chunk by chunk as the
next stage consumes it. Per ResnetBlock3D: pass 1 streams the block input through norm1 -> conv1 to
collect norm2's statistics; pass 2 recomputes conv1 (instead of storing its output: one extra conv
per block, about +45 % compute, and one stored activation instead of two) and writes the block
output. A spatial-only upsampling (level 1 of the release config, whose output is the largest tensor
of the decode) is not stored at all: it is recomputed from its small input in each of the three
passes of the next block. The alternative without any stored activation, recomputing everything from
the trunk for every norm, is about 9x the compute of a full decode (25 norms on the up path).
So the compute device holds ``O(chunk)`` and the offload device at most one activation of the
largest stage; with ``offload_device`` equal to the compute device (e.g. on CPU) peak memory still
drops from several activations to about one.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .modules import CausalConv3d, Decoder, ResnetBlock3D

# --------------------------------------------------------------------------------------------
# Exact GroupNorm statistics accumulated over chunks
# --------------------------------------------------------------------------------------------


class GroupStats:
    """Per-(sample, group) mean and variance of a tensor seen chunk by chunk along time.

    Each chunk contributes its own mean and sum of squared deviations (fp32, two-pass inside
    ``torch.var_mean``); chunks are merged in float64 with Chan et al.'s parallel formula, so the
    result equals the statistics over the whole tensor up to rounding. Only (B, groups) values are
    kept.
    """

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean: torch.Tensor | None = None  # (B, G) float64
        self.m2: torch.Tensor | None = None  # (B, G) float64, sum of squared deviations

    def add(self, x: torch.Tensor) -> None:  # (B, C, f, H, W)
        b = x.shape[0]
        items = x.reshape(b, self.groups, -1)
        var, mean = torch.var_mean(items.float(), dim=2, correction=0)  # (B, G) each
        n = items.shape[2]
        mean, m2 = mean.double(), var.double() * n
        if self.count == 0:
            self.mean, self.m2 = mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count += n

    def affine(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (scale, shift), each (B, C, 1, 1, 1), with ``norm(x) == x * scale + shift`` over the
        whole tensor (the form PyTorch's GroupNorm kernels evaluate)."""
        if norm.num_groups != self.groups:
            raise ValueError(f"statistics were taken over {self.groups} groups, the norm has {norm.num_groups}")
        rstd = torch.rsqrt(self.m2 / self.count + norm.eps)  # (B, G)
        per_group = norm.num_channels // self.groups
        mean = self.mean.repeat_interleave(per_group, dim=1)  # (B, C)
        rstd = rstd.repeat_interleave(per_group, dim=1)
        scale = rstd * norm.weight.double() if norm.affine else rstd
        shift = -mean * scale + norm.bias.double() if norm.affine else -mean * scale
        shape = (*scale.shape, 1, 1, 1)
        return scale.float().view(shape), shift.float().view(shape)


def _norm_silu(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """SiLU(GroupNorm(x)) for one chunk, with statistics of the whole tensor. Same dtype as x."""
    scale, shift = affine
    y = torch.addcmul(shift, x, scale)  # fp32 (type promotion: no fp32 copy of x), like GroupNorm's math for bf16
    return F.silu(y, inplace=not torch.is_grad_enabled()).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Causal convolution with carry-over
# --------------------------------------------------------------------------------------------


class _CarriedConv:
    """A CausalConv3d applied to successive chunks; keeps the last ``k_t - 1`` input frames.

    The padded window (carry + chunk) is written into one buffer reused by every chunk of the same shape
    instead of a fresh ``torch.cat`` per chunk: allocating and faulting in a chunk-sized tensor per conv
    was a large share of the lossless decode's system time."""

    def __init__(self, conv: CausalConv3d):
        self.conv = conv
        self.carry: torch.Tensor | None = None
        self.window: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, f, H, W) -> (B, C', f, H', W')
        pad = self.conv.time_pad
        if not pad:
            return self.conv.conv(x)
        if self.carry is None:  # first chunk: the replicate-first padding of CausalConv3d
            self.carry = x[:, :, :1].expand(-1, -1, pad, -1, -1)
        shape = (*x.shape[:2], pad + x.shape[2], *x.shape[3:])
        if self.window is None or self.window.shape != shape or self.window.dtype != x.dtype or torch.is_grad_enabled():
            self.window = x.new_empty(shape)  # (B, C, pad + f, H, W)
        self.window[:, :, :pad] = self.carry
        self.window[:, :, pad:] = x
        self.carry = self.window[:, :, -pad:].clone()  # clone: the window is overwritten by the next chunk
        return self.conv.conv(self.window)


# --------------------------------------------------------------------------------------------
# Chunk stores and sources
# --------------------------------------------------------------------------------------------


class _Store:
    """A stage output: frame chunks on ``device`` in time order, plus the GroupNorm statistics of the
    chunks or, when ``stats_of`` is given, of ``stats_of(chunk)`` (the next stage's recomputed
    input: measured while the chunk is at hand instead of in an extra pass)."""

    def __init__(self, device: torch.device, groups: int, stats_of: Callable | None = None):
        self.device, self.stats_of = device, stats_of
        self.chunks: list[torch.Tensor | None] = []
        self.stats = GroupStats(groups)

    def append(self, x: torch.Tensor) -> None:
        self.stats.add(self.stats_of(x) if self.stats_of else x)
        if x.device != self.device:
            x = x.to(self.device)
        elif x._base is not None:  # a slice of a larger temporary: keep only its own frames
            x = x.clone()
        self.chunks.append(x)

    def frames(self) -> int:
        return sum(c.shape[2] for c in self.chunks if c is not None)


class _Source:
    """Chunks of a store as the compute device sees them, optionally through a per-frame transform
    (a spatial upsampling that is recomputed rather than stored)."""

    def __init__(self, store: _Store, device: torch.device, transform: Callable | None = None):
        self.store, self.device, self.transform = store, device, transform
        self._stats: GroupStats | None = store.stats if store.stats_of is transform else None

    def chunks(self, consume: bool = False) -> Iterator[torch.Tensor]:
        for i in range(len(self.store.chunks)):
            x = self.store.chunks[i].to(self.device, non_blocking=True)
            if consume:
                self.store.chunks[i] = None
            yield self.transform(x) if self.transform else x

    def stats(self) -> GroupStats:
        if self._stats is None:  # a transformed source: one extra pass to measure it
            self._stats = GroupStats(self.store.stats.groups)
            for x in self.chunks():
                self._stats.add(x)
        return self._stats


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def _resnet_stage(block: ResnetBlock3D, src: _Source, out: _Store) -> _Store:
    """ResnetBlock3D over a chunked input: pass 1 collects norm2's statistics, pass 2 writes ``out``."""
    affine1 = src.stats().affine(block.norm1)
    stats2 = GroupStats(out.stats.groups)
    conv1 = _CarriedConv(block.conv1)
    for x in src.chunks():
        stats2.add(conv1(_norm_silu(x, affine1)))
    affine2 = stats2.affine(block.norm2)
    conv1, conv2 = _CarriedConv(block.conv1), _CarriedConv(block.conv2)
    for x in src.chunks(consume=True):
        h = conv2(block.dropout(_norm_silu(conv1(_norm_silu(x, affine1)), affine2)))
        skip = block.nin_shortcut.conv(x) if hasattr(block, "nin_shortcut") else x  # 1x1x1: no carry
        # h is this pass's fresh tensor: without autograd, add in place (h + skip == skip + h exactly)
        out.append(skip + h if torch.is_grad_enabled() else h.add_(skip))
    return out


class _Rechunker:
    """Writes pieces of any length to a store in chunks of exactly ``frames`` frames (the last one may
    be shorter), so that a stage that delays frames does not let the chunks drift and grow."""

    def __init__(self, store: _Store, frames: int):
        self.store, self.frames = store, frames
        self.pieces: list[torch.Tensor] = []
        self.count = 0

    def push(self, x: torch.Tensor) -> None:
        self.pieces.append(x)
        self.count += x.shape[2]
        while self.count >= self.frames:
            joined = torch.cat(self.pieces, dim=2) if len(self.pieces) > 1 else self.pieces[0]
            self.store.append(joined[:, :, :self.frames])
            rest = joined[:, :, self.frames:]
            self.pieces, self.count = ([rest.clone()] if rest.shape[2] else []), rest.shape[2]

    def flush(self) -> _Store:
        if self.pieces:
            self.store.append(torch.cat(self.pieces, dim=2) if len(self.pieces) > 1 else self.pieces[0])
            self.pieces, self.count = [], 0
        return self.store


def _time_upsample_stage(src: _Source, out: _Store, frames_per_chunk: int) -> _Store:
    """TimeUpsample2x over chunks: frame 0 kept, frames 1.. linearly doubled with one frame of context
    on each side (the same ``F.interpolate`` call on a window gives the full call's values). The
    output is re-chunked to ``frames_per_chunk`` frames: the one-frame delay would otherwise move
    frames into the last chunk at every time upsampling."""
    writer = _Rechunker(out, frames_per_chunk)
    left: torch.Tensor | None = None  # last frame already emitted (left context)
    pending: torch.Tensor | None = None  # last frame received, waiting for its right neighbour
    chunks = src.chunks(consume=True)
    x = next(chunks)
    head: torch.Tensor | None = x[:, :, :1]  # frame 0 passes through; emitted with the first frames after it
    x = x[:, :, 1:]
    while x is not None:
        following = next(chunks, None)
        last = following is None
        avail = x if pending is None else torch.cat((pending, x), dim=2)
        if avail.shape[2]:
            window = avail if left is None else torch.cat((left, avail), dim=2)
            up = F.interpolate(window, scale_factor=(2, 1, 1), mode="trilinear", align_corners=False)
            lo = 0 if left is None else 2
            hi = up.shape[2] if last else up.shape[2] - 2
            if hi > lo:
                piece = up[:, :, lo:hi]
                if head is not None:
                    writer.push(head)
                    head = None
                writer.push(piece)
            if not last:
                if avail.shape[2] >= 2:
                    left = avail[:, :, -2:-1].clone()
                pending = avail[:, :, -1:].clone()
        x = following
    if head is not None:  # a single frame: nothing to interpolate
        writer.push(head)
    return writer.flush()


def _output_stage(norm: nn.GroupNorm, conv: CausalConv3d, src: _Source, frames: int) -> torch.Tensor:
    """norm_out -> SiLU -> conv_out, written into one preallocated (B, 3, T, H, W) tensor."""
    affine = src.stats().affine(norm)
    carried = _CarriedConv(conv)
    result, start = None, 0
    for x in src.chunks(consume=True):
        y = carried(_norm_silu(x, affine))
        if result is None:
            result = y.new_empty((y.shape[0], y.shape[1], frames, *y.shape[3:]))
        result[:, :, start:start + y.shape[2]] = y
        start += y.shape[2]
    return result


# --------------------------------------------------------------------------------------------
# The streamed up path
# --------------------------------------------------------------------------------------------


def stream_up_path(decoder: Decoder, h: torch.Tensor, chunk_latent_frames: int,
                   offload_device: torch.device | str | None = "cpu") -> torch.Tensor:
    """``decoder.up_path(h)`` computed over chunks of ``chunk_latent_frames`` latent frames.

    Args:
        decoder: the CausalVAE ``Decoder`` (its mode — eval for inference — is respected).
        h: trunk output (B, C_top, t, h, w) on the compute device.
        chunk_latent_frames: latent frames per chunk (>= 1); each stage's chunk covers the same
            latent frames (e.g. 4 latent frames = 13..16 pixel frames at the last level).
        offload_device: where stage outputs wait between stages (default ``"cpu"``); ``None`` keeps
            them on the compute device.

    Returns:
        (B, 3, 1 + 4(t-1), 8h, 8w) for the release config, on the compute device, equal to
        ``decoder.up_path(h)`` up to float rounding.
    """
    if chunk_latent_frames < 1:
        raise ValueError(f"chunk_latent_frames must be >= 1, got {chunk_latent_frames}.")
    device = h.device
    offload = torch.device(offload_device) if offload_device is not None else device
    groups = decoder.norm_out.num_groups
    store = _Store(offload, groups)
    for start in range(0, h.shape[2], chunk_latent_frames):
        store.append(h[:, :, start:start + chunk_latent_frames])
    src = _Source(store, device)
    frames_per_chunk = chunk_latent_frames  # at the current stage's frame rate
    for up in reversed(decoder.up):
        # A spatial-only upsampling is recomputed by the next block; its statistics are measured
        # while the last block of this level writes its output.
        spatial_only = up.upsample if hasattr(up, "upsample") and not hasattr(up, "time_upsample") else None
        for j, block in enumerate(up.block):
            stats_of = spatial_only if j == len(up.block) - 1 else None
            src = _Source(_resnet_stage(block, src, _Store(offload, groups, stats_of)), device)
        if hasattr(up, "time_upsample"):
            if hasattr(up, "upsample"):
                src = _Source(src.store, device, transform=up.upsample)
            frames_per_chunk *= 2
            src = _Source(_time_upsample_stage(src, _Store(offload, groups), frames_per_chunk), device)
        elif hasattr(up, "upsample"):
            src = _Source(src.store, device, transform=up.upsample)  # recomputed in the next block's passes
    frames = src.store.frames()
    return _output_stage(decoder.norm_out, decoder.conv_out, src, frames)
