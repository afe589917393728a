"""AMT (All-Pairs Multi-Field Transforms, CVPR 2023): two frames and a time t -> the frame at t.

Open-Sora-Plan v1.0.0 ships the giant variant, AMT-G, for frame interpolation of generated videos
(spec ``sr-vfi-v1.0.0.md`` section 1). The released weights are a fixed t = 0.5 model; longer videos
come from recursive doubling (``pipelines/interpolate.py``).

Forward order: mean removal -> correlation features and the all-pairs correlation pyramid (``corr.py``)
-> context pyramids of both frames -> decoder at 1/16 -> update at 1/8 with correlation lookups ->
decoders at 1/4 and 1/2, each followed by a "low" update (run at 1/8) and a "high" one (at the level's
resolution) -> multi-field decoder at full resolution -> num_flows candidate frames, combined.

Licence: AMT's code and weights are CC BY-NC 4.0 (non-commercial use only). This file is written from
the description of the computation; loading the weights logs the licence.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..loading import check_state_dict, load_pretrained
from .blocks import resize
from .corr import BidirCorrelation, coords_grid
from .decoder import (
    InitDecoder,
    IntermediateDecoder,
    MultiFlowDecoder,
    combine_candidates,
)
from .extractor import ContextPyramid, CorrelationEncoder
from .update import UpdateBlock

logger = logging.getLogger(__name__)

LICENCE_NOTE = ("AMT weights and code are licensed CC BY-NC 4.0 (MCG-NKU/AMT): non-commercial use only; commercial "
                "use needs the authors' permission.")
#: The key holding the weights in the official ``amt-g.pth``.
OFFICIAL_WRAPPER_KEY = "state_dict"


@dataclass
class AMTOutput:
    """``imgt_pred`` (B, 3, H, W) in [0, 1]. With ``return_intermediates=True`` also the flows t->0 / t->1
    (index 0: the full-resolution multi-flows (B, num_flows, 2, H, W); 1, 2, 3: the flow pair at 1/2, 1/4, 1/8)
    and the interpolated features at 1/2, 1/4, 1/8 (``ft_pred``)."""

    imgt_pred: torch.Tensor
    flow0_pred: list[torch.Tensor] | None = None
    flow1_pred: list[torch.Tensor] | None = None
    ft_pred: list[torch.Tensor] | None = None


class AMTModel(ModelMixin, ConfigMixin):
    """AMT frame interpolation network; defaults are the released AMT-G.

    ``corr_radius``, ``corr_lvls``, ``num_flows``: lookup window radius, correlation pyramid levels and
    flow fields per direction (the three values of the official config). ``channels``: context pyramid
    widths at 1/2, 1/4, 1/8, 1/16; ``skip_channels``: side width of the decoders' residual blocks; the
    correlation encoder's stage widths and feature size and the update blocks' widths are the rest.
    """

    @register_to_config
    def __init__(
        self,
        corr_radius: int = 3,
        corr_lvls: int = 4,
        num_flows: int = 5,
        channels: tuple[int, int, int, int] | list[int] = (84, 96, 112, 128),
        skip_channels: int = 84,
        corr_encoder_channels: tuple[int, int, int] | list[int] = (64, 112, 160),
        corr_feature_dim: int = 128,
        update_hidden_dim: int = 192,
        update_flow_dim: int = 64,
        update_corr_dim: int = 256,
        update_corr_dim2: int = 192,
        update_fc_dim: int = 188,
    ):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 context widths (1/2, 1/4, 1/8, 1/16), got {list(channels)}.")
        if len(corr_encoder_channels) != 3:
            raise ValueError(f"corr_encoder_channels must list 3 stage widths, got {list(corr_encoder_channels)}.")
        if corr_radius < 0 or corr_lvls < 1 or num_flows < 1:
            raise ValueError(f"AMT needs corr_radius >= 0, corr_lvls >= 1 and num_flows >= 1; got {corr_radius}, "
                             f"{corr_lvls}, {num_flows}.")
        self.radius, self.corr_levels, self.num_flows = corr_radius, corr_lvls, num_flows
        #: Source pixels per correlation chunk (None: the whole volume at once); see set_correlation_chunk.
        self.corr_chunk_size: int | None = None
        c1, c2, c3, c4 = channels
        corr_channels = 2 * corr_lvls * (2 * corr_radius + 1) ** 2
        update = {"corr_channels": corr_channels, "hidden_dim": update_hidden_dim, "flow_dim": update_flow_dim,
                      "corr_dim": update_corr_dim, "corr_dim2": update_corr_dim2, "fc_dim": update_fc_dim}

        # Registration order = the official state-dict order.
        self.feat_encoder = CorrelationEncoder(tuple(corr_encoder_channels), corr_feature_dim)
        self.encoder = ContextPyramid(tuple(channels))
        self.decoder4 = InitDecoder(c4, c3, skip_channels)
        self.decoder3 = IntermediateDecoder(c3, c2, skip_channels)
        self.decoder2 = IntermediateDecoder(c2, c1, skip_channels)
        self.decoder1 = MultiFlowDecoder(c1, skip_channels, num_flows)
        self.update4 = UpdateBlock(c3, **update)
        self.update3_low = UpdateBlock(c2, scale_factor=2.0, **update)
        self.update2_low = UpdateBlock(c1, scale_factor=4.0, **update)
        self.update3_high = UpdateBlock(c2, **update)
        self.update2_high = UpdateBlock(c1, **update)
        self.comb_block = nn.Sequential(nn.Conv2d(3 * num_flows, 6 * num_flows, 7, 1, 3), nn.PReLU(6 * num_flows),
                                        nn.Conv2d(6 * num_flows, 3, 7, 1, 3))

    # ----------------------------------------------------------------------- sizes and memory

    @property
    def size_multiple(self) -> int:
        """Processed sides must be multiples of this (the 1/16 decoder and its transposed convolution)."""
        return 16

    @property
    def min_size(self) -> int:
        """Smallest processed side: the coarsest correlation level must be >= 2 pixels wide, since the lookup
        normalises by (side - 1) (a 1-pixel level gives NaN, the reference's silent failure)."""
        return max(self.size_multiple, 8 * 2**self.corr_levels)

    def set_correlation_chunk(self, chunk_size: int | None) -> None:
        """Compute the correlation in chunks of ``chunk_size`` source pixels (None: all at once).

        Same result (to float rounding), memory n*h*w per direction instead of (h*w)^2 at 1/8 resolution."""
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size
                                       or chunk_size < 1):
            raise ValueError(f"Correlation chunk size must be a positive number of pixels or None, got {chunk_size!r}.")
        self.corr_chunk_size = None if chunk_size is None else int(chunk_size)

    def check_size(self, height: int, width: int, scale_factor: float = 1.0) -> None:
        """Raise one ValueError when (height, width) cannot be processed at ``scale_factor``."""
        h, w = int(height * scale_factor), int(width * scale_factor)
        if h % self.size_multiple or w % self.size_multiple or min(h, w) < self.min_size:
            scaled = f" (x{scale_factor} = {w}x{h})" if scale_factor != 1.0 else ""
            raise ValueError(f"AMT cannot process {width}x{height} frames{scaled}: processed sides must be multiples of "
                             f"{self.size_multiple} and at least {self.min_size} (corr_lvls={self.corr_levels}); pad "
                             "the frames (pipelines.interpolate pads for you).")

    # ----------------------------------------------------------------------- forward

    def _lookup(self, corr: BidirCorrelation, coords: torch.Tensor, flow0: torch.Tensor, flow1: torch.Tensor,
                embt: torch.Tensor, downsample: int = 1):
        """Correlation samples at 1/8 for flows at 1/(8/downsample): the t->1 flow stretched by 1/t points
        frame-0 pixels into frame 1, the t->0 flow stretched by 1/(1-t) frame-1 pixels into frame 0
        (linear motion). Returns (corr (B, K, h, w), flows at 1/8 (B, 4, h, w))."""
        if downsample != 1:
            inv = 1 / downsample
            flow0, flow1 = inv * resize(flow0, inv), inv * resize(flow1, inv)
        samples = corr(coords + flow1 * (1.0 / embt), coords + flow0 * (1.0 / (1.0 - embt)))
        return samples, torch.cat([flow0, flow1], dim=1)

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, embt: torch.Tensor | float = 0.5,
                scale_factor: float = 1.0, return_intermediates: bool = False) -> AMTOutput:
        """img0, img1: (B, 3, H, W) in [0, 1]; embt: t as a float or (B or 1, 1, 1, 1). ``scale_factor`` < 1 runs
        the estimation on resized frames (the warp stays at full resolution)."""
        b, _, height, width = img0.shape
        self.check_size(height, width, scale_factor)
        embt = torch.as_tensor(embt, dtype=img0.dtype, device=img0.device).reshape(-1, 1, 1, 1).expand(b, 1, 1, 1)
        # One scalar per sample over both frames and all channels, removed here and added back in every
        # candidate frame: what the weights expect (reproduced, including the order of the means).
        mean = torch.cat([img0, img1], 2).mean(1, keepdim=True).mean(2, keepdim=True).mean(3, keepdim=True)
        img0, img1 = img0 - mean, img1 - mean  # (B, 3, H, W)
        if img0.device.type == "cpu":
            # Channels-last activations from here on (every op keeps the layout): oneDNN's NHWC convolutions
            # are faster on CPU than NCHW ones (benchmarks/interpolate_vs_reference.py); same result to rounding.
            img0 = img0.contiguous(memory_format=torch.channels_last)
            img1 = img1.contiguous(memory_format=torch.channels_last)
        small0 = resize(img0, scale_factor) if scale_factor != 1.0 else img0
        small1 = resize(img1, scale_factor) if scale_factor != 1.0 else img1
        _, _, h, w = small0.shape
        coords = coords_grid(b, h // 8, w // 8, img0.device)  # (B, 2, h/8, w/8)

        fmap0, fmap1 = self.feat_encoder(torch.cat([small0, small1], 0)).chunk(2, 0)  # (B, 128, h/8, w/8) each
        corr = BidirCorrelation(fmap0, fmap1, self.corr_levels, self.radius, self.corr_chunk_size)
        f0_1, f0_2, f0_3, f0_4 = self.encoder(small0)  # (B, C1, h/2, w/2) ... (B, C4, h/16, w/16)
        f1_1, f1_2, f1_3, f1_4 = self.encoder(small1)

        # 1/16 -> 1/8, then one update with correlation lookups
        flow0_4, flow1_4, ft_3 = self.decoder4(f0_4, f1_4, embt)  # (B, 2, h/8, w/8) x2, (B, C3, h/8, w/8)
        corr_4, flow_4 = self._lookup(corr, coords, flow0_4, flow1_4, embt)  # (B, K, h/8, w/8), (B, 4, ...)
        delta_ft, delta_flow = self.update4(ft_3, flow_4, corr_4)
        flow0_4, flow1_4, ft_3 = flow0_4 + delta_flow[:, :2], flow1_4 + delta_flow[:, 2:], ft_3 + delta_ft

        # 1/8 -> 1/4, updates at 1/8 ("low") and 1/4 ("high")
        flow0_3, flow1_3, ft_2 = self.decoder3(ft_3, f0_3, f1_3, flow0_4, flow1_4)  # (B, 2, h/4, w/4), (B, C2, ...)
        flow0_3, flow1_3, ft_2 = self._update(self.update3_low, self.update3_high, corr, coords, embt, 2,
                                              flow0_3, flow1_3, ft_2)

        # 1/4 -> 1/2, updates at 1/8 and 1/2
        flow0_2, flow1_2, ft_1 = self.decoder2(ft_2, f0_2, f1_2, flow0_3, flow1_3)  # (B, 2, h/2, w/2), (B, C1, ...)
        flow0_2, flow1_2, ft_1 = self._update(self.update2_low, self.update2_high, corr, coords, embt, 4,
                                              flow0_2, flow1_2, ft_1)

        # 1/2 -> 1/1: num_flows flow pairs, masks and residuals, then the combination
        flow0_1, flow1_1, mask, residual = self.decoder1(ft_1, f0_1, f1_1, flow0_2, flow1_2)  # (B, 2n, h, w) ...
        if scale_factor != 1.0:
            up = 1.0 / scale_factor
            flow0_1, flow1_1 = resize(flow0_1, up) * up, resize(flow1_1, up) * up  # (B, 2n, H, W)
            mask, residual = resize(mask, up), resize(residual, up)
        imgt = combine_candidates(self.comb_block, img0, img1, flow0_1, flow1_1, mask, residual, mean)
        imgt = torch.clamp(imgt, 0, 1)  # (B, 3, H, W); the clamp is part of the official model
        if not return_intermediates:
            return AMTOutput(imgt)
        full = (b, self.num_flows, 2, *flow0_1.shape[-2:])  # the full size, also with scale_factor != 1
        return AMTOutput(imgt, [flow0_1.reshape(full), flow0_2, flow0_3, flow0_4],
                         [flow1_1.reshape(full), flow1_2, flow1_3, flow1_4], [ft_1, ft_2, ft_3])

    def _update(self, low: UpdateBlock, high: UpdateBlock, corr: BidirCorrelation, coords: torch.Tensor,
                embt: torch.Tensor, factor: int, flow0: torch.Tensor, flow1: torch.Tensor, ft: torch.Tensor):
        """The two updates after an intermediate decoder at 1/(8/factor): "low" on correlation samples at 1/8,
        "high" at the level's own resolution on the same samples bilinearly up-sampled (inside the block)."""
        samples, flow = self._lookup(corr, coords, flow0, flow1, embt, downsample=factor)  # (B, K, h/8, w/8)
        delta_ft, delta_flow = low(ft, flow, samples)
        flow0, flow1, ft = flow0 + delta_flow[:, :2], flow1 + delta_flow[:, 2:], ft + delta_ft
        delta_ft, delta_flow = high(ft, torch.cat([flow0, flow1], dim=1), samples, corr_upsample=float(factor))
        return flow0 + delta_flow[:, 0:2], flow1 + delta_flow[:, 2:4], ft + delta_ft

    # ----------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        **config_overrides) -> AMTModel:
        """Load a ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), strict keys."""
        logger.info(LICENCE_NOTE)
        return load_pretrained(cls, path, subfolder=subfolder, torch_dtype=torch_dtype, device=device,
                               **config_overrides)

    @classmethod
    def from_official_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                                 torch_dtype: torch.dtype | None = None, **config) -> AMTModel:
        """Load the official ``amt-g.pth`` (``{"state_dict": {...}}``, official key names) unchanged, strictly.

        ``config``: constructor arguments for another AMT configuration (default AMT-G). Raises
        FileNotFoundError for a missing file and one ValueError for anything that is not such a checkpoint.
        """
        from accelerate import init_empty_weights

        path = Path(path)
        expected = (f"expected the official AMT checkpoint (a torch file holding {{'{OFFICIAL_WRAPPER_KEY}': "
                    "{name: tensor}}, e.g. amt-g.pth)")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; {expected}, or load a save_pretrained folder with "
                             "AMTModel.from_pretrained.")
        if not path.is_file():
            raise FileNotFoundError(f"AMT checkpoint {path} does not exist; {expected}.")
        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (not a torch file, truncated, or a pickle of Python objects)
            raise ValueError(f"{path} is not a readable torch checkpoint ({type(err).__name__}); {expected}.") from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(OFFICIAL_WRAPPER_KEY), dict):
            found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ValueError(f"{path} has no '{OFFICIAL_WRAPPER_KEY}' entry (found {found}); {expected}.")  # noqa: TRY004
        state = checkpoint[OFFICIAL_WRAPPER_KEY]
        with init_empty_weights(include_buffers=False):
            model = cls(**config)
        layout = ("of the released AMT-G size (a .pth carries no config; save other sizes with save_pretrained)"
                  if not config else "of the config passed in (a .pth carries no config)")
        check_state_dict(model, state, str(path), layout)
        dtype = torch_dtype or torch.float32
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        nn.Module.to(model, device=device, dtype=dtype)
        logger.info(LICENCE_NOTE)
        return model.eval()


