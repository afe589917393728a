"""The one training loop shared by the CausalVAE and the LatteT2V trainings (edm style).

The loop knows nothing about the loss maths. A :class:`TrainTask` supplies the trainable models, the
dataset, its optimizer *phases* (T2V: one AdamW phase; VAE: a generator phase then a discriminator
phase, each with its own optimizer, parameters and clip value) and ``loss(phase, batch, step, models)``.
The loop owns everything else:

* processes: ``accelerate`` (``Accelerator(cpu=True)`` without CUDA so ``torchrun`` gives DDP over
  gloo), optional FSDP2 sharding (:mod:`opensora_plan.train.sharding`) or DeepSpeed ZeRO
  (:mod:`opensora_plan.train.zero`), mixed precision, TF32, compile;
  sequence parallelism (``sp_size`` > 1): the world is ``dp x sp`` processes, groups of ``sp_size``
  consecutive ranks share one data-parallel rank (same batches, same noise) and split its tokens;
* optimisation: gradient accumulation, grad-norm clipping, LR schedule (diffusers ``get_scheduler``,
  stepped once per optimizer step, not once per process), EMA updated after every optimizer step,
  non-finite losses skipped and counted (a clear error after ``max_nonfinite_steps`` in a row);
* bookkeeping: ``options.json``, ``log.jsonl`` (one line per optimizer step), TensorBoard or W&B
  (``report_to``), tqdm (step, loss, samples/s, ETA; the first step's time, warm-up / compile, is reported
  on its own as ``first_step_seconds`` and left out of samples/s and the ETA), atomic
  ``checkpoint-<step>`` folders (:mod:`opensora_plan.train.checkpoint`) and exact resume;
* validation (``validation_steps``): ``task.validate`` before the first step (a baseline; on resume, at the
  resume step when the log holds no validation record yet), every N steps and after the last one, on the
  main process, with the EMA weights swapped in place (no copy of the model) and the RNG state restored
  afterwards, so a run trains bit-identically with or without validation; the
  metrics it returns (``val_loss``, ...) go into that step's ``log.jsonl`` line and the writer.

Exact resume rests on three things: the data order is a seeded function of ``(seed, epoch, position)``
(:mod:`opensora_plan.train.sampler`), every micro-batch reseeds the RNGs from
``(seed, step, phase, micro-batch, rank)`` before the task's loss draws noise / timesteps / dropout,
and the checkpoint holds optimizer, scheduler and EMA state. N steps + kill + M resumed steps therefore
give the same ``log.jsonl`` losses and the same weights as N + M uninterrupted steps.

Phases run one after the other on the same micro-batches of a step, in the order the task lists them;
a task that needs a result of an earlier phase (the VAE discriminator needs the reconstruction) may
cache it on itself keyed by the micro-batch index passed in ``TrainTask.loss``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from opensora_plan.train import checkpoint as ckpt
from opensora_plan.train.ema import EMA
from opensora_plan.train.sampler import ResumableSampler, SeededSamples, derive_seed
from opensora_plan.options import Options, option
from opensora_plan.utils import atomic_dir, atomic_write_bytes, plural

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"no": "no", "fp32": "no", "bf16": "bf16", "fp16": "fp16"}
REPORT_TO = ("tensorboard", "wandb", "none")


# --------------------------------------------------------------------------------------------
# what a task provides
# --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One optimizer and the parameters it steps (clipped together to ``max_grad_norm``; None = no clip)."""

    name: str
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    max_grad_norm: float | None = 1.0
    models: tuple[str, ...] = ("model",)  # task models whose gradients this phase synchronises
    start_step: int = 0  # the phase runs from this step (0-based count of finished steps) on


class TrainTask:
    """Base class of a training task; see the module docstring for the contract.

    Attributes set by the subclass:
      models        name -> trainable ``nn.Module``; saved as ``checkpoint-<step>/<name>/``. The model named
                    ``"model"`` is the one averaged by EMA.
      dataset       map-style dataset; ``collate_fn`` turns a list of its samples into a batch.
    """

    models: dict[str, torch.nn.Module]
    dataset: Dataset
    collate_fn: Any = None
    ema_model_name: str = "model"
    find_unused_parameters: bool = False

    def setup(self, accelerator) -> None:
        """Called once before the models are wrapped: e.g. move frozen encoders to ``accelerator.device``."""

    def phases(self) -> list[Phase]:
        """Build the optimizers over the (possibly sharded) parameters of ``self.models``."""
        raise NotImplementedError

    def loss(self, phase: str, batch: Any, step: int, models: dict[str, torch.nn.Module], micro: int = 0):
        """-> (scalar loss tensor, {stat name: float}); ``models`` are the process-wrapped models to call."""
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        """Number of samples in a batch (for samples/s)."""
        raise NotImplementedError

    def setup_sequence_parallel(self, group) -> None:
        """Make the models split each sample's tokens over ``group`` (only tasks that support ``sp_size``)."""
        raise ValueError(f"{type(self).__name__} does not support sequence parallelism; use --sp_size 1.")

    def tokens(self, batch: Any) -> int:
        """Number of latent tokens the denoiser sees in a batch (for tokens/s); 0 when not meaningful."""
        return 0

    def batch_sampler(self, seed: int, rank: int, world_size: int):
        """A batch sampler yielding lists of ``(epoch, index)`` keys (e.g. one bucket per batch,
        :class:`~opensora_plan.train.sampler.BucketBatchSampler`), or None for plain fixed-size batches.
        It needs ``set_epoch(epoch, start_batch)``, ``per_process()`` and ``signature()``."""
        return None

    def options(self) -> dict:
        """Task-specific options recorded in ``options.json``."""
        return {}

    def save_model(self, name: str, model: torch.nn.Module, state_dict: dict, folder: Path) -> None:
        """Write one model of a checkpoint (``state_dict`` may hold EMA values); default: the full weights."""
        ckpt.save_model_folder(model, state_dict, folder)

    def load_model(self, name: str, model: torch.nn.Module, folder: Path) -> None:
        """Restore what :meth:`save_model` wrote into ``model`` when resuming; default: strict full load."""
        ckpt.load_model_folder_weights(model, folder)

    def validate(self, step: int, models: dict[str, torch.nn.Module], folder: Path, writer) -> dict | None:
        """Optional validation (e.g. sample videos from fixed prompts) into ``folder``; main process only.

        Runs with the EMA weights in the models when the run keeps an EMA, and with the training RNG
        saved and restored around it. Returns ``{name: float}`` (e.g. ``{"val_loss": ...}``) for the loop to
        log in ``log.jsonl`` and the writer, or None.
        """

    def epoch_report(self) -> dict:
        """Called at the end of every epoch; e.g. ``{"skipped": [...bad files...]}``. Reset for the next epoch."""
        return {}

    def run_report(self) -> dict:
        """Merged into the run's summary at the end (e.g. how many unreadable videos were skipped in all)."""
        return {}


