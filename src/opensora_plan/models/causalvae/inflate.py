"""Initialise a CausalVAE from a 2-D image VAE (diffusers ``AutoencoderKL``) by kernel inflation.

The reference started its CausalVAE from Stable Diffusion's image VAE with what the authors call
"tail" initialisation (spec 1.8, last item): every 2-D kernel goes into the **last** temporal tap of
the 3-D kernel and the other taps are zero. Under the replicate-first causal padding the last tap
sees the current frame, so each 3-D conv computes the 2-D conv of the current frame:

- an image (T = 1) goes through the inflated model exactly as through the 2-D VAE;
- a static video comes close, but not exactly, because the mid-block attention's reshape quirk
  (spec 1.2 AttnBlock3D, quirk 8.1) mixes channels of different frames; :func:`compare_with_2d`
  measures how close, frame by frame.

Name mapping (diffusers -> CausalVAE): ``down_blocks.l.resnets.j`` -> ``down.l.block.j``,
``downsamplers.0.conv`` -> ``downsample.conv``, ``mid_block.resnets.{0,1}`` -> ``mid.block_{1,2}``,
``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` -> ``mid.attn_1.{norm,q,k,v,proj_out}``,
``up_blocks.i`` -> ``up.(L-1-i)`` (diffusers lists the decoder levels in application order, the
CausalVAE by level index), ``conv_shortcut`` -> ``nin_shortcut``, ``conv_norm_out`` -> ``norm_out``;
every conv gains the CausalConv3d ``.conv`` level.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ...options import Options, option
from ...pipelines.outputs import OVERWRITE_HELP, check_targets
from .model import CausalVAEModel

logger = logging.getLogger(__name__)

_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", r".nin_shortcut."),
]
# CausalVAE modules that are CausalConv3d (their Conv3d sits one level deeper, under ``.conv``).
_CAUSAL_CONV = re.compile(
    r"(conv_in|conv_out|conv1|conv2|nin_shortcut|downsample\.conv|upsample\.conv|quant_conv|"
    r"post_quant_conv|attn_1\.q|attn_1\.k|attn_1\.v|attn_1\.proj_out)\.(weight|bias)$"
)


def causalvae_key(key_2d: str, levels: int) -> str:
    """The CausalVAE state-dict key for a diffusers ``AutoencoderKL`` key (``levels`` = number of levels)."""
    key = key_2d
    match = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.", key)
    if match:
        level = levels - 1 - int(match.group(1))
        rest = key[match.end():]
        if match.group(2) == "resnets":
            key = f"decoder.up.{level}.block.{match.group(3)}.{rest}"
        else:
            key = f"decoder.up.{level}.upsample.{rest}"
    for pattern, replacement in _RULES:
        key = re.sub(pattern, replacement, key)
    if _CAUSAL_CONV.search(key):
        key = re.sub(r"\.(weight|bias)$", r".conv.\1", key)
    return key


def inflate_tensor(tensor_2d: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    """2-D conv (O, I, kh, kw) or linear (O, I) weight -> 3-D (O, I, kt, kh, kw): 2-D kernel in the last
    temporal tap, zeros elsewhere ("tail" initialisation). Other tensors must already match."""
    if tensor_2d.shape == target_shape:
        return tensor_2d.clone()
    if len(target_shape) == 5:
        kernel = tensor_2d.reshape(*tensor_2d.shape[:2], *([1, 1] if tensor_2d.ndim == 2 else tensor_2d.shape[2:]))
        if kernel.shape == (*target_shape[:2], *target_shape[3:]):
            out = torch.zeros(target_shape, dtype=tensor_2d.dtype)
            out[:, :, -1] = kernel  # the current-frame tap under replicate-first causal padding
            return out
    raise ValueError(f"cannot inflate a {tuple(tensor_2d.shape)} tensor into {tuple(target_shape)}")


def causalvae_config_from_2d(config_2d: dict) -> dict:
    """CausalVAE config with the 2-D VAE's widths and the release layout of temporal resampling.

    Levels 0 and 1 of the encoder halve time, the last two decoder levels double it (as the release
    config); spatial resampling follows the 2-D VAE (all levels but the last / first).
    """
    widths = list(config_2d["block_out_channels"])
    levels = len(widths)
    problems = []
    if config_2d.get("norm_num_groups", 32) != 32:
        problems.append(f"norm_num_groups {config_2d['norm_num_groups']} (CausalVAE GroupNorms use 32)")
    if config_2d.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn {config_2d['act_fn']!r} (CausalVAE uses silu)")
    if config_2d.get("in_channels", 3) != 3 or config_2d.get("out_channels", 3) != 3:
        problems.append("in/out channels other than 3")
    if any(t != "DownEncoderBlock2D" for t in config_2d.get("down_block_types", ())) or any(
        t != "UpDecoderBlock2D" for t in config_2d.get("up_block_types", ())
    ):
        problems.append("block types other than DownEncoderBlock2D/UpDecoderBlock2D")
    if levels < 3:
        problems.append(f"{levels} levels (4x temporal compression needs at least 3)")
    if any(w % widths[0] for w in widths):
        problems.append(f"block_out_channels {widths} not multiples of the first width")
    if problems:
        raise ValueError(
            "The 2-D VAE cannot be inflated into a CausalVAE: " + "; ".join(problems)
            + "; use a Stable-Diffusion-style AutoencoderKL or pass a matching CausalVAE config."
        )
    return {
        "hidden_size": widths[0],
        "hidden_size_mult": [w // widths[0] for w in widths],
        "num_res_blocks": config_2d["layers_per_block"],
        "z_channels": config_2d["latent_channels"],
        "embed_dim": config_2d["latent_channels"],
        "resolution": config_2d.get("sample_size", 256),
        "scaling_factor": config_2d.get("scaling_factor", 0.18215),
        "encoder_resnet_blocks": ["ResnetBlock3D"] * levels,
        "decoder_resnet_blocks": ["ResnetBlock3D"] * levels,
        "encoder_spatial_downsample": ["SpatialDownsample2x"] * (levels - 1) + [""],
        "encoder_temporal_downsample": ["TimeDownsample2x"] * 2 + [""] * (levels - 2),
        "decoder_spatial_upsample": [""] + ["SpatialUpsample2x"] * (levels - 1),
        "decoder_temporal_upsample": [""] * (levels - 2) + ["TimeUpsample2x"] * 2,
    }


@dataclass
class InflationReport:
    """What the inflation filled: ``not_filled`` keeps the CausalVAE's fresh initialisation."""

    filled: list[str] = field(default_factory=list)
    not_filled: list[str] = field(default_factory=list)
    unused_2d: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"filled {len(self.filled)} CausalVAE tensors from the 2-D VAE (2-D kernels in the last temporal tap)"]
        lines.append(f"not filled (kept their fresh initialisation): {len(self.not_filled)}")
        lines += [f"  {k}" for k in self.not_filled]
        lines.append(f"2-D tensors with no CausalVAE counterpart (ignored): {len(self.unused_2d)}")
        lines += [f"  {k}" for k in self.unused_2d]
        return "\n".join(lines)