#################################################################################
#                              Named configurations                             #
#################################################################################
# AMT-G is the released model (30,638,919 parameters). AMT-Tiny keeps the wiring at small widths for
# tests and demo training (not a released model; its correlation needs sides >= 64).

AMT_CONFIGS: dict[str, dict] = {
    "AMT-G": {"corr_radius": 3, "corr_lvls": 4, "num_flows": 5},
    "AMT-Tiny": {"corr_radius": 2, "corr_lvls": 3, "num_flows": 3, "channels": (16, 24, 32, 40), "skip_channels": 12,
                     "corr_encoder_channels": (16, 24, 32), "corr_feature_dim": 32, "update_hidden_dim": 32,
                     "update_flow_dim": 16, "update_corr_dim": 32, "update_corr_dim2": 32, "update_fc_dim": 28},
}


def amt_config(name: str, **overrides) -> dict:
    """Constructor arguments of a named configuration, with overrides."""
    if name not in AMT_CONFIGS:
        raise ValueError(f"Unknown AMT configuration {name!r}; choose one of {', '.join(AMT_CONFIGS)}.")
    return dict(AMT_CONFIGS[name], **overrides)


def build_amt(name: str, **overrides) -> AMTModel:
    """A randomly initialised AMT of a named configuration, e.g. ``build_amt("AMT-Tiny")``."""
    return AMTModel(**amt_config(name, **overrides))
