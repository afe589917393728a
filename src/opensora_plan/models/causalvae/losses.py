"""CausalVAE training loss: L1 + LPIPS reconstruction, KL, PatchGAN hinge loss (spec 1.8).

``LPIPSWithDiscriminator`` is the reference's loss module. Its state-dict keys are the official
``loss.*`` names without the ``loss.`` prefix (``logvar``, ``perceptual_loss.*``, ``discriminator.*``).
The two optimizer phases of one training batch call :meth:`generator_loss` and
:meth:`discriminator_loss`; the caller passes the same step number to both: one step per batch.
(The reference's Lightning loop counted two steps per batch, so its ``disc_start`` was reached after
half as many batches; that double count is fixed here, spec 1.8 "Quirk".)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..lpips import LPIPS
from .discriminator import NLayerDiscriminator


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def kl_divergence(posterior) -> torch.Tensor:
    """KL(q || N(0, I)) of a diagonal Gaussian summed over all latent elements, averaged over the batch.

    ``posterior`` has ``mean``, ``var`` and ``logvar`` of shape (B, C, t, h, w) (diffusers'
    ``DiagonalGaussianDistribution``).
    """
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)
    return kl.sum() / kl.shape[0]


class LPIPSWithDiscriminator(nn.Module):
    """Reference VAE loss. ``perceptual`` is a loaded :class:`LPIPS`, or None with ``perceptual_weight=0``.

    Defaults are the release values (config ``loss_params``): disc_start 2001, kl_weight 1e-6,
    logvar_init 0, disc_weight 0.5; perceptual weight 1.0, disc_factor 1.0, 3-layer PatchGAN.
    ``rec_loss`` "l1" is the reference's |x - x_hat|; "l2" uses (x - x_hat)^2 instead (the mean rather
    than the median of what the decoder is unsure about: on sparse frames, e.g. small objects on black,
    L1 keeps an uncertain object black while L2 lets it appear as a blur to refine).
    """

    def __init__(
        self,
        perceptual: LPIPS | None = None,
        disc_start: int = 2001,
        logvar_init: float = 0.0,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        rec_loss: str = "l1",
    ):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss {rec_loss!r} is not supported; use 'l1' (the reference) or 'l2'.")
        self.rec_loss = rec_loss
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError(
                f"perceptual_weight is {perceptual_weight} but no LPIPS network was given; load one with "
                "opensora_plan.models.lpips.load_lpips(path) or set perceptual_weight to 0."
            )
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.perceptual_loss = perceptual if perceptual_weight > 0 else None
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)

    def forward(self, phase: str, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int,
                posterior=None, last_layer: torch.Tensor | None = None):
        """``phase`` "generator" -> :meth:`generator_loss`, "discriminator" -> :meth:`discriminator_loss`.

        (One entry point so a DDP-wrapped loss module synchronises the discriminator's gradients.)
        """
        if phase == "generator":
            return self.generator_loss(inputs, reconstructions, posterior, step, last_layer)
        if phase == "discriminator":
            return self.discriminator_loss(inputs, reconstructions, step)
        raise ValueError(f"Unknown loss phase {phase!r}; use 'generator' or 'discriminator'.")

    def disc_factor_at(self, step: int) -> float:
        """The adversarial weight at ``step`` (0-based count of finished batches): 0 before disc_start."""
        return self.disc_factor if step >= self.disc_start else 0.0

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """||d nll / d W|| / (||d g / d W|| + 1e-4) on the last decoder weight W, clamped to [0, 1e4], x disc_weight."""
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.disc_weight

    def reconstruction_nll(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, mean |x - x_hat| or (x - x_hat)^2) for frames folded into the batch: (N, C, H, W) each, N = B*T."""
        diff = inputs - reconstructions
        rec = diff.abs() if self.rec_loss == "l1" else diff.square()  # (N, C, H, W)
        if self.perceptual_loss is not None:
            # The per-frame LPIPS scalar (N, 1, 1, 1) is broadcast to every channel and pixel.
            rec = rec + self.perceptual_weight * self.perceptual_loss(inputs, reconstructions)
        nll = rec / torch.exp(self.logvar) + self.logvar
        return nll.sum() / nll.shape[0], rec.detach().mean()

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior,
        step: int,
        last_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder phase: nll + kl_weight * KL + adaptive_weight * disc_factor * (-mean D(x_hat)).

        ``inputs``/``reconstructions``: (B, C, T, H, W) in [-1, 1]; ``posterior``: the encoder's
        diagonal Gaussian; ``last_layer``: the decoder's last conv weight (adaptive-weight anchor).
        """
        x = rearrange(inputs, "b c t h w -> (b t) c h w").contiguous()
        x_hat = rearrange(reconstructions, "b c t h w -> (b t) c h w").contiguous()
        nll, l1 = self.reconstruction_nll(x, x_hat)
        kl = kl_divergence(posterior)
        g_loss = -torch.mean(self.discriminator(x_hat))
        disc_factor = self.disc_factor_at(step)
        if disc_factor > 0 and torch.is_grad_enabled():
            d_weight = self.adaptive_weight(nll, g_loss, last_layer)
        else:
            # The reference also computes the weight before disc_start, then multiplies it by 0.
            d_weight = torch.zeros((), device=nll.device)
        loss = nll + self.kl_weight * kl + d_weight * disc_factor * g_loss
        stats = {
            "rec_loss": l1.item(),
            "nll_loss": nll.item(),
            "kl_loss": kl.item(),
            "g_loss": g_loss.item(),
            "d_weight": float(d_weight),
            "disc_factor": disc_factor,
            "logvar": self.logvar.item(),
        }
        return loss, stats

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator phase: disc_factor * hinge(D(x), D(x_hat)) on detached (B, C, T, H, W) videos."""
        x = rearrange(inputs, "b c t h w -> (b t) c h w").contiguous().detach()
        x_hat = rearrange(reconstructions, "b c t h w -> (b t) c h w").contiguous().detach()
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(x_hat)
        disc_factor = self.disc_factor_at(step)
        loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
        stats = {
            "disc_loss": loss.item(),
            "logits_real": logits_real.detach().mean().item(),
            "logits_fake": logits_fake.detach().mean().item(),
        }
        return loss, stats