@dataclass
class TrainConfig(Options):
    """Options of the generic loop (the task has its own). Names follow the reference's flags.

    The one place where the loop's options are declared and defaulted: the commands' options classes
    (``T2VTrainOptions``, ``VAETrainOptions``) inherit these fields, and hand a plain TrainConfig to
    :func:`train` (:meth:`loop_config`).
    """

    output_dir: str = option(help="checkpoints, options.json, log.jsonl, tensorboard/", group="run")
    max_train_steps: int = option(help="optimizer steps", group="optimisation")
    train_batch_size: int = option(1, help="batch per process", group="optimisation")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step", group="optimisation")
    lr_scheduler: str = option("constant", help="diffusers schedule name", group="optimisation")
    lr_warmup_steps: int = option(0, help="linear warm-up optimizer steps", group="optimisation")
    mixed_precision: str = option("bf16", choices=list(MIXED_PRECISION), help="autocast dtype", group="optimisation")
    seed: int = option(0, help="seed of weights, data order and noise", group="optimisation")
    checkpointing_steps: int = option(500, help="write checkpoint-<step> every N optimizer steps", group="run")
    checkpoints_total_limit: int | None = option(None, help="keep only the newest N checkpoints", group="run")
    resume_from_checkpoint: str | None = option(None, help="'latest' or a checkpoint-<step> folder", group="run")
    dataloader_num_workers: int = option(0, help="data-loading processes", group="data")
    use_ema: bool = option(False, help="keep an EMA of the weights (saved as ema/)", group="optimisation")
    ema_decay: float = option(0.9999, help="EMA weight of the old average", group="optimisation")
    allow_tf32: bool = option(False, help="TF32 matmuls on Ampere+ GPUs", group="optimisation")
    compile: bool = option(False, help="torch.compile the model", group="optimisation")
    max_nonfinite_steps: int = option(10, help="stop after this many non-finite steps in a row", group="optimisation")
    validation_steps: int | None = option(None, help="validate every N optimizer steps", group="run")
    report_to: str = option("tensorboard", choices=list(REPORT_TO), help="metrics sink besides log.jsonl (wandb: "
                            "needs `pip install wandb`; WANDB_MODE=offline works)", group="run")
    sharding: str = option("ddp", choices=["ddp", "fsdp2", "deepspeed"],
                           help="ddp (replicated), fsdp2 (sharded) or deepspeed (ZeRO, see --deepspeed_config)",
                           group="optimisation")
    sp_size: int = option(1, help="sequence parallel: processes that split each sample's frames/patches (world = "
                          "dp x sp, see docs/training.md)", group="optimisation")
    deepspeed_config: str | None = option(None, help="DeepSpeed JSON or shipped name: zero2 (default with --sharding "
                                          "deepspeed), zero2_offload, zero3", group="optimisation")
    extra: dict = field(default_factory=dict)  # task options, only recorded in options.json

    def loop_config(self, extra: dict | None = None) -> "TrainConfig":
        """A plain :class:`TrainConfig` with this object's loop fields; ``extra``: task options to record."""
        loop = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
        return TrainConfig(**loop, extra=dict(extra or {}))

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"--mixed_precision {self.mixed_precision!r} is not supported; use one of {', '.join(MIXED_PRECISION)}."
            )
        self.require_at_least(1, "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                              "checkpointing_steps")
        if self.sharding not in ("ddp", "fsdp2", "deepspeed"):
            raise ValueError(f"--sharding {self.sharding!r} is not supported; use 'ddp', 'fsdp2' or 'deepspeed'.")
        if self.sharding != "ddp" and self.compile:
            raise ValueError(f"--compile with --sharding {self.sharding} is not supported; drop one of the two flags.")
        if self.deepspeed_config and self.sharding != "deepspeed":
            raise ValueError("--deepspeed_config needs --sharding deepspeed.")
        if self.sharding == "deepspeed":
            from opensora_plan.train import zero

            zero.require_deepspeed()
            ds_config = zero.load_config(self.deepspeed_config)  # a bad name fails here, before any model loads
            if self.use_ema and zero.stage(ds_config) == 3:
                raise ValueError("--use_ema with ZeRO-3 is not supported (parameters are sharded); use zero2.")
        if self.sp_size < 1:
            raise ValueError(f"--sp_size must be at least 1, got {self.sp_size}.")
        if self.use_ema and self.sharding == "fsdp2":  # before any model loads or any file is written (QA 7)
            raise ValueError("--use_ema with --sharding fsdp2 is not supported; use --sharding ddp for EMA runs.")
        if self.sp_size > 1 and self.sharding == "fsdp2":
            raise ValueError("--sp_size > 1 with --sharding fsdp2 is not supported (untested); use --sharding ddp "
                             "or deepspeed.")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"--report_to {self.report_to!r} is not supported; use one of {', '.join(REPORT_TO)}.")
        if self.report_to == "wandb":
            require_wandb()
        if self.validation_steps is not None and self.validation_steps < 1:
            raise ValueError(f"--validation_steps must be at least 1, got {self.validation_steps}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay is the weight of the old EMA in (0, 1), e.g. 0.9999; got {self.ema_decay}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be at least 1 (keep the newest N checkpoints), got "
                             f"{self.checkpoints_total_limit}; leave it out to keep every checkpoint.")
        # Values with no effect: the options cannot tell a value given as the default from no value, so a
        # value that differs from the default is refused.
        if not self.use_ema and self.ema_decay != _field_default(type(self), "ema_decay"):
            raise ValueError(f"--ema_decay {self.ema_decay} has no effect without --use_ema; add --use_ema or drop "
                             "--ema_decay.")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}.")
        if self.lr_warmup_steps and self.lr_scheduler == "constant":  # diffusers' constant schedule has no warm-up
            logger.warning("--lr_warmup_steps %d has no effect with --lr_scheduler constant; use --lr_scheduler "
                           "constant_with_warmup for a warm-up.", self.lr_warmup_steps)
        from diffusers.optimization import SchedulerType

        names = [t.value for t in SchedulerType]
        if self.lr_scheduler not in names:  # checked here, before any model loads
            raise ValueError(f"--lr_scheduler {self.lr_scheduler!r} is not supported; use one of {', '.join(names)}.")


