"""The ``opensora-plan sample`` command: prompts -> mp4 files, on one device or sharded with ``torchrun``.

Mirrors the reference's ``opensora/sample/sample_t2v.py`` (its flags, plus ``--negative_prompt``,
``--batch_size``, ``--seed``, ``--dtype``, ``--device``) with what it lacked: every path is checked before anything heavy is loaded, sampling is seeded per prompt, the
T5 encoder is freed after all prompts are encoded, and ``torchrun --nproc_per_node N`` splits the
prompts over N processes (rank r takes prompts r, r+N, ...), each writing its own files. With
``--sp_size S`` the N processes form N/S groups of S consecutive ranks: the groups split the prompts and
the S ranks of a group split each video's tokens (sequence parallelism, :mod:`opensora_plan.models.parallel`);
the group's first rank writes the file. ``--cfg_parallel`` doubles that: two groups run the unconditional and
the conditional half of classifier-free guidance (world = prompts-groups x 2 x S).

Each video gets its own generator seeded with ``seed + prompt index``, and each prompt its own text
conditioning (``text_conditioning="per_prompt"``, the default), so a prompt's video does not depend on
the batch it is in or on how many processes share the work. ``text_conditioning="reference"`` keeps the
reference's batch rule instead (see ``OpenSoraPlanPipeline``).

Prompts come from the ``prompt`` argument / ``--text_prompt`` (always a prompt, never a file name) or
from ``--prompt_file`` (one prompt per line); a prompt that names an existing file, or looks like a
file name, is refused with a pointer to ``--prompt_file`` rather than sampled as text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import ClassVar

from opensora_plan.options import Options, option
from opensora_plan.pipelines.model_folder import (DEFAULT_TEXT_ENCODER, RELEASE_SAMPLE_DEFAULTS,
                                                  adapter_sampling_config, base_model_sampling_config, default_model_path,
                                                  fast_cache_options, load_sampling_config, vae_folder)
from opensora_plan.pipelines.outputs import OVERWRITE_HELP, check_targets

logger = logging.getLogger(__name__)

VERSIONS = ("17x256x256", "65x256x256", "65x512x512")
INTERPOLATE_FACTORS = (1, 2, 4, 8)  # 1: off; else pipelines.interpolate.FACTORS
UPSCALE_FACTORS = (1, 2, 3, 4)  # 1: off; RGT's scales (x3 as upscale --scale; the pipeline handles it)
AE_NAMES = ("CausalVAEModel_4x8x8",)
DEFAULT_MODEL_PATH = "LanguageBind/Open-Sora-Plan-v1.0.0"


FILE_NAME_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".tsv", ".json", ".jsonl", ".prompts", ".text")
TEXT_CONDITIONING = ("per_prompt", "reference")
DTYPES = ("auto", "fp32", "bf16", "fp16")
OFFLOAD_MODES = ("none", "model", "sequential")  # = pipelines.memory_plan.OFFLOAD_MODES (imported lazily: torch)
_SCHEDULERS = ("PNDM, DDIM, EulerDiscrete, DDPM, DPMSolverMultistep, DPMSolverSinglestep, HeunDiscrete, "
               "EulerAncestralDiscrete, DEISMultistep, KDPM2AncestralDiscrete, UniPCMultistep, LCM, TCD")


def _model_default(name: str) -> str:
    """Help text of an option whose default comes from the model folder."""
    value = RELEASE_SAMPLE_DEFAULTS[name]
    shown = f"{value:g}" if isinstance(value, float) else value  # 24, not 24.0
    return f"(default: the model folder's sampling_config.json, or a demo's demo.json; a release folder: {shown})"


def parse_memory_budget(text: str) -> float | str | None:
    """``--vae_memory_gb``: 'auto', 0 (never chunk: None) or a positive finite number of GiB."""
    import argparse

    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number of GiB >= 0 (0: never chunk) or 'auto', got "
                                         f"{text!r}")
    return value or None


@dataclass
class SampleOptions(Options):
    """Every option of ``opensora-plan sample`` / :func:`sample_t2v`, with its default and its check.

    ``None`` for ``model_path`` means the shipped demo model; ``None`` for version, text_encoder_name,
    fps, guidance_scale, num_sampling_steps and sample_method means "the model folder's own setting":
    its ``sampling_config.json`` (or a demo model's ``demo.json``), else :data:`RELEASE_SAMPLE_DEFAULTS`
    (:meth:`resolve` fills them in; docs/sampling.md).
    """

    COMMAND: ClassVar[str] = "sample"
    CONFIG: ClassVar[bool] = True  # --config FILE holds any of these options
    NONFINITE_OK: ClassVar[tuple[str, ...]] = ("guidance_scale", "memory_gb")  # checked below, nan and inf too

    prompt: str | None = option(None, positional=True, help="the prompt (or use --text_prompt)")
    model_path: str | None = option(None, help="folder with the version folders and vae/ (unset: the shipped demo "
                                    f"model, docs/demo.md; the release is {DEFAULT_MODEL_PATH}), or a train-t2v run "
                                    "or checkpoint folder")
    version: str | None = option(None, help=f"version folder under --model_path: {', '.join(VERSIONS)} "
                                 + _model_default("version"))
    text_encoder_name: str | None = option(None, help=f"local T5 folder ({DEFAULT_TEXT_ENCODER} layout) "
                                           + _model_default("text_encoder_name"))
    text_prompt: str | None = option(None, help="the prompt (always text, never a file name)")
    prompt_file: str | None = option(None, help="a text file with one prompt per line (blank lines skipped)")
    clean_caption: bool = option(True, flag="--no_clean_caption",
                                 help="feed prompts as written (lower-cased) instead of the reference's caption "
                                 "cleaning, which removes e.g. CJK characters, URLs and file names")
    text_conditioning: str = option("per_prompt", choices=list(TEXT_CONDITIONING),
                                    help="per_prompt: a prompt gets the same video alone and in any batch, and the "
                                    "negative prompt keeps all its tokens; reference: the reference's batch rule "
                                    "(padded to the token limit, padded positions attended to) and negative prompt "
                                    "cut to the prompt's length")
    negative_prompt: str = option("", help="negative prompt (empty, as the reference)", show_default=False)
    ae: str = option(AE_NAMES[0], help=f"autoencoder name (only {AE_NAMES[0]})")
    save_img_path: str = option("./sample_videos", help="output folder")
    fps: float | None = option(None, help="frames per second of the mp4 " + _model_default("fps"))
    gif: bool = option(False, help="also write <name>.gif beside each mp4")
    overwrite: bool = option(False, help=OVERWRITE_HELP)
    guidance_scale: float | None = option(None, help="classifier-free guidance (1 disables it) "
                                          + _model_default("guidance_scale"))
    num_sampling_steps: int | None = option(None, help="scheduler steps " + _model_default("num_sampling_steps"))
    sample_method: str | None = option(None, help=f"scheduler {_model_default('sample_method')}: {_SCHEDULERS}")
    seed: int = option(0, help="seed; prompt i uses seed + i")
    batch_size: int = option(1, help="prompts per denoising batch")
    force_images: bool = option(False, help="image mode: 1 frame, temporal attention off (png)")
    num_frames: int | None = option(None, help="video frames (1 + 4k) other than the model's own; for models "
                                    "trained with --buckets at several sizes (unset: the model's)",
                                    show_default=False)
    height: int | None = option(None, help="video height in pixels, a multiple of 16, other than the model's; "
                                "for bucket-trained models (unset: the model's)", show_default=False)
    width: int | None = option(None, help="video width in pixels, a multiple of 16, other than the model's; for "
                               "bucket-trained models (unset: the model's)", show_default=False)
    sp_size: int = option(1, help="sequence parallel: processes (of torchrun's) that split each video's tokens")
    cfg_parallel: bool = option(False, help="two process groups run the unconditional and conditional halves of "
                                "guidance (world = prompt groups x 2 x sp_size)")
    enable_tiling: bool = option(False, help="decode in spatial tiles (for 512 px)")
    tile_overlap_factor: float = option(0.25, help="tile overlap")
    vae_memory_gb: float | str | None = option(
        "auto", type=parse_memory_budget, help="VAE decode memory budget in GiB; a decode that would need more runs "
        "losslessly in temporal chunks (same output). auto: the room the memory plan leaves; 0: never")
    memory_gb: float | None = option(None, help="memory of the compute device the plan may use, in GiB (unset: its "
                                     "free memory); on a CPU it also stands in for a smaller card (docs/sampling.md, "
                                     "'Memory plan')", show_default=False)
    offload: str | None = option(None, choices=list(OFFLOAD_MODES), show_default=False,
                                 help="where the models wait (CUDA only): none (all on the device), model (each on "
                                 "the device during its stage), sequential (one layer at a time; slow) (unset: the "
                                 "memory plan's choice)")
    dry_run: bool = option(False, help="print the memory plan with its per-stage peak estimates and exit; loads no "
                           "weights, writes nothing")
    dtype: str = option("auto", choices=list(DTYPES), help="auto = fp16 on GPU (as the reference), fp32 on CPU")
    device: str | None = option(None, help="cpu, cuda, cuda:1 (unset: cuda when available)")
    cache: str = option("none", help="step caching: none (exact), fast (the model's measured preset), teacache, "
                        "first_block, or METHOD:THRESHOLD e.g. teacache:0.5 (docs/sampling.md)")
    compile: bool = option(False, help="torch.compile the transformer blocks (pays a warm-up; docs/sampling.md)")
    lora: str | None = option(None, help="LoRA adapter from train-t2v --lora_rank, applied to the transformer (needs "
                              "peft): a run or checkpoint folder (its ema/ adapter preferred, else model/) or an "
                              "adapter folder such as <checkpoint>/model")
    lora_scale: float = option(1.0, help="strength of the LoRA (0 = base model)")
    interpolate: int = option(1, choices=list(INTERPOLATE_FACTORS), group="post-processing",
                              help="frame interpolation (AMT) after the VAE decode: N (m - 1) + 1 frames from m, "
                              "written at fps x N (1: off)")
    upscale: int = option(1, choices=list(UPSCALE_FACTORS), group="post-processing",
                          help="super-resolution (RGT) after the interpolation: sides x S (1: off)")
    interpolate_model: str | None = option(None, group="post-processing", show_default=False,
                                           help="AMT weights for --interpolate: the official amt-g.pth or a "
                                           "save_pretrained folder (unset: the model folder's stages.interpolate, "
                                           "docs/sampling.md)")
    upscale_model: str | None = option(None, group="post-processing", show_default=False,
                                       help="RGT weights for --upscale: the official RGT_x2.pth / RGT_x4.pth or a "
                                       "save_pretrained folder (unset: the model folder's stages.upscale)")

    def __post_init__(self):
        from opensora_plan.models.step_cache import parse_cache_spec

        given = [name for name, value in (("the prompt argument", self.prompt), ("--text_prompt", self.text_prompt),
                                          ("--prompt_file", self.prompt_file)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"Give the prompt one way only, got {' and '.join(given)}.")
        from opensora_plan.utils import valid_num_frames  # here: utils imports torch, --help stays fast

        if self.num_frames is not None and not valid_num_frames(self.num_frames, 4):
            raise ValueError(f"--num_frames {self.num_frames} is not a length the CausalVAE makes; use 1 + 4k "
                             "(e.g. 9, 17, 65).")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value % 16):
                raise ValueError(f"--{name} {value} must be a positive multiple of 16 (the VAE's 8 x the patch "
                                 "size 2).")
        if self.force_images and self.num_frames not in (None, 1):
            raise ValueError(f"--force_images samples 1 frame; drop --num_frames {self.num_frames}.")
        if self.force_images and self.interpolate != 1:
            raise ValueError(f"--interpolate {self.interpolate} needs videos but --force_images samples single images; "
                             "drop one of the two (--upscale works on images).")
        for flag, model, factor in (("interpolate", self.interpolate_model, self.interpolate),
                                    ("upscale", self.upscale_model, self.upscale)):
            if model is not None and factor == 1:
                raise ValueError(f"--{flag}_model has no effect without --{flag} (2 or more); add --{flag} or drop "
                                 f"--{flag}_model.")
        if self.gif and self.force_images:
            raise ValueError("--gif needs videos but --force_images writes single-frame png images; drop one of "
                             "the two.")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}.")
        if self.sp_size < 1:
            raise ValueError(f"--sp_size must be at least 1, got {self.sp_size}.")
        if self.sp_size > 1 and self.force_images:
            raise ValueError("--force_images samples one frame, which cannot be split over --sp_size processes; "
                             "use --sp_size 1.")
        if self.guidance_scale is not None and (not self.guidance_scale >= 0 or math.isinf(self.guidance_scale)):
            raise ValueError(f"--guidance_scale must be a finite number >= 0 (1 disables guidance), got "
                             f"{self.guidance_scale}.")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps must be positive, got {self.fps}.")
        if self.num_sampling_steps is not None and self.num_sampling_steps < 1:
            raise ValueError(f"--num_sampling_steps must be at least 1, got {self.num_sampling_steps}.")
        if not 0.0 <= self.tile_overlap_factor < 1.0:
            raise ValueError(f"--tile_overlap_factor must be in [0, 1), got {self.tile_overlap_factor}; the "
                             "reference uses 0.25.")
        parse_cache_spec(self.cache)  # --cache NAME or METHOD:THRESHOLD
        if self.cache != "none" and self.sp_size > 1:
            raise ValueError(f"--cache {self.cache} cannot run with --sp_size {self.sp_size} (the ranks would decide "
                             "apart); use --cache none or --sp_size 1.")
        if self.text_conditioning not in TEXT_CONDITIONING:
            raise ValueError(f"--text_conditioning {self.text_conditioning} is not supported; use "
                             f"{' or '.join(TEXT_CONDITIONING)}.")
        if self.memory_gb is not None and not (self.memory_gb > 0 and math.isfinite(self.memory_gb)):
            raise ValueError(f"--memory_gb must be a positive number of GiB, got {self.memory_gb}.")
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise ValueError(f"--offload {self.offload} is not supported; use one of {', '.join(OFFLOAD_MODES)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype} is not supported; use one of {', '.join(DTYPES)}.")
        if self.vae_memory_gb not in (None, "auto"):
            if isinstance(self.vae_memory_gb, bool) or not isinstance(self.vae_memory_gb, (int, float)) or not (
                    self.vae_memory_gb >= 0 and math.isfinite(self.vae_memory_gb)):
                raise ValueError(f"--vae_memory_gb must be a finite number of GiB >= 0 (0: never chunk) or 'auto', "
                                 f"got {self.vae_memory_gb!r}.")
            if self.vae_memory_gb == 0:  # 0 = never chunk, as on the command line
                object.__setattr__(self, "vae_memory_gb", None)

    def resolve(self) -> "SampleOptions":
        """A copy with the model-dependent settings filled in (see :func:`resolve_sample_defaults`)."""
        keys = ("version", "text_encoder_name", "sample_method", "num_sampling_steps", "guidance_scale", "fps")
        resolved = resolve_sample_defaults(self.model_path, lora=self.lora,
                                           **{k: getattr(self, k) for k in keys})
        return dataclasses.replace(self, **resolved)


def resolve_sample_defaults(model_path: str | os.PathLike | None = None, lora: str | os.PathLike | None = None,
                            **given) -> dict:
    """Sampling settings with every ``None`` filled in: flag > model folder file > release defaults.

    No ``model_path``: the shipped demo model. The folder's ``sampling_config.json`` (or a demo model's
    ``demo.json``, :func:`~opensora_plan.pipelines.model_folder.load_sampling_config`; for a ``train-t2v`` run or
    checkpoint, its ``--pretrained`` base model's, :func:`~.model_folder.base_model_sampling_config`) gives what it sets;
    what it does not set, or a folder without such a file (a release checkpoint), comes from
    :data:`RELEASE_SAMPLE_DEFAULTS`. Values given (not ``None``) always win.
    Keys: model_path, version, text_encoder_name, sample_method, num_sampling_steps, guidance_scale, fps.
    ``lora``: an adapter that carries its own ``sampling_config.json`` (a ``distill --lora_rank`` student, in its
    folder, checkpoint or run) overrides the model folder's sampler, steps and guidance.
    """
    import warnings

    from opensora_plan.diffusion.schedulers import clips_sample

    unknown = sorted(set(given) - set(RELEASE_SAMPLE_DEFAULTS))
    if unknown:
        raise ValueError(f"sample_defaults got unknown options {unknown}; expected {sorted(RELEASE_SAMPLE_DEFAULTS)}.")
    folder = Path(model_path) if model_path is not None else default_model_path()
    config = load_sampling_config(folder)
    given_by_file = config.sample_defaults() if config is not None else {}
    if config is None and model_path is not None:
        from opensora_plan.pipelines.training_run import is_training_output, resolve_training_output

        if is_training_output(folder):  # a train-t2v run samples as its base model does (fps, scheduler, ...)
            config = base_model_sampling_config(resolve_training_output(folder).pretrained)
            given_by_file = {k: v for k, v in (config.sample_defaults() if config else {}).items()
                             if k not in ("version", "text_encoder_name")}  # the run records its own
    if config is None and model_path is None:
        raise FileNotFoundError(f"The shipped demo model is missing from {folder}; reinstall opensora-plan or pass "
                                f"--model_path (a release folder) and --text_encoder_name.")
    defaults = {**RELEASE_SAMPLE_DEFAULTS, **given_by_file}
    adapter = adapter_sampling_config(lora)
    if adapter is not None:
        defaults.update({k: v for k, v in adapter.sample_defaults().items()
                         if k in ("sample_method", "num_sampling_steps", "guidance_scale")})
    options = {"model_path": str(folder) if model_path is None else model_path, **defaults}
    options.update({k: v for k, v in given.items() if v is not None})
    # The demo's scaled latents reach +-8: a scheduler that clips x0 to [-1, 1] (DDIM, DDPM as the reference
    # builds them) turns every object the same colour (docs/demo.md).
    if config is not None and config.is_demo and clips_sample(options["sample_method"]):
        warnings.warn(
            f"{options['sample_method']} clips the predicted latents to [-1, 1] (as the reference builds it); the "
            f"demo model's latents reach +-8, so its videos lose their colours (docs/demo.md, 'Pick the scheduler "
            f"with care'). Its default, {defaults['sample_method']}, does not clip.", UserWarning, stacklevel=3)
    baked = distilled_guidance(folder)
    if baked is not None and (options["guidance_scale"] > 1.0 or options["sample_method"] != defaults["sample_method"]):
        said = []
        if options["sample_method"] != defaults["sample_method"]:
            said.append(f"--sample_method {options['sample_method']} is not the sampler it was distilled for, so "
                        "its videos will be poor")
        if options["guidance_scale"] > 1.0:
            said.append(f"--guidance_scale {options['guidance_scale']:g} applies guidance on top of it (two "
                        "transformer evaluations per step)")
        warnings.warn(
            f"{folder} is a distilled student (guidance {baked:g} baked in, made for {defaults['sample_method']}): "
            f"{'; '.join(said)}. Its defaults are {defaults['sample_method']}, guidance 1.", UserWarning, stacklevel=3)
    return options


def distilled_guidance(folder: Path) -> float | None:
    """The guidance a ``distill`` student has baked in (its sampling file's ``_distillation`` record), else None."""
    record_file = Path(folder) / "sampling_config.json"
    try:
        record = json.loads(record_file.read_text()).get("_distillation") if record_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # load_sampling_config has already named a broken file
    return float(record["guidance_scale"]) if isinstance(record, dict) and "guidance_scale" in record else None


def read_prompts(text_prompt: str | None = None, prompt_file: str | os.PathLike | None = None,
                 file_flag: str = "--prompt_file") -> list[str]:
    """``[text_prompt]``, or the non-empty lines of ``prompt_file``; exactly one of the two.

    Never guesses: a ``text_prompt`` that is the path of an existing file, or a single word ending in a
    text-file suffix (``prompts.txt``, ``list.TXT``), is a ValueError that points to ``--prompt_file``.
    """
    from opensora_plan.utils import read_text_file

    if (text_prompt is None) == (prompt_file is None):
        raise ValueError(f"Give either a prompt (the argument or --text_prompt) or {file_flag}, exactly one of them.")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file() and not path.is_dir():
            raise FileNotFoundError(f"Prompt file {path} does not exist; {file_flag} takes a text file with one "
                                    "prompt per line.")
        text = read_text_file(path, "Prompt file")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"Prompt file {path} has no prompts; write one prompt per line.")
        return prompts
    if not text_prompt.strip():
        raise ValueError(f"The prompt is empty; pass a prompt such as 'a red circle moving left' or {file_flag}.")
    looks_like_file = " " not in text_prompt.strip() and text_prompt.strip().lower().endswith(FILE_NAME_SUFFIXES)
    if os.path.isfile(text_prompt) or looks_like_file:
        exists = "names an existing file" if os.path.isfile(text_prompt) else "looks like a file name"
        raise ValueError(f"The prompt {text_prompt!r} {exists}; prompts are never read from files implicitly: use "
                         f"{file_flag} {text_prompt} for one prompt per line, or write the prompt in words.")
    return [text_prompt]


def video_filename(index: int, prompt: str, suffix: str = ".mp4", max_chars: int = 80) -> str:
    """``0007-a_cat_playing_the_piano.mp4``: the prompt's index, then its words (file-system safe)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:max_chars].rstrip("_") or "prompt"
    return f"{index:04d}-{slug}{suffix}"


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item starting at ``rank``."""
    return items[rank::world_size]


def _distributed_setup(device_name: str | None):
    """``(rank, world_size, device)``; under ``torchrun`` joins the process group (NCCL on GPU, gloo on CPU)."""
    import torch

    from opensora_plan.utils import resolve_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_name)
    if world_size > 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _check_model_folders(model_path: Path, version: str, ae: str, text_encoder_name: str) -> None:
    """All folder/file checks and the config-level compatibility checks, before any weights load."""
    from opensora_plan.models.loading import find_weights, resolve_model_folder
    from opensora_plan.models.text_encoder import t5_hidden_size

    if ae not in AE_NAMES:
        raise ValueError(f"--ae {ae} is not supported; use {' or '.join(AE_NAMES)}.")
    if not model_path.is_dir():
        problem = "is a file, not a folder" if model_path.exists() else "does not exist"
        raise (ValueError if model_path.exists() else FileNotFoundError)(
            f"--model_path {model_path} {problem}; expected a local copy of {DEFAULT_MODEL_PATH} with the "
            f"version folders ({', '.join(VERSIONS)}) and vae/, or a train-t2v run or checkpoint folder."
        )
    if not (model_path / version).is_dir() and (model_path / "config.json").is_file():  # one component's folder
        raise ValueError(f"--model_path {model_path} is one model's folder (it holds config.json), not a model folder "
                         f"with version folders and vae/; pass the folder above it, --model_path {model_path.parent}.")
    if not (model_path / version).is_dir():
        present = sorted(d.name for d in model_path.iterdir() if d.is_dir())
        raise FileNotFoundError(
            f"Version folder {model_path / version} does not exist; --version must name a folder of --model_path "
            f"(found: {', '.join(present) or 'none'}; the release has {', '.join(VERSIONS)})."
        )
    vae = vae_folder(model_path)  # vae/, or the folder's sampling file's "vae" (a student shipped in its teacher)
    for folder in (model_path / version, vae):
        find_weights(resolve_model_folder(folder))
    width = t5_hidden_size(text_encoder_name)
    latte_config = _read_config(model_path / version / "config.json", ("caption_channels", "in_channels", "video_length"),
                                f"a LatteT2V config; --version names a transformer folder ({', '.join(VERSIONS)}), not vae")
    vae_config = _read_config(vae / "config.json", ("embed_dim",), "a CausalVAE config")
    if latte_config["caption_channels"] != width:
        raise ValueError(
            f"The T5 in {text_encoder_name} is {width} wide but {model_path / version} expects caption_channels="
            f"{latte_config['caption_channels']}; use the text encoder that model was trained with."
        )
    if vae_config["embed_dim"] != latte_config["in_channels"]:
        raise ValueError(
            f"The VAE in {vae} has {vae_config['embed_dim']} latent channels but {version} expects "
            f"{latte_config['in_channels']}; use the VAE shipped with that model."
        )


