"""Text-to-video sampling: T5 -> LatteT2V denoising with classifier-free guidance -> CausalVAE decode.

A diffusers ``DiffusionPipeline`` with the usual skeleton (``check_inputs``, ``encode_prompt``,
``prepare_latents``, the denoising loop in ``__call__``, ``decode_latents``) that reproduces the
reference sampler (``VideoGenPipeline`` of Open-Sora-Plan v1.0.0, spec 3.2 and 4) step for step:

- the prompt is cleaned, tokenised to 300 tokens and encoded with its mask; with ``mask_feature``
  (default) a single prompt's embeddings are cut to its number of valid tokens and the negative
  embeddings to the same length, while a batch keeps 300 tokens and zeroes the padded positions of
  the prompt embeddings only; embeddings passed in for both prompt and negative are used as they are;
- the transformer is called **without** a text mask on ``[uncond; cond]`` latents, guidance is applied
  to all 8 output channels and the first ``in_channels`` (epsilon) are kept, the learned variance is
  dropped;
- decoding divides by the VAE's scaling factor (0.18215) and converts to uint8 by truncation,
  giving (B, T, H, W, 3) (``output_type="uint8"``, the default; ``"np"``, ``"pt"`` and ``"pil"`` follow
  diffusers' video pipelines).

Loading follows diffusers: ``OpenSoraPlanPipeline.from_pretrained(folder)`` and
``DiffusionPipeline.from_pretrained(folder)`` read a folder with ``model_index.json`` (the shipped demo,
or anything written by ``save_pretrained``); :meth:`OpenSoraPlanPipeline.from_release` builds the
pipeline from the released layout (version folders + ``vae/`` and a separate T5 folder).

Differences from the reference, on purpose: inputs are validated before any heavy work, sampling is
seeded through ``generator``, and the text encoder can be released after encoding to save memory.

Text conditioning (``text_conditioning``): the default ``"per_prompt"`` gives every prompt exactly the
conditioning it gets alone, in any batch: each prompt keeps its valid tokens, the negative prompt
keeps its own tokens (padded to the prompt's length when shorter, as the reference does), and the
positions beyond them are excluded from cross-attention by an attention mask. Alone, with a negative
that fits in the prompt's length, this *is* the reference's single-prompt conditioning (no mask is
passed). ``"reference"`` reproduces the reference exactly, quirks included: the negative prompt is cut
to the prompt's length, and a batch uses 300 tokens with zeroed prompt pads, attended to without a mask.
Truncation is never silent: one warning per prompt says how many tokens were dropped. A prompt that
caption cleaning empties is an error (it would be sampled as the unconditional prompt).

Non-finite values (the initial latents, the latents after any step, the decoded video) stop sampling
with :class:`~opensora_plan.utils.NonFiniteError` naming the step, instead of a black video.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from opensora_plan.models.latte import temporal_length
from opensora_plan.models.layers import inference_weight_cache
from opensora_plan.models.step_cache import CACHE_METHODS, CACHE_PRESETS, FAST_CACHE, make_step_cache, parse_cache_spec
from opensora_plan.models.text_encoder import MODEL_MAX_LENGTH, encode_texts, preprocess_prompts, warn_truncated
from opensora_plan.pipelines.memory_plan import out_of_memory_guard
from opensora_plan.pipelines.model_folder import (RELEASE_SAMPLE_DEFAULTS, fast_cache_options, load_sampling_config,
                                                  vae_folder)
from opensora_plan.utils import check_finite, valid_num_frames

if TYPE_CHECKING:
    from opensora_plan.pipelines.memory_plan import MemoryPlan

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("uint8", "np", "pt", "pil", "latent")
TEXT_CONDITIONING = ("per_prompt", "reference")


@dataclass
class OpenSoraPlanPipelineOutput(BaseOutput):
    """``frames``, by ``output_type``:

    - ``"uint8"`` (default): torch uint8 (B, T, H, W, 3) on CPU, the reference's truncating conversion;
    - ``"np"``: numpy float32 (B, T, H, W, 3) in [0, 1] (diffusers' video pipelines);
    - ``"pt"``: torch float32 (B, T, 3, H, W) in [0, 1] on the pipeline's device;
    - ``"pil"``: a list of B lists of T ``PIL.Image`` (RGB);
    - ``"latent"``: the final latents (B, C, F, h, w), not decoded.

    ``video`` is the old name of ``frames``, kept for one release (it warns).
    """

    frames: torch.Tensor | np.ndarray | list

    @property
    def video(self):
        warnings.warn("OpenSoraPlanPipelineOutput.video is renamed to .frames (diffusers' name); .video will be "
                      "removed in the next release.", FutureWarning, stacklevel=2)
        return self.frames



def check_scheduler_steps(scheduler, num_inference_steps: int) -> None:
    """ValueError when ``scheduler`` cannot run ``num_inference_steps`` steps: diffusers' PNDM builds its
    Runge-Kutta warm-up from the last 4 timesteps and fails below that; LCM and TCD sample on their skipping grid
    of ``original_inference_steps`` (50) points and fail above that."""
    prk_order = getattr(scheduler, "pndm_order", 0) if not scheduler.config.get("skip_prk_steps") else 0
    if num_inference_steps < prk_order:
        raise ValueError(
            f"PNDM with Runge-Kutta warm-up needs at least {prk_order} steps, got {num_inference_steps}; "
            f"use more steps or another sample method (e.g. DDIM)."
        )
    name = type(scheduler).__name__
    grid = scheduler.config.get("original_inference_steps") if name in ("LCMScheduler", "TCDScheduler") else None
    if grid is not None and num_inference_steps > grid:
        raise ValueError(f"{name[:3]} samples on its {grid}-point timestep grid: at most {grid} steps, got "
                         f"{num_inference_steps} (a distilled student is made for 1-8).")


class OpenSoraPlanPipeline(DiffusionPipeline):
    """Open-Sora-Plan v1.0.0 text-to-video pipeline (LatteT2V + CausalVAE 4x8x8 + T5).

    ``text_encoder`` and ``tokenizer`` may be ``None`` when ``prompt_embeds`` are given (e.g. after
    :meth:`release_text_encoder`). ``frame_interpolator`` (an ``AMTModel``) and ``upscaler`` (an ``RGTModel``)
    are optional post-processing stages run after the VAE decode when ``__call__`` asks for an
    ``interpolation_factor`` / ``upscale_factor`` above 1; they are None unless passed in, loaded with
    :meth:`load_stages` (the folder's ``stages``) or saved in a ``save_pretrained`` folder.
    """

    _optional_components = ["text_encoder", "tokenizer", "frame_interpolator", "upscaler"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, vae, transformer, scheduler, text_encoder=None, tokenizer=None, frame_interpolator=None,
                 upscaler=None):
        super().__init__()
        self.register_modules(
            vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
            frame_interpolator=frame_interpolator, upscaler=upscaler,
        )
        # The model folder this pipeline was loaded from (from_release sets it; from_pretrained records it as
        # config._name_or_path): its sampling file gives the call's defaults and the stages of load_stages().
        self.model_folder: str | None = None
        # What enable_cache("fast") means; None: the loaded folder's own preset ("cache_fast" of its
        # sampling_config.json or demo.json, pipelines/model_folder.py), else models.step_cache.FAST_CACHE.
        # Code that builds the pipeline by hand may set it.
        self.fast_cache_options: dict | None = None
        self._interrupt = False
        self.memory_plan = None  # a pipelines.memory_plan.MemoryPlan once apply_memory_plan() ran
        self._warn_mixed_dtypes()

    def _warn_mixed_dtypes(self) -> None:
        """One warning naming the models whose dtype differs from the transformer's (a folder loaded without a
        dtype, or components passed in by hand); the post-processing stage models run in float32 by design."""
        from opensora_plan.utils import module_dtype

        dtypes = {name: module_dtype(getattr(self, name)) for name in ("transformer", "vae", "text_encoder")
                  if isinstance(getattr(self, name, None), torch.nn.Module)}
        main = dtypes.get("transformer")
        differ = {name: dtype for name, dtype in dtypes.items() if dtype not in (None, main)}
        if main is not None and differ:
            logger.warning("The pipeline's models are not one dtype: the transformer is %s but %s; pass dtype= to "
                           "from_pretrained / from_release to load them all in one, or call pipe.to(dtype).",
                           str(main).replace("torch.", ""),
                           ", ".join(f"{n} is {str(d).replace('torch.', '')}" for n, d in differ.items()))

    @classmethod
    def from_release(
        cls,
        root: str | os.PathLike,
        version: str | None = None,
        text_encoder: str | os.PathLike | None = None,
        scheduler: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "OpenSoraPlanPipeline":
        """The pipeline from the released layout: ``root/<version>/``, ``root/vae/`` and a T5 folder.

        ``root`` is a local copy of LanguageBind/Open-Sora-Plan-v1.0.0 (``17x256x256/``, ``65x256x256/``,
        ``65x512x512/``, ``vae/``); ``text_encoder`` a local DeepFloyd/t5-v1_1-xxl folder (weights,
        ``spiece.model``, ``tokenizer_config.json``). ``text_encoder=None`` leaves the T5 out: pass
        ``prompt_embeds`` then. ``scheduler`` is a sample-method name of ``create_scheduler`` (PNDM, the
        reference's default). Weights load strictly (a missing or unexpected key raises ``ValueError``);
        a missing folder raises ``FileNotFoundError`` naming it. The shipped demo also has this layout:
        ``from_release(demo_folder, version="17x64x64", text_encoder=demo_folder / "text_encoder")``.
        ``version`` / ``scheduler`` unset: the folder's sampling file's (``sampling_config.json`` or ``demo.json``),
        else the release's ``65x512x512`` / PNDM; the VAE is the file's ``vae`` (a distilled student shares its
        teacher's, e.g. ``assets/demo/student``), else ``root/vae``.

        ``dtype`` (diffusers' current name) or ``torch_dtype`` (the older one; both only if equal, else ValueError):
        every model is loaded in it (T5 in float16 keeps its ``wo`` layers in float32, as transformers does for
        T5's stability). Unset: :func:`~opensora_plan.utils.default_dtype` of ``device`` (float16 on CUDA,
        float32 on the CPU); ``torch.bfloat16`` halves the CPU's memory and runs faster there. ``device``: where
        the models are put (unset: they stay on the CPU).
        """
        from pathlib import Path

        from opensora_plan.diffusion.schedulers import create_scheduler
        from opensora_plan.models.causalvae import CausalVAEModel
        from opensora_plan.models.latte import LatteT2V
        from opensora_plan.models.text_encoder import load_t5
        from opensora_plan.utils import resolve_dtype_arguments

        torch_dtype = resolve_dtype_arguments(dtype, torch_dtype, device)
        root = Path(root)
        config = load_sampling_config(root) if root.is_dir() else None
        given = {**RELEASE_SAMPLE_DEFAULTS, **(config.sample_defaults() if config is not None else {})}
        version = version if version is not None else given["version"]
        scheduler = scheduler if scheduler is not None else given["sample_method"]
        if not (root / version).is_dir():
            present = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(f"Version folder {root / version} does not exist; version must name a folder of "
                                    f"{root} (found: {', '.join(present) or 'none'}).")
        tokenizer = t5 = None
        if text_encoder is not None:
            tokenizer, t5 = load_t5(text_encoder, torch_dtype=torch_dtype, device=device)
        pipe = cls(
            vae=CausalVAEModel.from_pretrained(vae_folder(root), torch_dtype=torch_dtype, device=device),
            transformer=LatteT2V.from_pretrained(root / version, torch_dtype=torch_dtype, device=device),
            scheduler=create_scheduler(scheduler),
            text_encoder=t5,
            tokenizer=tokenizer,
        )
        if load_sampling_config(root) is not None:  # the folder's own "fast" cache preset (e.g. the demo's)
            pipe.fast_cache_options = fast_cache_options(root)
        pipe.model_folder = str(root)
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "OpenSoraPlanPipeline":
        """diffusers' ``from_pretrained`` with one dtype for the whole folder.

        ``dtype`` (diffusers' current name) or ``torch_dtype`` (older; both only if equal, else ValueError): every
        model in it; a dict ``{"transformer": ..., "default": ...}`` (diffusers' per-component form) is passed on
        as it is. Unset: :func:`~opensora_plan.utils.default_dtype` (float16 when CUDA is available, else
        float32), not each file's own dtype, so a folder saved in bfloat16 and loaded without a dtype does not
        come back mixed. Any model that still differs is named in one warning. Other keywords go to diffusers.
        A local path (absolute, or starting with ``.`` / ``~``) that is not a folder, or a folder without
        ``model_index.json`` (the released layout, a student folder: :meth:`from_release`), is a FileNotFoundError.
        """
        from opensora_plan.utils import resolve_dtype_arguments

        path = str(pretrained_model_name_or_path)
        if (os.path.isabs(path) or path.startswith((".", "~"))) and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"{path} is not a folder; from_pretrained takes a pipeline folder (model_index.json: "
                                    "the demo, or one written by save_pretrained) or a Hub repo id; for the released "
                                    "layout use from_release.")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path} has no model_index.json, so it is not a pipeline folder; for the released "
                                    "layout or a distilled student folder use OpenSoraPlanPipeline.from_release("
                                    f"{path!r}, text_encoder=...).")
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        if isinstance(dtype, dict) or isinstance(torch_dtype, dict):
            if dtype is not None and torch_dtype is not None:
                raise ValueError("Pass one of dtype and torch_dtype (dtype is diffusers' current name).")
            kwargs["dtype"] = dtype if dtype is not None else torch_dtype
        else:
            kwargs["dtype"] = resolve_dtype_arguments(dtype, torch_dtype)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """diffusers' ``save_pretrained``, plus the loaded folder's sampling defaults (its ``sampling_config.json``
        or a demo's ``demo.json``: scheduler, steps, guidance, fps, cache preset, prompts) so that the saved folder
        samples as the loaded one did, also through ``sample --model_path`` (``text_encoder/`` gets the tokenizer's
        files too, a whole T5 folder; stage models loaded with :meth:`load_stages` are listed in its ``stages``;
        ``pipelines/model_folder.save_sampling_defaults``). Raises ValueError for the folder it was loaded from,
        NotADirectoryError where ``save_directory`` is an existing file."""
        from opensora_plan.pipelines.model_folder import save_sampling_defaults

        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_pretrained needs a folder, and {save_directory} is an existing file; "
                                     "give a new or existing folder's path.")
        source = self._folder()
        if source is not None and os.path.realpath(save_directory) == os.path.realpath(source):
            raise ValueError(f"save_pretrained into {source}, the folder this pipeline was loaded from, would mix two "
                             "layouts in it (and rewrite its sampling file); save into a new folder.")
        super().save_pretrained(save_directory, **kwargs)
        if self.tokenizer is not None and self.text_encoder is not None:
            # text_encoder/ becomes a whole T5 folder, as --text_encoder_name takes (the release's T5 layout)
            self.tokenizer.save_pretrained(os.path.join(save_directory, "text_encoder"))
        stages = {"interpolate": self.frame_interpolator, "upscale": self.upscaler}
        save_sampling_defaults(source, save_directory, tuple(name for name, model in stages.items() if model is not None))

    # ----------------------------------------------------------------------------------------
    # The model folder's sampling file: call defaults and post-processing stages
    # ----------------------------------------------------------------------------------------

    def _folder(self) -> str | None:
        folder = self.model_folder or self.config.get("_name_or_path")  # from_release / from_pretrained
        return folder if folder and os.path.isdir(folder) else None

    def sampling_defaults(self) -> dict:
        """``{"num_inference_steps", "guidance_scale"}`` that ``__call__`` uses when not given: the loaded
        folder's ``sampling_config.json`` (or a demo's ``demo.json``), else the release's (50, 7.5)."""
        folder = self._folder()
        config = load_sampling_config(folder) if folder is not None else None
        given = config.sample_defaults() if config is not None else {}
        merged = {**RELEASE_SAMPLE_DEFAULTS, **given}
        return {"num_inference_steps": merged["num_sampling_steps"], "guidance_scale": merged["guidance_scale"]}

    def load_stages(self, interpolation_model: str | os.PathLike | None = None,
                    upscale_model: str | os.PathLike | None = None, device: str | torch.device | None = None):
        """Load the post-processing models: each one given here, else the one the loaded folder's sampling file
        lists in ``stages`` (``pipelines/model_folder.stage_model``); a stage neither names stays as it is.

        Explicit, not part of ``from_pretrained``: loading a folder never loads models you did not ask for.
        ``interpolation_model``: an official ``amt-g.pth`` or a ``save_pretrained`` AMT folder;
        ``upscale_model``: ``RGT_x2.pth`` / ``RGT_x4.pth`` or a ``save_pretrained`` RGT folder. ``device``:
        unset, the pipeline's. Returns the pipeline; then call it with ``interpolation_factor`` / ``upscale_factor``.
        """
        from opensora_plan.models.rgt import load_rgt
        from opensora_plan.pipelines.interpolate import load_interpolation_model
        from opensora_plan.pipelines.model_folder import folder_stages, stage_model

        device = torch.device(device) if device is not None else self.device
        folder = self._folder()
        listed = folder_stages(folder) if folder is not None else {}
        if interpolation_model is not None or "interpolate" in listed:
            path = stage_model("interpolate", interpolation_model, folder, "interpolation_model")
            self.register_modules(frame_interpolator=load_interpolation_model(path, device))
        if upscale_model is not None or "upscale" in listed:
            path = stage_model("upscale", upscale_model, folder, "upscale_model")
            self.register_modules(upscaler=load_rgt(path, device=device))
        return self

    # ----------------------------------------------------------------------------------------
    # Step caching
    # ----------------------------------------------------------------------------------------

    def enable_cache(self, method: str = "fast", **options) -> None:
        """Skip the transformer blocks on denoising steps where they would change little.

        ``method``: "none" (exact, same as :meth:`disable_cache`), "fast" (this model's measured
        preset: ``self.fast_cache_options``, else the loaded folder's "cache_fast" (its ``sampling_config.json``
        or ``demo.json``), else ``models.step_cache.FAST_CACHE``), or one of ``models.step_cache.CACHE_METHODS``
        ("teacache", "first_block") with its options, e.g. ``threshold=0.1``. Raises ValueError for
        an unknown method or option. See docs/sampling.md for what each costs in quality.
        """
        method, parsed = parse_cache_spec(method)  # "teacache:0.5" works as well as threshold=0.5
        options = {**parsed, **options}
        if method == "none":
            self.disable_cache()
            return
        if method == "fast":
            options = {**self._fast_cache_preset(), **options}
            method = options.pop("method")
        elif method not in CACHE_METHODS:
            raise ValueError(f"Unknown cache {method!r}; choose one of {', '.join((*CACHE_PRESETS, *CACHE_METHODS))}.")
        self.transformer.enable_step_cache(make_step_cache(method, **options))

    def _fast_cache_preset(self) -> dict:
        if self.fast_cache_options is not None:
            return dict(self.fast_cache_options)
        folder = self.config.get("_name_or_path")  # set by from_pretrained
        if folder and os.path.isdir(folder):
            return fast_cache_options(folder)
        return dict(FAST_CACHE)

    def disable_cache(self) -> None:
        """Run every transformer block on every step again (exact sampling)."""
        self.transformer.disable_step_cache()

    @property
    def cache_stats(self):
        """Computed / skipped transformer forwards of the last call (``CacheStats``), or None without a cache."""
        cache = self.transformer.step_cache
        return None if cache is None else cache.stats

    # ----------------------------------------------------------------------------------------
    # Switches
    # ----------------------------------------------------------------------------------------

    def enable_vae_tiling(self, tile_overlap_factor: float = 0.25) -> None:
        """Decode in overlapping spatial tiles (the reference turns this on for 512 px, spec 1.6)."""
        if not 0.0 <= tile_overlap_factor < 1.0:
            raise ValueError(f"tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}; the reference uses 0.25.")
        self.vae.enable_tiling()
        self.vae.tile_overlap_factor = tile_overlap_factor

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    # ----------------------------------------------------------------------------------------
    # LoRA adapters (models/lora.py; needs peft)
    # ----------------------------------------------------------------------------------------

    def load_lora_weights(self, path: str | os.PathLike, lora_scale: float = 1.0) -> None:
        """Add the LoRA adapter saved at ``path`` to the transformer, applied at ``lora_scale``.

        ``path``: a folder with ``pytorch_lora_weights.safetensors`` (+ ``adapter_config.json``), e.g.
        a ``train-t2v --lora_rank`` checkpoint's ``model/``, or the checkpoint folder itself. Raises
        FileNotFoundError when there is no adapter there and ValueError when it does not fit the
        transformer or one is already loaded.
        """
        from opensora_plan.models.lora import load_lora

        load_lora(self.transformer, path, scale=lora_scale)
        self.transformer.to(self.device)

    def set_lora_scale(self, lora_scale: float) -> None:
        """Scale the loaded adapter (0 = the base model exactly, 1 = as trained); not while fused."""
        from opensora_plan.models.lora import set_lora_scale

        set_lora_scale(self.transformer, lora_scale)

    def fuse_lora(self, lora_scale: float | None = None) -> None:
        """Merge the adapter (at ``lora_scale``, default: its current scale) into the base weights: same
        videos up to float rounding, no per-step adapter cost."""
        from opensora_plan.models.lora import fuse_lora, set_lora_scale

        if lora_scale is not None:
            set_lora_scale(self.transformer, lora_scale)
        fuse_lora(self.transformer)

    def unfuse_lora(self) -> None:
        """Subtract the fused adapter again (the base weights come back up to float rounding)."""
        from opensora_plan.models.lora import unfuse_lora

        unfuse_lora(self.transformer)

    def set_vae_memory_budget(self, gib: float | str | None) -> None:
        """Decode losslessly in temporal chunks whenever a plain decode would exceed ``gib`` GiB
        (``"auto"``: the device's free memory; None: off). See ``CausalVAEModel.set_decode_memory_budget``."""
        self.vae.set_decode_memory_budget(gib)

    # ----------------------------------------------------------------------------------------
    # Memory plan (pipelines/memory_plan.py) and offload
    # ----------------------------------------------------------------------------------------

    def plan_memory(self, num_frames: int | None = None, height: int | None = None, width: int | None = None,
                    batch_size: int = 1, guidance: bool = True, memory_gb: float | None = None,
                    offload: str | None = None, vae_memory_gb: float | str | None = "auto",
                    device: str | torch.device | None = None) -> "MemoryPlan":
        """The memory plan for this pipeline's models and a video size (default: the model's own), without
        changing anything; :meth:`enable_memory_plan` applies it.

        ``memory_gb``: the compute device's memory in GiB (unset: its free memory; on a CPU it may stand in for a
        smaller card); ``offload``: "none", "model" or "sequential" (unset: the plan's choice); ``vae_memory_gb``:
        the VAE decode budget ("auto": the room the plan leaves; None: never chunk); ``device``: the compute
        device (unset: CUDA when available). Raises ValueError for an unknown offload, or offload on a CPU.
        """
        from opensora_plan.pipelines.memory_plan import device_memory, pipeline_sizes, plan_memory
        from opensora_plan.utils import resolve_device

        device = torch.device(device) if device is not None else resolve_device(None)
        frames, h, w = (given if given is not None else default for given, default in
                        zip((num_frames, height, width), self.default_size()))
        shape = self._latent_shape(batch_size, frames, h, w)
        sizes = pipeline_sizes(self.transformer, self.vae, self.text_encoder, self.transformer.dtype, shape, device,
                               guidance, batch_size)
        memory, source = device_memory(device, memory_gb)
        budget = vae_memory_gb if vae_memory_gb in (None, "auto") else int(vae_memory_gb * 2**30)
        return plan_memory(sizes, memory, device.type, source, offload=offload, vae_memory=budget,
                           tiling=self.vae.use_tiling, one_shot=False)

    def enable_memory_plan(self, num_frames: int | None = None, height: int | None = None, width: int | None = None,
                           batch_size: int = 1, guidance: bool = True, memory_gb: float | None = None,
                           offload: str | None = None, vae_memory_gb: float | str | None = "auto",
                           device: str | torch.device | None = None) -> "MemoryPlan":
        """Plan (:meth:`plan_memory`, same arguments) and apply it (:meth:`apply_memory_plan`); returns the plan.
        One INFO line states it."""
        plan = self.plan_memory(num_frames, height, width, batch_size, guidance, memory_gb, offload, vae_memory_gb,
                                device)
        self.apply_memory_plan(plan, device)
        return plan

    def apply_memory_plan(self, plan: "MemoryPlan", device: str | torch.device | None = None) -> None:
        """Put the models where ``plan`` says: offload "model" / "sequential" through diffusers'
        :meth:`enable_model_cpu_offload` / :meth:`enable_sequential_cpu_offload`, else every model on ``device``
        (unset: CUDA when available) except a T5 planned for the CPU; the VAE's decode budget and tiling."""
        from opensora_plan.utils import resolve_device

        device = torch.device(device) if device is not None else resolve_device(None)
        if plan.offload != "none":
            if plan.text_encoder == "cpu":  # no hook for T5: it encodes where it is
                self.model_cpu_offload_seq = "transformer->vae"
                self._exclude_from_cpu_offload = sorted({*self._exclude_from_cpu_offload, "text_encoder"})
            if plan.offload == "model":
                self.enable_model_cpu_offload(device=device)
            else:
                self.enable_sequential_cpu_offload(device=device)
            if plan.text_encoder == "cpu" and self.text_encoder is not None:
                self.text_encoder.to("cpu")  # diffusers puts excluded models on the device
        else:
            for name in ("transformer", "vae", "frame_interpolator", "upscaler", "text_encoder"):
                module = getattr(self, name, None)
                if isinstance(module, torch.nn.Module):
                    module.to("cpu" if name == "text_encoder" and plan.text_encoder == "cpu" else device)
        if plan.vae_decode == "tiles" and not self.vae.use_tiling:
            self.enable_vae_tiling()
        self.set_vae_memory_budget(None if plan.vae_budget is None else plan.vae_budget / 2**30)
        self.memory_plan = plan
        logger.info("%s", plan.describe())

    def release_text_encoder(self) -> None:
        """Drop the T5 encoder (about 9.5 GB in half precision for T5-XXL) and free its memory.

        Later calls need ``prompt_embeds`` and ``negative_prompt_embeds``; encode all prompts first
        with :meth:`encode_prompt`, then release, then denoise.
        """
        encoder = weakref.ref(self.text_encoder) if self.text_encoder is not None else None
        self.register_modules(text_encoder=None)
        if encoder is not None and encoder() is not None:  # kept alive by a reference cycle (e.g. offload hooks)
            gc.collect()  # a full pass: 0.1-0.3 s of CPU over the libraries' objects, skipped when T5 is gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------

    def default_size(self) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` the transformer was trained for (e.g. 65, 512, 512)."""
        t_factor, s_factor = self.vae.temporal_compression, self.vae.spatial_compression
        cfg = self.transformer.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        return t_factor * (cfg.video_length - 1) + 1, size[0] * s_factor, size[1] * s_factor

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_frames: int,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        latents: torch.Tensor | None,
        output_type: str,
        num_videos_per_prompt: int = 1,
        any_size: bool = False,
    ) -> None:
        """Every check that can fail, before any model runs; each error says what to change.

        ``any_size`` accepts every 1 + 4k frame count and every height / width divisible by the VAE's
        compression x the patch size, not only the transformer's training size (bucket-trained models)."""
        cfg = self.transformer.config
        t_factor, s_factor = self.vae.temporal_compression, self.vae.spatial_compression
        patch = cfg.patch_size
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not supported; use one of {', '.join(OUTPUT_TYPES)}.")
        if self.vae.config.embed_dim != cfg.in_channels:
            raise ValueError(
                f"The VAE has {self.vae.config.embed_dim} latent channels but the transformer expects "
                f"{cfg.in_channels}; use the VAE the transformer was trained with (CausalVAEModel_4x8x8)."
            )
        if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
            raise ValueError(
                f"The transformer outputs {cfg.out_channels} channels for {cfg.in_channels} input channels; "
                f"expected {cfg.in_channels} (epsilon) or {2 * cfg.in_channels} (epsilon + learned variance)."
            )
        default_frames = t_factor * (cfg.video_length - 1) + 1
        if not valid_num_frames(num_frames, t_factor):
            raise ValueError(
                f"num_frames={num_frames} is not 1 + {t_factor}k, which the VAE needs; use {default_frames} "
                f"(this model) or 1 (image mode)."
            )
        if not any_size and num_frames != 1 and (num_frames - 1) // t_factor + 1 != cfg.video_length:
            raise ValueError(
                f"num_frames={num_frames} does not match this transformer, which generates {default_frames} frames "
                f"({cfg.video_length} latent frames); use num_frames={default_frames} or the version trained for "
                f"{num_frames} frames."
            )
        _, default_h, default_w = self.default_size()
        for name, value, default in (("height", height, default_h), ("width", width, default_w)):
            if value % (s_factor * patch) != 0:
                raise ValueError(f"{name}={value} is not divisible by {s_factor * patch}; use {default} for this model.")
            if value != default and not any_size:
                raise ValueError(
                    f"{name}={value} does not match this transformer, trained at {default_w}x{default_h}; use "
                    f"{name}={default} or the version trained at that size."
                )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        check_scheduler_steps(self.scheduler, num_inference_steps)
        if not guidance_scale >= 0 or guidance_scale == float("inf"):  # also NaN
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 disables guidance), got {guidance_scale}.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of prompt and prompt_embeds.")
        if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of negative_prompt and negative_prompt_embeds.")
        needs_text_encoder = prompt is not None or (guidance_scale > 1 and negative_prompt_embeds is None)
        if needs_text_encoder and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "The text encoder was released or never loaded; pass prompt_embeds and negative_prompt_embeds "
                "(see encode_prompt) or build the pipeline with a text_encoder and tokenizer."
            )
        caption_width = None
        if prompt_embeds is not None:
            caption_width = prompt_embeds.shape[-1]
            if prompt_embeds.ndim != 3:
                raise ValueError(f"prompt_embeds must be (B, L, C), got shape {tuple(prompt_embeds.shape)}.")
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                    f"{tuple(prompt_embeds.shape)} must have the same shape; encode both with encode_prompt."
                )
        elif self.text_encoder is not None:
            caption_width = self.text_encoder.config.d_model
        if caption_width is not None and caption_width != cfg.caption_channels:
            raise ValueError(
                f"The text embeddings are {caption_width} wide but the transformer expects caption_channels="
                f"{cfg.caption_channels}; use the text encoder the transformer was trained with "
                f"(DeepFloyd/t5-v1_1-xxl, 4096)."
            )
        if latents is not None:
            batch = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
            expected = self._latent_shape(batch * num_videos_per_prompt, num_frames, height, width)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {expected} for these settings.")

    def _latent_shape(self, batch_size: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        t_factor, s_factor = self.vae.temporal_compression, self.vae.spatial_compression
        latent_frames = (num_frames - 1) // t_factor + 1
        return (batch_size, self.transformer.config.in_channels, latent_frames, height // s_factor, width // s_factor)

    # ----------------------------------------------------------------------------------------
    # Text
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str = "",
        do_classifier_free_guidance: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clean_caption: bool = True,
        mask_feature: bool = True,
        max_length: int = MODEL_MAX_LENGTH,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds (B, L, C), negative_prompt_embeds (B, L, C) or None)`` as the reference builds them.

        With ``mask_feature`` and at least one of the two embeddings computed here: a single prompt is
        cut to its valid tokens (L = mask sum) and the negative embeddings to the *same* L; a batch
        keeps L = max_length with the prompt embeddings' padded positions zeroed (the negative ones are
        not). Embeddings passed in for both are returned unchanged (reference behaviour, spec 4).
        The result can be fed back as ``prompt_embeds`` / ``negative_prompt_embeds`` unchanged.
        """
        embeds_given = prompt_embeds is not None and negative_prompt_embeds is not None
        negative_texts = None
        device = self._execution_device
        if prompt_embeds is None:
            texts = preprocess_prompts(prompt, clean=clean_caption)
            warn_truncated(self.tokenizer, texts, max_length)
            prompt_embeds, prompt_mask = encode_texts(self.tokenizer, self.text_encoder, texts, max_length)
        else:
            prompt_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        batch_size = prompt_embeds.shape[0]
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)  # (B, L, C)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            # The negative prompt (default "": only EOS) is padded to the prompt's length, as the reference.
            negative_texts = preprocess_prompts([negative_prompt] * batch_size, clean=clean_caption,
                                                what="negative prompt", empty_is_error=False)
            negative_prompt_embeds, _ = encode_texts(self.tokenizer, self.text_encoder, negative_texts,
                                                     prompt_embeds.shape[1])
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        else:
            negative_prompt_embeds = None

        if mask_feature and not embeds_given:
            prompt_mask = prompt_mask.to(device)
            if batch_size == 1:
                keep = int(prompt_mask.sum().item())
                prompt_embeds = prompt_embeds[:, :keep]
                if negative_texts is not None:
                    _warn_negative_cut(self.tokenizer, negative_texts[0], keep)
                if negative_prompt_embeds is not None:
                    negative_prompt_embeds = negative_prompt_embeds[:, :keep]
            else:
                # Reference quirk kept on purpose (spec 4): batches are masked, not cut, and only the prompt side.
                prompt_embeds = prompt_embeds * prompt_mask[:, :, None].to(dtype)
        return prompt_embeds, negative_prompt_embeds

    @torch.no_grad()
    def encode_prompt_with_masks(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        do_classifier_free_guidance: bool = True,
        clean_caption: bool = True,
        max_length: int = MODEL_MAX_LENGTH,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-prompt conditioning: ``(prompt_embeds (B, L, C), prompt_mask (B, L), negative_embeds (B, L, C)
        or None, negative_mask (B, L) or None)``; masks are bool, True = attend.

        Prompt i attends to its k_i valid tokens; the negative prompt, for prompt i, to its own n valid
        tokens, or to k_i positions (its tokens, then pads) when n < k_i, which is how the reference
        pads it for a single prompt. L is the longest of these in the batch, so prompt i gets the same
        conditioning alone and in any batch. Feed the four tensors back to ``__call__`` as
        ``prompt_embeds``, ``prompt_attention_mask``, ``negative_prompt_embeds``,
        ``negative_prompt_attention_mask``.
        """
        device, dtype = self._execution_device, self.transformer.dtype
        texts = preprocess_prompts(prompt, clean=clean_caption)
        warn_truncated(self.tokenizer, texts, max_length)
        embeds, mask = encode_texts(self.tokenizer, self.text_encoder, texts, max_length)  # (B, 300, C), (B, 300)
        prompt_len = mask.sum(1).to(device)  # (B,)
        positions = torch.arange(max_length, device=device)
        length = int(prompt_len.max())
        negative_embeds = negative_mask = None
        if do_classifier_free_guidance:
            negative = preprocess_prompts(negative_prompt, clean=clean_caption, what="negative prompt",
                                          empty_is_error=False)
            warn_truncated(self.tokenizer, negative, max_length, what="negative prompt")
            negative_embeds, negative_valid = encode_texts(self.tokenizer, self.text_encoder, negative, max_length)
            negative_len = prompt_len.clamp(min=int(negative_valid.sum()))  # (B,)
            length = max(length, int(negative_len.max()))
            negative_mask = positions[None, :length] < negative_len[:, None]  # (B, L)
            negative_embeds = negative_embeds[:, :length].to(device=device, dtype=dtype).expand(len(texts), -1, -1)
        prompt_mask = positions[None, :length] < prompt_len[:, None]  # (B, L)
        prompt_embeds = embeds[:, :length].to(device=device, dtype=dtype)  # (B, L, C)
        return prompt_embeds, prompt_mask, negative_embeds, negative_mask

    @staticmethod
    def _cross_attention_mask(prompt_mask, negative_mask, do_cfg: bool, batch_size: int, length: int):
        """The transformer's text mask for ``[uncond; cond]`` (2B, L), or None when every position is attended
        (then the call is exactly the reference's, which samples without a mask)."""
        if prompt_mask is None and (negative_mask is None or not do_cfg):
            return None
        ones = torch.ones(batch_size, length, dtype=torch.bool)
        cond = ones.to(prompt_mask.device) if prompt_mask is None else prompt_mask.bool()
        if do_cfg:
            uncond = torch.ones_like(cond) if negative_mask is None else negative_mask.bool().to(cond.device)
            cond = torch.cat([uncond, cond], dim=0)  # (2B, L)
        return None if bool(cond.all()) else cond.long()

    def _check_text_options(self, text_conditioning, prompt_embeds, prompt_attention_mask,
                            negative_prompt_embeds, negative_prompt_attention_mask) -> None:
        if text_conditioning not in TEXT_CONDITIONING:
            raise ValueError(f"text_conditioning {text_conditioning!r} is not supported; use one of "
                             f"{', '.join(TEXT_CONDITIONING)}.")
        for name, mask, embeds in (("prompt_attention_mask", prompt_attention_mask, prompt_embeds),
                                   ("negative_prompt_attention_mask", negative_prompt_attention_mask,
                                    negative_prompt_embeds)):
            if mask is None:
                continue
            if embeds is None:
                raise ValueError(f"{name} needs the matching embeddings; pass them together (see encode_prompt_with_masks).")
            if tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(embeds.shape[:2])} "
                                 "(one entry per text token, 1 = attend).")

    # ----------------------------------------------------------------------------------------
    # Latents
    # ----------------------------------------------------------------------------------------

    def prepare_latents(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """N(0, 1) noise of ``shape`` (B, C, F, h, w) (or the given ``latents``) times ``init_noise_sigma``."""
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per video.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator, eta: float) -> dict:
        """``eta`` / ``generator`` for schedulers whose ``step`` takes them (DDIM: eta; ancestral: generator)."""
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ----------------------------------------------------------------------------------------
    # Decoding
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_latents_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (B, C, F, h, w) -> decoded video (B, T, C, H, W), roughly in [-1, 1]."""
        latents = latents / self.vae.config.scaling_factor
        video = self.vae.decode(latents.to(self.vae.dtype)).sample  # (B, C, T, H, W)
        check_finite(video, "The VAE decoded the final latents to non-finite pixels", self.vae.dtype)
        return video.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W)

    def postprocess_video(self, video: torch.Tensor, output_type: str):
        """Decoded float video (B, T, C, H, W) in about [-1, 1] -> ``output_type`` (see the output class)."""
        if output_type == "uint8":
            video = ((video / 2.0 + 0.5).clamp(0, 1) * 255).to(torch.uint8)  # truncation, as the reference
            return video.cpu().permute(0, 1, 3, 4, 2).contiguous()  # (B, T, H, W, C)
        video = (video.float() / 2.0 + 0.5).clamp(0, 1)  # (B, T, C, H, W) in [0, 1]
        if output_type == "pt":
            return video
        video = video.cpu().permute(0, 1, 3, 4, 2).numpy()  # (B, T, H, W, C) float32
        if output_type == "np":
            return video
        from PIL import Image  # "pil": rounded, as diffusers' numpy_to_pil

        return [[Image.fromarray(frame) for frame in (clip * 255).round().astype("uint8")] for clip in video]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, interpolation_factor: int = 1,
                       upscale_factor: int = 1) -> torch.Tensor:
        """Diffusion latents -> uint8 video (B, T', H', W', 3) on CPU, through the post-processing stages asked
        for (:meth:`run_stages`; none by default: T' = T, H' = H).

        ``(x / 2 + 0.5)`` clamped to [0, 1] times 255, cast by truncation (not rounding) as the reference.
        """
        self.check_stages(interpolation_factor, upscale_factor, None)
        video = self.run_stages(self.decode_latents_float(latents), interpolation_factor, upscale_factor)
        return self.postprocess_video(video, "uint8")  # (B, T', H', W', C)

    def check_stages(self, interpolation_factor: int, upscale_factor: int, num_frames: int | None) -> None:
        """ValueError unless the post-processing asked for can run: the factors' values, the models loaded, an
        upscaler of that factor, more than one frame to interpolate."""
        from opensora_plan.pipelines.interpolate import FACTORS

        if interpolation_factor != 1:
            if interpolation_factor not in FACTORS:
                raise ValueError(f"interpolation_factor must be 1 (off) or one of {', '.join(map(str, FACTORS))}, "
                                 f"got {interpolation_factor!r}.")
            if self.frame_interpolator is None:
                raise ValueError(f"interpolation_factor={interpolation_factor} needs a frame_interpolator (AMT); "
                                 "call pipe.load_stages(interpolation_model=...) or pass frame_interpolator=.")
            if num_frames == 1:
                raise ValueError("interpolation_factor > 1 needs a video, but num_frames=1 samples an image; use "
                                 "interpolation_factor=1.")
        if upscale_factor != 1:
            if isinstance(upscale_factor, bool) or upscale_factor not in (2, 3, 4):
                raise ValueError(f"upscale_factor must be 1 (off), 2, 3 or 4, got {upscale_factor!r}.")
            if self.upscaler is None:
                raise ValueError(f"upscale_factor={upscale_factor} needs an upscaler (RGT); call "
                                 "pipe.load_stages(upscale_model=...) or pass upscaler=.")
            if self.upscaler.upscale != upscale_factor:
                raise ValueError(f"upscale_factor={upscale_factor} but the upscaler is an x{self.upscaler.upscale} "
                                 f"model; use upscale_factor={self.upscaler.upscale} or load x{upscale_factor} weights.")

    @torch.no_grad()
    def run_stages(self, video: torch.Tensor, interpolation_factor: int = 1, upscale_factor: int = 1) -> torch.Tensor:
        """Decoded float video (B, T, C, H, W) in about [-1, 1] -> frame interpolation (``frame_interpolator``,
        T -> factor (T - 1) + 1 frames), then super-resolution (``upscaler``, H x factor), in that order: the
        interpolation runs at the low resolution, where it is cheaper. Returns the same layout and range, on
        the input's device; factors of 1 skip a stage (the input comes back unchanged)."""
        if interpolation_factor == 1 and upscale_factor == 1:
            return video
        from opensora_plan.pipelines.interpolate import interpolate_video
        from opensora_plan.pipelines.upscale import auto_tiles, upscale_frames

        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)  # set_progress_bar_config
        # the upscale command's plan: whole frames or blended tiles, from the device's free memory (4 GB on the CPU)
        batch_size, tile_size = auto_tiles(self.upscaler, *video.shape[-2:]) if upscale_factor != 1 else (4, None)
        outputs = []
        for clip in video:  # (T, C, H, W)
            frames = (clip.float() / 2 + 0.5).clamp(0, 1)  # [0, 1], as the stage models expect
            if interpolation_factor != 1:
                frames = interpolate_video(self.frame_interpolator, frames, interpolation_factor, progress=progress)
            if upscale_factor != 1:
                frames = upscale_frames(self.upscaler, frames, batch_size, tile_size, progress=progress)
            outputs.append(frames * 2 - 1)  # back to the decoder's range
        return torch.stack(outputs).to(video.device)  # (B, T', C, H', W')

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from ``callback_on_step_end`` to stop after the current step."""
        return self._interrupt

    # ----------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "uint8",
        eta: float = 0.0,
        clean_caption: bool = True,
        mask_feature: bool = True,
        release_text_encoder: bool = False,
        return_dict: bool = True,
        num_videos_per_prompt: int = 1,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        text_conditioning: str = "per_prompt",
        any_size: bool = False,
        interpolation_factor: int = 1,
        upscale_factor: int = 1,
    ):
        """Generate videos; returns :class:`OpenSoraPlanPipelineOutput` (``.frames``) or a 1-tuple.

        ``any_size=True`` lets ``num_frames`` / ``height`` / ``width`` differ from the training size (any
        1 + 4k frames, sides divisible by 16 for the 4x8x8 VAE and patch 2), for models trained with
        ``--buckets``: the position embeddings are computed as bucket training computes them (the spatial
        one on the new grid at the training grid's scale, the temporal one for the new length, for this
        call only). Other sizes on a model trained at one size give poorer videos.

        ``num_frames`` / ``height`` / ``width`` default to the transformer's training size
        (:meth:`default_size`); ``num_frames=1`` is image mode (temporal attention off, the reference's
        ``--force_images``). ``guidance_scale <= 1`` disables classifier-free guidance.
        ``release_text_encoder`` frees the T5 after this call's prompts are encoded.
        ``num_videos_per_prompt`` n gives B = prompts x n videos, prompt-major (prompt 0's n videos
        first); ``generator`` is one generator or a list of B. ``callback_on_step_end(pipe, step_index,
        timestep, callback_kwargs)`` is called after every denoising step with the tensors named in
        ``callback_on_step_end_tensor_inputs`` (any of ``latents``, ``prompt_embeds``) and may return
        replacements; set ``pipe._interrupt = True`` in it to stop early (the current latents are decoded).
        Raises ``ValueError`` for any invalid input, before a model runs.
        ``text_conditioning``: ``"per_prompt"`` (default: a prompt gets the same video alone and in a
        batch, given the same generator) or ``"reference"`` (the reference's batch and negative-prompt
        quirks, see the module docstring). ``prompt_attention_mask`` / ``negative_prompt_attention_mask``
        (B, L), 1 = attend, go with embeddings from :meth:`encode_prompt_with_masks`.
        ``num_inference_steps`` / ``guidance_scale`` None: the loaded folder's sampling file
        (``sampling_config.json`` or a demo's ``demo.json``), else the release's 50 / 7.5 (:meth:`sampling_defaults`).
        ``interpolation_factor`` (2, 4, 8; 1 = off) and ``upscale_factor`` (the upscaler's 2 or 4; 1 = off) run the
        ``frame_interpolator`` then the ``upscaler`` after the VAE decode, for every ``output_type`` but "latent"
        (:meth:`run_stages`, :meth:`load_stages`): factor (T - 1) + 1 frames (play them at fps x factor), sides x
        upscale_factor.
        Raises :class:`~opensora_plan.utils.NonFiniteError` when the latents or the video become NaN/inf.
        """
        defaults = self.sampling_defaults() if num_inference_steps is None or guidance_scale is None else {}
        num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        default_frames, default_h, default_w = self.default_size()
        num_frames = default_frames if num_frames is None else num_frames
        height = default_h if height is None else height
        width = default_w if width is None else width
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be an integer >= 1, got {num_videos_per_prompt!r}.")
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available; use any of "
                             f"{self._callback_tensor_inputs}.")
        self.check_inputs(
            prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
            prompt_embeds, negative_prompt_embeds, latents, output_type, num_videos_per_prompt, any_size,
        )
        self.check_stages(interpolation_factor, upscale_factor, num_frames)
        if output_type == "latent" and (interpolation_factor, upscale_factor) != (1, 1):
            raise ValueError("output_type='latent' returns the latents undecoded, so interpolation_factor and "
                             "upscale_factor cannot apply; use another output_type or factors of 1.")
        self._interrupt = False
        self._check_text_options(text_conditioning, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                                 negative_prompt_attention_mask)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        with out_of_memory_guard("encoding the prompts", self.memory_plan):
            if (prompt is not None and text_conditioning == "per_prompt" and mask_feature
                    and negative_prompt_embeds is None):
                prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
                    self.encode_prompt_with_masks(prompt, "" if negative_prompt is None else negative_prompt, do_cfg,
                                                  clean_caption=clean_caption))
            else:
                prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                    prompt,
                    negative_prompt="" if negative_prompt is None else negative_prompt,
                    do_classifier_free_guidance=do_cfg,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    clean_caption=clean_caption,
                    mask_feature=mask_feature,
                )
        if release_text_encoder:
            self.release_text_encoder()
        if num_videos_per_prompt > 1:  # (B, L, C) -> (B * n, L, C), prompt-major
            prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        batch_size = prompt_embeds.shape[0]
        text_mask = self._cross_attention_mask(prompt_attention_mask, negative_prompt_attention_mask, do_cfg,
                                               batch_size, prompt_embeds.shape[1])  # (2B, L) or None
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)  # (2B, L, C): [uncond; cond]

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        in_channels = self.transformer.config.in_channels
        latents = self.prepare_latents(
            self._latent_shape(batch_size, num_frames, height, width), self.transformer.dtype, device, generator, latents
        )  # (B, C, F, h, w)
        check_finite(latents, "The initial latents are not finite", self.transformer.dtype)
        step_kwargs = self._step_kwargs(generator, eta)
        temporal = num_frames != 1  # image mode skips temporal attention (spec 2.6)

        cache = self.transformer.step_cache
        if cache is not None:
            cache.reset(len(timesteps))
        loop_start = time.perf_counter()
        # inference_weight_cache: weights cast/stacked once for the loop, as autocast does for F.linear
        # any_size: another length gets its temporal position embedding for this call (as bucket training).
        length = temporal_length(self.transformer, latents.shape[2] if temporal else None)
        # Sequential offload swaps every weight in and out per forward: cached copies would stay on the device.
        weight_cache = contextlib.nullcontext() if _weights_offloaded(self.transformer) else inference_weight_cache()
        guard = out_of_memory_guard("denoising", self.memory_plan)
        with guard, self.progress_bar(total=len(timesteps)) as progress, weight_cache, length:
            for step_index, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B, C, F, h, w)
                model_input = self.scheduler.scale_model_input(model_input, t)
                timestep = t[None].to(device).expand(model_input.shape[0])  # (2B,)
                # The reference samples without a text mask (spec 3.2, 8.8); text_mask is None whenever
                # that gives the same conditioning (a single prompt), and masks only padded positions otherwise.
                noise_pred = self.transformer(
                    model_input,
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    encoder_attention_mask=text_mask,
                    enable_temporal_attentions=temporal,
                    return_dict=True,
                ).sample  # (2B, 8, F, h, w)
                if do_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)  # on all 8 channels, as the reference
                if noise_pred.shape[1] == 2 * in_channels:
                    noise_pred = noise_pred[:, :in_channels]  # epsilon; the learned variance is not used
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                _check_step_finite(latents, step_index, len(timesteps), t, self.transformer.dtype)
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress.update()

        loop_seconds = time.perf_counter() - loop_start
        logger.debug("Denoising loop: %d steps of %s in %.2f s (%.1f ms/step); latents %s %s on %s, guidance %s.",
                     len(timesteps), type(self.scheduler).__name__, loop_seconds,
                     1000 * loop_seconds / max(len(timesteps), 1), tuple(latents.shape), latents.dtype,
                     latents.device, guidance_scale)
        if cache is not None:
            logger.info("Step cache %s: ran the transformer blocks on %d of %d steps (%.0f%% skipped).", cache.name,
                        cache.stats.computed, len(timesteps), 100 * cache.stats.skipped_fraction)
        if output_type == "latent":
            video = latents
        else:
            decode_start = time.perf_counter()
            with out_of_memory_guard("decoding with the VAE", self.memory_plan):
                video = self.decode_latents_float(latents)
            logger.debug("VAE decode done: latents %s in %.1f s.", tuple(latents.shape), time.perf_counter() - decode_start)
            video = self.run_stages(video, interpolation_factor, upscale_factor)
            video = self.postprocess_video(video, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return OpenSoraPlanPipelineOutput(frames=video)


# --------------------------------------------------------------------------------------------
# Helpers: silent-failure checks
# --------------------------------------------------------------------------------------------


def _weights_offloaded(module: torch.nn.Module) -> bool:
    """True when accelerate's hooks keep ``module``'s weights off the device between forwards
    (``enable_sequential_cpu_offload``)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in module.modules())


def _check_step_finite(latents: torch.Tensor, step_index: int, num_steps: int, t, dtype: torch.dtype) -> None:
    """Stop at the first denoising step whose latents hold NaN/inf (they would decode to a black video)."""
    check_finite(latents, f"Denoising step {step_index + 1} of {num_steps} (timestep {int(t)}) produced non-finite "
                 "latents", dtype)


def _warn_negative_cut(tokenizer, negative: str, length: int) -> None:
    """The reference's single-prompt rule cuts the negative prompt to the prompt's length: say what it drops."""
    count = len(tokenizer(negative, add_special_tokens=True).input_ids)
    if count > length:
        logger.warning("text_conditioning='reference': the negative prompt (%d tokens) is cut to the prompt's %d "
                       "tokens, dropping %d (its end token included); the default 'per_prompt' keeps them.",
                       count, length, count - length)


def _register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained(folder)`` find this class.

    diffusers resolves a ``model_index.json``'s ``_class_name`` in its own namespace; a pipeline living
    outside diffusers is otherwise only loadable as remote code. Registering the name (once, when this
    module is imported, e.g. by ``import opensora_plan.pipelines``) lets the plain call work. diffusers
    also loads a component only from a module already imported, so the two model modules are imported here.
    """
    import diffusers

    import opensora_plan.models.amt.model  # noqa: F401  (the optional frame_interpolator)
    import opensora_plan.models.causalvae.model  # noqa: F401
    import opensora_plan.models.latte  # noqa: F401
    import opensora_plan.models.rgt  # noqa: F401  (the optional upscaler)

    if getattr(diffusers, OpenSoraPlanPipeline.__name__, None) is None:
        setattr(diffusers, OpenSoraPlanPipeline.__name__, OpenSoraPlanPipeline)


_register_with_diffusers()