def check_adamw(learning_rate: float, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> None:
    """ValueError (one line) for AdamW settings torch would refuse or that cannot train: learning_rate > 0,
    0 <= beta1, beta2 < 1, epsilon > 0, weight_decay >= 0, max_grad_norm > 0 (None: no clipping)."""
    checks = (("learning_rate", learning_rate, learning_rate > 0, "positive"),
              ("adam_beta1", beta1, 0 <= beta1 < 1, "in [0, 1)"), ("adam_beta2", beta2, 0 <= beta2 < 1, "in [0, 1)"),
              ("adam_epsilon", epsilon, epsilon > 0, "positive"),
              ("adam_weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
              ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0, "positive"))
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name} must be {expected}, got {value}.")


# Options that name files or folders: options.json records them absolute, so `--config <run>/options.json`
# works from any directory. Names that may also be presets (model sizes, bucket presets, DeepSpeed config
# names, resume "latest") are made absolute only when they name an existing path.
PATH_OPTIONS = ("output_dir", "data_path", "video_folder", "video_path", "cached_features", "validation_data_path",
                "validation_prompt_file", "ae_path", "pretrained", "text_encoder_name", "model", "model_config",
                "pretrained_model_path", "lpips_path", "buckets", "deepspeed_config", "resume_from_checkpoint",
                "validation_data", "data_index", "teacher", "student")


def absolute_paths(options: dict) -> dict:
    """A copy of ``options`` with the paths of :data:`PATH_OPTIONS` that exist made absolute and resolved (one
    spelling per folder: ``runs/lcd``, ``./runs/lcd/`` and a symlink to it compare equal on resume)."""
    def absolute(key: str, value):
        if isinstance(value, list):
            return [absolute(key, v) for v in value]
        if not isinstance(value, str) or not value:
            return value
        if os.path.exists(value) or (key == "output_dir" and not os.path.isabs(value)):
            return str(Path(value).resolve())
        return value

    return {k: absolute(k, v) if k in PATH_OPTIONS else v for k, v in options.items()}


