"""AMT frame-interpolation training on the shared trainer (``opensora-plan train-vfi``).

Data: :class:`~opensora_plan.data.frames.TripletDataset`: frames ``(f, f + g, f + 2g)`` of the training
videos, the model sees the outer two and predicts the middle one at ``embt = 0.5``; random crops and AMT's
augmentations. Objective (:mod:`opensora_plan.train.losses_frames`): AMT's Charbonnier + census loss on the
predicted middle frame, weights 1 and 1; AMT's third term, flow distillation from a pretrained optical-flow
teacher, is omitted (no teacher weights here). Optimiser: AdamW, AMT-G's lr 1.5e-4, no weight decay, no
clipping (upstream ``cfgs/AMT-G.yaml``; upstream decays the lr by a cosine to 2e-5 over 300 epochs of
Vimeo90K at batch 24: ``--lr_scheduler cosine`` is the closest, ending at 0). Validation: PSNR / SSIM of the
(EMA) model's middle frames on held-out clips (the middle triplet of each, centre crop), in ``log.jsonl``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..data.frames import TripletDataset
from ..options import option
from .frame_task import (
    FrameTrainOptions,
    FrameTrainTask,
    check_pretrained,
    model_config_arg,
    prepare_frame_run,
)
from .losses_frames import amt_loss
from .trainer import train

MIDDLE = 0.5  # the time of the target frame between img0 (0) and img1 (1)


@dataclass
class VFITrainOptions(FrameTrainOptions):
    """Every option of ``opensora-plan train-vfi`` / :func:`train_vfi`; defaults are AMT-G's recipe where it has one."""

    COMMAND: ClassVar[str] = "train-vfi"

    crop_size: int = option(224, help="square crop side of every triplet (AMT: 224 crops of Vimeo90K)", group="data")
    max_frame_gap: int = option(1, help="the gap g between img0, the target and img1 (frames f, f+g, f+2g) is drawn "
                                "from 1..N (capped by each video's length); 1 = consecutive frames, as Vimeo90K",
                                group="data")
    saturation_jitter: float = option(0.0, help="scale the colour saturation of each triplet by a factor drawn "
                                      "from [1 - S, 1] (0: off, AMT's recipe); for training clips of a few pure "
                                      "colours", group="data")
    learning_rate: float = option(1.5e-4, help="AdamW learning rate", group="optimisation")
    adam_beta1: float = option(0.9, help="AdamW beta1", group="optimisation")
    adam_beta2: float = option(0.999, help="AdamW beta2", group="optimisation")

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "max_frame_gap")
        if not 0.0 <= self.saturation_jitter <= 1.0:
            raise ValueError(f"--saturation_jitter must be between 0 and 1, got {self.saturation_jitter}.")


class VFITrainTask(FrameTrainTask):
    """``model(img0, img1, embt)`` -> the middle frame, against ``imgt``; Charbonnier + census."""

    def predict(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        img0, img1 = batch["img0"].to(device), batch["img1"].to(device)  # (B, 3, S, S)
        embt = torch.full((img0.shape[0], 1, 1, 1), MIDDLE, device=device, dtype=img0.dtype)
        return model(img0, img1, embt).imgt_pred, batch["imgt"].to(device)  # AMTOutput; (B, 3, S, S) each

    def objective(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return amt_loss(prediction, target)

    def picture(self, sample: dict, prediction: torch.Tensor) -> torch.Tensor:
        """img0 | prediction | target | img1, side by side."""
        return torch.cat([sample["img0"], prediction, sample["imgt"], sample["img1"]], dim=-1)


def build_vfi_model(model_config: str | None, pretrained: str | None) -> torch.nn.Module:
    """AMT from ``--pretrained`` (the official ``amt-g.pth``, whose architecture ``--model_config`` names when it
    is not AMT-G; or a save_pretrained folder) or from ``--model_config`` alone (a registry name such as
    ``AMT-G``, or a JSON config of AMTModel's fields), randomly initialised from the current torch seed."""
    from ..models.amt import AMT_CONFIGS, AMTModel

    config = model_config_arg(model_config, AMT_CONFIGS, "AMT")
    if isinstance(config, str):
        config = AMT_CONFIGS[config]
    if pretrained:
        path = check_pretrained(pretrained, model_config, "the official amt-g.pth")
        if path.is_dir():
            return AMTModel.from_pretrained(path)
        return AMTModel.from_official_checkpoint(path, **(config or {}))
    return AMTModel.from_config(config)


def train_vfi(options: VFITrainOptions | Mapping, build_model=build_vfi_model) -> dict:
    """Build AMT and the triplets, then run the shared trainer; returns the trainer's summary.

    ``options``: a :class:`VFITrainOptions` or a dict of its fields. Bad input raises ValueError /
    FileNotFoundError (one line) before any model loads. ``build_model(model_config, pretrained)`` makes the
    model (default :func:`build_vfi_model`; tests pass a tiny one).
    """
    options = VFITrainOptions.of(options)
    config, paths, held_out = prepare_frame_run(options)
    torch.manual_seed(config.seed)  # fresh weights are a function of --seed (and the same on every process)
    model = build_model(options.model_config, options.pretrained)
    if hasattr(model, "check_size"):  # AMT processes sides that are multiples of 16 and large enough
        try:
            model.check_size(options.crop_size, options.crop_size)
        except ValueError as err:
            raise ValueError(f"--crop_size {options.crop_size} does not fit the model: {err}") from None
    dataset = TripletDataset(paths, options.crop_size, options.max_frame_gap,
                             samples_per_video=options.samples_per_video, saturation_jitter=options.saturation_jitter)
    validation = TripletDataset(held_out, options.crop_size, options.max_frame_gap,
                                deterministic=True) if held_out else None
    task = VFITrainTask(model, dataset, validation, learning_rate=options.learning_rate,
                        betas=(options.adam_beta1, options.adam_beta2), weight_decay=options.adam_weight_decay,
                        max_grad_norm=options.max_grad_norm)
    if validation is not None:
        task.held_out_samples()  # read (and checked) once, before the first step
    return train(task, config)
