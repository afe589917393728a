"""RGT super-resolution training on the shared trainer (``opensora-plan train-sr``).

Data: :class:`~opensora_plan.data.frames.SRPairDataset` (HR crops of random video frames, LR made by a
degradation of :data:`~opensora_plan.data.frames.DEGRADATIONS`; ``bicubic`` by default, as RGT's DF2K
training pairs; ``vae`` / ``bicubic_or_vae`` add a round trip through the CausalVAE of ``--degradation_vae``, loaded
once here by :func:`load_degradation_vae`). Objective: L1 between the network's (unclamped) output and the HR crop, as RGT
(``options/train/train_RGT_x2.yml``: Adam, lr 2e-4, betas (0.9, 0.99), no weight decay, HR patches of 128
for x2, batch 32 = 8 per GPU x 4). The scale is the model's (``upscale`` of its config or weights file).
Validation: PSNR / SSIM (RGB, whole crop) of the (EMA) model on held-out clips, in ``log.jsonl``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..data.frames import DEGRADATIONS, SRPairDataset, degradation_needs_vae
from ..options import option
from .frame_task import (
    FrameTrainOptions,
    FrameTrainTask,
    check_pretrained,
    model_config_arg,
    prepare_frame_run,
)
from .losses_frames import l1_loss
from .trainer import train


@dataclass
class SRTrainOptions(FrameTrainOptions):
    """Every option of ``opensora-plan train-sr`` / :func:`train_sr`; defaults are RGT's x2 recipe where it has one."""

    COMMAND: ClassVar[str] = "train-sr"
    RENAMED: ClassVar[dict[str, str]] = {"ae_path": "degradation_vae"}

    crop_size: int = option(128, help="HR crop side (a multiple of the model's scale; the LR crop is crop_size / "
                            "scale)", group="data")
    degradation: str = option("bicubic", choices=list(DEGRADATIONS), help="how LR frames are made from HR frames "
                              "(data/frames.py DEGRADATIONS): bicubic; vae = bicubic, then a round trip through the "
                              "CausalVAE of --degradation_vae (what a text-to-video model's decoded frames look like); "
                              "bicubic_or_vae = one or the other per sample", group="data")
    degradation_vae: str | None = option(None, help="CausalVAE folder (or a model folder with a vae/ subfolder) of --degradation "
                                 "vae / bicubic_or_vae: the VAE whose decoded frames the model will upscale (the demo's: "
                                 "src/opensora_plan/assets/demo/vae)", group="data")
    vae_latent_noise: float = option(0.0, help="with a VAE degradation: Gaussian noise added to the latent before "
                                     "decoding, its std a fraction drawn per sample from [0, S] of the latent's own std, "
                                     "as a sampled video's latents are less exact than an encoding (held-out clips: "
                                     "none)", group="data")
    learning_rate: float = option(2e-4, help="AdamW learning rate", group="optimisation")
    adam_beta1: float = option(0.9, help="AdamW beta1", group="optimisation")
    adam_beta2: float = option(0.99, help="AdamW beta2", group="optimisation")

    def __post_init__(self):
        super().__post_init__()
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"--degradation {self.degradation!r} is not known; use one of {', '.join(DEGRADATIONS)}.")
        if degradation_needs_vae(self.degradation) and not self.degradation_vae:
            raise ValueError(f"--degradation {self.degradation} needs --degradation_vae: the CausalVAE folder whose decoded frames "
                             "the model will upscale (the demo's: src/opensora_plan/assets/demo/vae).")
        if not 0 <= self.vae_latent_noise <= 1:
            raise ValueError(f"--vae_latent_noise must be in [0, 1] (the largest fraction of the latent's own standard "
                             f"deviation drawn as noise; 0.3-0.4 matches the demo's sampled latents), got "
                             f"{self.vae_latent_noise}.")
        if self.vae_latent_noise and not degradation_needs_vae(self.degradation):
            raise ValueError(f"--vae_latent_noise has no effect with --degradation {self.degradation}; drop it, or use "
                             f"{' or '.join(n for n in DEGRADATIONS if degradation_needs_vae(n))}.")
        if self.degradation_vae and not degradation_needs_vae(self.degradation):
            raise ValueError(f"--degradation_vae has no effect with --degradation {self.degradation}; drop it, or use "
                             f"{' or '.join(n for n in DEGRADATIONS if degradation_needs_vae(n))}.")


