"""The model behind the web page: load once, validate a request, sample, write mp4 + gif.

No gradio here, so this part is tested without a browser. A model folder is either

- a folder with ``model_index.json`` (the shipped demo, or one written by ``save_pretrained``): loaded
  with ``OpenSoraPlanPipeline.from_pretrained``; its one transformer is the only version;
- the released layout (``17x256x256/``, ``65x256x256/``, ``65x512x512/``, ``vae/``) plus a T5 folder:
  every version folder found is offered; the VAE and T5 are loaded once and a version's transformer
  when it is first asked for (one held at a time, as each 1B-parameter transformer is ~4 GB in fp32).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from opensora_plan.options import SEED_LIMIT

logger = logging.getLogger(__name__)

MAX_SEED = SEED_LIMIT - 1  # the CLI's limit (options.check_seed)
RANDOM_SEEDS = 2**32  # a random seed is drawn below this: short enough to read off the page and type again
MAX_STEPS = 1000


def cache_presets() -> list[str]:
    """Step-caching choices offered on the page (``pipe.enable_cache(name)``): none, fast, and each method."""
    from opensora_plan.models.step_cache import CACHE_METHODS, CACHE_PRESETS

    return [*CACHE_PRESETS, *CACHE_METHODS]


@dataclass
class GenerationRequest:
    """One click of *Generate*; :meth:`validate` turns bad input into one ``ValueError`` line."""

    prompt: str
    negative_prompt: str = ""
    version: str | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int | None = None  # None: a random seed, reported back
    scheduler: str = "PNDM"
    cache: str = "none"
    interpolate: int = 1  # frame interpolation factor after the decode (1: off); VideoService.interpolation_choices
    upscale: int = 1  # super-resolution factor after that (1: off); VideoService.upscale_choices


@dataclass
class GenerationResult:
    """The files written, the seed used (also when it was random) and the frames, uint8 (T, H, W, 3)."""

    mp4: Path
    gif: Path
    seed: int
    num_frames: int
    height: int
    width: int
    fps: float
    seconds: float
    request: GenerationRequest = field(repr=False, default=None)
    frames: torch.Tensor = field(repr=False, default=None)

    def caption(self) -> str:
        return f"{self.request.prompt} (seed {self.seed})"


class VideoService:
    """Holds the models of one folder and turns :class:`GenerationRequest` into mp4 + gif files.

    ``model_path`` None is the shipped demo. ``text_encoder_name`` is needed for a release folder (a
    local DeepFloyd/t5-v1_1-xxl copy). ``interpolate_model`` / ``upscale_model``: post-processing models
    (AMT / RGT) offered to requests; unset, the folder's sampling file ``stages`` (if any; flag > folder).
    They load when a request first asks for them. Raises ``FileNotFoundError`` / ``ValueError`` with one line
    when the folder is not usable.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, version: str | None = None,
                 text_encoder_name: str | os.PathLike | None = None, device: str | None = None,
                 dtype: str = "auto", out_dir: str | os.PathLike | None = None,
                 interpolate_model: str | os.PathLike | None = None, upscale_model: str | os.PathLike | None = None,
                 memory_gb: float | None = None, offload: str | None = None):
        from opensora_plan.diffusion.schedulers import scheduler_names
        from opensora_plan.pipelines.model_folder import DEMO_INFO, load_sampling_config
        from opensora_plan.pipelines.sample_t2v import resolve_sample_defaults
        from opensora_plan.utils import check_output_folder, default_dtype, parse_dtype, resolve_device

        self.device = resolve_device(device)
        self.dtype = default_dtype(self.device) if dtype == "auto" else parse_dtype(dtype)
        defaults = resolve_sample_defaults(model_path, version=version, text_encoder_name=text_encoder_name)
        self.folder = Path(defaults["model_path"])
        self.is_demo = (self.folder / DEMO_INFO).is_file()
        self.sampling_config = load_sampling_config(self.folder)  # None: a folder without one (release defaults)
        self.defaults = defaults
        self.scheduler_names = scheduler_names()
        self.out_dir = check_output_folder(out_dir, "--out_dir") if out_dir else Path(
            tempfile.mkdtemp(prefix="opensora-plan-serve-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._stage_paths = self._find_stages(interpolate_model, upscale_model)  # checked before the big models
        self._stage_models: dict = {}
        self._load(version, text_encoder_name)
        # The models load on the CPU; the memory plan (T5 kept for every request) puts them on the device.
        self.plan = self._base.enable_memory_plan(memory_gb=memory_gb, offload=offload, device=self.device)

    def _find_stages(self, interpolate_model, upscale_model) -> dict:
        """``{"interpolate": path, "upscale": path}`` of the stages available: flag > the folder's ``stages``."""
        from opensora_plan.pipelines.model_folder import folder_stages, stage_model

        listed = folder_stages(self.folder)
        paths = {}
        for name, given in (("interpolate", interpolate_model), ("upscale", upscale_model)):
            if given is not None or name in listed:
                paths[name] = stage_model(name, given, self.folder, f"--{name}_model")
        if "upscale" in paths:
            from opensora_plan.pipelines.upscale import model_scale

            self._upscale_scale = model_scale(paths["upscale"])  # None for a .pth: known once loaded
        return paths

    def interpolation_choices(self) -> list[int]:
        """Frame interpolation factors a request may ask for: [1] (off) or [1, 2, 4] with an AMT model."""
        return [1, 2, 4] if "interpolate" in self._stage_paths else [1]

    def upscale_choices(self) -> list[int]:
        """Super-resolution factors a request may ask for: [1] (off) or [1, the RGT model's factor]."""
        if "upscale" not in self._stage_paths:
            return [1]
        if self._upscale_scale is None:  # an official .pth: its factor is in its weights
            self._upscale_scale = self._stage_model("upscaler").upscale
        return [1, self._upscale_scale]

    def _stage_model(self, component: str):
        """The loaded ``frame_interpolator`` / ``upscaler`` (loaded on first use, then kept)."""
        if component not in self._stage_models:
            if component == "frame_interpolator":
                from opensora_plan.pipelines.interpolate import load_interpolation_model

                model = load_interpolation_model(self._stage_paths["interpolate"], self.device)
            else:
                from opensora_plan.models.rgt import load_rgt

                model = load_rgt(self._stage_paths["upscale"], device=self.device)
            self._stage_models[component] = model
        return self._stage_models[component]

    # ----------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------

    def _load(self, version: str | None, text_encoder_name) -> None:
        from opensora_plan.models.loading import COMPONENT_FOLDERS_KEY, PIPELINE_INDEX
        from opensora_plan.pipelines import OpenSoraPlanPipeline

        index = self.folder / PIPELINE_INDEX
        if index.is_file() and text_encoder_name is None:
            folders = json.loads(index.read_text()).get(COMPONENT_FOLDERS_KEY, {})
            self.versions = [folders.get("transformer", "transformer")]
            if version not in (None, self.versions[0]):
                raise ValueError(f"--version {version} is not in {self.folder}, which has one transformer "
                                 f"({self.versions[0]}); leave --version out.")
            self._base = OpenSoraPlanPipeline.from_pretrained(self.folder, dtype=self.dtype)
            self.version = self.versions[0]
            return
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--model_path {self.folder} does not exist; give the shipped demo (leave it "
                                    f"out), a save_pretrained folder or a release folder.")
        from opensora_plan.pipelines.model_folder import version_folders

        self.versions = version_folders(self.folder)
        version = version or self.defaults["version"]
        if version not in self.versions:
            raise FileNotFoundError(f"Version {version} is not in {self.folder} (found: "
                                    f"{', '.join(self.versions) or 'none'}); pass --version with one of those.")
        self._base = OpenSoraPlanPipeline.from_release(self.folder, version=version,
                                                       text_encoder=self.defaults["text_encoder_name"],
                                                       dtype=self.dtype)
        self.version = version

    def _use_version(self, version: str) -> None:
        if version == self.version:
            return
        from opensora_plan.models.latte import LatteT2V

        self._base.register_modules(transformer=None)  # free the old one first: two may not fit
        transformer = LatteT2V.from_pretrained(self.folder / version, torch_dtype=self.dtype)
        self._base.register_modules(transformer=transformer)
        self._base.apply_memory_plan(self.plan, self.device)  # the same plan: the versions are the same size
        self.version = version

    def size_of(self, version: str | None = None) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` of a version (the loaded one by default)."""
        if version in (None, self.version):
            return self._base.default_size()
        config = json.loads((self.folder / version / "config.json").read_text())
        size = config["sample_size"] if isinstance(config["sample_size"], list) else [config["sample_size"]] * 2
        t, s = self._base.vae.temporal_compression, self._base.vae.spatial_compression
        return t * (config["video_length"] - 1) + 1, size[0] * s, size[1] * s

    def example_prompts(self) -> list[str]:
        """Prompts the model knows: its folder file's ``example_prompts`` (the demo's vocabulary), or a few general
        ones for a release model."""
        if self.sampling_config is not None and self.sampling_config.example_prompts:
            return list(self.sampling_config.example_prompts)
        return ["a dog running on the beach at sunset", "a drone shot of waves crashing on a rocky coast",
                "a red car driving through a snowy forest", "time lapse of clouds over a mountain lake"]

    def prompt_hint(self, prompt: str) -> str | None:
        """A sentence when ``prompt`` is outside the folder file's ``vocabulary`` (the demo's words), else None."""
        return self.sampling_config.prompt_hint(prompt) if self.sampling_config is not None else None

    # ----------------------------------------------------------------------------------------
    # Requests
    # ----------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Check every field before any model runs; returns the request with the version filled in."""
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise ValueError("The prompt is empty; describe the video, e.g. " + repr(self.example_prompts()[0]) + ".")
        version = request.version or self.version
        if version not in self.versions:
            raise ValueError(f"Unknown version {version!r}; choose one of {', '.join(self.versions)}.")
        steps = request.num_inference_steps
        if steps is None or int(steps) != steps or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"Steps must be a whole number from 1 to {MAX_STEPS}, got {steps}.")
        if request.guidance_scale is None or not 0 <= request.guidance_scale <= 50:
            raise ValueError(f"Guidance must be between 0 and 50 (1 disables it), got {request.guidance_scale}.")
        if request.seed is not None and (int(request.seed) != request.seed or not 0 <= request.seed <= MAX_SEED):
            raise ValueError(f"The seed must be a whole number from 0 to {MAX_SEED}, or random; got {request.seed}.")
        if request.scheduler not in self.scheduler_names:
            raise ValueError(f"Unknown scheduler {request.scheduler!r}; choose one of {', '.join(self.scheduler_names)}.")
        if request.cache not in cache_presets():
            raise ValueError(f"Unknown caching preset {request.cache!r}; choose one of {', '.join(cache_presets())}.")
        for name, label, choices, flag in (
                ("interpolate", "Interpolation", self.interpolation_choices(), "--interpolate_model"),
                ("upscale", "Upscaling", self.upscale_choices(), "--upscale_model")):
            value = getattr(request, name)
            if value not in choices:
                offered = ", ".join(f"{c}x" for c in choices[1:])
                raise ValueError(f"{label} {value}x is not available; " + (
                    f"choose off or {offered}." if offered else f"this model folder has no {name} stage (start "
                    f"serve with {flag}, or list one in the folder's stages)."))
        from dataclasses import replace

        return replace(request, version=version, num_inference_steps=int(steps),
                       seed=None if request.seed is None else int(request.seed))

    def _pipeline_for(self, request: GenerationRequest):
        """A pipeline sharing the loaded models, with the request's scheduler (nothing shared is changed)."""
        from opensora_plan.diffusion.schedulers import create_scheduler
        from opensora_plan.pipelines import OpenSoraPlanPipeline
        from opensora_plan.pipelines.model_folder import fast_cache_options

        self._use_version(request.version)
        base = self._base
        stages = {}
        if request.interpolate != 1:
            stages["frame_interpolator"] = self._stage_model("frame_interpolator")
        if request.upscale != 1:
            stages["upscaler"] = self._stage_model("upscaler")
        pipe = OpenSoraPlanPipeline(vae=base.vae, transformer=base.transformer, scheduler=create_scheduler(
            request.scheduler), text_encoder=base.text_encoder, tokenizer=base.tokenizer, **stages)
        pipe.set_progress_bar_config(disable=True)
        pipe.memory_plan = base.memory_plan  # its out-of-memory message names the plan
        pipe.fast_cache_options = fast_cache_options(self.folder)
        pipe.enable_cache(request.cache)  # the transformer is shared: every request sets (or clears) its cache
        return pipe

    def generate(self, request: GenerationRequest,
                 on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Sample one video; ``on_step(done, total)`` is called after each denoising step.

        Writes ``<out_dir>/<n>-<prompt>.mp4`` and ``.gif``. Raises ``ValueError`` for bad input
        (before any model runs); PNDM with fewer than 4 steps is such a case.
        """
        from opensora_plan.data.video_io import write_gif, write_video
        from opensora_plan.pipelines.outputs import free_path
        from opensora_plan.pipelines.sample_t2v import video_filename

        request = self.validate(request)
        seed = random.randrange(RANDOM_SEEDS) if request.seed is None else request.seed
        pipe = self._pipeline_for(request)
        total = request.num_inference_steps

        def callback(pipe, step_index, timestep, tensors):
            if on_step is not None:
                on_step(step_index + 1, total)
            return {}

        start = time.perf_counter()
        frames = pipe(request.prompt, negative_prompt=request.negative_prompt or None,
                      num_inference_steps=total, guidance_scale=request.guidance_scale,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="uint8",
                      callback_on_step_end=callback, interpolation_factor=request.interpolate,
                      upscale_factor=request.upscale).frames[0]  # (T, H, W, 3) uint8, after the stages
        seconds = time.perf_counter() - start
        fps = float(self.defaults["fps"]) * request.interpolate  # interpolation keeps the duration
        self._count += 1
        name = video_filename(self._count, request.prompt, max_chars=60)
        # A free name: the counter restarts with the server, and --out_dir may hold an earlier session's files.
        mp4 = write_video(free_path(self.out_dir / name, companions=(".gif",)), frames, fps)
        gif = write_gif(mp4.with_suffix(".gif"), frames, fps)
        t, h, w, _ = frames.shape
        logger.info("generated %s in %.1f s (seed %d)", mp4, seconds, seed)
        return GenerationResult(mp4=mp4, gif=gif, seed=seed, num_frames=t, height=h, width=w, fps=fps,
                                seconds=seconds, request=request, frames=frames)
