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
  giving (B, T, H, W, 3).

Differences from the reference, on purpose: inputs are validated before any heavy work, sampling is
seeded through ``generator``, and the text encoder can be released after encoding to save memory.
"""

from __future__ import annotations

import gc
import inspect
import logging
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from opensora_plan.models.text_encoder import MAX_LENGTH, encode_texts, preprocess_texts

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("uint8", "pt", "latent")


@dataclass
class OpenSoraPlanPipelineOutput(BaseOutput):
    """``video``: uint8 (B, T, H, W, 3) on CPU, float (B, T, C, H, W) in [-1, 1] (not clamped) for
    ``output_type="pt"``, or the final latents (B, C, F, h, w) for ``output_type="latent"``."""

    video: torch.Tensor


class OpenSoraPlanPipeline(DiffusionPipeline):
    """Open-Sora-Plan v1.0.0 text-to-video pipeline (LatteT2V + CausalVAE 4x8x8 + T5).

    ``text_encoder`` and ``tokenizer`` may be ``None`` when ``prompt_embeds`` are given (e.g. after
    :meth:`release_text_encoder`).
    """

    _optional_components = ["text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, vae, transformer, scheduler, text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(
            vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )

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

    def set_vae_memory_budget(self, gib: float | str | None) -> None:
        """Decode losslessly in temporal chunks whenever a plain decode would exceed ``gib`` GiB
        (``"auto"``: the device's free memory; None: off). See ``CausalVAEModel.set_decode_memory_budget``."""
        self.vae.set_decode_memory_budget(gib)

    def release_text_encoder(self) -> None:
        """Drop the T5 encoder (about 9.5 GB in half precision for T5-XXL) and free its memory.

        Later calls need ``prompt_embeds`` and ``negative_prompt_embeds``; encode all prompts first
        with :meth:`encode_prompt`, then release, then denoise.
        """
        self.register_modules(text_encoder=None)
        gc.collect()
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
    ) -> None:
        """Every check that can fail, before any model runs; each error says what to change."""
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
        if (num_frames - 1) % t_factor != 0:
            raise ValueError(
                f"num_frames={num_frames} is not 1 + {t_factor}k, which the VAE needs; use {default_frames} "
                f"(this model) or 1 (image mode)."
            )
        if num_frames != 1 and (num_frames - 1) // t_factor + 1 != cfg.video_length:
            raise ValueError(
                f"num_frames={num_frames} does not match this transformer, which generates {default_frames} frames "
                f"({cfg.video_length} latent frames); use num_frames={default_frames} or the version trained for "
                f"{num_frames} frames."
            )
        _, default_h, default_w = self.default_size()
        for name, value, default in (("height", height, default_h), ("width", width, default_w)):
            if value % (s_factor * patch) != 0:
                raise ValueError(f"{name}={value} is not divisible by {s_factor * patch}; use {default} for this model.")
            if value != default:
                raise ValueError(
                    f"{name}={value} does not match this transformer, trained at {default_h}x{default_w}; use "
                    f"{name}={default} or the version trained at that size."
                )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        prk_order = getattr(self.scheduler, "pndm_order", 0) if not self.scheduler.config.get("skip_prk_steps") else 0
        if num_inference_steps < prk_order:
            # diffusers' PNDM builds its Runge-Kutta warm-up from the last 4 timesteps and fails below that.
            raise ValueError(
                f"PNDM with Runge-Kutta warm-up needs at least {prk_order} steps, got {num_inference_steps}; "
                f"use more steps or another sample method (e.g. DDIM)."
            )
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 disables guidance), got {guidance_scale}.")
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
            expected = self._latent_shape(batch, num_frames, height, width)
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
        max_length: int = MAX_LENGTH,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds (B, L, C), negative_prompt_embeds (B, L, C) or None)`` as the reference builds them.

        With ``mask_feature`` and at least one of the two embeddings computed here: a single prompt is
        cut to its valid tokens (L = mask sum) and the negative embeddings to the *same* L; a batch
        keeps L = max_length with the prompt embeddings' padded positions zeroed (the negative ones are
        not). Embeddings passed in for both are returned unchanged (reference behaviour, spec 4).
        The result can be fed back as ``prompt_embeds`` / ``negative_prompt_embeds`` unchanged.
        """
        embeds_given = prompt_embeds is not None and negative_prompt_embeds is not None
        device = self._execution_device
        if prompt_embeds is None:
            texts = preprocess_texts(prompt, clean=clean_caption)
            prompt_embeds, prompt_mask = encode_texts(self.tokenizer, self.text_encoder, texts, max_length)
        else:
            prompt_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        batch_size = prompt_embeds.shape[0]
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)  # (B, L, C)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            # The negative prompt (default "": only EOS) is padded to the prompt's length, as the reference.
            texts = preprocess_texts([negative_prompt] * batch_size, clean=clean_caption)
            negative_prompt_embeds, _ = encode_texts(self.tokenizer, self.text_encoder, texts, prompt_embeds.shape[1])
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        else:
            negative_prompt_embeds = None

        if mask_feature and not embeds_given:
            prompt_mask = prompt_mask.to(device)
            if batch_size == 1:
                keep = int(prompt_mask.sum().item())
                prompt_embeds = prompt_embeds[:, :keep]
                if negative_prompt_embeds is not None:
                    negative_prompt_embeds = negative_prompt_embeds[:, :keep]
            else:
                # Reference quirk kept on purpose (spec 4): batches are masked, not cut, and only the prompt side.
                prompt_embeds = prompt_embeds * prompt_mask[:, :, None].to(dtype)
        return prompt_embeds, negative_prompt_embeds

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
        return video.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> uint8 video (B, T, H, W, 3) on CPU.

        ``(x / 2 + 0.5)`` clamped to [0, 1] times 255, cast by truncation (not rounding) as the reference.
        """
        video = self.decode_latents_float(latents)  # (B, T, C, H, W)
        video = ((video / 2.0 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
        return video.cpu().permute(0, 1, 3, 4, 2).contiguous()  # (B, T, H, W, C)

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
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
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
    ):
        """Generate videos; returns :class:`OpenSoraPlanPipelineOutput` (or a 1-tuple).

        ``num_frames`` / ``height`` / ``width`` default to the transformer's training size
        (:meth:`default_size`); ``num_frames=1`` is image mode (temporal attention off, the reference's
        ``--force_images``). ``guidance_scale <= 1`` disables classifier-free guidance.
        ``release_text_encoder`` frees the T5 after this call's prompts are encoded.
        """
        default_frames, default_h, default_w = self.default_size()
        num_frames = default_frames if num_frames is None else num_frames
        height = default_h if height is None else height
        width = default_w if width is None else width
        self.check_inputs(
            prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
            prompt_embeds, negative_prompt_embeds, latents, output_type,
        )
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

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
        batch_size = prompt_embeds.shape[0]
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)  # (2B, L, C): [uncond; cond]

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        in_channels = self.transformer.config.in_channels
        latents = self.prepare_latents(
            self._latent_shape(batch_size, num_frames, height, width), self.transformer.dtype, device, generator, latents
        )  # (B, C, F, h, w)
        step_kwargs = self._step_kwargs(generator, eta)
        temporal = num_frames != 1  # image mode skips temporal attention (spec 2.6)

        with self.progress_bar(total=len(timesteps)) as progress:
            for t in timesteps:
                model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B, C, F, h, w)
                model_input = self.scheduler.scale_model_input(model_input, t)
                timestep = t[None].to(device).expand(model_input.shape[0])  # (2B,)
                # No text mask on purpose: the reference samples without one (spec 3.2, 8.8).
                noise_pred = self.transformer(
                    model_input,
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    enable_temporal_attentions=temporal,
                    return_dict=True,
                ).sample  # (2B, 8, F, h, w)
                if do_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)  # on all 8 channels, as the reference
                if noise_pred.shape[1] == 2 * in_channels:
                    noise_pred = noise_pred[:, :in_channels]  # epsilon; the learned variance is not used
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                progress.update()

        if output_type == "latent":
            video = latents
        elif output_type == "pt":
            video = self.decode_latents_float(latents)
        else:
            video = self.decode_latents(latents)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return OpenSoraPlanPipelineOutput(video=video)
