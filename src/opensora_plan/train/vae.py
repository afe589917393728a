"""The CausalVAE training task for the shared trainer (spec 1.8; ``opensora-plan train-vae``).

Pieces, edm style: :class:`VAEVideoDataset` (data), :class:`~opensora_plan.models.causalvae.losses.
LPIPSWithDiscriminator` (loss maths, in ``models/causalvae/losses.py``) and :class:`VAETrainTask`
(what the generic loop in :mod:`opensora_plan.train.trainer` needs: models, two optimizer phases, the
loss call, validation). :func:`train_vae` wires them from command-line style options.

Two optimizer phases per batch, as the reference's manual optimisation:

1. ``generator``: encode, sample the posterior, decode; loss = nll + kl_weight * KL + adaptive
   adversarial term; Adam(0.5, 0.9) over the VAE and the learned ``logvar``; clip 1.0.
2. ``discriminator``: hinge loss on the (detached) reconstruction of phase 1; Adam(0.5, 0.9); clip 1.0.

Learning rates: the reference hard-codes 1e-4 for VAE parameters whose name contains "time" and
1e-5 for all others, and the config lr (1e-5) for the discriminator. Here the base lr is
``--learning_rate`` (default 1e-5, so the defaults reproduce the reference): "time" parameters get
``time_lr_multiplier`` x that (default 10 -> 1e-4), everything else (and the discriminator) the base lr.
The release architecture has no parameter whose name contains "time" (its time resamplers have no
weights), so there all VAE parameters train at the base lr.

Steps count once per batch: ``disc_start`` and ``max_train_steps`` are numbers of batches (the
reference's Lightning loop counted two steps per batch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from ..data.datasets import SkippedVideos, VAEVideoDataset, collate_video_caption, load_video_entries
from ..data.video_io import VIDEO_EXTENSIONS, list_videos
from ..options import option
from ..utils import valid_num_frames
from .trainer import (Phase, check_adamw, check_new_run_folder, check_resume_options, run_options, TrainConfig,
                      TrainTask, train)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The options
# --------------------------------------------------------------------------------------------


@dataclass
class VAETrainOptions(TrainConfig):
    """Every option of ``opensora-plan train-vae`` / :func:`train_vae`; defaults are the reference's
    (train_causalvae.py). Loop options are inherited from :class:`~opensora_plan.train.trainer.TrainConfig`
    (three get the reference's VAE defaults here); values are checked on construction (ValueError)."""

    COMMAND: ClassVar[str] = "train-vae"
    CONFIG: ClassVar[bool] = True
    # Loop features the VAE task does not offer (its two optimizer phases): they keep TrainConfig's values.
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ("lr_scheduler", "lr_warmup_steps", "use_ema", "ema_decay", "compile",
                                              "sharding", "sp_size", "deepspeed_config")
    GROUPS: ClassVar[tuple[str, ...]] = ("data", "model and loss", "optimisation", "run")

    max_train_steps: int = option(100000, help="optimizer steps (batches)", group="optimisation")
    checkpointing_steps: int = option(2000, help="write checkpoint-<step> every N optimizer steps", group="run")
    validation_steps: int | None = option(500, help="with --validation_videos: PSNR/SSIM + image logs every N "
                                          "optimizer steps", group="run")
    # data
    video_path: str | None = option(None, help="folder of videos, searched recursively (mp4/avi/webm/mkv)",
                                    group="data")
    data_path: str | None = option(None, help="JSON video list (the text-to-video dataset format; captions unused)",
                                   group="data")
    video_folder: str | None = option(None, help="base folder for relative paths in --data_path", group="data")
    num_frames: int = option(17, help="frames per clip: 1 (images) or 1 + 4k", group="data")
    sample_rate: int = option(1, help="temporal stride of the clip window", group="data")
    resolution: int = option(64, help="centre crop to a square of this many pixels; frames are NOT resized "
                             "(reconstruct / eval-vae resize the short side to --resolution first)",
                             group="data")
    validation_videos: int = option(0, help="hold out the last N videos for PSNR/SSIM + image logs every "
                                    "--validation_steps", group="data")
    # model and loss
    model_config: str | None = option(None, help="CausalVAE config.json (or its folder); random initialisation",
                                      group="model and loss")
    pretrained_model_path: str | None = option(None, help="CausalVAE folder to start from (e.g. convert "
                                               "inflate-2d-vae output)", group="model and loss")
    perceptual_weight: float = option(1.0, help="LPIPS weight; 0 trains without LPIPS", group="model and loss")
    lpips_path: list[str] | None = option(None, help="LPIPS weight file(s): VGG16 features + LPIPS heads",
                                          group="model and loss")
    disc_start: int = option(2001, help="step (batches) at which the GAN term starts", group="model and loss")
    disc_weight: float = option(0.5, help="weight of the adversarial term", group="model and loss")
    kl_weight: float = option(1e-6, help="weight of the KL term", group="model and loss")
    logvar_init: float = option(0.0, help="initial value of the learned log-variance", group="model and loss")
    rec_loss: str = option("l1", choices=["l1", "l2"], help="pixel term: l1 (reference) or l2 (better on sparse "
                           "frames, e.g. the demo's shapes)", group="model and loss")
    # optimisation
    learning_rate: float = option(1e-5, help="base lr (VAE, logvar, discriminator); VAE parameters named *time* "
                                  "get --time_lr_multiplier x", group="optimisation")
    time_lr_multiplier: float = option(10.0, help="lr factor of VAE parameters named *time*", group="optimisation")
    max_grad_norm: float = option(1.0, help="grad-norm clip of both phases", group="optimisation")

    def __post_init__(self):
        super().__post_init__()
        check_adamw(self.learning_rate, max_grad_norm=self.max_grad_norm)
        for name in ("learning_rate", "time_lr_multiplier"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}.")
        for name in ("kl_weight", "disc_weight", "perceptual_weight", "disc_start", "validation_videos"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        self.require_at_least(1, "num_frames", "sample_rate")
        if self.model_config and self.pretrained_model_path:
            raise ValueError("--model_config has no effect with --pretrained_model_path (the folder's config.json is "
                             "used); drop one of the two.")
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"--rec_loss {self.rec_loss!r} is not supported; use 'l1' or 'l2'.")

    def task_options(self) -> dict:
        """The options of the VAE task (recorded as ``extra`` in options.json)."""
        loop = {f.name for f in dataclasses.fields(TrainConfig)}
        return {k: v for k, v in self.to_dict().items() if k not in loop}


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP-wrapped -> the model


def _broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy process 0's buffers (the PatchGAN's BatchNorm running statistics) to every process.

    Each process updates the running statistics with its own batch; DDP re-broadcasts process 0's
    at the next forward anyway, so this only makes the state after the last step (what checkpoints
    and the trainer's replica check see) the same everywhere. The statistics are never used for
    training: the discriminator always runs in train mode, as in the reference.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer, src=0)


