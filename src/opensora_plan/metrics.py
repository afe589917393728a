"""Frame-wise video quality metrics in plain torch: PSNR and SSIM.

Both follow the reference's evaluation scripts (the common video-quality metric code the
Open-Sora-Plan report used): each frame is scored on its own and the scores are averaged over frames
(and over videos in a batch).

* PSNR per frame = ``10 log10(data_range^2 / MSE)``; identical frames (MSE < 1e-10) score 100 dB, as
  in the reference scripts, so averages stay finite.
* SSIM per frame is the standard Wang et al. (2004) index: 11x11 Gaussian window with sigma 1.5,
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, population (not sample) variances, evaluated only where the
  window fits inside the frame ("valid" region), computed per colour channel and averaged. This equals
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=L, channel_axis=...)``.

Inputs are float tensors ``(T, C, H, W)`` or ``(B, T, C, H, W)`` with values in ``[0, data_range]``.
"""

from __future__ import annotations

import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
PSNR_OF_IDENTICAL_FRAMES = 100.0  # reference scripts' value for MSE < 1e-10


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"{name}: both videos must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.ndim not in (4, 5):
        raise ValueError(f"{name}: expected (T, C, H, W) or (B, T, C, H, W) frames, got shape {tuple(a.shape)}.")
    if a.ndim == 4:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    return a, b  # (B, T, C, H, W)


def _reduce(per_frame: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_frame.mean()
    if reduction == "none":
        return per_frame
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per frame then averaged over frames and videos.

    ``reduction="none"`` returns the per-frame values, shape ``(T,)`` or ``(B, T)`` like the input.
    """
    squeeze = a.ndim == 4
    a, b = _check_pair(a, b, "psnr")
    mse = (a.double() - b.double()).pow(2).flatten(2).mean(dim=2)  # (B, T)
    values = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-30))
    values = torch.where(mse < 1e-10, torch.full_like(values, PSNR_OF_IDENTICAL_FRAMES), values)
    return _reduce(values[0] if squeeze else values, reduction)


def _gaussian_window() -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()  # (11,)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    reduction: str = "mean",
    frames_per_chunk: int = 16,
) -> torch.Tensor:
    """Structural similarity (Gaussian 11x11, sigma 1.5), per frame then averaged over frames and videos.

    Computed in float64, ``frames_per_chunk`` frames at a time to bound memory on long videos.
    ``reduction="none"`` returns the per-frame values, shape ``(T,)`` or ``(B, T)`` like the input.
    """
    squeeze = a.ndim == 4
    a, b = _check_pair(a, b, "ssim")
    batch, frames, channels, height, width = a.shape
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"ssim: frames must be at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}.")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    weights = _gaussian_window().tolist()
    out_h, out_w = height - SSIM_WINDOW + 1, width - SSIM_WINDOW + 1

    def blur(x: torch.Tensor) -> torch.Tensor:  # (N, H, W) -> (N, H-10, W-10)
        # Separable Gaussian filter over the "valid" region (no padding, like the reference crop),
        # as 11 shifted multiply-adds per axis: exact float64 arithmetic and far faster on CPU than
        # a float64 conv2d (which has no optimised kernel there).
        rows = x[:, :out_h] * weights[0]
        for k in range(1, SSIM_WINDOW):
            rows.add_(x[:, k : k + out_h], alpha=weights[k])
        out = rows[:, :, :out_w] * weights[0]
        for k in range(1, SSIM_WINDOW):
            out.add_(rows[:, :, k : k + out_w], alpha=weights[k])
        return out

    x = a.reshape(batch * frames * channels, height, width)
    y = b.reshape(batch * frames * channels, height, width)
    chunk = max(1, frames_per_chunk) * channels
    per_plane = []
    for start in range(0, x.shape[0], chunk):
        xs, ys = x[start : start + chunk].double(), y[start : start + chunk].double()
        mu_x, mu_y = blur(xs), blur(ys)
        var_x = blur(xs * xs) - mu_x**2
        var_y = blur(ys * ys) - mu_y**2
        cov_xy = blur(xs * ys) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        per_plane.append(ssim_map.flatten(1).mean(dim=1))
    values = torch.cat(per_plane).view(batch, frames, channels).mean(dim=2)  # (B, T)
    return _reduce(values[0] if squeeze else values, reduction)