class SRTrainTask(FrameTrainTask):
    """``model(lr) -> sr`` (unclamped) against the HR crop, L1."""

    def predict(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        return model(batch["lr"].to(device)), batch["hr"].to(device)  # (B, 3, S, S) each

    def objective(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return l1_loss(prediction, target), {}

    def picture(self, sample: dict, prediction: torch.Tensor) -> torch.Tensor:
        """LR (nearest-upscaled) | prediction | HR, side by side."""
        scale = sample["hr"].shape[-1] // sample["lr"].shape[-1]
        lr = sample["lr"].repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        return torch.cat([lr, prediction, sample["hr"]], dim=-1)


def build_sr_model(model_config: str | None, pretrained: str | None) -> torch.nn.Module:
    """RGT from ``--pretrained`` (an official ``RGT_x2.pth`` / ``RGT_x4.pth``, whose architecture ``--model_config``
    names when it is not the released RGT, e.g. ``RGT-S-x2``; or a save_pretrained folder) or from
    ``--model_config`` alone (a registry name such as ``RGT-x2``, or a JSON config: RGTModel fields or an
    official ``{"network_g": {...}}``), randomly initialised from the current torch seed."""
    from ..models.rgt import RGT_CONFIGS, RGTModel

    config = model_config_arg(model_config, RGT_CONFIGS, "RGT")
    if pretrained:
        path = check_pretrained(pretrained, model_config, "an official RGT_x2.pth / RGT_x4.pth")
        if path.is_dir():
            return RGTModel.from_pretrained(path)
        return RGTModel.from_official_checkpoint(path, config=config)
    return RGTModel.from_config(RGT_CONFIGS[config] if isinstance(config, str) else config)


def load_degradation_vae(degradation_vae: str) -> torch.nn.Module:
    """The CausalVAE of ``--degradation_vae`` (a VAE folder, or a model folder with a ``vae/`` subfolder), fp32 on the CPU
    (the data loader's workers run the degradation), eval mode, no gradients.

    Raises FileNotFoundError / ValueError (one line) for a folder that holds no CausalVAE.
    """
    from ..models.causalvae import CausalVAEModel
    from ..utils import read_json_file, with_article

    path = Path(degradation_vae)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--degradation_vae {degradation_vae} is not a CausalVAE folder (no config.json, nor vae/config.json "
                                "in it); give the VAE folder, e.g. src/opensora_plan/assets/demo/vae.")
    config = read_json_file(path / "config.json", "--degradation_vae")
    found = config.get("_class_name", "CausalVAEModel") if isinstance(config, dict) else type(config).__name__
    if found != "CausalVAEModel":
        raise ValueError(f"--degradation_vae {path} holds {with_article(found)}, not a CausalVAE; give the VAE folder, e.g. "
                         "src/opensora_plan/assets/demo/vae.")
    try:
        vae = CausalVAEModel.from_pretrained(path, device="cpu")
    except (OSError, ValueError) as err:
        raise ValueError(f"--degradation_vae {path} could not be loaded as a CausalVAE: {err}") from None
    return vae.eval().requires_grad_(False)


def train_sr(options: SRTrainOptions | Mapping, build_model=build_sr_model) -> dict:
    """Build RGT and the LR/HR pairs, then run the shared trainer; returns the trainer's summary.

    ``options``: an :class:`SRTrainOptions` or a dict of its fields. Bad input raises ValueError /
    FileNotFoundError (one line) before any model loads. ``build_model(model_config, pretrained)`` makes the
    model (default :func:`build_sr_model`; tests pass a tiny one).
    """
    options = SRTrainOptions.of(options)
    config, paths, held_out = prepare_frame_run(options)
    vae = load_degradation_vae(options.degradation_vae) if degradation_needs_vae(options.degradation) else None
    torch.manual_seed(config.seed)  # fresh weights are a function of --seed (and the same on every process)
    model = build_model(options.model_config, options.pretrained)
    scale = int(model.config.upscale)
    if options.crop_size % scale:
        raise ValueError(f"--crop_size {options.crop_size} must be a multiple of the model's scale {scale}; e.g. "
                         f"{max(scale, options.crop_size // scale * scale)}.")
    side = options.crop_size // scale
    for training in (True, False):  # RGT refuses sides its recursion cannot reduce (training and validation)
        try:
            model.train(training).check_size(side, side)
        except ValueError as err:
            raise ValueError(f"--crop_size {options.crop_size} gives {side} px LR crops, too small: {err}") from None
    dataset = SRPairDataset(paths, scale, options.crop_size, options.degradation,
                            samples_per_video=options.samples_per_video, vae=vae,
                            vae_latent_noise=options.vae_latent_noise)
    validation = SRPairDataset(held_out, scale, options.crop_size, options.degradation,
                               deterministic=True, vae=vae) if held_out else None
    task = SRTrainTask(model, dataset, validation, learning_rate=options.learning_rate,
                       betas=(options.adam_beta1, options.adam_beta2), weight_decay=options.adam_weight_decay,
                       max_grad_norm=options.max_grad_norm)
    if validation is not None:
        task.held_out_samples()  # read (and checked) once, before the first step
    return train(task, config)
