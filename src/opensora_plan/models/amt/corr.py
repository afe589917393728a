"""All-pairs correlation pyramid between two 1/8 feature maps, and its windowed lookup.

The memory-hungry part of AMT: each direction holds (h*w)^2 correlations at 1/8 resolution (plus ~1/3
for the coarser levels), 128 MiB for a 512x512 pair and 8 GiB at 1080p. :class:`BidirCorrelation`
either builds the whole pyramid once (``chunk_size=None``, the reference computation) or, with
``chunk_size=n``, recomputes the correlation rows of n source pixels at a time inside every lookup.
Each row of the volume (one source pixel against all target pixels) is pooled and sampled on its own,
so the chunked result is the same computation split up; only the matrix products run as smaller blocks
(differences at float32 rounding level, ~1e-7). Peak memory becomes n*h*w per direction instead of
(h*w)^2.

Window channel order (part of the trained weights, from RAFT): for a lookup radius r the
(2r+1)^2 samples of one level are ordered x-offset-major, index = (dx + r) * (2r+1) + (dy + r);
levels are concatenated level-major, the forward volume before the transposed one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def coords_grid(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Pixel coordinates (B, 2, H, W): channel 0 = x, channel 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([xs, ys], 0).float()[None].repeat(batch, 1, 1, 1)


def window_offsets(radius: int, device: torch.device) -> torch.Tensor:
    """(2r+1, 2r+1, 2) offsets added to (x, y) centres; [i, j] = (i - r, j - r), i.e. x varies along the first
    axis. That puts the x offset outer in the flattened window (RAFT's meshgrid order, which the weights expect)."""
    d = torch.linspace(-radius, radius, 2 * radius + 1, device=device)
    di, dj = torch.meshgrid(d, d, indexing="ij")
    return torch.stack([di, dj], -1)


def correlation_rows(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(D, n) source features against (D, h, w) target features -> (n, 1, h, w) scaled dot products."""
    dim, h, w = target.shape
    corr = torch.matmul(source.transpose(0, 1), target.reshape(dim, h * w))  # (n, h*w)
    return (corr / torch.sqrt(torch.tensor(dim).float())).view(-1, 1, h, w)


def pool_pyramid(rows: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """(n, 1, h, w) correlation rows -> num_levels volumes, each 2x2-average-pooled over the target pixels."""
    pyramid = [rows]
    for _ in range(num_levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
    return pyramid


def lookup(pyramid: list[torch.Tensor], centres: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear samples of a (2r+1)^2 window around each row's centre on every level.

    pyramid: volumes (n, 1, h_l, w_l); centres: (n, 2) (x, y) in level-0 target pixels -> (n, L*(2r+1)^2).
    Zero padding outside the volume; coordinates normalised by (side - 1) (align_corners=True).
    """
    offsets = window_offsets(radius, centres.device).view(1, 2 * radius + 1, 2 * radius + 1, 2)
    samples = []
    for level, volume in enumerate(pyramid):
        h, w = volume.shape[-2:]
        coords = centres.view(-1, 1, 1, 2) / 2**level + offsets  # (n, 2r+1, 2r+1, 2)
        x, y = coords.split([1, 1], dim=-1)
        grid = torch.cat([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)
        samples.append(F.grid_sample(volume, grid, align_corners=True).view(volume.shape[0], -1))
    return torch.cat(samples, dim=-1)


class BidirCorrelation:
    """Correlation of frame-0 features with frame-1 features, looked up in both directions.

    ``fmap0``, ``fmap1``: (B, D, h, w). Calling it with ``coords0`` (where each frame-0 pixel looks in
    frame 1) and ``coords1`` (where each frame-1 pixel looks in frame 0), both (B, 2, h, w), returns
    (B, 2 * num_levels * (2r+1)^2, h, w): the forward samples, then the transposed ones.
    """

    def __init__(self, fmap0: torch.Tensor, fmap1: torch.Tensor, num_levels: int, radius: int,
                 chunk_size: int | None = None):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Correlation chunk_size must be >= 1 source pixels (or None for no chunking), got "
                             f"{chunk_size}.")
        self.fmap0, self.fmap1 = fmap0, fmap1
        self.num_levels, self.radius, self.chunk_size = num_levels, radius, chunk_size
        b, dim, h, w = fmap0.shape
        self.pyramids = None
        if chunk_size is None or chunk_size >= h * w:
            # The whole volume once; the transposed volume is the same numbers, permuted (no second product).
            # flatten(2) is a view in both memory layouts (channels-first and channels-last).
            corr = torch.matmul(fmap0.flatten(2).transpose(1, 2), fmap1.flatten(2))
            corr = corr / torch.sqrt(torch.tensor(dim).float())  # (B, h*w [frame 0], h*w [frame 1])
            forward = corr.reshape(b * h * w, 1, h, w)
            backward = corr.transpose(1, 2).reshape(b * h * w, 1, h, w)
            self.pyramids = (pool_pyramid(forward, num_levels), pool_pyramid(backward, num_levels))

    def __call__(self, coords0: torch.Tensor, coords1: torch.Tensor) -> torch.Tensor:
        b, _, h, w = coords0.shape
        centres0 = coords0.permute(0, 2, 3, 1).reshape(b * h * w, 2)
        centres1 = coords1.permute(0, 2, 3, 1).reshape(b * h * w, 2)
        if self.pyramids is not None:
            out0 = lookup(self.pyramids[0], centres0, self.radius)  # (B*h*w, L*(2r+1)^2)
            out1 = lookup(self.pyramids[1], centres1, self.radius)
        else:
            out0 = self._chunked(self.fmap0, self.fmap1, centres0)
            out1 = self._chunked(self.fmap1, self.fmap0, centres1)
        out = torch.cat([out0.view(b, h, w, -1), out1.view(b, h, w, -1)], dim=-1)
        return out.permute(0, 3, 1, 2).float()  # (B, 2*L*(2r+1)^2, h, w), channels-last in memory

    def _chunked(self, source: torch.Tensor, target: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        b, dim, h, w = source.shape
        out = []
        for i in range(b):
            flat = source[i].reshape(dim, h * w)
            for start in range(0, h * w, self.chunk_size):
                stop = min(start + self.chunk_size, h * w)
                rows = correlation_rows(flat[:, start:stop], target[i])  # (n, 1, h, w)
                pyramid = pool_pyramid(rows, self.num_levels)
                out.append(lookup(pyramid, centres[i * h * w + start:i * h * w + stop], self.radius))
        return torch.cat(out, 0)  # (B*h*w, L*(2r+1)^2)
