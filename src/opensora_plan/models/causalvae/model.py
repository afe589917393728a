"""CausalVAEModel: the Open-Sora-Plan v1.0.0 video VAE ("CausalVAEModel_4x8x8"), spec section 1.

Pixels (B, 3, T, H, W) in [-1, 1] with T = 1 or 1 + 4k  <->  latents (B, 4, 1 + (T-1)/4, H/8, W/8)
(for the release config). ``encode`` returns a diagonal Gaussian (diffusers'
``DiagonalGaussianDistribution``); ``decode`` returns pixels (no clamp). The latent scaling factor
``config.scaling_factor`` (0.18215) is *not* applied here, as in the reference model; pipelines apply it.

Beyond the reference: ``enable_temporal_chunking`` decodes long latent videos a few latent frames at
a time with bounded memory, by default losslessly (``streaming.py``: the full decode's output), and
``set_decode_memory_budget`` turns that on by itself when a decode would not fit; see
``docs/causalvae.md`` for the design and measurements.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from opensora_plan.utils import progress_bar

from ...utils import valid_num_frames
from ..loading import load_pretrained
from .modules import CausalConv3d, Decoder, Encoder
from .streaming import stream_up_path

logger = logging.getLogger(__name__)

# Config keys of the official release.json that are accepted for compatibility but change nothing
# here: training-only settings (the loss module and its optimiser live in the training code) and the
# attention-resolution bookkeeping (``resolution`` only matters through ``attn_resolutions``, which
# must be empty).
UNUSED_CONFIG_KEYS = ("loss_type", "loss_params", "lr", "resolution")

# Block-type names of the release config -> the only value each key supports. ``""`` in a per-level
# resampler list means "no resampler at this level".
SUPPORTED_BLOCK_TYPES = {
    "q_conv": "CausalConv3d",
    "encoder_conv_in": "CausalConv3d",
    "encoder_conv_out": "CausalConv3d",
    "encoder_attention": "AttnBlock3D",
    "encoder_mid_resnet": "ResnetBlock3D",
    "encoder_resnet_blocks": "ResnetBlock3D",
    "encoder_spatial_downsample": "SpatialDownsample2x",
    "encoder_temporal_downsample": "TimeDownsample2x",
    "decoder_conv_in": "CausalConv3d",
    "decoder_conv_out": "CausalConv3d",
    "decoder_attention": "AttnBlock3D",
    "decoder_mid_resnet": "ResnetBlock3D",
    "decoder_resnet_blocks": "ResnetBlock3D",
    "decoder_spatial_upsample": "SpatialUpsample2x",
    "decoder_temporal_upsample": "TimeUpsample2x",
}
_PER_LEVEL_RESAMPLERS = ("encoder_spatial_downsample", "encoder_temporal_downsample",
                         "decoder_spatial_upsample", "decoder_temporal_upsample")

# ``enable_temporal_chunking(mode=...)``: exact streaming, or per-chunk decoding with context.
TEMPORAL_CHUNKING_MODES = ("lossless", "approximate")

LOSS_SKIP_REASON = "LPIPS + discriminator training tensors; not part of encode/decode"


def estimate_decode_memory(vae: "CausalVAEModel", latent_shape: tuple[int, ...], dtype: torch.dtype,
                           mode: str = "full", chunk_latent_frames: int = 4,
                           offload_device: str | torch.device | None = "cpu",
                           device: str | torch.device | None = None) -> int:
    """Estimated peak bytes a decode allocates on the compute device (weights excluded).

    A model of the largest set of tensors alive at once, walked over the decoder's layout: for
    ``mode="full"`` (no tiling, no chunking) whole activations, for ``mode="lossless"`` the trunk
    (latent resolution), the output video and the working set of one ``chunk_latent_frames`` chunk,
    plus the stored stage outputs when they stay on the compute device ``device`` (default: the
    VAE's device), i.e. when ``offload_device`` is None or that device. Within 10 % of the measured
    CPU peak RSS in ``docs/causalvae.md``; allocator caches and attention workspaces come on top.

    Args:
        latent_shape: (B, embed_dim, t, h, w) of the latents to decode.
        dtype: the VAE's dtype.

    Raises:
        ValueError: a latent shape that is not 5-D, or an unknown mode.
    """
    if len(latent_shape) != 5:
        raise ValueError(f"estimate_decode_memory needs a latent shape (B, C, t, h, w); got {tuple(latent_shape)}.")
    if mode not in ("full", "lossless"):
        raise ValueError(f"estimate_decode_memory: unknown mode {mode!r}; use 'full' or 'lossless'.")
    batch, _, frames, height, width = (int(v) for v in latent_shape)
    item = torch.empty((), dtype=dtype, device="meta").element_size()
    decoder = vae.decoder

    def stage_peaks(t: int, streamed: bool) -> tuple[int, int, int]:
        """(peak live elements inside one stage, largest stored stage output, output elements).

        ``t``: latent frames (a whole video, or one chunk when ``streamed``: every stage then also
        holds 2 carried frames and a time upsampling exactly doubles the frames). A causal conv holds
        its input, the padded copy, a reordered copy (oneDNN's blocked layout on CPU) and its output
        twice (blocked, then plain); a ResnetBlock3D also holds its input and, around conv2, conv1's
        output. Measured CPU peaks match within about 10 %.
        """
        top = decoder.conv_in.conv.out_channels
        hw, peak = height * width, 0
        # Lossless stage outputs: a stage consumes its input store chunk by chunk while it fills its
        # output store, so about the larger of the two is alive (a spatial-only upsampling is not
        # stored: the next block recomputes it from the smaller store before it).
        stored = top * t * hw
        for up in reversed(decoder.up):
            for block in up.block:
                cin, cout = block.conv1.conv.in_channels, block.conv1.conv.out_channels
                n, padded = t * hw, (t + 2) * hw
                peak = max(peak, 2 * cin * n + 2 * cin * padded + 2 * cout * n,
                           cin * n + 2 * cout * n + 2 * cout * padded + 2 * cout * n)
                stored = max(stored, cout * n)
                channels = cout
            if hasattr(up, "upsample"):  # input, nearest x2, reordered copy, output twice
                peak = max(peak, channels * t * hw * (1 + 4 * 4))
                hw *= 4
            if hasattr(up, "time_upsample"):  # input, interpolated, concatenated
                peak = max(peak, channels * t * hw * 5)
                t = 2 * t if streamed else 1 + 2 * (t - 1)
                stored = max(stored, channels * t * hw)
        head = channels * (2 * t + 2 * (t + 2)) * hw + 6 * t * hw
        return max(peak, head, 7 * top * height * width), stored, 3 * t * hw

    trunk = 7 * decoder.conv_in.conv.out_channels * frames * height * width  # mid block at latent resolution
    if mode == "full":
        peak, _, _ = stage_peaks(frames, streamed=False)
        return batch * max(peak, trunk) * item
    working, _, _ = stage_peaks(min(chunk_latent_frames, frames), streamed=True)
    _, stored, output = stage_peaks(frames, streamed=False)
    compute = torch.device(device) if device is not None else next(vae.parameters()).device
    on_device = offload_device is None or torch.device(offload_device) == compute
    total = max(trunk, working + output) + (stored if on_device else 0)
    return batch * total * item


@dataclass(frozen=True)
class DecodePlan:
    """:meth:`CausalVAEModel.decode_plan`: ``chunk`` latent frames per lossless chunk (None: the plain decode),
    ``offload`` where the stage outputs wait (None: the compute device), ``need`` the plain decode's estimated
    bytes, ``peak`` the chosen plan's, ``fits`` whether that is within the budget."""

    chunk: int | None
    offload: torch.device | None
    need: int
    peak: int
    fits: bool


@dataclass
class CausalVAEOutput(BaseOutput):
    """``forward`` output: the reconstruction and the posterior it was decoded from (for the KL term)."""

    sample: torch.Tensor
    latent_dist: DiagonalGaussianDistribution


def _check_block_types(config: dict, levels: int) -> None:
    """One ValueError for the first block type this implementation does not provide."""
    for key, supported in SUPPORTED_BLOCK_TYPES.items():
        value = config[key]
        if key in _PER_LEVEL_RESAMPLERS or key.endswith("_resnet_blocks"):
            values = list(value)
            if len(values) != levels:
                raise ValueError(
                    f"Config key {key!r} has {len(values)} entries but hidden_size_mult has {levels} levels; "
                    f"give one entry per level."
                )
            allowed = {supported, ""} if key in _PER_LEVEL_RESAMPLERS else {supported}
            bad = [v for v in values if v not in allowed]
        else:
            bad = [] if value == supported else [value]
        if bad:
            raise ValueError(
                f"Config key {key!r} asks for {bad[0]!r}, which this implementation does not provide; "
                f"only the v1.0.0 release block {supported!r} is supported, use the release config value."
            )
    for key in ("encoder_spatial_downsample", "encoder_temporal_downsample"):
        if config[key][-1]:
            # The reference builds such a resampler but its encoder never applies it (spec 1.3 quirk).
            raise ValueError(
                f"Config key {key!r} puts a resampler at the last level, which the reference silently "
                f"ignores; use '' for the last level as the release config does."
            )


class CausalVAEModel(ModelMixin, ConfigMixin):
    """CausalVAE 4x8x8 video autoencoder with the official state-dict layout.

    The constructor accepts every key of the release ``config.json``; the keys in
    ``UNUSED_CONFIG_KEYS`` have no effect and block types other than the release ones are rejected.
    """

    _supports_gradient_checkpointing = True  # per residual/attention block, for VAE training

    @register_to_config
    def __init__(
        self,
        lr: float = 1e-5,
        hidden_size: int = 128,
        z_channels: int = 4,
        hidden_size_mult: tuple[int, ...] = (1, 2, 4, 4),
        attn_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        resolution: int = 256,
        double_z: bool = True,
        embed_dim: int = 4,
        num_res_blocks: int = 2,
        loss_type: str = "opensora.models.ae.videobase.losses.LPIPSWithDiscriminator",
        loss_params: dict | None = None,
        q_conv: str = "CausalConv3d",
        encoder_conv_in: str = "CausalConv3d",
        encoder_conv_out: str = "CausalConv3d",
        encoder_attention: str = "AttnBlock3D",
        encoder_resnet_blocks: tuple[str, ...] = ("ResnetBlock3D",) * 4,
        encoder_spatial_downsample: tuple[str, ...] = ("SpatialDownsample2x",) * 3 + ("",),
        encoder_temporal_downsample: tuple[str, ...] = ("TimeDownsample2x",) * 2 + ("", ""),
        encoder_mid_resnet: str = "ResnetBlock3D",
        decoder_conv_in: str = "CausalConv3d",
        decoder_conv_out: str = "CausalConv3d",
        decoder_attention: str = "AttnBlock3D",
        decoder_resnet_blocks: tuple[str, ...] = ("ResnetBlock3D",) * 4,
        decoder_spatial_upsample: tuple[str, ...] = ("",) + ("SpatialUpsample2x",) * 3,
        decoder_temporal_upsample: tuple[str, ...] = ("", "", "TimeUpsample2x", "TimeUpsample2x"),
        decoder_mid_resnet: str = "ResnetBlock3D",
        scaling_factor: float = 0.18215,
    ):
        # Defaults are the release config (spec 1.1); note the *official* constructor defaults put the
        # time downsampling at other levels (spec 8.3), so always pass the release config.
        super().__init__()
        levels = len(hidden_size_mult)
        _check_block_types(dict(self.config), levels)
        if list(attn_resolutions):
            raise ValueError(
                f"attn_resolutions={list(attn_resolutions)} asks for attention inside the levels, which the "
                f"v1.0.0 release does not use and this implementation does not provide; use []."
            )
        if not double_z:
            raise ValueError("double_z=False leaves no log-variance for the Gaussian posterior; use double_z=true.")
        if hidden_size % 32:
            raise ValueError(f"hidden_size={hidden_size} does not split into GroupNorm's 32 groups; use a multiple of 32.")
        if z_channels != embed_dim:
            # quant_conv maps 2*z -> 2*embed and post_quant_conv embed -> z: both fine, but the
            # release (and the rest of this package) assumes one latent width.
            raise ValueError(f"z_channels ({z_channels}) and embed_dim ({embed_dim}) differ; use equal values (4).")

        self.encoder = Encoder(
            hidden_size, hidden_size_mult, num_res_blocks, z_channels, dropout,
            spatial_downsample=[bool(s) for s in encoder_spatial_downsample],
            temporal_downsample=[bool(s) for s in encoder_temporal_downsample],
        )
        self.decoder = Decoder(
            hidden_size, hidden_size_mult, num_res_blocks, z_channels, dropout,
            spatial_upsample=[bool(s) for s in decoder_spatial_upsample],
            temporal_upsample=[bool(s) for s in decoder_temporal_upsample],
        )
        self.quant_conv = CausalConv3d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, z_channels, 1)

        # Compression factors, derived from the config (4 and 8 for the release).
        self.temporal_compression = 2 ** sum(bool(s) for s in encoder_temporal_downsample)
        self.spatial_compression = 2 ** sum(bool(s) for s in encoder_spatial_downsample)

        # Spatial tiling (spec 1.6), off by default; all four attributes may be set by the user.
        self.use_tiling = False
        self.tile_sample_min_size = 256
        self.tile_latent_min_size = int(self.tile_sample_min_size / 2 ** (levels - 1))
        self.tile_overlap_factor = 0.25

        # Temporal chunking of decode (not in the reference), off by default.
        self.temporal_chunk_latent_frames: int | None = None
        self.temporal_chunking_mode = "lossless"
        self.temporal_context_latent_frames = 0
        self.temporal_offload_device: str | torch.device | None = "cpu"
        self.decode_memory_budget: float | str | None = None  # GiB, "auto" or None: set_decode_memory_budget

    # ----------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        **config_overrides) -> "CausalVAEModel":
        """Load a diffusers-layout folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

        Official VAE files also hold the training loss module (``loss.*``); those tensors are skipped
        with one log line. Any other missing or unexpected key is a ValueError naming it.
        """
        return load_pretrained(cls, path, subfolder=subfolder, torch_dtype=torch_dtype, device=device,
                               skip_prefixes=("loss.",), skip_reason=LOSS_SKIP_REASON, **config_overrides)

    # ----------------------------------------------------------------------------------------
    # Switches
    # ----------------------------------------------------------------------------------------

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode/decode in overlapping spatial tiles once H or W exceeds the tile size (spec 1.6)."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.enable_tiling(False)

    def enable_temporal_chunking(self, chunk_latent_frames: int = 4, context_latent_frames: int | None = None,
                                 mode: str = "lossless", offload_device: str | torch.device | None = "cpu") -> None:
        """Decode long videos ``chunk_latent_frames`` latent frames at a time (not in the reference).

        Applies whenever the latents (or a spatial tile of them) have more than ``chunk_latent_frames``
        frames. With spatial tiling also on, every spatial tile is chunked.

        Args:
            chunk_latent_frames: latent frames per chunk, >= 1.
            context_latent_frames: ``mode="approximate"`` only (default 4, a value of 0 is raised to 1):
                earlier latent frames decoded before each chunk and dropped.
            mode: ``"lossless"`` (default) streams every decoder stage over the chunks with causal-conv
                carry-over and GroupNorm statistics accumulated over all frames, so the output equals
                the full decode up to float rounding (<= 1e-4 in fp32, tested) while the compute
                device holds only a chunk of each stage. ``"approximate"`` decodes each chunk (plus
                context) separately, so GroupNorm statistics are per chunk (~29.5 dB against the full
                decode with random weights); it is the behaviour before ``mode`` existed.
            offload_device: ``mode="lossless"`` only: where each stage's output waits for the next
                stage (default ``"cpu"``; ``None`` = the compute device, faster on a GPU but holds
                one activation of the largest stage there).

        Raises:
            ValueError: ``chunk_latent_frames < 1``, ``context_latent_frames < 0``, an unknown mode, or
                an option given for the other mode.

        Measured memory and time of both modes: ``docs/causalvae.md``.
        """
        if mode not in TEMPORAL_CHUNKING_MODES:
            raise ValueError(f"Unknown temporal chunking mode {mode!r}; use one of {', '.join(TEMPORAL_CHUNKING_MODES)}.")
        if chunk_latent_frames < 1 or (context_latent_frames is not None and context_latent_frames < 0):
            raise ValueError(
                f"Temporal chunking needs chunk_latent_frames >= 1 and context_latent_frames >= 0; got "
                f"{chunk_latent_frames} and {context_latent_frames}."
            )
        if mode == "lossless" and context_latent_frames is not None:
            raise ValueError("context_latent_frames only applies to mode='approximate'; the lossless mode needs no "
                             "context (leave it out).")
        if mode == "approximate" and offload_device != "cpu":
            raise ValueError("offload_device only applies to mode='lossless'; leave it out for mode='approximate'.")
        self.temporal_chunk_latent_frames = int(chunk_latent_frames)
        self.temporal_chunking_mode = mode
        self.temporal_context_latent_frames = max(1, int(4 if context_latent_frames is None else context_latent_frames))
        self.temporal_offload_device = offload_device

    def disable_temporal_chunking(self) -> None:
        self.temporal_chunk_latent_frames = None

    def set_decode_memory_budget(self, gib: float | str | None) -> None:
        """Switch to lossless temporal chunking for decodes that would not fit in ``gib`` GiB.

        ``gib``: a positive finite number of GiB, ``"auto"`` (the compute device's free memory at decode time:
        ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on Linux CPUs), or None (off, the
        default). At each ``decode`` without explicit temporal chunking, the plain decode's need is
        estimated with :func:`estimate_decode_memory` (per tile when tiling applies); above the
        budget, the decode runs in ``mode="lossless"`` with the largest chunk that fits (at least 1
        latent frame) and one INFO line says so. The output is the same either way (lossless).

        Raises:
            ValueError: a budget that is not a positive finite number, ``"auto"`` or None.
        """
        if gib is not None and gib != "auto" and not (
                isinstance(gib, (int, float)) and not isinstance(gib, bool) and gib > 0 and math.isfinite(gib)):
            raise ValueError(f"The VAE decode memory budget must be a positive finite number of GiB, 'auto' or None; "
                             f"got {gib!r}.")
        self.decode_memory_budget = gib

    def _budget_bytes(self, device: torch.device) -> int | None:
        budget = self.decode_memory_budget
        if budget is None:
            return None
        if budget != "auto":
            return int(budget * 2**30)
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu" and os.path.exists("/proc/meminfo"):
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        return None  # no way to ask this device: no automatic switch

    def decode_plan(self, latent_shape: tuple[int, ...], budget: int | None, tiled: bool = False,
                    device: str | torch.device | None = None) -> "DecodePlan":
        """How a decode of ``latent_shape`` (B, C, t, h, w) keeps within ``budget`` bytes (None: no limit).

        The plain decode's need is :func:`estimate_decode_memory` (per tile when ``tiled``); above the budget,
        lossless chunks: stage outputs on the compute device ``device`` (default: the VAE's) first (no
        transfers), then on the CPU, and within each the largest chunk (fewest, most efficient kernel calls).
        Pure arithmetic (a VAE on the meta device works). ``DecodePlan.peak`` is the estimate of the chosen
        plan; ``fits`` is False when even one latent frame per chunk is over the budget (the smallest plan).
        """
        shape = list(latent_shape)
        if tiled:
            shape[3:] = [min(side, self.tile_latent_min_size) for side in shape[3:]]
        need = estimate_decode_memory(self, shape, self.dtype, device=device)
        if budget is None or need <= budget or shape[2] < 2:
            return DecodePlan(None, None, need, need, budget is None or need <= budget)
        compute = torch.device(device) if device is not None else next(self.parameters()).device
        plans = [(c, offload) for offload in (None, torch.device("cpu")) for c in range(shape[2] - 1, 0, -1)]
        estimate = lambda plan: estimate_decode_memory(self, shape, self.dtype, "lossless", *plan, compute)  # noqa: E731
        chunk, offload = next((plan for plan in plans if estimate(plan) <= budget), plans[-1])
        peak = estimate((chunk, offload))
        return DecodePlan(chunk, offload, need, peak, peak <= budget)

    def _chunking_for_budget(self, z: torch.Tensor, tiled: bool) -> tuple[int, torch.device | None] | None:
        """(latent frames per lossless chunk, offload device) that keep this decode within the budget
        (:meth:`decode_plan`), or None (no change)."""
        if self.temporal_chunk_latent_frames is not None or z.shape[2] < 2:
            return None  # explicit chunking wins; a single frame cannot be chunked
        budget = self._budget_bytes(z.device)
        if budget is None:
            return None
        plan = self.decode_plan(tuple(z.shape), budget, tiled, z.device)
        if plan.chunk is None:
            return None
        where = "the CPU" if plan.offload is not None and plan.offload != z.device else "the compute device"
        logger.info("VAE decode of latents %s needs ~%.2f GiB%s, over the %.2f GiB budget: decoding losslessly in "
                    "chunks of %d latent frame(s), stage outputs on %s (~%.2f GiB%s).", tuple(z.shape),
                    plan.need / 2**30, " per tile" if tiled else "", budget / 2**30, plan.chunk, where,
                    plan.peak / 2**30, "" if plan.fits else ", still over budget: the smallest plan")
        return plan.chunk, plan.offload

    # ----------------------------------------------------------------------------------------
    # Encode / decode
    # ----------------------------------------------------------------------------------------

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(
                f"encode expects a video tensor (B, 3, T, H, W) in [-1, 1]; got shape {tuple(x.shape)}."
            )
        frames, (height, width) = x.shape[2], x.shape[3:]
        step = self.temporal_compression
        if not valid_num_frames(frames, step):
            valid = ", ".join(str(1 + step * k) for k in range(5))
            raise ValueError(
                f"encode got {frames} frames; use 1 (an image) or 1+{step}k frames: {valid}, ..., {1 + step * 16}."
            )
        s = self.spatial_compression
        if height % s or width % s:
            # Not an error: the reference accepts any size, but each SpatialDownsample2x halves with
            # rounding down (odd sizes lose their last row/column), so the decode comes back smaller.
            rounded = [side // s * s for side in (height, width)]
            logger.warning("encode got %dx%d frames, not multiples of %d; decoding will give %dx%d (crop or "
                           "resize to multiples of %d to avoid this).", height, width, s, *rounded, s)

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_encode_moments(x)
        return self.quant_conv(self.encoder(x))  # (B, 2*embed, t, h, w)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """(B, 3, T, H, W) in [-1, 1] -> ``AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)``.

        The distribution's logvar is clamped to [-30, 20]; ``.mode()`` is the mean,
        ``.sample(generator)`` draws mean + std * N(0, 1).
        """
        self._check_video(x)
        posterior = DiagonalGaussianDistribution(self._encode_moments(x))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        chunk = self.temporal_chunk_latent_frames
        if chunk and z.shape[2] > chunk:
            if self.temporal_chunking_mode == "lossless":
                return self._lossless_decode(z)
            return self._chunked_decode(z)
        return self.decoder(self.post_quant_conv(z))  # (B, 3, T, H, W)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """(B, embed, t, h, w) latents (unscaled) -> ``DecoderOutput(sample=(B, 3, T, H, W))``.

        T = 1 + 4(t - 1) for the release config; any t >= 1 works. Uses spatial tiling and/or
        temporal chunking when they are enabled, and lossless chunking when a memory budget is set
        (``set_decode_memory_budget``) and the plain decode would exceed it.
        """
        if z.ndim != 5 or z.shape[1] != self.config.embed_dim or z.shape[2] < 1:
            raise ValueError(
                f"decode expects latents (B, {self.config.embed_dim}, t, h, w) with t >= 1; got shape "
                f"{tuple(z.shape)} (unscale diffusion latents by 1/scaling_factor before decoding)."
            )
        tiled = self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size
        chunking = self._chunking_for_budget(z, tiled)
        saved = self.temporal_chunk_latent_frames, self.temporal_chunking_mode, self.temporal_offload_device
        if chunking:  # for this call only
            self.temporal_chunk_latent_frames, self.temporal_offload_device = chunking
            self.temporal_chunking_mode = "lossless"
        try:
            # each spatial tile is temporally chunked when that is enabled
            dec = self._tiled_decode(z) if tiled else self._decode_tile(z)
        finally:
            self.temporal_chunk_latent_frames, self.temporal_chunking_mode, self.temporal_offload_device = saved
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None, return_dict: bool = True):
        """Encode, take a posterior sample (or the mean), decode.

        Returns ``CausalVAEOutput(sample, latent_dist)``, or ``(sample, posterior)`` as the reference.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(z).sample
        if not return_dict:
            return dec, posterior
        return CausalVAEOutput(sample=dec, latent_dist=posterior)

    # ----------------------------------------------------------------------------------------
    # Spatial tiling (reference algorithm, spec 1.6)
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _ramp(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (1 - y/extent, y/extent) for y < extent, computed in float64 and then cast, which is
        the rounding of the reference's per-row Python scalars."""
        new = torch.arange(extent, dtype=torch.float64) / extent
        return (1 - new).to(like.dtype).to(like.device), new.to(like.dtype).to(like.device)

    def _blend_v(self, above: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
        """Linear ramp from the bottom rows of ``above`` into the top rows of ``tile``, **in place**."""
        extent = min(above.shape[3], tile.shape[3], extent)
        if extent:
            old_w, new_w = (w.view(extent, 1) for w in self._ramp(extent, tile))
            tile[:, :, :, :extent] = above[:, :, :, -extent:] * old_w + tile[:, :, :, :extent] * new_w
        return tile

    def _blend_h(self, left: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
        """Linear ramp from the right columns of ``left`` into the left columns of ``tile``, **in place**."""
        extent = min(left.shape[4], tile.shape[4], extent)
        if extent:
            old_w, new_w = self._ramp(extent, tile)
            tile[..., :extent] = left[..., -extent:] * old_w + tile[..., :extent] * new_w
        return tile

    def _stitch(self, rows: list[list[torch.Tensor]], blend_extent: int, keep: int) -> torch.Tensor:
        # Blending mutates each tile in place, so later rows/columns blend against already-blended
        # neighbours: reproduced on purpose (spec 1.6, same as diffusers' AutoencoderKL).
        out_rows = []
        for i, row in enumerate(rows):
            kept = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = self._blend_v(rows[i - 1][j], tile, blend_extent)
                if j > 0:
                    tile = self._blend_h(row[j - 1], tile, blend_extent)
                kept.append(tile[:, :, :, :keep, :keep])
            out_rows.append(torch.cat(kept, dim=4))
        return torch.cat(out_rows, dim=3)

    def _tiles(self, height: int, width: int, stride: int, what: str):
        starts = [(i, j) for i in range(0, height, stride) for j in range(0, width, stride)]
        return progress_bar(starts, desc=what, leave=False, disable=len(starts) < 8)

    def _tiled_encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        size = self.tile_sample_min_size
        stride = int(size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_latent_min_size * self.tile_overlap_factor)
        rows: dict[int, list[torch.Tensor]] = {}
        for i, j in self._tiles(x.shape[3], x.shape[4], stride, "encode tiles"):
            tile = x[:, :, :, i:i + size, j:j + size]  # (B, 3, T, <=size, <=size)
            rows.setdefault(i, []).append(self.quant_conv(self.encoder(tile)))
        return self._stitch(list(rows.values()), blend_extent, self.tile_latent_min_size - blend_extent)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        size = self.tile_latent_min_size
        stride = int(size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_sample_min_size * self.tile_overlap_factor)
        rows: dict[int, list[torch.Tensor]] = {}
        for i, j in self._tiles(z.shape[3], z.shape[4], stride, "decode tiles"):
            tile = z[:, :, :, i:i + size, j:j + size]  # (B, embed, t, <=size, <=size)
            rows.setdefault(i, []).append(self._decode_tile(tile))
        return self._stitch(list(rows.values()), blend_extent, self.tile_sample_min_size - blend_extent)

    # ----------------------------------------------------------------------------------------
    # Temporal chunking (beyond the reference)
    # ----------------------------------------------------------------------------------------

    def _lossless_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The full decode's output with the up levels streamed over frame chunks (see ``streaming``).

        The trunk (conv_in + mid block, incl. the frame-mixing attention quirk) runs on all frames at
        latent resolution, exactly as in a full decode.
        """
        trunk = self.decoder.trunk(self.post_quant_conv(z))  # (B, C_top, t, h, w)
        return stream_up_path(self.decoder, trunk, self.temporal_chunk_latent_frames,
                              self.temporal_offload_device)  # (B, 3, 1 + c*(t-1), H, W)

    def _chunked_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode all latent frames through the decoder trunk, then the up levels chunk by chunk.

        The trunk (conv_in + mid block) runs on every frame at latent resolution (cheap), so the mid
        attention, whose reshape quirk mixes frames, sees exactly what it sees in a full decode. The
        up levels (nearly all the memory) then produce the pixels of latent frames [s, e) from trunk
        features [s - context, e): causal convolutions want past frames, and the decoder treats the
        first frame it is given as an image frame (1 pixel frame instead of ``temporal_compression``),
        so every chunk but the first has at least one context frame whose pixels are dropped.
        GroupNorm statistics are still per chunk, which is why this is approximate.
        """
        chunk, context = self.temporal_chunk_latent_frames, self.temporal_context_latent_frames
        frames = z.shape[2]
        trunk = self.decoder.trunk(self.post_quant_conv(z))  # (B, C_top, t, h, w)
        pieces = []
        for start in progress_bar(range(0, frames, chunk), desc="decode chunks", leave=False,
                          disable=math.ceil(frames / chunk) < 3):
            end = min(start + chunk, frames)
            first = max(0, start - context)
            dec = self.decoder.up_path(trunk[:, :, first:end])  # (B, 3, 1 + c*(end-first-1), H, W)
            if start > 0:
                dec = dec[:, :, -(end - start) * self.temporal_compression:]
            pieces.append(dec)
        return torch.cat(pieces, dim=2)  # (B, 3, 1 + c*(t-1), H, W)
