"""What ``train-vfi`` (AMT interpolation) and ``train-sr`` (RGT super-resolution) share on the shared trainer.

* :class:`FrameTrainOptions`: the data, model and optimiser options of both commands (each command's class,
  ``VFITrainOptions`` / ``SRTrainOptions``, adds its own fields and the defaults that differ between them).
* :class:`FrameTrainTask`: one model, one AdamW phase, unreadable videos counted, and validation: PSNR and
  SSIM of the (EMA) model's predictions on held-out clips, in ``log.jsonl`` (``val_psnr``, ``val_ssim``,
  ``val_loss``), ``validation/validation.jsonl`` and the writer (scalars + one picture per clip).
  Subclasses say how a batch becomes ``(prediction, target)`` (:meth:`FrameTrainTask.predict`) and what the
  objective is (:meth:`FrameTrainTask.objective`).
* :func:`prepare_frame_run`: the checks before any model loads, the video lists (training and held out).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from ..data.datasets import SkippedVideos, collate_video_caption
from ..data.video_io import VideoReadError, unusable_reason
from ..options import option
from .trainer import (
    Phase,
    TrainConfig,
    TrainTask,
    check_adamw,
    check_new_run_folder,
    check_resume_options,
    run_options,
    unwrap_module,
)

logger = logging.getLogger(__name__)


@dataclass
class FrameTrainOptions(TrainConfig):
    """Options shared by ``train-vfi`` and ``train-sr`` (the loop's come from TrainConfig)."""

    CONFIG: ClassVar[bool] = True
    # One optimizer phase on one small image model: no sequence parallelism, no sharding needed.
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ("sharding", "sp_size", "deepspeed_config")
    GROUPS: ClassVar[tuple[str, ...]] = ("data", "model and loss", "optimisation", "run")

    validation_steps: int | None = option(500, help="with held-out clips (--validation_data or "
                                          "--validation_videos): PSNR/SSIM every N optimizer steps", group="run")
    # data
    video_path: str | None = option(None, help="folder of videos, searched recursively (mp4/avi/webm/mkv)",
                                    group="data")
    data_path: str | None = option(None, help="JSON video list (the text-to-video dataset format; captions "
                                   "unused) or a folder of videos", group="data")
    video_folder: str | None = option(None, help="base folder for relative paths in --data_path", group="data")
    samples_per_video: int = option(1, help="samples (random triplets / crops) drawn from every video per epoch; "
                                    "raise it for a few long clips", group="data")
    validation_data: str | None = option(None, help="held-out videos for validation: a folder or a JSON video list",
                                         group="data")
    validation_videos: int = option(0, help="hold out the last N training videos for validation instead",
                                    group="data")
    # model
    model_config: str | None = option(None, help="a named size of the model's registry or a JSON config file: "
                                      "random initialisation, or the architecture of an official --pretrained file",
                                      group="model and loss")
    pretrained: str | None = option(None, help="weights to start from: an official checkpoint file or a "
                                    "save_pretrained folder (e.g. checkpoint-<step>/model of a run)",
                                    group="model and loss")
    # optimisation (AdamW; neither upstream recipe clips gradients or decays weights)
    adam_weight_decay: float = option(0.0, help="AdamW weight decay", group="optimisation")
    max_grad_norm: float | None = option(None, help="grad-norm clip (unset: no clipping, as upstream)",
                                         group="optimisation")

    def __post_init__(self):
        super().__post_init__()
        check_adamw(self.learning_rate, self.adam_beta1, self.adam_beta2, weight_decay=self.adam_weight_decay,
                    max_grad_norm=self.max_grad_norm)
        self.require_at_least(1, "crop_size", "samples_per_video")
        if self.validation_videos < 0:
            raise ValueError(f"--validation_videos must be >= 0, got {self.validation_videos}.")
        if not (self.validation_data or self.validation_videos) and \
                self.validation_steps != type(self).__dataclass_fields__["validation_steps"].default:
            raise ValueError(f"--validation_steps {self.validation_steps} has no effect without held-out clips; add "
                             "--validation_data or --validation_videos, or drop --validation_steps.")
        if self.validation_data and self.validation_videos:
            raise ValueError("--validation_data and --validation_videos both choose the held-out clips; give one.")

    def task_options(self) -> dict:
        """The options of the task (recorded as ``extra`` in options.json)."""
        loop = {f.name for f in dataclasses.fields(TrainConfig)}
        return {k: v for k, v in self.to_dict().items() if k not in loop}


def model_config_arg(model_config: str | None, registry: dict, kind: str) -> dict | str | None:
    """``--model_config`` as a registry name (kept as the name) or the dict of a JSON file (an official
    ``{"network_g": {...}}`` is unwrapped); None stays None."""
    if model_config is None or model_config in registry:
        return model_config
    path = Path(model_config)
    if not path.is_file():
        raise FileNotFoundError(f"--model_config {model_config} is neither a {kind} size ({', '.join(registry)}) nor a "
                                "JSON config file.")
    from ..utils import read_json_file

    config = read_json_file(path, "--model_config")
    if not isinstance(config, dict):  # a user error: one ValueError line, as every option check
        found = type(config).__name__
        raise ValueError(f"--model_config {path} must hold a JSON object of {kind} fields, got a {found}.")
    return config.get("network_g", config)


def check_pretrained(pretrained: str, model_config: str | None, what: str) -> Path:
    """``--pretrained`` as a Path after checking it exists and that ``--model_config`` goes only with a file."""
    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(f"--pretrained {path} does not exist; give {what} or a save_pretrained folder.")
    if path.is_dir() and model_config:
        raise ValueError(f"--model_config has no effect with the folder --pretrained {path} (its config.json fixes "
                         "the architecture); drop --model_config.")
    return path


def prepare_frame_run(options: FrameTrainOptions) -> tuple[TrainConfig, list[Path], list[Path]]:
    """Checks before any model loads; returns the loop config, the training videos and the held-out videos."""
    from ..data.frames import check_crop_fits
    from ..utils import check_output_folder
    from .vae import video_paths

    if not (options.model_config or options.pretrained):
        raise ValueError(f"{options.COMMAND} needs --model_config (a named size or a JSON config) or --pretrained "
                         "(weights to fine-tune).")
    config = options.loop_config(extra=options.task_options())
    check_output_folder(config.output_dir, "--output_dir")
    check_new_run_folder(config.output_dir, config.resume_from_checkpoint)
    check_resume_options(run_options(dataclasses.asdict(config)))  # a changed option: refused, or applied and said
    paths = video_paths(options.video_path, options.data_path, options.video_folder)
    held_out: list[Path] = []
    if options.validation_data:
        source = Path(options.validation_data)
        if not source.exists():
            raise FileNotFoundError(f"--validation_data {source} does not exist; give a folder of videos or a JSON "
                                    "video list.")
        held_out = video_paths(source, None) if source.is_dir() else video_paths(None, source, options.video_folder)
    elif options.validation_videos:
        if options.validation_videos >= len(paths):
            raise ValueError(f"--validation_videos {options.validation_videos} leaves no training videos out of "
                             f"{len(paths)}; lower it.")
        paths, held_out = paths[: -options.validation_videos], paths[-options.validation_videos :]
    if not held_out:
        config.validation_steps = None
    check_crop_fits(paths, options.crop_size)  # else the first sample fails, after options.json is written
    return config, paths, held_out


class FrameTrainTask(TrainTask):
    """One image model (``model``) trained by one AdamW phase on a frame dataset; see the module docstring.

    ``validation``: a dataset of the same kind built with ``deterministic=True`` (held-out clips), or None.
    """

    def __init__(self, model: torch.nn.Module, dataset: Dataset, validation: Dataset | None = None,
                 learning_rate: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 max_grad_norm: float | None = None):
        self.models = {"model": model}
        self.dataset = dataset
        self.validation = validation
        self.collate_fn = collate_video_caption  # stacks tensors, merges the per-sample "skipped" lists
        self.learning_rate = learning_rate
        self.betas = tuple(betas)
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.skipped = SkippedVideos()
        self._held_out: list[dict] | None = None
        self.held_out_unreadable: list[dict] = []

    # ---- what a subclass provides

    def predict(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, target)`` images ``(B, 3, H, W)`` for a batch."""
        raise NotImplementedError

    def objective(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss and its terms for the log."""
        raise NotImplementedError

    def picture(self, sample: dict, prediction: torch.Tensor) -> torch.Tensor:
        """One validation image ``(3, h, w)`` in [0, 1] showing a held-out sample and its prediction."""
        raise NotImplementedError

    # ---- the TrainTask contract

    def phases(self) -> list[Phase]:
        params = [p for p in self.models["model"].parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, betas=self.betas, weight_decay=self.weight_decay)
        return [Phase("model", optimizer, params, self.max_grad_norm)]

    def loss(self, phase: str, batch: Any, step: int, models: dict[str, torch.nn.Module], micro: int = 0):
        self.skipped.update(batch["skipped"])
        prediction, target = self.predict(models["model"], batch)
        return self.objective(prediction.float(), target)

    def batch_size(self, batch: Any) -> int:
        return int(batch["index"].shape[0])

    def options(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "adam_betas": list(self.betas),
            "adam_weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "num_videos": len(self.dataset.paths),
            "samples_per_epoch": len(self.dataset),
            "num_validation_videos": len(self.validation.paths) if self.validation is not None else 0,
            "model_class": type(self.models["model"]).__name__,
            "model_config": dict(getattr(self.models["model"], "config", {}) or {}),
        }

    def epoch_report(self) -> dict:
        report = {"skipped_videos": self.skipped.total, "details": self.skipped.summary()} if self.skipped.total else {}
        self.skipped.reset()
        return report

    def run_report(self) -> dict:
        report = self.skipped.run_report()
        if self.validation is not None:
            report["held_out_clips"] = len(self._held_out or [])
            reasons = [item["why"] for item in self.held_out_unreadable]
            report["held_out_unreadable"] = reasons.count("unreadable")
            report["held_out_left_out"] = {why: reasons.count(why) for why in dict.fromkeys(reasons)}
        return report

    # ---- validation

    def held_out_samples(self) -> list[dict]:
        """The held-out samples, read once; an unusable held-out video is left out (listed, never substituted,
        so no clip counts twice)."""
        if self._held_out is None:
            self._held_out = []
            for index in range(len(self.validation.paths)):
                try:
                    self._held_out.append(self.validation.load(index, None))
                except VideoReadError as err:
                    logger.warning("held-out video left out of validation: %s", err)
                    self.held_out_unreadable.append({"path": str(self.validation.paths[index]), "reason": str(err),
                                                     "why": unusable_reason(err)})
            if not self._held_out:
                raise ValueError(f"None of the {len(self.validation.paths)} held-out videos is usable (last: "
                                 f"{self.held_out_unreadable[-1]['reason']}); fix --validation_data or "
                                 "--validation_videos.")
        return self._held_out

    @torch.no_grad()
    def validate(self, step: int, models: dict[str, torch.nn.Module], folder: Path, writer) -> dict | None:
        """PSNR / SSIM / loss of the model's predictions on the held-out samples (clamped to [0, 1])."""
        if self.validation is None:
            return None
        from ..metrics import psnr, ssim

        model = unwrap_module(models["model"])  # main process only: no DDP forward (it would wait for the others)
        was_training = model.training
        model.eval()
        psnrs, ssims, losses, pictures = [], [], [], []
        try:
            for sample in self.held_out_samples():
                batch = collate_video_caption([{**sample, "index": 0, "skipped": []}])
                prediction, target = self.predict(model, batch)
                prediction, target = prediction.float().clamp(0, 1).cpu(), target.float().cpu()
                losses.append(float(self.objective(prediction, target)[0]))
                psnrs.append(float(psnr(prediction, target)))  # (1, 3, H, W): one frame
                ssims.append(float(ssim(prediction, target)) if min(target.shape[-2:]) >= 11 else float("nan"))
                pictures.append(self.picture(sample, prediction[0]))
        finally:
            model.train(was_training)
        metrics = {"val_psnr": sum(psnrs) / len(psnrs), "val_ssim": sum(ssims) / len(ssims),
                   "val_loss": sum(losses) / len(losses)}
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "validation.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics, "psnr_per_clip": psnrs}) + "\n")
        if writer is not None and len({p.shape for p in pictures}) == 1:
            writer.add_images("val/predictions", torch.stack(pictures), step)
        return metrics
