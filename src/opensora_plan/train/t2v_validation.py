"""Validation of a text-to-video run: the held-out loss at fixed timesteps and noise, and preview videos.

:class:`T2VValidation` holds what :class:`~opensora_plan.train.t2v.T2VTask` does when the trainer calls
``validate``: the IDDPM loss of the transformer over held-out clips (``--validation_data_path``), exactly
reproducible for fixed weights, and one preview mp4 per ``--validation_prompts`` prompt, sampled with the
base model's own settings unless the ``--validation_*`` flags are given (:func:`preview_defaults`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# The held-out loss draws its fixed noise from this seed, never from --seed: runs with other seeds compare
# the same noise (T2VValidation.held_out_loss).
VALIDATION_SEED = 0


# Preview settings when neither the flags nor the base model's folder file (sampling_config.json, demo.json) set them.
PREVIEW_DEFAULTS = {"validation_sampling_steps": 20, "validation_sample_method": "PNDM",
                    "validation_guidance_scale": 7.5}
_SAMPLING_KEYS = {"validation_sampling_steps": "num_sampling_steps", "validation_sample_method": "sample_method",
                  "validation_guidance_scale": "guidance_scale"}


def preview_defaults(pretrained: str | None) -> tuple[dict, str | None]:
    """``(settings, path of the folder file read or None)``: the preview sampler / steps / guidance of a base model.

    A ``--pretrained`` folder with a sampling file (``pipelines/model_folder.py``: its ``sampling_config.json`` or
    a demo's ``demo.json``), or whose parent has one (the shipped demo's ``17x64x64/``), gives that file's
    ``sample_method`` / ``num_sampling_steps`` / ``guidance_scale`` (what ``sample`` uses for it); what it does not
    give, or anything else, :data:`PREVIEW_DEFAULTS`.
    """
    from opensora_plan.pipelines.model_folder import load_sampling_config

    if pretrained and Path(pretrained).is_dir():
        for folder in (Path(pretrained), Path(pretrained).parent):
            config = load_sampling_config(folder)
            if config is not None:
                given = config.sample_defaults()
                return ({key: given.get(name, PREVIEW_DEFAULTS[key]) for key, name in _SAMPLING_KEYS.items()},
                        str(config.path))
    return dict(PREVIEW_DEFAULTS), None



class T2VValidation:
    """The validation half of :class:`~opensora_plan.train.t2v.T2VTask` (which sets every attribute used here:
    ``validation_*``, ``diffusion``, ``device``, ``vae``, ``text_encoder``, ``tokenizer``, ``model_max_length``,
    ``encode_video`` / ``encode_captions`` and ``_held_out``)."""

    def validation_timesteps(self) -> torch.Tensor:
        """The K fixed timesteps of the held-out loss: midpoints of K equal bins of [0, T), int64 (K,)."""
        k, total = self.validation_num_timesteps, self.diffusion.num_timesteps
        return ((torch.arange(k, dtype=torch.float64) + 0.5) * total / k).long()

    @torch.no_grad()
    def held_out_features(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per held-out clip: ``(latents (1, C, t, h, w), text (1, L, D), mask (1, L))``, encoded on first use.

        Clip ``i`` is read, cropped and encoded (posterior sample) under the RNG seeded from ``i`` alone (not the
        training ``--seed``), with its first caption and no caption dropout, so the features are the same in
        every run.
        """
        if self._held_out is None:
            from opensora_plan.train.sampler import derive_seed

            from opensora_plan.data.datasets import NoUsableVideoError
            from opensora_plan.data.video_io import VideoReadError

            held_out, failed = [], []
            for index in range(len(self.validation_data)):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(VALIDATION_SEED, 7, index))  # 7: a tag that keeps this stream apart
                    try:  # the one time each held-out clip is decoded (the run's start only opened it)
                        sample = self.validation_data[index]
                    except (VideoReadError, NoUsableVideoError) as err:  # opens but does not decode (e.g. truncated): left out
                        failed.append(index)
                        entry = self.validation_data.entries[index]
                        self.validation_data.unreadable.append({"path": str(entry.path), "reason": str(err)})
                        logger.warning("held-out clip %s cannot be decoded and is left out of the held-out loss: %s",
                                       entry.path, err)
                        continue
                    if "latents" in sample:
                        latents = sample["latents"][None].to(self.device, torch.float32)  # (1, C, t + n, h, w)
                    else:
                        latents = self.encode_video(sample["video"][None])
                    if "text_emb" in sample:
                        text, mask = sample["text_emb"][None, 0], sample["text_mask"][None, 0]  # (1, L, D), (1, L)
                    else:
                        caption = self.validation_data.entries[sample["index"]].captions[0]
                        text, mask = self.encode_captions([[caption]])
                        text, mask = text[:, 0], mask[:, 0]
                frames = latents.shape[2] - getattr(self.validation_data, "use_image_num", 0)
                held_out.append((latents[:, :, :frames], text.to(self.device), mask.to(self.device)))
            if failed:
                self.validation_data.entries = [e for i, e in enumerate(self.validation_data.entries) if i not in failed]
            if not held_out:
                raise ValueError("None of the held-out clips can be decoded; run `opensora-plan data check` on "
                                 "--validation_data_path.")
            self._held_out = held_out
        return self._held_out

    @torch.no_grad()
    def held_out_loss(self, transformer) -> dict[str, float]:
        """Mean IDDPM loss of ``transformer`` over the held-out clips at :meth:`validation_timesteps`.

        The noise of (clip ``i``, timestep ``t``) comes from a generator seeded with ``(i, t)`` only (the global RNG
        and the training ``--seed`` are not used), so for fixed weights the value is exactly reproducible and
        comparable across steps and runs (a seed sweep, LoRA vs full fine-tuning). Returns ``val_loss`` (hybrid:
        MSE + VLB), ``val_mse``, ``val_vb``, ``val_loss_t<t>`` per timestep and ``val_clips`` (how many held-out
        clips the mean is over).
        """
        from opensora_plan.train.sampler import derive_seed

        timesteps = self.validation_timesteps().to(self.device)
        totals = {"loss": torch.zeros(len(timesteps)), "mse": torch.zeros(len(timesteps)),
                  "vb": torch.zeros(len(timesteps))}
        features = self.held_out_features()
        for index, (latents, text, mask) in enumerate(features):
            noise = torch.stack([
                torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                    derive_seed(VALIDATION_SEED, 7, index, int(t))), dtype=torch.float32)
                for t in timesteps.tolist()]).to(self.device)  # (K, C, t, h, w)
            for chunk in range(0, len(timesteps), self.validation_batch_size):
                t = timesteps[chunk: chunk + self.validation_batch_size]  # (b,)
                b = len(t)

                def model_fn(x_t, t_):
                    return transformer(x_t, t_, encoder_hidden_states=text.expand(b, -1, -1),
                                       encoder_attention_mask=mask.expand(b, -1), use_image_num=0, return_dict=False)[0]

                terms = self.diffusion.training_losses(model_fn, latents.expand(b, -1, -1, -1, -1), t,
                                                       noise[chunk: chunk + b])
                for key in totals:
                    totals[key][chunk: chunk + b] += terms[key].float().cpu()
        means = {key: value / len(features) for key, value in totals.items()}  # (K,) each
        metrics = {f"val_{key}": float(value.mean()) for key, value in means.items()}
        width = len(str(self.diffusion.num_timesteps - 1))
        metrics.update({f"val_loss_t{int(t):0{width}d}": float(v) for t, v in zip(timesteps.tolist(), means["loss"])})
        metrics["val_clips"] = len(features)  # held-out clips averaged (unreadable ones are left out, never replaced)
        return metrics

    @torch.no_grad()
    def validate(self, step: int, models: dict, folder: Path, writer) -> dict | None:
        """Held-out loss (``--validation_data_path``) and preview videos (``--validation_prompts``).

        Previews: one video per prompt (seed = prompt index; ``--validation_sample_method``,
        ``--validation_guidance_scale``, ``--validation_sampling_steps``) written to
        ``folder/step-<step>/<index>-<prompt words>.mp4`` and, first/middle/last frame, to the writer
        (``validation/<index>/frames``; W&B also gets the mp4 as ``validation/<index>/video``). Prompts are
        encoded at the run's ``model_max_length``.
        The trainer swaps the EMA weights in beforehand when the run keeps an EMA.
        """
        if self.validation_data is None and not self.validation_prompts:
            return None
        transformer = models["model"].module if hasattr(models["model"], "module") else models["model"]
        was_training = transformer.training
        transformer.eval()
        sequence_parallel, transformer.sequence_parallel = transformer.sequence_parallel, None  # main process only
        try:
            metrics = self.held_out_loss(transformer) if self.validation_data is not None else {}
            if self.validation_prompts and self.vae is not None and self.text_encoder is not None:
                self._write_previews(transformer, step, folder, writer)
        finally:
            transformer.train(was_training)
            transformer.sequence_parallel = sequence_parallel
        return metrics

    def _write_previews(self, transformer, step: int, folder: Path, writer) -> None:
        from opensora_plan.data.video_io import write_video
        from opensora_plan.diffusion.schedulers import create_scheduler
        from opensora_plan.pipelines.pipeline_opensora_plan import OpenSoraPlanPipeline
        from opensora_plan.pipelines.sample_t2v import video_filename

        pipe = OpenSoraPlanPipeline(vae=self.vae, transformer=transformer,
                                    scheduler=create_scheduler(self.validation_sample_method),
                                    text_encoder=self.text_encoder, tokenizer=self.tokenizer)
        pipe.set_progress_bar_config(disable=True)
        out = folder / f"step-{step}"
        for i, prompt in enumerate(self.validation_prompts):
            generator = torch.Generator(self.device).manual_seed(i)
            with torch.autocast(self.device.type, enabled=False):
                # Encoded at the run's --model_max_length (what the model was trained with), not the pipeline's 300.
                embeds, negative = pipe.encode_prompt(prompt, "", self.validation_guidance_scale > 1.0,
                                                      max_length=self.model_max_length)
                video = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative,
                             num_inference_steps=self.validation_sampling_steps,
                             guidance_scale=self.validation_guidance_scale, generator=generator).frames[0]
            path = write_video(out / video_filename(i, prompt), video, fps=24)  # (T, H, W, 3) uint8
            if writer is not None:  # first, middle and last frame (add_video would need moviepy)
                picks = [0, video.shape[0] // 2, video.shape[0] - 1]
                writer.add_images(f"validation/{i:02d}/frames", video[picks].permute(0, 3, 1, 2), step)
                if hasattr(writer, "add_video_file"):
                    writer.add_video_file(f"validation/{i:02d}/video", path, step)

