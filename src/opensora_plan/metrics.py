"""Video quality metrics: PSNR and SSIM (frame-wise, plain torch), the Fréchet distance behind FVD
(numpy, float64) and the CLIP-score formula.

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

PSNR/SSIM inputs are tensors ``(T, C, H, W)`` or ``(B, T, C, H, W)`` of one dtype with values in
``[0, data_range]``. ``data_range`` defaults to the dtype's range: 255 for uint8, 65535 for uint16, 1.0 for
floating point; signed integer inputs need it given. Values outside ``[0, data_range]`` (beyond float
rounding, 1e-6 of the range) or NaN are refused: a uint8 pair scored with range 1, or a [-1, 1] pair, would
otherwise give a plausible-looking wrong number (-5.99 dB instead of 42.14 dB). The networks that produce FVD features (I3D) and CLIP embeddings live in
:mod:`opensora_plan.models.i3d` and :mod:`opensora_plan.models.clip`; the evaluation protocol is in
:mod:`opensora_plan.pipelines.evaluate_t2v` and docs/evaluation.md.
"""

from __future__ import annotations

import numpy as np
import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
PSNR_OF_IDENTICAL_FRAMES = 100.0  # reference scripts' value for MSE < 1e-10


# The value range each dtype stands for when no data_range is given (images are [0, 1] floats or 8/16-bit).
_DTYPE_RANGES = {torch.uint8: 255.0, torch.uint16: 65535.0}
_ROUNDING = 1e-6  # of the range: float frames computed as (x + 1) / 2 may land a rounding step outside [0, 1]


def _value_range(a: torch.Tensor, b: torch.Tensor, data_range: float | None, name: str) -> float:
    """The range ``L`` of the pair: ``data_range`` or the dtype's; ValueError for mixed dtypes, a signed
    integer dtype without ``data_range``, a non-positive range, or any value outside ``[0, L]`` (or NaN)."""
    if a.dtype != b.dtype:
        raise ValueError(f"{name}: both videos must have one dtype, got {a.dtype} and {b.dtype}; convert one "
                         "(e.g. uint8 frames to float with .float() / 255).")
    given = data_range is not None
    if not given:
        if a.dtype.is_floating_point:
            data_range = 1.0
        elif a.dtype in _DTYPE_RANGES:
            data_range = _DTYPE_RANGES[a.dtype]
        else:
            raise ValueError(f"{name}: {a.dtype} frames have no standard value range; pass data_range (e.g. 255).")
    data_range = float(data_range)
    if not data_range > 0:
        raise ValueError(f"{name}: data_range must be positive, got {data_range}.")
    slack = _ROUNDING * data_range if a.dtype.is_floating_point else 0.0
    for which, x in (("first", a), ("second", b)):
        if x.numel() == 0:
            continue
        x = x if x.dtype.is_floating_point or x.dtype == torch.uint8 else x.long()  # uint16 has no min() on CPU
        low, high = float(x.min()), float(x.max())
        if not (low >= -slack and high <= data_range + slack):  # NaN fails both comparisons
            if not a.dtype.is_floating_point and given:
                hint = f"; leave data_range out for {a.dtype} (its range is {_DTYPE_RANGES.get(a.dtype, 'unknown')})"
            elif low < 0:
                hint = "; [-1, 1] frames: pass (x + 1) / 2"
            elif high > 1 and data_range == 1.0:
                hint = "; 0-255 values in a float tensor: divide by 255 or pass data_range=255"
            else:
                hint = ""
            source = "given" if given else f"the {a.dtype} default"
            raise ValueError(f"{name}: the {which} video's values span [{low:.4g}, {high:.4g}], outside "
                             f"[0, {data_range:g}] (data_range {data_range:g}, {source}){hint}.")
    return data_range