def check_new_run_folder(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> None:
    """ValueError (one line) when ``output_dir`` already holds a run (options.json or checkpoint-*) and
    ``resume_from_checkpoint`` is not given: a new run would overwrite its options.json and mix its logs."""
    if resume_from_checkpoint:
        return
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    held = [p.name for p in [folder / "options.json"] if p.exists()] + sorted(p.name for p in folder.glob("checkpoint-*"))
    if held:
        raise ValueError(f"--output_dir {folder} already holds a run ({held[0]}); use --resume_from_checkpoint latest to "
                         "continue it, or another --output_dir.")


# What a resume does with an option whose value differs from the run's options.json: one rule per option name,
# the same in every train command (the table in docs/training.md, "Changing options on resume").
# Refused: what the checkpoint's weights and state were made from, or what acts only at the start of a run.
RESUME_REFUSED = frozenset({
    "model", "model_config", "pretrained", "pretrained_model_path", "ae", "ae_path", "text_encoder_name",
    "model_max_length", "lora_rank", "lora_alpha", "lora_target_modules", "logvar_init", "seed", "use_ema",
    "sharding", "deepspeed_config", "teacher", "guidance_scale", "method", "student",
})
# Applied without a word: where and how often the run reports, saves and validates, and speed switches; they do
# not change the updates.
RESUME_QUIET = frozenset({
    "output_dir", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    "report_to", "dataloader_num_workers", "allow_tf32", "compile", "gradient_checkpointing", "enable_tiling",
    "attention_mode", "max_nonfinite_steps", "dry_run", "validation_steps", "validation_prompts",
    "validation_prompt_file", "validation_sampling_steps", "validation_sample_method", "validation_guidance_scale",
    "validation_data_path", "validation_num_timesteps", "validation_data", "validation_videos",
})
# Every other option (learning rate and the other optimizer settings, the schedule, batch sizes, precision, data,
# loss weights) is applied from the resume step on, with one warning line naming the old and new values.
# Options whose unset value (None) is a choice of its own, not "from the model, teacher or cache": switching one
# off on resume is a change like any other (train-sr's --degradation_vae: path -> None with --degradation bicubic).
RESUME_NONE_IS_A_VALUE = frozenset({"degradation_vae"})
RESUMES_KEY = "resumes"  # options.json: one record per resume (step, checkpoint, the options it changed)


def run_options(record: Mapping) -> dict:
    """The options of an ``options.json`` record (or of ``{**loop options, "extra": task options}``), flat:
    the run's bookkeeping keys dropped, the task options merged in."""
    from opensora_plan.options import RUN_RECORD_KEYS

    flat = {k: v for k, v in record.items() if k not in RUN_RECORD_KEYS}
    flat.update(record.get("extra") or {})
    return flat


def resume_changes(options: Mapping) -> tuple[Path | None, dict[str, tuple]]:
    """``(checkpoint, {option: (run's value, new value)})`` for a resumed run (``options`` flat, with
    ``output_dir`` and ``resume_from_checkpoint``): the options that differ from the options.json of the run the
    checkpoint belongs to; an unset (None) option is not a change, except those of :data:`RESUME_NONE_IS_A_VALUE`. ``(None, {})`` for a fresh run or a run folder
    without options.json."""
    from opensora_plan.train.checkpoint import resolve_resume
    from opensora_plan.utils import read_json_file

    checkpoint = resolve_resume(options.get("resume_from_checkpoint"), options["output_dir"])
    record = checkpoint.parent / "options.json" if checkpoint is not None else None
    if record is None or not record.is_file():
        return checkpoint, {}
    before = absolute_paths(run_options(read_json_file(record, "The run's options file")))  # older runs: as typed
    now = json.loads(json.dumps(absolute_paths(dict(options)), default=str))  # as options.json records them
    # An option left unset (None: "from the model, teacher or cache") keeps what the run resolved and recorded.
    return checkpoint, {k: (before[k], v) for k, v in now.items()
                        if k in before and (v is not None or k in RESUME_NONE_IS_A_VALUE) and before[k] != v}


def check_resume_options(options: Mapping) -> dict[str, tuple]:
    """Before any model loads: the changed options of a resume (:func:`resume_changes`) by the rule of
    :data:`RESUME_REFUSED` / :data:`RESUME_QUIET`: a refused change is a ValueError naming it, the others are
    applied, those that change the updates with one warning line. Returns the changes."""
    checkpoint, changes = resume_changes(options)
    refused = [k for k in changes if k in RESUME_REFUSED]
    if refused:
        key = refused[0]
        before, now = changes[key]
        keep = (f"drop --{key}" if before is None or before is False else
                f"give --{key} again" if before is True else f"give --{key} {before} again")  # never "Give None again"
        was = "unset" if before is None else before  # not "the run's None" (QA 7)
        raise ValueError(f"--resume_from_checkpoint {checkpoint.name}: --{key} {now} differs from the run's {was} "
                         f"(its options.json); a resumed run keeps --{key}, which made its checkpoint. To resume, "
                         f"{keep}; or start a new --output_dir to train with {now}.")
    told = [k for k in changes if k not in RESUME_QUIET]
    if told:
        logger.warning("Resuming %s with changed options, applied from step %d on (options.json records the change): "
                       "%s.", checkpoint.name, ckpt.checkpoint_step(checkpoint),
                       ", ".join(f"--{k} {changes[k][0]} -> {changes[k][1]}" for k in told))
    return changes


def unwrap_module(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its DDP / DataParallel / torch.compile wrappers (any nesting)."""
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def _field_default(cls, name: str):
    return cls.__dataclass_fields__[name].default


def require_wandb() -> None:
    """ValueError (one line) when ``--report_to wandb`` is asked for but the package is missing, or when no
    W&B credentials are found (``wandb login``, ``WANDB_API_KEY`` or netrc, as ``wandb.login(prompt=False)``
    looks for them) and ``WANDB_MODE`` is not offline/disabled; checked before any model loads."""
    from opensora_plan.utils import MissingExtraError, extra_installed

    if not extra_installed("wandb"):
        raise MissingExtraError('--report_to wandb needs wandb, which is not installed; pip install '
                                '"opensora-plan[wandb]", or use --report_to tensorboard.')
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    import wandb

    advice = ("run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on disk, or use "
              "--report_to tensorboard.")
    try:
        logged_in = wandb.login(prompt=False, verify=False)  # wandb's own look-up; no network, no prompt
    except Exception as err:  # e.g. AuthenticationError for a malformed WANDB_API_KEY
        raise ValueError(f"--report_to wandb: {err}; {advice}") from None
    if not logged_in:
        raise ValueError(f"--report_to wandb: no W&B login found; {advice}")


class WandbWriter:
    """The part of TensorBoard's ``SummaryWriter`` the loop and the tasks use, sent to Weights & Biases.

    ``add_scalar`` / ``add_images`` log at the given optimizer step (the x axis of every chart); set
    ``WANDB_MODE=offline`` to keep the run on disk (``<output_dir>/wandb/``).
    """

    def __init__(self, output_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opensora-plan"), dir=str(output_dir),
                              name=output_dir.name, config=config)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """``images`` (N, 3, H, W): uint8, or float in [0, 1] (as ``SummaryWriter.add_images``)."""
        if images.dtype != torch.uint8:
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        pictures = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
        self.run.log({tag: [self.wandb.Image(p) for p in pictures]}, step=step)

    def add_video_file(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        self.run.finish()


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive steps with a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs ``task`` under ``config``; ``run()`` returns a summary dict (final step, skipped steps, ...)."""

    def __init__(self, task: TrainTask, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.task = task
        self.config = config
        self.output_dir = Path(config.output_dir)
        kwargs = [DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)]
        # Without CUDA, cpu=True is what makes torchrun start DDP over gloo (a plain Accelerator() runs
        # each process alone; stack.md section 5).
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=MIXED_PRECISION[config.mixed_precision],
            kwargs_handlers=kwargs,
            dynamo_backend="inductor" if config.compile else None,
        )
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        # Data parallel rank/size: the sp_size ranks of one sequence-parallel group share a dp rank.
        from opensora_plan.models.parallel import init_sequence_parallel

        self.sp_group, self.dp_rank, self.dp_size = init_sequence_parallel(config.sp_size)
        # Bucketed data: batches come from the task's sampler and the data position counts batches.
        self.bucket_sampler = task.batch_sampler(config.seed, self.dp_rank, self.dp_size)
        if self.world_size > 1:
            # A process group left alive at interpreter exit lets gloo's threads be torn down by C++
            # static destructors, which aborts a rank now and then ("terminate called without an active
            # exception"). Destroy it at exit instead, after any caller code that still uses it.
            atexit.register(_destroy_process_group)

        self.step = 0
        self.epoch = 0
        self.position = 0  # samples of this process's share of the current epoch already consumed
        self.skipped_total = 0
        self.nonfinite_in_a_row = 0
        self.ema: EMA | None = None
        self.writer = None
        self.engines: dict[str, Any] = {}  # phase name -> DeepSpeed engine (--sharding deepspeed)

    def _unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The task's module under DDP / torch.compile wrappers (state-dict keys without ``_orig_mod.``).

        Accelerate's ``unwrap_model`` imports DeepSpeed whenever it is installed (and DeepSpeed prints a
        "Setting accelerator to CPU" warning on import), so it is used only with ``--sharding deepspeed``."""
        if self.config.sharding == "deepspeed":
            return self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return unwrap_module(model)

    # ---------------------------------------------------------------- setup

    def _setup(self) -> Path | None:
        cfg, task = self.config, self.task
        task.setup(self.accelerator)
        if self.sp_group is not None:
            task.setup_sequence_parallel(self.sp_group)
        resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, self.output_dir)
        state = None
        if resume is not None:
            logger.info("Resuming from %s", resume)
            for name, model in task.models.items():
                task.load_model(name, model, resume / name)
            state = torch.load(resume / ckpt.STATE_NAME, map_location="cpu", weights_only=False)
        if cfg.use_ema:
            self.ema = EMA(task.models[task.ema_model_name], decay=cfg.ema_decay)
            if state is not None:
                if state.get("ema") is None:
                    raise ValueError(f"{resume} holds no EMA state but --use_ema is set; resume without --use_ema.")
                self.ema.load_state_dict(state["ema"])

        names = list(task.models)
        if cfg.sharding == "deepspeed":
            from opensora_plan.train import zero
            from opensora_plan.train.sharding import check_phase_model

            self.phases = task.phases()
            if len(self.phases) != 1:
                raise ValueError(f"{type(task).__name__} has {len(self.phases)} optimizer phases; --sharding "
                                 "deepspeed trains one (use --sharding ddp).")
            phase = self.phases[0]
            model = check_phase_model(task, phase)
            ds_config = zero.fill_auto(zero.load_config(cfg.deepspeed_config), micro_batch=cfg.train_batch_size,
                                       accumulation=cfg.gradient_accumulation_steps, world_size=self.world_size,
                                       max_grad_norm=phase.max_grad_norm, mixed_precision=cfg.mixed_precision)
            model.to(self.accelerator.device)
            self.engines[phase.name] = zero.initialize(model, phase.optimizer, ds_config)
            self.wrapped = {name: self.engines[phase.name] if name == phase.models[0] else task.models[name]
                            for name in names}
        elif cfg.sharding == "fsdp2":
            from opensora_plan.train.sharding import check_phase_model, shard_model

            for name in names:
                shard_model(task.models[name], task, name, self.accelerator)
            self.wrapped = dict(task.models)
            self.phases = task.phases()
            for phase in self.phases:
                check_phase_model(task, phase)  # before any step: checkpoints need one model per phase
                phase.optimizer = self.accelerator.prepare_optimizer(phase.optimizer)
        else:
            self.phases = task.phases()
            prepared = self.accelerator.prepare(*[task.models[n] for n in names], *[p.optimizer for p in self.phases])
            prepared = prepared if isinstance(prepared, tuple) else (prepared,)
            self.wrapped = dict(zip(names, prepared[: len(names)]))
            for phase, optimizer in zip(self.phases, prepared[len(names) :]):
                phase.optimizer = optimizer
        if self.ema is not None:  # the models are on the training device now
            self.ema.shadow = {k: v.to(self.accelerator.device) for k, v in self.ema.shadow.items()}

        from diffusers.optimization import get_scheduler

        # Built here (not through accelerator.prepare) so the schedule advances once per optimizer step;
        # an accelerate-prepared scheduler advances num_processes times per step.
        self.schedulers = [
            get_scheduler(
                cfg.lr_scheduler,
                phase.optimizer,
                num_warmup_steps=cfg.lr_warmup_steps,
                num_training_steps=cfg.max_train_steps,
            )
            for phase in self.phases
        ]
        if state is not None:
            self._load_training_state(state, resume)
        return resume

    def _load_training_state(self, state: dict, resume: Path) -> None:
        if state.get("sharding", "ddp") != self.config.sharding:
            raise ValueError(f"{resume} was written with --sharding {state.get('sharding', 'ddp')}; resume it with "
                             f"the same --sharding (the optimizer state is stored per mode).")
        for phase, scheduler in zip(self.phases, self.schedulers):
            if phase.name not in state["optimizers"]:
                raise ValueError(f"{resume} has no optimizer state for phase {phase.name!r}; it was written by another task.")
            optimizer = phase.optimizer  # the one the schedule drives (under DeepSpeed, the engine's base optimizer)
            # This run's settings (learning rate, betas, eps, weight decay, the schedule), built from its options:
            # loading the checkpoint's state would bring back the interrupted run's, silently ignoring a change.
            fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            if self.config.sharding == "deepspeed":
                if int(state["world_size"]) != self.world_size:
                    raise ValueError(f"{resume} was written by {state['world_size']} processes; a --sharding deepspeed "
                                     f"run resumes on the same number (ZeRO shards the optimizer state per rank).")
                from opensora_plan.train import zero

                zero.load_state(self.engines[phase.name], resume / "deepspeed")
            elif self.config.sharding == "fsdp2":
                from opensora_plan.train.sharding import load_optimizer_state

                load_optimizer_state(self.task, phase, state["optimizers"][phase.name])
            else:
                phase.optimizer.load_state_dict(state["optimizers"][phase.name])
            scheduler.load_state_dict(state["schedulers"][phase.name])
            _apply_settings(optimizer, scheduler, fresh)
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.skipped_total = int(state["skipped_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        dp_size = int(state.get("dp_size", state["world_size"]))
        if state.get("data_order", "samples") != self._data_order():
            logger.warning("Resuming with other data batching (%s) than the interrupted run (%s): the data order "
                           "differs from here on.", self._data_order(), state.get("data_order", "samples"))
            self.position = 0
            self.epoch += 1
        elif dp_size != self.dp_size or int(state["train_batch_size"]) != self.config.train_batch_size:
            logger.warning(
                "Resuming a run of %d data-parallel rank(s) x batch %d with %d x %d: the data order differs "
                "from the interrupted run from here on.",
                dp_size, state["train_batch_size"], self.dp_size, self.config.train_batch_size,
            )
            self.position = 0
            self.epoch += 1
        rng_file = resume / f"rng_state_{self.rank}.pt"
        if rng_file.is_file():
            ckpt.restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))

    def _write_options(self, resumed_from: Path | None) -> None:
        """``options.json``: the options in force from now on, and under ``resumes`` one record per resume (the
        step, the checkpoint, each changed option's old and new value), so the file says what every step ran."""
        options = absolute_paths(dataclasses.asdict(self.config))
        options["extra"] = absolute_paths(options.get("extra") or {})
        options.update(
            task=type(self.task).__name__,
            task_options=self.task.options(),
            world_size=self.world_size,
            distributed_type=str(self.accelerator.distributed_type),
            torch_version=torch.__version__,
        )
        path = self.output_dir / "options.json"
        if resumed_from is not None:
            previous = json.loads(path.read_text()) if path.is_file() else {}
            _, changes = resume_changes({**run_options(options), "resume_from_checkpoint": str(resumed_from)})
            options[RESUMES_KEY] = [*previous.get(RESUMES_KEY, []), {
                "step": self.step, "checkpoint": str(resumed_from),
                "changed": {k: {"before": before, "after": after} for k, (before, after) in changes.items()
                            if k != "resume_from_checkpoint"}}]
        atomic_write_bytes(path, json.dumps(options, indent=2, default=str).encode())

    @staticmethod
    def _log_has_validation(path: Path) -> bool:
        """Whether ``log.jsonl`` already holds a validation record (``val_*`` keys)."""
        if not path.is_file():
            return False
        return any(key.startswith("val_") for line in path.read_text().splitlines() if line.strip()
                   for key in json.loads(line))

    def _prepare_log(self) -> None:
        """Keep ``log.jsonl`` lines up to the resumed step (a crash may have logged steps after the checkpoint)."""
        path = self.output_dir / "log.jsonl"
        kept = []
        if self.step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= self.step:
                    kept.append(line)
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    # ---------------------------------------------------------------- data

    def _data_order(self) -> str:
        """'samples' (fixed-size batches, position in samples) or the bucket sampler's signature (position in batches)."""
        return "samples" if self.bucket_sampler is None else f"buckets:{self.bucket_sampler.signature()}"

    def _batches(self) -> Iterator[Any]:
        cfg = self.config
        if self.bucket_sampler is not None:
            sampler, advance = self.bucket_sampler, 1  # the position counts batches
            loader_args = {"batch_sampler": sampler}
        else:
            sampler, advance = ResumableSampler(len(self.task.dataset), cfg.seed, self.dp_rank, self.dp_size), \
                cfg.train_batch_size
            if sampler.per_process() < cfg.train_batch_size:
                raise ValueError(
                    f"Each of the {plural(self.dp_size, 'data-parallel rank')} gets "
                    f"{plural(sampler.per_process(), 'sample')} per epoch, fewer than --train_batch_size "
                    f"{cfg.train_batch_size}; add data or lower the batch size."
                )
            loader_args = {"batch_size": cfg.train_batch_size, "sampler": sampler, "drop_last": True}
        samples = SeededSamples(self.task.dataset, cfg.seed)
        while True:
            sampler.set_epoch(self.epoch, self.position)
            loader = DataLoader(
                samples,
                num_workers=cfg.dataloader_num_workers,
                collate_fn=self.task.collate_fn,
                **loader_args,
            )
            for batch in loader:
                self.position += advance
                yield batch
            report = self.task.epoch_report()
            if report:
                logger.warning("Epoch %d (rank %d): %s", self.epoch, self.rank, json.dumps(report, default=str))
            self.epoch += 1
            self.position = 0

    # ---------------------------------------------------------------- one optimizer step

    def _no_sync(self, phase: Phase, sync: bool):
        stack = contextlib.ExitStack()
        if not sync and self.world_size > 1:
            for name in phase.models:
                if self.config.sharding == "fsdp2":
                    stack.enter_context(_fsdp_no_sync(self.wrapped[name]))
                else:
                    stack.enter_context(self.accelerator.no_sync(self.wrapped[name]))
        return stack

    def _train_step_deepspeed(self, micro_batches: list) -> dict:
        """One optimizer step through the DeepSpeed engine (it accumulates, reduces, clips and steps)."""
        cfg, phase = self.config, self.phases[0]
        engine = self.engines[phase.name]
        losses, stats_sum = [], {}
        for micro, batch in enumerate(micro_batches):
            _seed_everything(derive_seed(cfg.seed, self.step, 0, micro, self.dp_rank))
            loss, stats = self.task.loss(phase.name, batch, self.step, self.wrapped, micro)
            finite = torch.isfinite(loss.detach()).all().float().reshape(1)
            if self.world_size > 1:
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if not finite.item():
                # DeepSpeed has no way to drop gradients already accumulated in its buckets mid-step.
                raise NonFiniteLossError(
                    f"Non-finite loss at step {self.step + 1}; --sharding deepspeed cannot skip the update. Lower "
                    f"--learning_rate or check the data, then resume from the last checkpoint."
                )
            engine.backward(loss * cfg.sp_size)  # the engine divides by the accumulation steps itself
            engine.step()  # applies the optimizer on the last micro-batch only
            losses.append(loss.detach().float())
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(value) / len(micro_batches)
        values = torch.stack([torch.stack(losses).mean()] + [torch.tensor(v) for v in stats_sum.values()])
        values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean").cpu()
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        record = {"loss": float(values[0]), "lr": phase.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
        record.update({key: float(v) for key, v in zip(stats_sum, values[1:])})
        self.schedulers[0].step()
        return record

    def _train_step(self, micro_batches: list) -> dict | None:
        """Every phase on the step's micro-batches; returns the log record, or None when the step was skipped."""
        cfg = self.config
        if cfg.sharding == "deepspeed":
            return self._train_step_deepspeed(micro_batches)
        accum = len(micro_batches)
        record: dict[str, Any] = {}
        skipped = False
        for p_index, phase in enumerate(self.phases):
            if self.step < phase.start_step:
                continue  # e.g. a GAN discriminator before its loss term starts: all its gradients are 0
            phase.optimizer.zero_grad(set_to_none=True)
            losses, stats_sum = [], {}
            for micro, batch in enumerate(micro_batches):
                # Seeded by the data-parallel rank: a sequence-parallel group draws the same noise.
                _seed_everything(derive_seed(cfg.seed, self.step, p_index, micro, self.dp_rank))
                with self._no_sync(phase, sync=micro == accum - 1):
                    loss, stats = self.task.loss(phase.name, batch, self.step, self.wrapped, micro)
                    # With sp_size > 1 each rank's gradient covers its share of the tokens and the gradient
                    # reduction averages over dp x sp ranks: x sp_size makes it the mean over dp of the sums.
                    self.accelerator.backward(loss * (cfg.sp_size / accum))
                losses.append(loss.detach().float())
                for key, value in stats.items():
                    stats_sum[key] = stats_sum.get(key, 0.0) + float(value) / accum
            # Mean over micro-batches and processes: the logged numbers do not depend on the process count.
            values = torch.stack([torch.stack(losses).mean()] + [torch.tensor(v) for v in stats_sum.values()])
            values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean").cpu()
            max_norm = phase.max_grad_norm if phase.max_grad_norm else math.inf
            grad_norm = self.accelerator.clip_grad_norm_(phase.params, max_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            loss_value = float(values[0])
            prefix = "" if p_index == 0 else f"{phase.name}_"
            lr = phase.optimizer.param_groups[0]["lr"]
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                if self.accelerator.scaler is not None and math.isfinite(loss_value):
                    phase.optimizer.step()  # fp16: the GradScaler skips this update and lowers its scale
                phase.optimizer.zero_grad(set_to_none=True)
                skipped = True
                logger.warning(
                    "Step %d, phase %s: non-finite loss %s / grad norm %s; the update is skipped.",
                    self.step + 1, phase.name, loss_value, grad_norm,
                )
                break
            phase.optimizer.step()
            record.update({f"{prefix}loss": loss_value, f"{prefix}lr": lr, f"{prefix}grad_norm": grad_norm})
            record.update({key: float(v) for key, v in zip(stats_sum, values[1:])})
        if skipped:
            return None
        for phase, scheduler in zip(self.phases, self.schedulers):
            with warnings.catch_warnings():
                if self.step < phase.start_step:  # the schedule follows the step count, stepped or not
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
        return record

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (all processes must call this)."""
        from opensora_plan.train import sharding

        rng_states = [ckpt.capture_rng_state()]
        if self.world_size > 1:
            rng_states = [None] * self.world_size
            torch.distributed.all_gather_object(rng_states, ckpt.capture_rng_state())
        full = self.config.sharding == "fsdp2"
        path = self.output_dir / f"checkpoint-{self.step}"
        staging = None
        if self.config.sharding == "deepspeed":
            from opensora_plan.train import zero

            # Every rank writes its optimizer shard beside the checkpoint; the main process moves it in.
            staging = self.output_dir / f".deepspeed-{self.step}"
            for engine in self.engines.values():
                zero.save_state(engine, staging)
            model_states = {name: zero.full_state_dict(self.engines[self.phases[0].name])
                            if model is self.engines[self.phases[0].name] else self._unwrap(model).state_dict()
                            for name, model in self.wrapped.items()}
            optimizer_states = {phase.name: None for phase in self.phases}  # in deepspeed/ (sharded)
        else:
            model_states = {
                name: sharding.full_model_state(model) if full else self._unwrap(model).state_dict()
                for name, model in self.wrapped.items()
            }
            optimizer_states = {
                phase.name: sharding.full_optimizer_state(self.task, phase) if full else phase.optimizer.state_dict()
                for phase in self.phases
            }
        ema_state = self.ema.state_dict() if self.ema is not None else None
        if self.is_main:
            with atomic_dir(path) as tmp:
                if staging is not None:
                    os.replace(staging, tmp / "deepspeed")
                for name, model in self.wrapped.items():
                    self.task.save_model(name, self._unwrap(model), model_states[name], tmp / name)
                if self.ema is not None:
                    model = self._unwrap(self.wrapped[self.task.ema_model_name])
                    ema_weights = dict(model_states[self.task.ema_model_name])
                    ema_weights.update({k: v.to(ema_weights[k].dtype) for k, v in ema_state["shadow"].items()})
                    self.task.save_model(self.task.ema_model_name, model, ema_weights, tmp / "ema")
                state = {
                    "step": self.step,
                    "epoch": self.epoch,
                    "position": self.position,
                    "data_order": self._data_order(),
                    "world_size": self.world_size,
                    "dp_size": self.dp_size,
                    "sp_size": self.config.sp_size,
                    "train_batch_size": self.config.train_batch_size,
                    "sharding": self.config.sharding,
                    "skipped_total": self.skipped_total,
                    "nonfinite_in_a_row": self.nonfinite_in_a_row,
                    "optimizers": optimizer_states,
                    "schedulers": {p.name: s.state_dict() for p, s in zip(self.phases, self.schedulers)},
                    "ema": ema_state,
                }
                torch.save(state, tmp / ckpt.STATE_NAME)
                for rank, rng in enumerate(rng_states):
                    torch.save(rng, tmp / f"rng_state_{rank}.pt")
            ckpt.prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
            logger.info("Saved %s", path)
        self.accelerator.wait_for_everyone()
        return path

    # ---------------------------------------------------------------- run

    def run(self) -> dict:
        from opensora_plan.utils import progress_bar

        cfg = self.config
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        resumed_from = self._setup()
        if self.is_main:
            self._write_options(resumed_from)
            self._prepare_log()
            if cfg.report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            elif cfg.report_to == "wandb":
                self.writer = WandbWriter(self.output_dir, dataclasses.asdict(cfg))
        self.accelerator.wait_for_everyone()
        for model in self.wrapped.values():
            model.train()

        batches = self._batches()
        log_path = self.output_dir / "log.jsonl"
        if cfg.validation_steps and self.is_main and (self.step == 0 or not self._log_has_validation(log_path)):
            # A baseline before any update: the first point of the held-out loss curve. A resumed run whose
            # log has no validation yet (validation added on resume) gets its baseline at the resume step.
            baseline = self._validate()
            if baseline:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": self.step, **baseline}) + "\n")
        progress = progress_bar(total=cfg.max_train_steps, initial=self.step, disable=not self.is_main, desc="train",
                        unit="step", dynamic_ncols=True)
        last_saved = self.step if resumed_from is not None else None
        first_step_seconds = None  # the first step of this process: warm-up / compile, reported on its own
        timed_samples, timed_seconds = 0, 0.0  # the later steps, for samples/s
        while self.step < cfg.max_train_steps:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
            record = self._train_step(micro_batches)
            if record is None:
                self.skipped_total += 1
                self.nonfinite_in_a_row += 1
                if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"The loss or gradient was non-finite for {self.nonfinite_in_a_row} steps in a row "
                        f"(last at step {self.step + 1}); lower --learning_rate, check the data or use "
                        f"--mixed_precision bf16/no instead of fp16, then resume from the last checkpoint."
                    )
                continue
            self.nonfinite_in_a_row = 0
            if self.ema is not None:
                self.ema.update(self._unwrap(self.wrapped[self.task.ema_model_name]))
            self.step += 1
            elapsed = time.perf_counter() - started
            samples = sum(self.task.batch_size(b) for b in micro_batches) * self.dp_size
            tokens = sum(self.task.tokens(b) for b in micro_batches) * self.dp_size
            record = {"step": self.step, **record, "samples_per_s": samples / elapsed}
            if tokens:
                record["tokens_per_s"] = tokens / elapsed
            record["epoch"] = self.epoch
            record["skipped_steps"] = self.skipped_total
            if first_step_seconds is None:
                first_step_seconds = record["first_step_seconds"] = elapsed
            else:
                timed_samples, timed_seconds = timed_samples + samples, timed_seconds + elapsed
            if self.is_main:
                self._report_progress(progress, record, first_step_seconds, timed_samples, timed_seconds)
            last = self.step == cfg.max_train_steps
            due = bool(cfg.validation_steps) and (self.step % cfg.validation_steps == 0 or last)
            if due and self.is_main:
                record.update(self._validate() or {})
            if self.is_main:  # before the checkpoint: a resumed run keeps the lines up to its step
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.writer is not None:
                    for key, value in record.items():
                        if key != "step" and isinstance(value, (int, float)) and not key.startswith("val_"):
                            self.writer.add_scalar(f"train/{key}", value, self.step)
            if self.step % cfg.checkpointing_steps == 0:
                self.save_checkpoint()
                last_saved = self.step
        progress.close()
        if last_saved != self.step:
            self.save_checkpoint()
        if self.writer is not None:
            self.writer.close()
        replicas = self._check_replicas()
        self.accelerator.wait_for_everyone()
        summary = {"step": self.step, "skipped_steps": self.skipped_total, "output_dir": str(self.output_dir),
                   "weights_sha256": replicas, "first_step_seconds": first_step_seconds,
                   "samples_per_s": timed_samples / timed_seconds if timed_seconds else None}
        return {**summary, **self.task.run_report()}

    def _report_progress(self, progress, record: dict, first_step_seconds: float, timed_samples: int,
                         timed_seconds: float) -> None:
        """tqdm: step / total, loss, samples/s and ETA, both without the first (warm-up / compile) step."""
        if "first_step_seconds" in record:
            logger.info("First step (warm-up/compile): %.1f s", first_step_seconds)  # once (not also on the bar)
            # Restart tqdm's clock after the first step, so its rate and ETA exclude the warm-up.
            progress.reset(total=self.config.max_train_steps)
            progress.initial = progress.n = progress.last_print_n = self.step
        else:
            progress.update(1)
        postfix = {"loss": f"{record['loss']:.4g}", "lr": f"{record['lr']:.2g}"}
        if timed_seconds:
            postfix["samples/s"] = f"{timed_samples / timed_seconds:.3g}"
        progress.set_postfix(postfix)

    def _validate(self) -> dict:
        """``task.validate`` on the main process: EMA weights swapped in (no copy), the RNG untouched.

        Returns the task's metrics (e.g. ``val_loss``) after writing them to the writer as ``val/<name>``.
        """
        rng = ckpt.capture_rng_state()
        ema_model = self._unwrap(self.wrapped[self.task.ema_model_name]) if self.ema is not None else None
        swap = self.ema.applied_to(ema_model) if ema_model is not None else contextlib.nullcontext()
        try:
            with swap:
                metrics = self.task.validate(self.step, self.wrapped, self.output_dir / "validation", self.writer)
        finally:
            ckpt.restore_rng_state(rng)
        metrics = {key: float(value) for key, value in (metrics or {}).items()}
        if metrics:
            logger.info("Validation at step %d: %s", self.step,
                        ", ".join(f"{k} {v:.5g}" for k, v in metrics.items()))
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key.removeprefix('val_')}", value, self.step)
        return metrics

    def _check_replicas(self) -> str | None:
        """With data parallel replicas, check that every process ends with bit-identical weights."""
        replicated = self.config.sharding == "ddp" or (
            self.config.sharding == "deepspeed" and all(e.zero_optimization_stage() < 3 for e in self.engines.values()))
        if self.world_size == 1 or not replicated:
            return None
        digest = hashlib.sha256()
        for name, model in sorted(self.wrapped.items()):
            for key, tensor in self._unwrap(model).state_dict().items():
                digest.update(f"{name}.{key}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        digests = [None] * self.world_size
        torch.distributed.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(
                f"The {self.world_size} processes ended with different weights (sha256 per rank: {digests}); "
                f"data parallel replicas diverged, which points at a non-deterministic or rank-dependent model."
            )
        if self.is_main:
            logger.info("All %d replicas hold identical weights (sha256 %s).", self.world_size, digests[0][:16])
        return digests[0]


def _apply_settings(optimizer, scheduler, fresh: list[dict]) -> None:
    """Put this run's optimizer settings ``fresh`` (one dict per parameter group, without ``params``) back after
    loading a checkpoint's optimizer and scheduler state, keeping the state's moments and step count, and set each
    group's learning rate to this run's schedule at the restored step. Equal settings give the same values the
    checkpoint held, so an unchanged resume stays exact."""
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # every diffusers schedule is one
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module):
    # FSDP2 defers the gradient reduce-scatter this way (it has no no_sync context manager).
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train(task: TrainTask, config: TrainConfig) -> dict:
    """Run ``task`` with ``config``; see :class:`Trainer`."""
    return Trainer(task, config).run()