class VAETrainTask(TrainTask):
    """Two-phase CausalVAE training; models ``model`` (CausalVAEModel) and ``loss`` (logvar + PatchGAN
    (+ frozen LPIPS), saved as ``checkpoint-<step>/loss/`` with the official ``loss.*`` names minus the
    prefix). ``validation`` is an optional dataset of held-out clips for PSNR and image logs."""

    # The discriminator phase does not touch the VAE or logvar, the generator phase never the frozen
    # LPIPS: DDP must tolerate parameters without gradients (the reference ran DDP the same way).
    find_unused_parameters = True

    def __init__(self, vae, loss, dataset: Dataset, learning_rate: float = 1e-5, time_lr_multiplier: float = 10.0,
                 max_grad_norm: float = 1.0, validation: Dataset | None = None):
        self.models = {"model": vae, "loss": loss}
        self.dataset = dataset
        self.collate_fn = collate_video_caption
        self.learning_rate = learning_rate
        self.time_lr_multiplier = time_lr_multiplier
        self.max_grad_norm = max_grad_norm
        self.validation = validation
        self.skipped = SkippedVideos()
        self._reconstructions: dict[int, torch.Tensor] = {}

    def phases(self) -> list[Phase]:
        vae, loss = self.models["model"], self.models["loss"]
        named = list(vae.named_parameters())
        time_params = [p for n, p in named if "time" in n]
        other_params = [p for n, p in named if "time" not in n] + [loss.logvar]
        # The base-lr group comes first: the trainer logs param_groups[0]["lr"].
        groups = [{"params": other_params, "lr": self.learning_rate}]
        if time_params:
            groups.append({"params": time_params, "lr": self.learning_rate * self.time_lr_multiplier})
        generator = torch.optim.Adam(groups, lr=self.learning_rate, betas=(0.5, 0.9))
        disc_params = list(loss.discriminator.parameters())
        discriminator = torch.optim.Adam(disc_params, lr=self.learning_rate, betas=(0.5, 0.9))
        return [
            Phase("generator", generator, other_params + time_params, self.max_grad_norm, models=("model", "loss")),
            # Before disc_start the discriminator loss is multiplied by 0 (zero gradients, no Adam update):
            # the phase is skipped instead of computed. Only Adam's step count differs from the reference.
            Phase("discriminator", discriminator, disc_params, self.max_grad_norm, models=("loss",),
                  start_step=loss.disc_start),
        ]

    def loss(self, phase: str, batch: Any, step: int, models: dict[str, torch.nn.Module], micro: int = 0):
        vae = models["model"]
        x = batch["video"].to(next(vae.parameters()).device)  # (B, 3, T, H, W)
        if phase == "generator":
            self.skipped.update(batch["skipped"])
            reconstruction, posterior = vae(x, sample_posterior=True, return_dict=False)  # (B, 3, T, H, W)
            last_layer = _unwrap(vae).decoder.conv_out.conv.weight
            loss, stats = models["loss"]("generator", x, reconstruction, step, posterior=posterior, last_layer=last_layer)
            # The discriminator phase of this step judges the same reconstruction.
            self._reconstructions[micro] = reconstruction.detach()
            return loss, stats
        reconstruction = self._reconstructions.pop(micro)
        loss, stats = models["loss"]("discriminator", x, reconstruction, step)
        _broadcast_buffers(_unwrap(models["loss"]).discriminator)
        return loss, stats

    def batch_size(self, batch: Any) -> int:
        return int(batch["video"].shape[0])

    def options(self) -> dict:
        loss = self.models["loss"]
        return {
            "learning_rate": self.learning_rate,
            "time_lr_multiplier": self.time_lr_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "adam_betas": [0.5, 0.9],
            "disc_start": loss.disc_start,
            "kl_weight": loss.kl_weight,
            "rec_loss": loss.rec_loss,
            "perceptual_weight": loss.perceptual_weight,
            "disc_weight": loss.disc_weight,
            "num_videos": len(self.dataset),
            "num_validation_videos": len(self.validation) if self.validation is not None else 0,
            "vae_config": dict(self.models["model"].config),
        }

    def run_report(self) -> dict:
        return self.skipped.run_report()

    def epoch_report(self) -> dict:
        report = {"skipped_videos": self.skipped.total, "details": self.skipped.summary()} if self.skipped.total else {}
        self.skipped.reset()
        return report

    @torch.no_grad()
    def validate(self, step: int, models: dict[str, torch.nn.Module], folder: Path, writer) -> None:
        """PSNR/SSIM of posterior-mode reconstructions of the held-out clips; first/middle/last frames as images."""
        if self.validation is None or len(self.validation) == 0:
            return
        from ..metrics import psnr, ssim

        vae = _unwrap(models["model"])
        device = next(vae.parameters()).device
        was_training = vae.training
        vae.eval()
        scores, pictures = [], []
        for index in range(len(self.validation)):
            x = self.validation[index]["video"].unsqueeze(0).to(device)  # (1, 3, T, H, W)
            rec = vae(x, sample_posterior=False).sample.float().clamp(-1, 1)
            a = ((x[0] + 1) / 2).transpose(0, 1).float().cpu()  # (T, 3, H, W) in [0, 1]
            b = ((rec[0] + 1) / 2).transpose(0, 1).cpu()
            scores.append((float(psnr(a, b)), float(ssim(a, b))))
            frames = sorted({0, a.shape[0] // 2, a.shape[0] - 1})
            pictures.append(torch.cat([torch.cat(list(a[frames]), dim=2), torch.cat(list(b[frames]), dim=2)], dim=1))
        vae.train(was_training)
        mean_psnr = sum(s[0] for s in scores) / len(scores)
        mean_ssim = sum(s[1] for s in scores) / len(scores)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "validation.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "psnr": mean_psnr, "ssim": mean_ssim}) + "\n")
        if writer is not None:
            writer.add_scalar("val/psnr", mean_psnr, step)
            writer.add_scalar("val/ssim", mean_ssim, step)
            # One image per clip: input frames on top, reconstructions below (first / middle / last).
            writer.add_images("val/reconstructions", torch.stack(pictures), step)


# --------------------------------------------------------------------------------------------
# Wiring (what `opensora-plan train-vae` calls)
# --------------------------------------------------------------------------------------------


def build_vae(model_config: str | os.PathLike | None, pretrained_model_path: str | os.PathLike | None):
    """A CausalVAE from a config (random init) or a pretrained folder (e.g. an inflated 2-D VAE)."""
    from ..models.causalvae import CausalVAEModel

    if pretrained_model_path:
        from ..models.loading import resolve_model_folder

        resolve_model_folder(pretrained_model_path, kind="CausalVAE", flag="--pretrained_model_path")
        return CausalVAEModel.from_pretrained(pretrained_model_path)
    if not model_config:
        raise ValueError("train-vae needs --model_config (a CausalVAE config.json) or --pretrained_model_path (a VAE folder).")
    path = Path(model_config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--model_config {path} does not exist; give a CausalVAE config.json (or its folder).")
    from ..utils import read_json_file

    return CausalVAEModel.from_config(read_json_file(path, "--model_config"))


def load_pretrained_loss_state(loss, pretrained_model_path: str | os.PathLike) -> bool:
    """Fill ``loss.logvar`` and the discriminator from ``loss.*`` tensors of a pretrained VAE file, if any."""
    from ..models.loading import find_weights, read_state_dict, resolve_model_folder

    state = read_state_dict(find_weights(resolve_model_folder(pretrained_model_path)))
    wanted = {k[len("loss."):]: v for k, v in state.items()
              if k == "loss.logvar" or k.startswith("loss.discriminator.")}
    if not wanted:
        return False
    own = {k for k in loss.state_dict() if k == "logvar" or k.startswith("discriminator.")}
    if set(wanted) != own:
        raise ValueError(
            f"{pretrained_model_path} holds loss.* tensors that do not match the PatchGAN discriminator "
            f"(missing {sorted(own - set(wanted))[:4]}, unexpected {sorted(set(wanted) - own)[:4]}); "
            "remove them from the file or train the discriminator from scratch."
        )
    loss.load_state_dict(wanted, strict=False)
    logger.info("Loaded logvar and the discriminator from %s", pretrained_model_path)
    return True


def video_paths(video_path: str | os.PathLike | None, data_path: str | os.PathLike | None,
                video_folder: str | os.PathLike | None = None) -> list[Path]:
    """Training videos from a folder (recursive) or from the JSON dataset format (captions unused)."""
    if bool(video_path) == bool(data_path):
        raise ValueError("Give exactly one of --video_path (a folder of videos) and --data_path (a JSON video list).")
    if video_path:
        if not Path(video_path).is_dir():
            raise FileNotFoundError(f"--video_path {video_path} is not a folder; give a folder of videos (searched recursively).")
        paths = list_videos(video_path, recursive=True)
        if not paths:
            raise ValueError(f"No videos ({'/'.join(VIDEO_EXTENSIONS)}) under {video_path}; point --video_path at a folder of videos.")
        return paths
    return [entry.path for entry in load_video_entries(data_path, video_folder)]


def train_vae(options: VAETrainOptions | TrainConfig | Mapping, **task_options) -> dict:
    """Build the VAE, loss and data, then run the shared trainer. Returns the trainer's summary.

    ``options``: a :class:`VAETrainOptions` (or a dict of its fields), or (older form) a loop :class:`TrainConfig` plus the task's
    options as keywords. Raises ValueError / FileNotFoundError (one line) before any work on bad input.
    """
    from ..models.causalvae.losses import LPIPSWithDiscriminator
    from ..models.lpips import load_lpips
    from ..utils import check_output_folder

    if isinstance(options, Mapping):
        if task_options:
            raise TypeError("train_vae takes a dict of VAETrainOptions fields or keywords, not both.")
        options = VAETrainOptions.from_mapping(options)
    if not isinstance(options, VAETrainOptions):  # the older form: a loop TrainConfig + the task's keywords
        loop = {f.name: getattr(options, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
        options = VAETrainOptions(**loop, **task_options)
    elif task_options:
        raise TypeError(f"train_vae takes VAETrainOptions or a TrainConfig with keywords, not both "
                        f"({sorted(task_options)}).")
    config = options.loop_config(extra=options.task_options())
    if not options.validation_videos:
        config.validation_steps = None
    check_output_folder(config.output_dir, "--output_dir")
    check_new_run_folder(config.output_dir, config.resume_from_checkpoint)
    check_resume_options(run_options(dataclasses.asdict(config)))  # a changed option: refused, or applied and said
    paths = video_paths(options.video_path, options.data_path, options.video_folder)  # before any model loads
    if options.validation_videos >= len(paths):
        raise ValueError(f"--validation_videos {options.validation_videos} leaves no training videos out of "
                         f"{len(paths)}; lower it.")
    if options.perceptual_weight > 0 and not options.lpips_path:
        raise ValueError(
            "--perceptual_weight > 0 needs LPIPS weights: pass --lpips_path FILE [FILE ...] (VGG16 features + "
            "LPIPS heads, see docs/vae_training.md), or train without the perceptual term with --perceptual_weight 0."
        )
    perceptual = load_lpips(options.lpips_path) if options.perceptual_weight > 0 else None
    # Fresh weights (VAE from a config, discriminator) are a function of --seed: runs are repeatable
    # and every process of a multi-process run starts from the same weights.
    torch.manual_seed(config.seed)
    vae = build_vae(options.model_config, options.pretrained_model_path)
    step_t = vae.temporal_compression
    if not valid_num_frames(options.num_frames, step_t):
        raise ValueError(f"--num_frames {options.num_frames} is not a length the VAE accepts; use 1 (images) or "
                         f"1 + {step_t}k (e.g. 9, 17).")
    if options.resolution % vae.spatial_compression or options.resolution < 32:
        raise ValueError(
            f"--resolution {options.resolution} must be a multiple of {vae.spatial_compression} and at least 32 "
            "(the PatchGAN needs 32 px); e.g. 64 or 256."
        )
    loss = LPIPSWithDiscriminator(perceptual, disc_start=options.disc_start, logvar_init=options.logvar_init,
                                  kl_weight=options.kl_weight, perceptual_weight=options.perceptual_weight,
                                  disc_weight=options.disc_weight, rec_loss=options.rec_loss)
    if options.pretrained_model_path:
        load_pretrained_loss_state(loss, options.pretrained_model_path)
    split = len(paths) - options.validation_videos
    train_paths, held_out = paths[:split], paths[split:]
    dataset = VAEVideoDataset(train_paths, options.num_frames, options.resolution, options.sample_rate)
    validation = VAEVideoDataset(held_out, options.num_frames, options.resolution, options.sample_rate,
                                 deterministic=True) if held_out else None
    task = VAETrainTask(vae, loss, dataset, learning_rate=options.learning_rate,
                        time_lr_multiplier=options.time_lr_multiplier, max_grad_norm=options.max_grad_norm,
                        validation=validation)
    return train(task, config)
