"""2-D PatchGAN discriminator used by the CausalVAE training loss (spec 1.8).

The reference's ``NLayerDiscriminator`` (pix2pix/taming design): frames are judged one by one (the
loss folds time into the batch), each output logit scores one receptive-field patch. Module indices
inside ``main`` match the official keys ``loss.discriminator.main.{0,2,3,5,6,8,9,11}.*``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (N, C, H, W) -> (N, 1, H', W') logits (H' = H/8 - 2 for 3 layers and H % 8 == 0).

    Layout for ``n_layers=3, ndf=64``: conv 4x4/2 (bias) + LeakyReLU, then 2 x [conv 4x4/2 (no bias)
    + BatchNorm + LeakyReLU] doubling the width, one conv 4x4/1 + BatchNorm + LeakyReLU, and a final
    conv 4x4/1 (bias) to one channel. Widths are capped at 8 * ndf.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kernel, pad = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kernel, stride=2, padding=pad),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev_mult, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last BatchNorm stage keeps the resolution
            layers += [
                # No bias: the BatchNorm right after has its own shift.
                nn.Conv2d(ndf * prev_mult, ndf * mult, kernel_size=kernel, stride=stride, padding=pad, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=kernel, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """Reference init: conv weights N(0, 0.02) (biases keep PyTorch's default), BN scale N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)