def inflate_state_dict(state_2d: dict[str, torch.Tensor], model: CausalVAEModel) -> tuple[dict, InflationReport]:
    """Fill ``model``'s state dict from a 2-D VAE state dict; returns (state dict, report)."""
    levels = len(model.config.hidden_size_mult)
    target = model.state_dict()
    state = {k: v.detach().clone() for k, v in target.items()}
    report = InflationReport()
    for key_2d, tensor in state_2d.items():
        key = causalvae_key(key_2d, levels)
        if key not in target:
            report.unused_2d.append(key_2d)
            continue
        try:
            state[key] = inflate_tensor(tensor.float(), target[key].shape).to(target[key].dtype)
        except ValueError as err:
            raise ValueError(
                f"2-D tensor {key_2d} does not fit CausalVAE tensor {key}: {err}; the CausalVAE config "
                "must have the 2-D VAE's widths, levels and blocks per level."
            ) from None
        report.filled.append(key)
    report.not_filled = sorted(target.keys() - set(report.filled))
    return state, report


@dataclass
class InflateOptions(Options):
    """Every option of ``opensora-plan convert inflate-2d-vae``."""

    COMMAND: ClassVar[str] = "convert inflate-2d-vae"

    vae_2d_path: str = option(help="diffusers AutoencoderKL folder (config.json + weights)")
    output_dir: str = option(help="CausalVAE folder to write")
    subfolder: str | None = option(None, help="e.g. 'vae' inside a Stable Diffusion folder")
    model_config: str | None = option(None, help="CausalVAE config.json to inflate into (unset: derived from the "
                                      "2-D config)")
    verify_size: int = option(0, help="also compare both VAEs on a synthetic SIZExSIZE image and a static video "
                              "(0: no check)")
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        if self.verify_size < 0:
            raise ValueError(f"--verify_size must be >= 0, got {self.verify_size}.")
        folder = Path(self.output_dir)  # a CausalVAE folder there is replaced only with --overwrite
        check_targets([], [folder / "config.json", folder / "diffusion_pytorch_model.safetensors"], self.overwrite,
                      flag="--output_dir")