def check_value_range(x: torch.Tensor, low: float, high: float, name: str) -> None:
    """ValueError naming ``name`` unless every value of ``x`` lies in ``[low, high]`` (up to float rounding,
    1e-6 of the span) and none is NaN: for metric networks that expect e.g. [-1, 1] frames (LPIPS, I3D)."""
    if x.numel() == 0:
        return
    slack = _ROUNDING * (high - low) if x.dtype.is_floating_point else 0.0
    found_low, found_high = float(x.min()), float(x.max())
    if not (found_low >= low - slack and found_high <= high + slack):
        hint = " (0-255 frames: pass x / 127.5 - 1)" if low == -1 and found_high > 1 else ""
        raise ValueError(f"{name} expects values in [{low:g}, {high:g}], got [{found_low:.4g}, {found_high:.4g}]{hint}.")


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


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per frame then averaged over frames and videos.

    ``data_range``: the peak value (None: from the dtype, 255 for uint8, 1.0 for floats); values outside
    ``[0, data_range]`` raise ValueError. ``reduction="none"`` returns the per-frame values, shape ``(T,)``
    or ``(B, T)`` like the input.
    """
    squeeze = a.ndim == 4
    a, b = _check_pair(a, b, "psnr")
    data_range = _value_range(a, b, data_range, "psnr")
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
    data_range: float | None = None,
    reduction: str = "mean",
    frames_per_chunk: int = 16,
) -> torch.Tensor:
    """Structural similarity (Gaussian 11x11, sigma 1.5), per frame then averaged over frames and videos.

    ``data_range`` as in :func:`psnr` (None: from the dtype; values outside ``[0, data_range]`` raise
    ValueError). Computed in float64, ``frames_per_chunk`` frames at a time to bound memory on long videos.
    ``reduction="none"`` returns the per-frame values, shape ``(T,)`` or ``(B, T)`` like the input.
    """
    squeeze = a.ndim == 4
    a, b = _check_pair(a, b, "ssim")
    data_range = _value_range(a, b, data_range, "ssim")
    batch, frames, channels, height, width = a.shape
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"ssim: frames must be at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {width}x{height}.")
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


# --------------------------------------------------------------------------------------------
# Fréchet distance (FVD, FID) and CLIP score
# --------------------------------------------------------------------------------------------


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and sample covariance ``(D, D)`` (divisor N - 1, as ``np.cov``) of ``(N, D)`` features.

    Returned in float64. Raises ValueError for fewer than 2 samples (no covariance) or a wrong shape.
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"Features must be a (N, D) array, got shape {features.shape}.")
    if features.shape[0] < 2:
        raise ValueError(f"A covariance needs at least 2 feature vectors, got {features.shape[0]}; evaluate more videos.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from rounding -> 0)."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): the FVD/FID formula.

    ``d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    Args: means as numpy arrays ``(D,)`` and covariances ``(D, D)`` (symmetric, positive
    semi-definite; torch tensors are accepted too). Computed in float64.

    The trace term is computed from eigen- and singular values instead of a general matrix square
    root: ``sigma1 sigma2`` is similar to ``M^T M`` with ``M = sigma2^(1/2) sigma1^(1/2)`` (symmetric
    PSD square roots from ``eigh``, rounding-negative eigenvalues clipped to 0), so
    ``tr((sigma1 sigma2)^(1/2))`` is the sum of M's singular values. This is the value
    ``scipy.linalg.sqrtm`` gives (StyleGAN-V's FVD, pytorch-fid) and TF-GAN's ``trace_sqrt_product``
    (the original FVD code) computes, but it stays real and accurate when the covariances are singular
    (fewer videos than feature dimensions), where ``sqrtm`` returns small imaginary parts and taking
    square roots of rounding-level eigenvalues would add errors of order sqrt(machine epsilon).

    Raises ValueError when the shapes do not agree or a value is not finite.
    """
    arrays = []
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"frechet_distance: {name} has non-finite values (NaN or inf).")
        arrays.append(value)
    mu1, sigma1, mu2, sigma2 = arrays
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance expects means (D,) and covariances (D, D) with one D, got {mu1.shape}, "
            f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}."
        )
    sigma1 = (sigma1 + sigma1.T) / 2  # symmetrise rounding noise
    sigma2 = (sigma2 + sigma2.T) / 2
    trace_sqrt_product = np.linalg.svd(_psd_sqrt(sigma2) @ _psd_sqrt(sigma1), compute_uv=False).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)
    return max(distance, 0.0)  # a squared distance; rounding can leave -1e-12 for equal statistics (printed '-0.00')


def frechet_distance_from_features(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two ``(N, D)`` feature sets (N >= 2 each)."""
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP score of paired embeddings: ``100 * max(cos(image, text), 0)`` per row, shape ``(N,)``.

    ``image_embeds`` ``(N, D)`` and ``text_embeds`` ``(N, D)`` or ``(1, D)`` (one text for every image):
    CLIP's projected features (``get_image_features`` / ``get_text_features``). Clamping each score
    at 0 is the CLIPScore paper's definition (Hessel et al. 2021, w = 1 as in torchmetrics);
    torchmetrics clamps the batch mean instead, which is the same whenever no cosine is negative.
    """
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"Expected image embeddings (N, D) and text embeddings (N or 1, D), got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}."
        )
    image_embeds = image_embeds.float()
    text_embeds = text_embeds.float()
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds.expand_as(image_embeds), dim=1, eps=1e-12)
    return (100 * cosine).clamp_min(0)
