"""IDDPM training objective: every loss term checked against hand computations on tiny tensors.

The hand computations use Python floats and the ``math`` module only (no code shared with the
implementation), following the formulas of Nichol & Dhariwal 2021 / spec section 3.1.
"""

from __future__ import annotations

import math

import pytest
import torch

from opensora_plan.diffusion import GaussianDiffusion

T = 1000


def hand_schedule(t: int):
    """beta_t, a_bar_t, a_bar_{t-1}, posterior variance at t, clipped posterior log-variance at t."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]

    def a_bar(k):
        return math.prod(1.0 - b for b in betas[: k + 1]) if k >= 0 else 1.0

    def post_var(k):
        return betas[k] * (1.0 - a_bar(k - 1)) / (1.0 - a_bar(k))

    clipped_log = math.log(post_var(1) if t == 0 else post_var(t))
    return betas[t], a_bar(t), a_bar(t - 1), post_var(t), clipped_log


def phi(x):
    """The tanh approximation of the normal CDF used by IDDPM's discretised decoder."""
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def hand_losses(x0, noise, eps_hat, v, t):
    """(mse, vb) for one sample given as lists of floats (one value per element)."""
    beta, a, a_prev, _, min_log = hand_schedule(t)
    max_log = math.log(beta)
    coef1 = beta * math.sqrt(a_prev) / (1.0 - a)
    coef2 = (1.0 - a_prev) * math.sqrt(1.0 - beta) / (1.0 - a)
    mse_terms, vb_terms = [], []
    for x, n, e, vv in zip(x0, noise, eps_hat, v):
        xt = math.sqrt(a) * x + math.sqrt(1.0 - a) * n
        pred_x0 = (xt - math.sqrt(1.0 - a) * e) / math.sqrt(a)
        true_mean = coef1 * x + coef2 * xt
        model_mean = coef1 * pred_x0 + coef2 * xt
        frac = (vv + 1.0) / 2.0
        model_log = frac * max_log + (1.0 - frac) * min_log
        mse_terms.append((n - e) ** 2)
        if t > 0:
            kl = 0.5 * (-1.0 + model_log - min_log + math.exp(min_log - model_log)
                        + (true_mean - model_mean) ** 2 * math.exp(-model_log))
            vb_terms.append(kl / math.log(2.0))
        else:
            inv_std = math.exp(-0.5 * model_log)
            centred = x - model_mean
            cdf_plus = phi(inv_std * (centred + 1.0 / 255.0))
            cdf_min = phi(inv_std * (centred - 1.0 / 255.0))
            if x < -0.999:
                log_p = math.log(max(cdf_plus, 1e-12))
            elif x > 0.999:
                log_p = math.log(max(1.0 - cdf_min, 1e-12))
            else:
                log_p = math.log(max(cdf_plus - cdf_min, 1e-12))
            vb_terms.append(-log_p / math.log(2.0))
    return sum(mse_terms) / len(mse_terms), sum(vb_terms) / len(vb_terms)


def constant_model(eps_hat, v):
    """A 'model' that ignores its input and returns fixed eps and v: output (B, 2C, ...)."""
    out = torch.cat([torch.tensor(eps_hat), torch.tensor(v)], dim=1)

    def model_fn(x_t, t):
        return out

    return model_fn


def test_schedule_is_linear_1e4_to_002_with_1000_steps():
    diffusion = GaussianDiffusion()
    assert diffusion.betas.shape == (T,)
    assert diffusion.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert diffusion.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    _, a_bar, _, post_var, clipped_log = hand_schedule(500)
    assert diffusion.alphas_cumprod[500].item() == pytest.approx(a_bar, rel=1e-10)
    assert diffusion.posterior_variance[500].item() == pytest.approx(post_var, rel=1e-10)
    assert diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(hand_schedule(0)[4], rel=1e-10)
    assert diffusion.posterior_log_variance_clipped[500].item() == pytest.approx(clipped_log, rel=1e-10)


