"""CausalVAE training loss (spec 1.8): each term checked by hand on tiny tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from opensora_plan.models.causalvae.discriminator import NLayerDiscriminator
from opensora_plan.models.causalvae.losses import LPIPSWithDiscriminator, hinge_d_loss, kl_divergence
from opensora_plan.models.lpips import LPIPS, random_lpips

B, C, T, H, W = 1, 3, 2, 32, 32


def _videos(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, T, H, W, generator=generator) * 2 - 1
    x_hat = x + 0.2 * torch.randn(x.shape, generator=generator)
    return x, x_hat


def _posterior(seed=1):
    generator = torch.Generator().manual_seed(seed)
    moments = torch.randn(2, 8, 1, 2, 2, generator=generator)  # (B=2, 2*z, t, h, w)
    return DiagonalGaussianDistribution(moments)


class ToyDecoder(nn.Module):
    """x_hat = conv(features): its weight plays the 'last decoder layer' of the adaptive weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Parameter(torch.randn(B * T, 4, H, W))
        self.conv_out = nn.Conv2d(4, C, 3, padding=1)

    def forward(self):
        y = self.conv_out(self.features)  # (B*T, C, H, W)
        return y.view(B, T, C, H, W).permute(0, 2, 1, 3, 4)


def test_state_dict_keys_match_official_loss_module(manifests_dir):
    manifest = json.loads((manifests_dir / "CausalVAE_4x8x8.json").read_text())["loss_state_dict"]
    with torch.device("meta"):
        loss = LPIPSWithDiscriminator(perceptual=LPIPS())
    got = {f"loss.{k}": list(v.shape) for k, v in loss.state_dict().items()}
    assert got == manifest


