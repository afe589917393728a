"""Training losses of the frame models: AMT interpolation (``train-vfi``) and RGT super-resolution (``train-sr``).

AMT (Li et al., CVPR 2023, arXiv 2304.09790; upstream ``MCG-NKU/AMT`` ``losses/loss.py`` and
``cfgs/AMT-*.yaml``) trains with three terms on the predicted middle frame and flows::

    L = 1.0 * Charbonnier(imgt_pred, imgt) + 1.0 * Census(imgt_pred, imgt) + w_flow * MultiFlowDistill(...)

with ``w_flow`` = 0.005 (AMT-G) or 0.002 (AMT-L, AMT-S). The third term distils optical flow: each of AMT's
multiple predicted flow fields (every decoder level, upsampled) is pulled towards the flows ``t->0`` and
``t->1`` of a pretrained flow *teacher* (upstream precomputes them with LiteFlowNet over Vimeo90K) by an
adaptive Charbonnier loss weighted by ``exp(-0.3 * EPE)`` of the finest prediction.

Implemented here: :func:`charbonnier_loss` and :func:`census_loss` (upstream ``TernaryLoss``) exactly, with
the upstream weights (:data:`AMT_LOSS_WEIGHTS`). **Omitted: the flow-distillation term**: no flow teacher's
weights are available to this project (and no teacher model is implemented), so ``train-vfi`` trains with
Charbonnier + census only: the photometric part of the published objective. Runs therefore differ from the
paper's recipe in this term; fine-tuning an official ``amt-g.pth`` starts from flows that were distilled.

RGT (Chen et al., ICLR 2024; upstream ``options/train/train_RGT_x2.yml``) trains with plain L1 (mean):
:func:`l1_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHARBONNIER_EPS = 1e-6  # upstream: sqrt(diff^2 + 1e-6)
CENSUS_PATCH = 7  # upstream TernaryLoss(patch_size=7)
AMT_LOSS_WEIGHTS = {"charbonnier": 1.0, "census": 1.0}  # flow distillation (0.005 / 0.002): omitted


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = CHARBONNIER_EPS) -> torch.Tensor:
    """``mean(sqrt((pred - target)^2 + eps))``: a smooth L1 (upstream ``CharbonnierLoss``)."""
    return ((pred - target) ** 2 + eps).sqrt().mean()


def _census_transform(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, patch^2, H, W)``: soft signs of each neighbour minus the centre, on the grey image."""
    grey = images.mean(dim=1, keepdim=True)  # (B, 1, H, W); upstream averages RGB
    # One one-hot kernel per neighbour: the conv gathers the patch^2 neighbours of every pixel.
    kernels = torch.eye(patch * patch, dtype=images.dtype, device=images.device).view(patch * patch, 1, patch, patch)
    neighbours = F.conv2d(grey, kernels, padding=patch // 2)  # (B, P^2, H, W)
    difference = neighbours - grey
    return difference / torch.sqrt(0.81 + difference**2)


def census_loss(pred: torch.Tensor, target: torch.Tensor, patch: int = CENSUS_PATCH) -> torch.Tensor:
    """The census (ternary) loss of AMT/IFRNet (upstream ``TernaryLoss``): compare the soft census
    transforms of the two images (``d^2 / (0.1 + d^2)``, averaged over the patch), ignoring the
    ``patch // 2`` border pixels (the mask is part of the mean's denominator, as upstream). Robust to
    brightness changes; the target's transform carries no gradient."""
    difference = _census_transform(pred, patch) - _census_transform(target, patch).detach()
    distance = (difference**2 / (0.1 + difference**2)).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    pad = patch // 2
    mask = torch.zeros_like(distance)
    mask[..., pad : distance.shape[-2] - pad, pad : distance.shape[-1] - pad] = 1
    return (distance * mask).mean()


def amt_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The implemented AMT objective (Charbonnier + census, upstream weights) and its terms for the log."""
    terms = {"charbonnier": charbonnier_loss(pred, target), "census": census_loss(pred, target)}
    loss = sum(AMT_LOSS_WEIGHTS[name] * value for name, value in terms.items())
    return loss, {f"{name}_loss": float(value.detach()) for name, value in terms.items()}


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (RGT's ``L1Loss``, weight 1, reduction mean)."""
    return (pred - target).abs().mean()