def inflate_2d_vae(
    vae_2d_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    causal_config: dict | None = None,
    subfolder: str | None = None,
) -> tuple[CausalVAEModel, InflationReport]:
    """Load a diffusers ``AutoencoderKL`` folder, inflate it into a CausalVAE, optionally save it.

    ``causal_config``: a CausalVAE config (e.g. the release config) to inflate into; by default it is
    derived from the 2-D config (:func:`causalvae_config_from_2d`). ``output_path`` receives a
    ``save_pretrained`` folder that ``CausalVAEModel.from_pretrained`` loads.
    """
    from diffusers import AutoencoderKL

    folder = Path(vae_2d_path) / subfolder if subfolder else Path(vae_2d_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'config.json'} does not exist; expected a diffusers AutoencoderKL folder "
            "(config.json + diffusion_pytorch_model.safetensors), e.g. the 'vae' folder of Stable Diffusion."
        )
    vae_2d = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32)
    config = causal_config if causal_config is not None else causalvae_config_from_2d(dict(vae_2d.config))
    model = CausalVAEModel.from_config(config)
    state, report = inflate_state_dict(vae_2d.state_dict(), model)
    model.load_state_dict(state, strict=True)
    if report.not_filled:
        logger.warning("%d CausalVAE tensors were not filled from the 2-D VAE: %s", len(report.not_filled),
                       ", ".join(report.not_filled))
    if output_path is not None:
        model.save_pretrained(str(output_path))
    return model.eval(), report


@torch.no_grad()
def compare_with_2d(vae_2d, model: CausalVAEModel, image: torch.Tensor, num_frames: int) -> dict:
    """Reconstruct ``image`` (B, 3, H, W) in [-1, 1] with both VAEs (posterior means).

    Returns ``image_max_abs_diff`` (T = 1 through the CausalVAE vs the 2-D VAE) and, for a static
    video of ``num_frames`` copies of the image, per-frame ``static_max_abs_diff`` and
    ``static_psnr_db`` against the 2-D reconstruction (pixels in [-1, 1], PSNR over range 2).
    """
    reference = vae_2d(image, sample_posterior=False).sample  # (B, 3, H, W)
    single = model(image.unsqueeze(2), sample_posterior=False).sample[:, :, 0]  # (B, 3, H, W)
    video = image.unsqueeze(2).expand(-1, -1, num_frames, -1, -1).contiguous()  # (B, 3, T, H, W)
    static = model(video, sample_posterior=False).sample  # (B, 3, T, H, W)
    diffs, psnrs = [], []
    for t in range(static.shape[2]):
        err = static[:, :, t] - reference
        diffs.append(err.abs().max().item())
        mse = err.pow(2).mean().item()
        psnrs.append(float("inf") if mse == 0 else 10 * math.log10(4.0 / mse))
    return {
        "image_max_abs_diff": (single - reference).abs().max().item(),
        "static_max_abs_diff": diffs,
        "static_psnr_db": psnrs,
    }


def synthetic_image(size: int) -> torch.Tensor:
    """A deterministic smooth test image (1, 3, size, size) in [-1, 1]: colour ramps and a disc."""
    ramp = torch.linspace(-1, 1, size)
    y, x = ramp[:, None].expand(size, size), ramp[None, :].expand(size, size)
    disc = ((x.pow(2) + y.pow(2)) < 0.25).float()
    return torch.stack([x, y, 0.8 * disc - 0.4 * x * y]).clamp(-1, 1).unsqueeze(0)
