"""PSNR / SSIM: hand-computed values, the reference conventions, and agreement with scikit-image."""

from __future__ import annotations

import math

import pytest
import torch

from opensora_plan.metrics import psnr, ssim


def noisy_pair(shape, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def test_psnr_of_a_known_mse():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full_like(a, 0.1)  # MSE = 0.01 -> 20 dB at data range 1
    assert psnr(a, b).item() == pytest.approx(20.0)
    assert psnr(a * 255, b * 255, data_range=255).item() == pytest.approx(20.0)


def test_psnr_averages_per_frame_values_not_the_pooled_mse():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.1  # frame 0: 20 dB
    b[1] += 0.01  # frame 1: 40 dB
    assert psnr(a, b, reduction="none").tolist() == pytest.approx([20.0, 40.0])
    assert psnr(a, b).item() == pytest.approx(30.0)  # pooled MSE would give ~23.0 dB
    assert 10 * math.log10(1 / ((0.01 + 0.0001) / 2)) == pytest.approx(22.967, abs=1e-3)


def test_identical_frames_score_100_db_and_ssim_one():
    a, _ = noisy_pair((3, 3, 16, 16))
    assert psnr(a, a).item() == 100.0
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)


def test_batched_input_averages_over_videos_and_frames():
    a, b = noisy_pair((2, 3, 3, 24, 24))
    per_frame = ssim(a, b, reduction="none")
    assert per_frame.shape == (2, 3)
    assert ssim(a, b).item() == pytest.approx(per_frame.mean().item())
    assert ssim(a[1], b[1]).item() == pytest.approx(per_frame[1].mean().item())
    assert psnr(a, b, reduction="none").shape == (2, 3)


def test_ssim_falls_with_noise_and_chunking_does_not_change_it():
    a, slightly = noisy_pair((5, 3, 32, 32), noise=0.02)
    _, very = noisy_pair((5, 3, 32, 32), noise=0.3)
    assert 1.0 > ssim(a, slightly).item() > ssim(a, very).item() > 0.0
    assert ssim(a, very, frames_per_chunk=2).item() == pytest.approx(ssim(a, very).item(), abs=1e-12)


def test_ssim_of_a_constant_shift_matches_the_formula():
    # Flat frames: variances and covariance are 0, so SSIM = luminance term only.
    x, y = 0.5, 0.6
    c1 = 0.01**2
    expected = (2 * x * y + c1) / (x**2 + y**2 + c1)
    a = torch.full((1, 1, 20, 20), x, dtype=torch.float64)
    assert ssim(a, torch.full_like(a, y)).item() == pytest.approx(expected, rel=1e-9)


def test_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = noisy_pair((4, 3, 40, 50))
    expected_ssim = sum(
        metrics.structural_similarity(
            a[t].numpy(), b[t].numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, channel_axis=0,
        )
        for t in range(len(a))
    ) / len(a)
    expected_psnr = sum(metrics.peak_signal_noise_ratio(a[t].numpy(), b[t].numpy(), data_range=1.0) for t in range(len(a))) / len(a)
    assert ssim(a, b).item() == pytest.approx(expected_ssim, abs=1e-9)
    assert psnr(a, b).item() == pytest.approx(expected_psnr, abs=1e-9)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\(T, C, H, W\)"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def _uint8_pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    noise = torch.randint(-3, 4, a.shape, generator=g)
    return a, (a.int() + noise).clamp(0, 255).to(torch.uint8)


def test_uint8_frames_take_their_range_from_the_dtype():
    a, b = _uint8_pair()
    as_float = psnr(a.double() / 255, b.double() / 255).item()
    assert psnr(a, b).item() == pytest.approx(as_float, abs=1e-6)  # 42.14 dB, not -5.99 dB at range 1
    assert psnr(a, b).item() > 40
    assert ssim(a, b).item() == pytest.approx(ssim(a.double() / 255, b.double() / 255).item(), abs=1e-9)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_values_outside_the_range_are_refused(metric):
    a, b = _uint8_pair()
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*leave data_range out"):
        metric(a, b, data_range=1.0)  # the example: uint8 frames scored at range 1
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*\(x \+ 1\) / 2"):
        metric(a.float() / 127.5 - 1, b.float() / 127.5 - 1)  # [-1, 1] frames
    with pytest.raises(ValueError, match="divide by 255"):
        metric(a.float(), b.float())  # 0-255 values in a float tensor
    with pytest.raises(ValueError, match="one dtype"):
        metric(a, b.float() / 255)
    with pytest.raises(ValueError, match="no standard value range"):
        metric(a.to(torch.int16), b.to(torch.int16))
    nan = (a.float() / 255).clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="outside"):
        metric(nan, b.float() / 255)
    assert metric(a.float(), b.float(), data_range=255).item() == pytest.approx(metric(a, b).item(), abs=1e-9)


def test_the_metric_networks_refuse_frames_outside_minus_one_one():
    """Found with kind 4: LPIPS (eval-vae) and the I3D behind FVD take [-1, 1] frames; 0-255 frames gave other
    numbers silently ([0, 1] frames lie inside [-1, 1], so no range check can tell them)."""
    from opensora_plan.models.i3d import check_i3d_input
    from opensora_plan.pipelines.evaluate_vae import lpips_video

    video = torch.rand(1, 3, 9, 224, 224) * 255
    with pytest.raises(ValueError, match=r"I3D \(FVD\) expects values in \[-1, 1\].*x / 127.5 - 1"):
        check_i3d_input(video)
    check_i3d_input(video / 127.5 - 1)
    clip = torch.rand(3, 2, 16, 16) * 255
    with pytest.raises(ValueError, match=r"lpips_video: the video expects values in \[-1, 1\].*x / 127.5 - 1"):
        lpips_video(torch.nn.Identity(), clip, clip)