def _read_config(path: Path, required: tuple[str, ...], expected: str) -> dict:
    """A model folder's config.json with the keys this command reads; one-line errors otherwise."""
    from opensora_plan.utils import read_text_file

    try:
        config = json.loads(read_text_file(path, "Config file"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Config file {path} is not valid JSON ({err}); expected {expected}.") from err
    missing = [key for key in required if not isinstance(config, dict) or key not in config]
    if missing:
        raise ValueError(f"{path} is not {expected} (it lacks {', '.join(missing)}).")
    return config


def _save(path: Path, frames, fps: float) -> Path:
    """uint8 (T, H, W, 3) -> mp4, or a png for a single frame (image mode)."""
    if frames.shape[0] == 1:
        from PIL import Image

        from opensora_plan.utils import atomic_path

        path = path.with_suffix(".png")
        with atomic_path(path) as tmp:  # never a half-written png
            Image.fromarray(frames[0].numpy()).save(tmp, format="PNG")
        return path
    from opensora_plan.data.video_io import write_video

    return write_video(path, frames, fps)


def plan_stages(opts: SampleOptions, model_path: str | os.PathLike | None) -> dict[str, Path]:
    """The post-processing models ``opts`` asks for: ``{"interpolate": path, "upscale": path}`` (stages that are
    on). Flag > the model folder's ``stages`` (``model_folder.stage_model``); one-line errors naming the flag
    for a missing model or path, and for a ``save_pretrained`` RGT folder of another factor than ``--upscale``
    (read from its config.json; an official .pth is checked right after it loads). Loads nothing."""
    from opensora_plan.pipelines.model_folder import stage_model

    stages = {}
    for name, flag, factor in (("interpolate", "--interpolate_model", opts.interpolate),
                               ("upscale", "--upscale_model", opts.upscale)):
        if factor != 1:
            stages[name] = stage_model(name, getattr(opts, f"{name}_model"), model_path, flag,
                                       f"--{name} {factor}")
    if "upscale" in stages:
        from opensora_plan.pipelines.upscale import check_scale, model_scale

        check_scale(opts.upscale, model_scale(stages["upscale"]), stages["upscale"], "--upscale_model", "--upscale")
    return stages


def _load_stages(stages: dict[str, Path], opts: SampleOptions, device) -> dict:
    """The stage models as pipeline components (``frame_interpolator``, ``upscaler``), in float32 on ``device``."""
    models = {}
    if "interpolate" in stages:
        from opensora_plan.pipelines.interpolate import load_interpolation_model

        models["frame_interpolator"] = load_interpolation_model(stages["interpolate"], device)
    if "upscale" in stages:
        from opensora_plan.models.rgt import load_rgt
        from opensora_plan.pipelines.upscale import check_scale

        models["upscaler"] = load_rgt(stages["upscale"], device=device)
        check_scale(opts.upscale, models["upscaler"].upscale, stages["upscale"], "--upscale_model", "--upscale")
    return models


def _sample_jobs(jobs, opts: SampleOptions, model_path, version, text_encoder_name, scheduler, torch_dtype, device,
                 rank, tag, out_dir, groups, run, stages, plan, placeholder) -> tuple[list[Path], tuple]:
    """Load the models as the memory ``plan`` says (the small stage models first: a wrong one fails before the big
    ones load), encode this rank's prompts, free T5, denoise, post-process and write each video. Without offload
    the prompts are encoded before the transformer loads (``placeholder``, its meta-device twin, stands in), so T5
    and the transformer are never in memory together. Returns the files and the last video's (T, H, W)."""
    import torch

    from opensora_plan.pipelines.memory_plan import out_of_memory_guard

    stage_models = _load_stages(stages, opts, device)

    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.text_encoder import load_t5
    from opensora_plan.pipelines.pipeline_opensora_plan import OpenSoraPlanPipeline

    offloaded = plan.offload != "none"  # the models wait on the CPU; diffusers' hooks move them
    home = torch.device("cpu") if offloaded else device
    vae = CausalVAEModel.from_pretrained(run.vae if run is not None else vae_folder(model_path),
                                         torch_dtype=torch_dtype, device=home)
    tokenizer, text_encoder = load_t5(text_encoder_name, torch_dtype=torch_dtype,
                                      device="cpu" if offloaded or plan.text_encoder == "cpu" else device)
    pipe = OpenSoraPlanPipeline(
        vae=vae,
        transformer=_load_transformer(opts, model_path, version, run, torch_dtype, home) if offloaded else placeholder,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        **stage_models,
    )
    del text_encoder  # the pipeline holds the only reference, so release_text_encoder() frees it
    if offloaded:
        _prepare_transformer(pipe, opts, model_path, torch_dtype, groups)
        pipe.apply_memory_plan(plan, device)
    batches = [jobs[i : i + opts.batch_size] for i in range(0, len(jobs), opts.batch_size)]
    do_cfg = opts.guidance_scale > 1.0
    # Encode every prompt of this rank, then free T5 before denoising (spec 4: ~9.5 GB in fp16).
    start = time.perf_counter()
    with out_of_memory_guard("encoding the prompts", plan):
        encoded = [_encode_batch(pipe, [p for _, p in batch], opts.negative_prompt, do_cfg, opts.clean_caption,
                                 opts.text_conditioning) for batch in batches]
    pipe.release_text_encoder()
    logger.debug("Encoded %d prompt(s) in %.1f s; T5 freed.", len(jobs), time.perf_counter() - start)
    if not offloaded:
        with out_of_memory_guard("loading the transformer", plan):
            pipe.register_modules(transformer=_load_transformer(opts, model_path, version, run, torch_dtype, device))
        _prepare_transformer(pipe, opts, model_path, torch_dtype, groups)
        pipe.apply_memory_plan(plan, device)
    if opts.enable_tiling:
        pipe.enable_vae_tiling(opts.tile_overlap_factor)
    pipe.set_progress_bar_config(disable=rank != 0 or not logger.isEnabledFor(logging.INFO))  # -q: no bars
    num_frames = 1 if opts.force_images else opts.num_frames
    # A size other than the model's own (bucket-trained models): the pipeline's any_size path.
    any_size = any(v is not None for v in (opts.num_frames, opts.height, opts.width))

    written, shape = [], ()
    for batch, (prompt_embeds, prompt_mask, negative_embeds, negative_mask) in zip(batches, encoded):
        # One generator per prompt, seeded as when the prompt is sampled alone: seed + its index.
        generators = [torch.Generator("cpu").manual_seed(opts.seed + index) for index, _ in batch]
        with out_of_memory_guard("sampling", plan):  # the pipeline names denoising / decoding itself
            videos = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                prompt_attention_mask=prompt_mask,
                negative_prompt_attention_mask=negative_mask,
                num_frames=num_frames,
                height=opts.height,
                width=opts.width,
                any_size=any_size,
                num_inference_steps=opts.num_sampling_steps,
                guidance_scale=opts.guidance_scale,
                generator=generators,
                interpolation_factor=opts.interpolate,
                upscale_factor=opts.upscale,
            ).frames  # (B, T, H, W, 3) uint8, after the stages
        for (index, prompt), frames in zip(batch, videos):
            if not groups["writer"]:
                continue
            written.append(_save(out_dir / video_filename(index, prompt), frames, opts.fps * opts.interpolate))
            shape = tuple(frames.shape[:3])
            logger.info("%swrote %s", tag, written[-1])
    return written, shape


def _load_transformer(opts: SampleOptions, model_path, version, run, torch_dtype, device):
    """The LatteT2V of the release folder's version, or of a train-t2v checkpoint (its LoRA applied)."""
    if run is not None:  # a train-t2v checkpoint (pipelines/training_run.py)
        from opensora_plan.pipelines.training_run import load_run_transformer

        return load_run_transformer(run, torch_dtype, device, opts.lora_scale)
    from opensora_plan.models.latte import LatteT2V

    return LatteT2V.from_pretrained(model_path / version, torch_dtype=torch_dtype, device=device)


def _prepare_transformer(pipe, opts: SampleOptions, model_path, torch_dtype, groups) -> None:
    """--lora, --cache, --compile and the parallel groups, on the pipeline's transformer."""
    if opts.lora is not None:
        pipe.load_lora_weights(opts.lora, lora_scale=opts.lora_scale)
        if any(p.dtype != torch_dtype for p in pipe.transformer.parameters()):
            pipe.transformer.to(torch_dtype)  # the adapters are stored in float32
    pipe.fast_cache_options = fast_cache_options(model_path)
    pipe.enable_cache(opts.cache)
    if opts.compile:
        pipe.transformer.compile_blocks()
    if groups["sp"] is not None:
        from opensora_plan.models.parallel import enable_sequence_parallel

        enable_sequence_parallel(pipe.transformer, groups["sp"])
    if groups["cfg"] is not None:
        from opensora_plan.models.parallel import enable_batch_parallel

        enable_batch_parallel(pipe.transformer, groups["cfg"])  # [uncond; cond]: one half per rank


def plan_sample_memory(opts: SampleOptions, model_path, version, text_encoder_name, run, torch_dtype, device):
    """``(MemoryPlan, the transformer on the meta device)`` of a sample run, from the folders' configs only (no
    weights read): the model's size unless --num_frames / --height / --width, --batch_size prompts per batch,
    guidance as --guidance_scale says; --memory_gb, --offload, --vae_memory_gb and --enable_tiling as given."""
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.pipelines.memory_plan import device_memory, meta_models, pipeline_sizes, plan_memory

    config = dict(run.transformer_config) if run is not None else dict(LatteT2V.load_config(str(model_path / version)))
    transformer, vae, text_encoder = meta_models(config, run.vae if run is not None else vae_folder(model_path),
                                                 text_encoder_name, torch_dtype)
    if opts.enable_tiling:
        vae.enable_tiling()
        vae.tile_overlap_factor = opts.tile_overlap_factor
    t_factor, s_factor = vae.temporal_compression, vae.spatial_compression
    size = config["sample_size"] if isinstance(config["sample_size"], (list, tuple)) else [config["sample_size"]] * 2
    frames = 1 if opts.force_images else opts.num_frames or t_factor * (config["video_length"] - 1) + 1
    height, width = opts.height or size[0] * s_factor, opts.width or size[1] * s_factor
    shape = (opts.batch_size, config["in_channels"], (frames - 1) // t_factor + 1, height // s_factor, width // s_factor)
    guidance = opts.guidance_scale > 1.0
    sizes = pipeline_sizes(transformer, vae, text_encoder, torch_dtype, shape, device, guidance, opts.batch_size)
    memory, source = device_memory(device, opts.memory_gb)
    budget = opts.vae_memory_gb if opts.vae_memory_gb in (None, "auto") else int(opts.vae_memory_gb * 2**30)
    plan = plan_memory(sizes, memory, device.type, source, offload=opts.offload, vae_memory=budget,
                       tiling=opts.enable_tiling, one_shot=True)
    return plan, transformer


def warn_unknown_prompts(prompts: list[str], config, shown: int = 3) -> None:
    """One warning line per prompt outside the model's ``vocabulary`` (its sampling file's; the demo's words), the
    first ``shown`` of them, then a count."""
    hints = [h for h in (config.prompt_hint(p) for p in prompts) if h] if config is not None else []
    for hint in hints[:shown]:
        logger.warning("%s%s", hint[0].upper(), hint[1:])
    if len(hints) > shown:
        logger.warning("%d more prompts are outside what this model knows.", len(hints) - shown)


def sample_summary(count: int, shape: tuple, fps: float, opts: SampleOptions, model: str, seconds: float) -> str:
    """The end-of-run line: what was written (png images or mp4 videos, frames, size and fps as written, after
    the post-processing stages, and the GIFs of ``--gif``), then the model folder and the scheduler that made it, and the time."""
    from opensora_plan.utils import plural

    noun = "image" if opts.force_images else "video"
    what = plural(count, f"png {noun}" if opts.force_images else f"mp4 {noun}")
    if count and opts.force_images:
        what += f" {shape[2]}x{shape[1]}"
    elif count:
        what += f" of {plural(shape[0], 'frame')} {shape[2]}x{shape[1]} at {fps:g} fps"
    steps = [f"--{name} {getattr(opts, name)}" for name in ("interpolate", "upscale") if getattr(opts, name) != 1]
    if count and steps:
        what += f" (after {', '.join(steps)})"
    if count and opts.gif:
        what += " and its GIF" if count == 1 else f" and their {count} GIFs"
    return (f"Sampled {what} with model {model} "
            f"({opts.sample_method}, {plural(opts.num_sampling_steps, 'step')}) in {seconds:.1f} s "
            f"({seconds / max(count, 1):.1f} s per {noun})")


def _encode_batch(pipe, prompts, negative_prompt, do_cfg, clean_caption, text_conditioning):
    """``(prompt_embeds, prompt_mask, negative_embeds, negative_mask)`` of one batch; masks are None for 'reference'."""
    if text_conditioning == "per_prompt":
        return pipe.encode_prompt_with_masks(prompts, negative_prompt, do_cfg, clean_caption=clean_caption)
    cond, uncond = pipe.encode_prompt(prompts, negative_prompt=negative_prompt, do_classifier_free_guidance=do_cfg,
                                      clean_caption=clean_caption)
    return cond, None, uncond, None


def sample_t2v(options: SampleOptions | Mapping | None = None, **kwargs) -> list[Path]:
    """Sample one video per prompt into ``save_img_path``; returns the files this process wrote.

    ``options``: a :class:`SampleOptions`, a dict of its fields, or its fields as keywords. Settings left ``None`` come from
    the model folder (:meth:`SampleOptions.resolve`). Prompts: ``prompt`` / ``text_prompt`` (one prompt)
    or ``prompt_file`` (one per line). ``gif``: also write ``<name>.gif`` beside each mp4. Every option, prompt,
    folder and config is checked before any model loads (ValueError / FileNotFoundError, one line).
    ``cache``: step caching, "none" (exact), "fast" (the model's preset) or a method of
    ``models.step_cache.CACHE_METHODS`` with its default threshold; ``compile``: torch.compile the
    transformer blocks (docs/sampling.md has the measured costs and gains of both).
    ``sp_size`` > 1 (under torchrun, world size a multiple of it): groups of ``sp_size`` processes split
    each video's frames / patch positions; the videos equal the single-process ones up to float rounding.
    ``cfg_parallel``: pairs of such groups run the unconditional / conditional halves of guidance.

    ``model_path`` may also be a ``train-t2v`` output: a ``checkpoint-<step>`` folder or the run folder
    (its latest checkpoint); the VAE, T5 (unless ``text_encoder_name`` is given) and, for a LoRA run,
    the base model come from the run's options.json, and EMA weights are used when the run kept them.
    ``lora``: a LoRA adapter folder (``pytorch_lora_weights.safetensors`` + ``adapter_config.json``) to
    apply at ``lora_scale`` (0 = the base model exactly).
    ``vae_memory_gb``: decode losslessly in temporal chunks when a plain VAE decode would need more
    (GiB; ``"auto"`` = the device's free memory at decode time; None = never).
    """
    import torch

    from opensora_plan.diffusion.schedulers import create_scheduler
    from opensora_plan.models.text_encoder import preprocess_prompts
    from opensora_plan.utils import check_output_folder, default_dtype, parse_dtype, resolve_device

    # Everything cheap first: flags, prompts, folders, configs.
    if options is None:
        options = SampleOptions(**kwargs)  # keyword form: the fields of SampleOptions
    elif not isinstance(options, SampleOptions):
        options = SampleOptions.of(options, **kwargs)  # a mapping of its fields
    elif kwargs:
        raise TypeError(f"sample_t2v takes a SampleOptions or keywords, not both (got {sorted(kwargs)}).")
    if options.prompt is None and options.text_prompt is None and options.prompt_file is None:
        raise ValueError('No prompt given; run e.g. opensora-plan sample "a red circle moving left" '
                         '(or --prompt_file).')
    opts = options.resolve()
    text_prompt = opts.prompt if opts.prompt is not None else opts.text_prompt
    model_path, version, text_encoder_name, device = opts.model_path, opts.version, opts.text_encoder_name, opts.device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    block = opts.sp_size * (2 if opts.cfg_parallel else 1)
    if world % block:
        raise ValueError(f"--sp_size {opts.sp_size}" + (" x 2 (--cfg_parallel)" if opts.cfg_parallel else "")
                         + f" must divide the number of processes ({world}); launch with torchrun "
                         f"--nproc_per_node a multiple of {block}.")
    if opts.cfg_parallel and opts.guidance_scale <= 1.0:
        raise ValueError(f"--cfg_parallel splits classifier-free guidance, which --guidance_scale "
                         f"{opts.guidance_scale} turns off; use a scale > 1 or drop --cfg_parallel.")
    scheduler = create_scheduler(opts.sample_method)
    from opensora_plan.pipelines.pipeline_opensora_plan import check_scheduler_steps

    check_scheduler_steps(scheduler, opts.num_sampling_steps)  # before any model loads or folder is made
    prompts = read_prompts(text_prompt, opts.prompt_file)
    preprocess_prompts(prompts, clean=opts.clean_caption, warn=False)  # a prompt that cleaning empties: error now
    warn_unknown_prompts(prompts, None if opts.lora else load_sampling_config(opts.model_path))  # a LoRA may add words
    out_dir = check_output_folder(opts.save_img_path, "--save_img_path")
    suffix = ".png" if opts.force_images else ".mp4"
    # Every planned file, checked now: an existing one (a rerun with another --seed names its files alike) is
    # refused without --overwrite, a folder in its place always, so nothing is replaced silently.
    targets = [out_dir / video_filename(index, prompt, suffix) for index, prompt in enumerate(prompts)]
    try:
        check_targets([], targets + ([t.with_suffix(".gif") for t in targets] if opts.gif else []), opts.overwrite,
                      flag="--save_img_path")
    except ValueError as err:
        if not opts.dry_run:
            raise
        logger.warning("%s (the run itself would stop here; --dry_run goes on to the plan)", err)
    model_path = Path(model_path)
    run = None
    from opensora_plan.pipelines.training_run import is_training_output, resolve_training_output

    if is_training_output(model_path):
        run = resolve_training_output(model_path)
        version = run.checkpoint.name  # for the log line
        if text_encoder_name in (None, DEFAULT_TEXT_ENCODER) and run.text_encoder:
            text_encoder_name = run.text_encoder
        print(f"Using {run.describe()}", flush=True)
    else:
        from opensora_plan.pipelines.training_run import checkpoint_subfolder_hint

        hint = checkpoint_subfolder_hint(model_path)
        if hint is not None:
            raise ValueError(hint)
        _check_model_folders(model_path, version, opts.ae, str(text_encoder_name))
    if opts.lora_scale != 1.0 and opts.lora is None and (run is None or run.lora is None):
        raise ValueError(f"--lora_scale {opts.lora_scale} needs a LoRA: pass --lora or a LoRA run's checkpoint.")
    if opts.lora is not None:
        from opensora_plan.pipelines.training_run import resolve_lora_adapter

        resolved = resolve_lora_adapter(opts.lora)
        if resolved is None:
            raise FileNotFoundError(f"--lora {opts.lora} holds no pytorch_lora_weights.safetensors; give a "
                                    f"train-t2v --lora_rank run or checkpoint folder, or an adapter folder (e.g. "
                                    f"runs/x/checkpoint-600/model).")
        if run is not None and run.lora is not None:
            raise ValueError(f"{model_path} is a LoRA run whose adapter is applied already; drop --lora "
                             f"(use --lora_scale to scale it).")
        print(f"Using the {resolved[1]}", flush=True)
        opts = dataclasses.replace(opts, lora=str(resolved[0]))  # the adapter folder itself
    if opts.lora is not None or (run is not None and run.lora is not None):
        from opensora_plan.models.lora import require_peft

        require_peft()  # a missing [lora] extra is one line now, not a traceback after the models load
    if opts.lora is not None and run is None:
        from opensora_plan.models.lora import check_lora_base

        check_lora_base(opts.lora, model_path / version)  # trained on another base: one warning line
    stages = plan_stages(opts, model_path)  # stage model paths and the upscaler's factor, before any model loads
    if not opts.force_images:  # the output formats' fps limits, checked and told with the other options
        from opensora_plan.data.video_io import check_fps

        note = check_fps(opts.fps * opts.interpolate, gif=opts.gif)
        if note:
            logger.warning(note)
    resolve_device(device)  # a bad --device fails here, before torchrun joins a process group

    rank, world_size, device = _distributed_setup(device)
    torch_dtype = default_dtype(device) if opts.dtype == "auto" else parse_dtype(opts.dtype)
    if torch_dtype == torch.float16 and device.type == "cpu":
        # Measured on this project's CPU (AVX512-BF16/AMX): the demo sample took ~12x longer in fp16.
        # Worded as upscale's / interpolate's --dtype refusal; sample casts the weights, which runs (its stage
        # models stay fp32), so it is a warning.
        logger.warning("--dtype fp16 on CPU: sample runs the models' fp16 weights on slow fallback kernels (about 12x "
                       "slower than fp32 here); use --dtype bf16 or fp32 on CPU.")
    plan, placeholder = plan_sample_memory(opts, model_path, version, text_encoder_name, run, torch_dtype, device)
    if opts.dry_run:
        print(plan.table(), flush=True)  # and nothing else: no weights read, no folder made
        return []
    groups = {"sp": None, "cfg": None, "dp_rank": rank, "dp_size": world_size, "writer": True}
    if block > 1:
        from opensora_plan.models.parallel import init_parallel_groups

        groups = init_parallel_groups(opts.sp_size, 2 if opts.cfg_parallel else 1)
    dp_rank, dp_size = groups["dp_rank"], groups["dp_size"]
    jobs = shard(list(enumerate(prompts)), dp_rank, dp_size)  # [(global index, prompt)]
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"[rank {rank}/{world_size}] " if world_size > 1 else ""

    start = time.perf_counter()
    written = []
    try:
        if jobs:  # more processes than prompts leaves some ranks idle
            written, shape = _sample_jobs(jobs, opts, model_path, version, text_encoder_name, scheduler, torch_dtype,
                                          device, rank, tag, out_dir, groups, run, stages, plan, placeholder)
    except BaseException:
        if made:  # a run that fails before its first video leaves no empty folder behind (e.g. bad stage weights)
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty
        raise
    elapsed = time.perf_counter() - start
    fps = opts.fps * opts.interpolate  # interpolation keeps the duration
    if opts.gif:  # before the summary line, which counts them
        from opensora_plan.data.video_io import read_video, write_gif

        for path in [p for p in written if p.suffix == ".mp4"]:
            logger.info("%swrote %s", tag, write_gif(path.with_suffix('.gif'), read_video(path)[0], fps))  # -q hides it
    # A release's version (65x512x512) and a run's checkpoint say which model ran; a save_pretrained folder's
    # component folder ("transformer") says nothing, so the folder itself is named.
    model = model_path.resolve().name if run is None and version == "transformer" else version
    print(f"{tag}{sample_summary(len(written), shape, fps, opts, model, elapsed)} -> {out_dir}", flush=True)
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return written