def test_discriminator_init_and_shape():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.bias is None for m in convs] == [False, True, True, True, False]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 1e-3
    scales = torch.cat([m.weight for m in norms])
    assert abs(scales.mean().item() - 1.0) < 0.01 and all(torch.all(m.bias == 0) for m in norms)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_nll_and_kl_by_hand_without_perceptual_term():
    x, x_hat = _videos()
    posterior = _posterior()
    loss_fn = LPIPSWithDiscriminator(perceptual=None, perceptual_weight=0.0, disc_start=10, disc_ndf=8)
    with torch.no_grad():
        loss_fn.logvar.fill_(0.3)
    loss, stats = loss_fn.generator_loss(x, x_hat, posterior, step=0, last_layer=None)
    # nll: per element |x - x_hat| / e^logvar + logvar, summed, divided by the B*T folded frames.
    nll = ((x - x_hat).abs() / math.exp(0.3) + 0.3).sum() / (B * T)
    mean, var = posterior.mean, posterior.var
    kl = 0.5 * (mean**2 + var - 1 - torch.log(var)).sum() / mean.shape[0]
    assert stats["nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert stats["kl_loss"] == pytest.approx(kl.item(), rel=1e-5)
    assert stats["rec_loss"] == pytest.approx((x - x_hat).abs().mean().item(), rel=1e-5)
    # before disc_start the adversarial term is off
    assert stats["disc_factor"] == 0.0 and stats["d_weight"] == 0.0
    torch.testing.assert_close(loss, nll + 1e-6 * kl)


def test_l2_reconstruction_term_and_unknown_name():
    x, x_hat = _videos()
    loss_fn = LPIPSWithDiscriminator(perceptual=None, perceptual_weight=0.0, disc_ndf=8, rec_loss="l2")
    _, stats = loss_fn.generator_loss(x, x_hat, _posterior(), step=0, last_layer=None)
    assert stats["nll_loss"] == pytest.approx(((x - x_hat) ** 2).sum().item() / (B * T), rel=1e-5)  # logvar 0
    assert stats["rec_loss"] == pytest.approx(((x - x_hat) ** 2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="rec_loss 'l3' is not supported"):
        LPIPSWithDiscriminator(perceptual=None, perceptual_weight=0.0, rec_loss="l3")


def test_kl_matches_diffusers_kl_reduction():
    posterior = _posterior()
    # diffusers sums over dims 1-3 of a 5-D latent (leaving W); summing that and dividing by B is the same.
    assert kl_divergence(posterior).item() == pytest.approx(posterior.kl().sum().item() / 2, rel=1e-6)


def test_lpips_term_is_broadcast_to_every_element():
    x, x_hat = _videos()
    lpips = random_lpips(seed=2)
    loss_fn = LPIPSWithDiscriminator(perceptual=lpips, perceptual_weight=0.7, disc_ndf=8)
    _, stats = loss_fn.generator_loss(x, x_hat, _posterior(), step=0, last_layer=None)
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    frames_hat = x_hat.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    per_frame = lpips(frames, frames_hat).flatten()  # (B*T,)
    expected = ((x - x_hat).abs().sum() + 0.7 * per_frame.sum() * C * H * W) / (B * T)  # logvar 0
    assert stats["nll_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_perceptual_weight_without_network_is_a_clear_error():
    with pytest.raises(ValueError, match="perceptual_weight is 1.0 but no LPIPS network"):
        LPIPSWithDiscriminator(perceptual=None, perceptual_weight=1.0)


def test_adaptive_weight_and_disc_start_switch():
    decoder = ToyDecoder()
    x, _ = _videos()
    posterior = _posterior()
    loss_fn = LPIPSWithDiscriminator(perceptual=None, perceptual_weight=0.0, disc_start=5, disc_ndf=8)
    last = decoder.conv_out.weight

    x_hat = decoder()
    loss, stats = loss_fn.generator_loss(x, x_hat, posterior, step=5, last_layer=last)
    assert stats["disc_factor"] == 1.0
    # recompute the weight by hand from the two gradients on the last layer
    x_hat = decoder()
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    frames_hat = x_hat.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    nll = (frames - frames_hat).abs().sum() / (B * T)
    g = -loss_fn.discriminator(frames_hat).mean()
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g, last, retain_graph=True)[0]
    expected_weight = 0.5 * min(g_nll.norm().item() / (g_adv.norm().item() + 1e-4), 1e4)
    assert stats["d_weight"] == pytest.approx(expected_weight, rel=1e-4)
    expected_loss = nll + 1e-6 * kl_divergence(posterior) + expected_weight * g
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert stats["g_loss"] == pytest.approx(g.item(), rel=1e-5)

    # one step earlier the adversarial term is off, in both phases
    loss_before, stats_before = loss_fn.generator_loss(x, decoder(), posterior, step=4, last_layer=last)
    assert stats_before["disc_factor"] == 0.0 and stats_before["d_weight"] == 0.0
    assert loss_before.item() == pytest.approx((nll + 1e-6 * kl_divergence(posterior)).item(), rel=1e-5)
    d_before, _ = loss_fn.discriminator_loss(x, decoder(), step=4)
    assert d_before.item() == 0.0


def test_adaptive_weight_is_clamped():
    loss_fn = LPIPSWithDiscriminator(perceptual=None, perceptual_weight=0.0, disc_ndf=8)
    w = nn.Parameter(torch.ones(3))
    nll = (w * 1e3).sum()
    g = (w * 0.0).sum()  # zero adversarial gradient -> ratio 1e3*sqrt(3)/1e-4, clamped to 1e4
    assert loss_fn.adaptive_weight(nll, g, w).item() == pytest.approx(1e4 * 0.5)


def test_discriminator_hinge_loss_by_hand():
    real = torch.tensor([0.5, 2.0, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0.5, 0, 2] mean 5/6; relu(1 + fake) = [0, 1, 1.5] mean 5/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 5 / 6))
    x, x_hat = _videos()
    loss_fn = LPIPSWithDiscriminator(perceptual=None, perceptual_weight=0.0, disc_start=0, disc_ndf=8)
    loss_fn.discriminator.eval()  # fixed BatchNorm statistics so the two evaluations agree
    d_loss, stats = loss_fn.discriminator_loss(x, x_hat.requires_grad_(True), step=0)
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    frames_hat = x_hat.detach().permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    expected = hinge_d_loss(loss_fn.discriminator(frames), loss_fn.discriminator(frames_hat))
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the discriminator phase never sends gradients into the autoencoder output
    d_loss.backward()
    assert x_hat.grad is None