@pytest.mark.parametrize("t", [1, 37, 999])
def test_mse_and_kl_term_match_hand_computation_for_t_above_zero(t):
    # one sample, C = 1, two elements: layout (B, C, N)
    x0, noise, eps_hat, v = [0.3, -0.7], [0.5, -1.2], [0.4, -1.0], [0.2, -0.6]
    losses = GaussianDiffusion().training_losses(
        constant_model([[eps_hat]], [[v]]),
        torch.tensor([[x0]]),
        torch.tensor([t]),
        noise=torch.tensor([[noise]]),
    )
    mse, vb = hand_losses(x0, noise, eps_hat, v, t)
    assert losses["mse"].shape == losses["vb"].shape == losses["loss"].shape == (1,)
    assert losses["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert losses["vb"].item() == pytest.approx(vb, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(mse + vb, rel=1e-4)


def test_decoder_nll_at_t_zero_matches_hand_computation_including_edge_bins():
    # interior value, the top bin (x > 0.999) and the bottom bin (x < -0.999)
    x0, noise, eps_hat, v = [0.25, 1.0, -1.0], [0.1, -0.3, 0.2], [0.3, -0.1, 0.0], [0.5, -0.2, 1.0]
    losses = GaussianDiffusion().training_losses(
        constant_model([[eps_hat]], [[v]]), torch.tensor([[x0]]), torch.tensor([0]), noise=torch.tensor([[noise]])
    )
    mse, vb = hand_losses(x0, noise, eps_hat, v, 0)
    assert losses["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert losses["vb"].item() == pytest.approx(vb, rel=1e-4)
    assert vb > 0


def test_mixed_batch_uses_kl_or_decoder_nll_per_sample():
    x0 = [[0.2, -0.4], [0.9, 0.1]]
    noise = [[1.0, 0.3], [-0.5, 0.8]]
    eps_hat = [[0.7, 0.2], [-0.2, 0.9]]
    v = [[0.0, 0.3], [-0.4, 0.6]]
    t = [0, 250]
    losses = GaussianDiffusion().training_losses(
        constant_model([[e] for e in eps_hat], [[vv] for vv in v]),
        torch.tensor([[x] for x in x0]),
        torch.tensor(t),
        noise=torch.tensor([[n] for n in noise]),
    )
    for i in range(2):
        mse, vb = hand_losses(x0[i], noise[i], eps_hat[i], v[i], t[i])
        assert losses["mse"][i].item() == pytest.approx(mse, rel=1e-5)
        assert losses["vb"][i].item() == pytest.approx(vb, rel=1e-4)


def test_perfect_prediction_gives_zero_mse_and_zero_kl():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(3, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 400, 999])

    def oracle(x_t, t):
        # true eps and v = -1, i.e. log-variance = clipped posterior log-variance: p equals q exactly
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    losses = diffusion.training_losses(oracle, x0, t, noise=noise)
    assert torch.allclose(losses["mse"], torch.zeros(3))
    assert torch.allclose(losses["vb"], torch.zeros(3), atol=1e-5)


def test_video_latent_shapes_and_loss_is_per_sample():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(2, 4, 3, 6, 6)  # (B, C, F, h, w)
    model = torch.nn.Conv3d(4, 8, 1)
    t = diffusion.sample_timesteps(2, "cpu", torch.Generator().manual_seed(0))
    losses = diffusion.training_losses(lambda x, t: model(x), x0, t)
    assert losses["loss"].shape == (2,)
    assert losses["x_t"].shape == x0.shape
    assert torch.isfinite(losses["loss"]).all()
    losses["loss"].mean().backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(2, 2, 5)
    out = torch.randn(2, 4, 5, requires_grad=True)
    losses = diffusion.training_losses(lambda x, t: out, x0, torch.tensor([0, 300]))
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert grad_vb[:, :2].abs().max() == 0  # eps channels detached in the vb term
    assert grad_vb[:, 2:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad_mse[:, :2].abs().max() > 0
    assert grad_mse[:, 2:].abs().max() == 0


def test_model_kwargs_are_passed_and_tuple_outputs_accepted():
    seen = {}

    def model_fn(x_t, t, encoder_hidden_states=None):
        seen["ehs"] = encoder_hidden_states
        return (torch.zeros(x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:]),)

    GaussianDiffusion().training_losses(
        model_fn, torch.zeros(1, 2, 3), torch.tensor([3]), model_kwargs={"encoder_hidden_states": "caption"}
    )
    assert seen["ehs"] == "caption"


def test_wrong_output_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="out_channels = 2 \\* in_channels"):
        GaussianDiffusion().training_losses(lambda x, t: x, torch.zeros(1, 4, 3), torch.tensor([3]))


def test_sample_timesteps_uniform_range_and_seeded():
    diffusion = GaussianDiffusion()
    a = diffusion.sample_timesteps(4096, "cpu", torch.Generator().manual_seed(7))
    b = diffusion.sample_timesteps(4096, "cpu", torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.dtype == torch.int64 and a.min() >= 0 and a.max() <= T - 1
    assert a.min() < 50 and a.max() > 950  # covers the whole range
