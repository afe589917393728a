"""IDDPM-style Gaussian diffusion training objective (Open-Sora-Plan v1.0.0, spec section 3.1).

What the reference trains with (``create_diffusion_T(timestep_respacing="")``):

* 1000 steps, linear betas from 1e-4 to 0.02 (scaled by 1000 / num_timesteps, so 1 here);
* the model predicts epsilon in its first C output channels and a learned-variance interpolation
  value ``v`` in the last C channels (``LEARNED_RANGE``):
  ``log sigma^2 = frac * log beta_t + (1 - frac) * log beta~_t`` with ``frac = (v + 1) / 2``;
* loss per sample = ``mse + vb`` where ``mse`` is the mean squared epsilon error and ``vb`` is the
  variational-bound term in bits computed with the *detached* mean prediction, so that ``vb`` only
  trains the variance (Nichol & Dhariwal 2021, "hybrid" objective). At t = 0 ``vb`` is the
  discretised-Gaussian decoder negative log-likelihood instead of a KL.
* t ~ Uniform{0, ..., num_timesteps - 1} per sample; the raw integer t is fed to the model.

The schedule constants are computed in float64 and cast to float32 when used, as the reference does.
All loss maths runs in float32 whatever the model's (autocast) output dtype.

This module knows nothing about data loading or the model: ``training_losses`` takes any callable
``model_fn(x_t, t, **model_kwargs) -> (B, 2*C, ...)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# --------------------------------------------------------------------------------------------
# Elementwise helpers (shared with the tests' hand computations by name only, not by code)
# --------------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (the one IDDPM uses, kept for parity)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of ``x`` in [-1, 1] under a Gaussian discretised to 256 bins.

    Each value owns the bin ``x +- 1/255``; the two outermost bins extend to -inf / +inf.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def linear_beta_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """IDDPM "linear" schedule in float64: the endpoints are scaled by 1000 / num_timesteps."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Forward process q(x_t | x_0), posterior q(x_{t-1} | x_t, x_0) and the hybrid training loss.

    Model parameterisation is fixed to the reference's: epsilon prediction + LEARNED_RANGE variance,
    loss type MSE (not rescaled). The model output therefore has twice the channels of ``x_start``.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}; use 1000 as the reference.")
        self.num_timesteps = int(num_timesteps)
        betas = linear_beta_schedule(self.num_timesteps, beta_start, beta_end)  # (T,) float64
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])

        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta~_t).
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta~_0 is 0, so its log is clipped to beta~_1 (IDDPM convention; only enters at t = 0).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)
        self.log_betas = torch.log(betas)

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as float32, shaped (B, 1, 1, ...) to broadcast against ``like`` (B, ...)."""
        values = table.to(t.device)[t].float()  # (B,)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform integer timesteps (B,) in [0, num_timesteps), drawn on the generator's device."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device)

    # ---- forward process and posterior -----------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - a_bar_t) eps) / sqrt(a_bar_t)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """Mean and log-variance of p(x_{t-1} | x_t) from a (B, 2C, ...) eps + LEARNED_RANGE output.

        No clipping of the predicted x_0 (the training loss uses ``clip_denoised=False``).
        """
        channels = x_t.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels but learned variance needs 2 x {channels}; "
                f"build the model with out_channels = 2 * in_channels."
            )
        eps, var_values = model_output.split(channels, dim=1)  # (B, C, ...) each
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (var_values + 1.0) / 2.0  # v in [-1, 1] -> [0, 1]; not clamped, as the reference
        log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Variational-bound term per sample (B,) in bits per dimension.

        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL -log p(x_0|x_1) for t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    # ---- the training objective ------------------------------------------------------------

    def training_losses(
        self,
        model_fn: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Hybrid IDDPM loss for one batch.

        Args:
            model_fn: ``model_fn(x_t, t, **model_kwargs)`` returning (B, 2C, ...) (or a tuple /
                diffusers output whose first element is that tensor).
            x_start: clean latents (B, C, ...), e.g. (B, 4, F, h, w).
            t: integer timesteps (B,).
            noise: optional epsilon (same shape as ``x_start``); drawn with ``torch.randn_like`` if None.
        Returns:
            dict with ``loss``, ``mse``, ``vb`` (each (B,), float32) and ``x_t`` (the noised input).
            The caller reduces ``loss`` (the reference takes the batch mean).
        """
        if t.ndim != 1 or t.shape[0] != x_start.shape[0]:
            raise ValueError(f"t must have shape ({x_start.shape[0]},) to match the batch, got {tuple(t.shape)}.")
        if noise is None:
            noise = torch.randn_like(x_start)
        x_start = x_start.float()
        x_t = self.q_sample(x_start, t, noise.float())  # (B, C, ...)
        model_output = model_fn(x_t, t, **(model_kwargs or {}))
        if not torch.is_tensor(model_output):
            model_output = model_output[0]
        model_output = model_output.float()  # (B, 2C, ...)
        channels = x_start.shape[1]
        expected = (x_start.shape[0], 2 * channels, *x_start.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)} but eps + learned variance for input "
                f"{tuple(x_start.shape)} needs {expected}; build the model with out_channels = 2 * in_channels."
            )
        eps, var_values = model_output.split(channels, dim=1)
        # The vb term must only train the variance: the mean (eps) is detached, as in IDDPM.
        frozen_output = torch.cat([eps.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen_output, x_start, x_t, t)  # (B,)
        mse = mean_flat((noise.float() - eps) ** 2)  # (B,)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "x_t": x_t}
