"""The LatteT2V text-to-video training task (``opensora-plan train-t2v``, spec 3.1, 5, 6).

:class:`T2VTask` is what the shared loop (:mod:`opensora_plan.train.trainer`) needs: one AdamW phase
over the transformer and ``loss(batch)`` = the IDDPM hybrid loss
(:class:`~opensora_plan.diffusion.GaussianDiffusion`) of the transformer on VAE latents conditioned on
T5 caption embeddings. The frozen encoders run inside the task: the VAE in float32 (posterior
*sample* x scaling factor, joint-training images encoded one frame at a time, spec 3.1), T5 in the
mixed-precision dtype. Either can be replaced by an ``opensora-plan extract`` cache
(``--cached_features``). Caption dropout (``--cfg_dropout``) happens in the dataset, which hands over
the empty string (or its cached embedding), the unconditional input used at sampling time.

:func:`train_t2v` wires everything from the command-line options. The other concerns have their own files,
each read top to bottom: ``t2v_options.py`` (:class:`T2VTrainOptions`, its checks), ``t2v_build.py`` (models
and data from the options), ``t2v_validation.py`` (held-out loss and previews); their public names are
importable from here too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from opensora_plan.models.text_encoder import MODEL_MAX_LENGTH
from opensora_plan.train.t2v_build import (
    _dataset,
    _load_vae,
    _validation_dataset,
    build_transformer,
)
from opensora_plan.train.t2v_options import (
    STAGE_CONFIG_DIR,
    SUPPORTED_AE,
    T2V_DEFAULTS,
    T2VTrainOptions,
    load_stage_config,
    validate_t2v_options,
)
from opensora_plan.train.t2v_validation import (
    PREVIEW_DEFAULTS,
    VALIDATION_SEED,
    T2VValidation,
    preview_defaults,
    preview_fps,
)
from opensora_plan.train.trainer import Phase, TrainConfig, TrainTask, train
from opensora_plan.utils import plural

__all__ = ["PREVIEW_DEFAULTS", "STAGE_CONFIG_DIR", "SUPPORTED_AE", "T2V_DEFAULTS", "VALIDATION_SEED", "T2VTask",
           "T2VTrainOptions", "_validation_dataset", "build_t2v", "build_transformer", "dry_run_report",
           "load_stage_config", "memory_estimate", "preview_defaults", "train_t2v", "validate_t2v_options"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class T2VTask(T2VValidation, TrainTask):
    """LatteT2V + IDDPM loss on (on-the-fly or cached) VAE latents and T5 embeddings.

    Batches come from :func:`~opensora_plan.data.datasets.collate_video_caption` and hold either
    ``video`` (B, 3, T + n, S, S) or ``latents`` (B, C, t + n, h, w), and either ``captions``
    (B lists of 1 + n strings) or ``text_emb`` (B, 1 + n, L, D) with ``text_mask`` (B, 1 + n, L).
    """

    def __init__(self, transformer, dataset, *, vae=None, tokenizer=None, text_encoder=None, use_image_num: int = 0,
                 model_max_length: int = MODEL_MAX_LENGTH, learning_rate: float = 2e-5,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_weight_decay: float = 1e-2,
                 adam_epsilon: float = 1e-8, max_grad_norm: float | None = 1.0, validation_prompts: list[str] = (),
                 validation_sampling_steps: int = 20, validation_data=None, validation_num_timesteps: int = 8,
                 validation_batch_size: int = 1, validation_sample_method: str = "PNDM",
                 validation_guidance_scale: float = 7.5, validation_fps: float = 24.0, seed: int = 0,
                 train_batch_size: int = 1):
        from opensora_plan.data.datasets import SkippedVideos, collate_video_caption
        from opensora_plan.diffusion import GaussianDiffusion

        self.models = {"model": transformer}
        self.dataset = dataset
        self.collate_fn = collate_video_caption
        self.vae = vae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.use_image_num = use_image_num
        self.model_max_length = model_max_length
        self.learning_rate = learning_rate
        self.adam_betas = adam_betas
        self.adam_weight_decay = adam_weight_decay
        self.adam_epsilon = adam_epsilon
        self.max_grad_norm = max_grad_norm
        self.validation_prompts = list(validation_prompts or [])
        self.validation_sampling_steps = validation_sampling_steps
        self.validation_sample_method = validation_sample_method
        self.validation_guidance_scale = validation_guidance_scale
        self.validation_fps = validation_fps  # of the preview mp4s: the base model's (t2v_validation.preview_fps)
        self.validation_data = validation_data  # held-out dataset (cfg_dropout 0) or None
        self.validation_num_timesteps = validation_num_timesteps
        self.validation_batch_size = validation_batch_size
        self.seed = seed
        self.train_batch_size = train_batch_size  # the shard sampler's batch (the trainer batches other data itself)
        self._held_out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # encoded once
        self.diffusion = GaussianDiffusion()
        self.skipped = SkippedVideos()
        self.device = torch.device("cpu")
        self.lora = getattr(transformer, "_lora_config", None) is not None  # adapters only are trained and saved
        buckets = getattr(dataset, "buckets", None)
        # A 1-frame (image) bucket skips the temporal blocks, as sampling images does: DDP must allow that.
        self.find_unused_parameters = bool(buckets) and any(b.frames == 1 for b in buckets)
        self.paths: dict[str, str | None] = {}  # absolute model paths, recorded in options.json for `sample`

    def setup(self, accelerator) -> None:
        """Frozen encoders on the training device: VAE in float32, T5 in the mixed-precision dtype."""
        self.device = accelerator.device
        if self.vae is not None:
            self.vae.to(self.device).eval().requires_grad_(False)  # float32 as loaded (spec 3.1)
        if self.text_encoder is not None:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
            self.text_encoder.to(self.device, dtype).eval().requires_grad_(False)

    def phases(self) -> list[Phase]:
        model = self.models["model"]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, betas=self.adam_betas,
                                      weight_decay=self.adam_weight_decay, eps=self.adam_epsilon)
        return [Phase("model", optimizer, params, self.max_grad_norm)]

    def batch_sampler(self, seed: int, rank: int, world_size: int):
        """With buckets: batches of one bucket each (train/sampler.py BucketBatchSampler); with an extract cache:
        batches in shard order (ShardBatchSampler); else None."""
        buckets = getattr(self.dataset, "buckets", None)
        if getattr(self.dataset, "shard", None) is not None:  # an extract cache: read shard by shard
            from opensora_plan.train.sampler import ShardBatchSampler

            return ShardBatchSampler(self.dataset.shard, self.train_batch_size, seed, rank, world_size)
        if not buckets:
            return None
        from opensora_plan.train.sampler import BucketBatchSampler

        sampler = BucketBatchSampler(self.dataset.plan.members, [b.batch_size for b in buckets], seed, rank,
                                     world_size, names=[b.name for b in buckets])
        idle = [b.name for b, m, n in zip(buckets, sampler.members, sampler.batches_per_bucket()) if m and not n]
        if idle and rank == 0:
            logger.warning("Buckets %s have fewer clips than one batch on each of %d process(es); their clips are "
                           "never trained (add data or give them a smaller batch_size).", idle, world_size)
        return sampler

    def setup_sequence_parallel(self, group) -> None:
        """The transformer splits each sample's frames / patch positions over ``group`` (models/parallel.py)."""
        from opensora_plan.models.parallel import enable_sequence_parallel

        enable_sequence_parallel(self.models["model"], group)

    def shard_units(self, name: str) -> list[torch.nn.Module]:
        """FSDP2 units: every spatial and temporal block (gathered only while it runs)."""
        model = self.models[name]
        return [*model.transformer_blocks, *model.temporal_transformer_blocks]

    # ---------------------------------------------------------------- encoders

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T + n, S, S) in [-1, 1] -> latents (B, C, t + n, h, w) = posterior sample x scaling factor.

        The clip is encoded as one video and each of the n trailing images as a one-frame video (spec 3.1).
        """
        if self.vae is None:
            raise ValueError("The batch holds videos but no VAE was loaded; pass --ae_path or cached latents.")
        video = video.to(self.device, torch.float32)
        batch, n = video.shape[0], self.use_image_num
        with torch.autocast(self.device.type, enabled=False):
            clip = self.vae.encode(video[:, :, : video.shape[2] - n]).latent_dist.sample()  # (B, C, t, h, w)
            parts = [clip]
            if n:
                images = video[:, :, -n:].transpose(1, 2).flatten(0, 1).unsqueeze(2)  # (B*n, 3, 1, S, S)
                latents = self.vae.encode(images).latent_dist.sample()  # (B*n, C, 1, h, w)
                parts.append(latents.squeeze(2).unflatten(0, (batch, n)).transpose(1, 2))  # (B, C, n, h, w)
        return torch.cat(parts, dim=2) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_captions(self, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """B lists of 1 + n strings -> embeddings (B, 1 + n, L, D) and mask (B, 1 + n, L)."""
        from opensora_plan.models.text_encoder import encode_texts, preprocess_texts

        if self.text_encoder is None:
            raise ValueError("The batch holds raw captions but no text encoder was loaded; pass --text_encoder_name.")
        slots = len(captions[0])
        flat = preprocess_texts([c for sample in captions for c in sample])
        embeds, mask = encode_texts(self.tokenizer, self.text_encoder, flat, self.model_max_length)  # (B*(1+n), L, D)
        return embeds.unflatten(0, (len(captions), slots)), mask.unflatten(0, (len(captions), slots))

    # ---------------------------------------------------------------- loss

    def loss(self, phase: str, batch: dict, step: int, models: dict, micro: int = 0):
        self.skipped.update(batch.get("skipped", []))
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)  # (B, C, t + n, h, w)
        else:
            latents = self.encode_video(batch["video"])
        if "text_emb" in batch:
            text, mask = batch["text_emb"].to(self.device), batch["text_mask"].to(self.device)  # (B, 1+n, L, D)
        else:
            text, mask = self.encode_captions(batch["captions"])
        if not self.use_image_num:
            text, mask = text[:, 0], mask[:, 0]  # (B, L, D), (B, L): a plain video batch has one caption slot
        model = models["model"]
        video_frames = latents.shape[2] - self.use_image_num
        temporal = video_frames != 1  # a 1-frame (image) bucket runs like sampling images: no temporal blocks

        def model_fn(x_t, t):
            return model(x_t, t, encoder_hidden_states=text, encoder_attention_mask=mask,
                         use_image_num=self.use_image_num, enable_temporal_attentions=temporal, return_dict=False)[0]

        t = self.diffusion.sample_timesteps(latents.shape[0], device=self.device)  # (B,)
        noise = torch.randn_like(latents)
        with _temporal_length(model, video_frames if temporal else None):
            terms = self.diffusion.training_losses(model_fn, latents, t, noise)
        stats = {"mse": float(terms["mse"].detach().mean()), "vb": float(terms["vb"].detach().mean())}
        return terms["loss"].mean(), stats

    def batch_size(self, batch: dict) -> int:
        return len(batch["index"])

    def tokens(self, batch: dict) -> int:
        """Latent patches the transformer processes: B x (t + n) x (h / p) x (w / p), from the batch's shape."""
        config = self.models["model"].config
        p = config.patch_size
        if "latents" in batch:
            _, _, frames, height, width = batch["latents"].shape
        elif self.vae is not None:
            _, _, pixel_frames, height, width = batch["video"].shape  # (B, 3, T + n, H, W)
            frames = (pixel_frames - self.use_image_num - 1) // self.vae.temporal_compression + 1 + self.use_image_num
            height, width = height // self.vae.spatial_compression, width // self.vae.spatial_compression
        else:
            frames = config.video_length + self.use_image_num
            height, width = config.sample_size
        return self.batch_size(batch) * frames * (height // p) * (width // p)

    def options(self) -> dict:
        model = self.models["model"]
        options = {"transformer_config": dict(model.config),
                   "num_parameters": sum(p.numel() for p in model.parameters()),
                   "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "paths": self.paths}
        if self.lora:
            config = model._lora_config
            options["lora"] = {"rank": config.r, "alpha": config.lora_alpha,
                               "target_modules": sorted(config.target_modules)}
        return options

    # ---------------------------------------------------------------- checkpoints

    def save_model(self, name: str, model, state_dict: dict, folder: Path) -> None:
        """A LoRA run writes only the adapter (diffusers/peft layout); the frozen base is ``--pretrained``."""
        if not self.lora:
            return super().save_model(name, model, state_dict, folder)
        from opensora_plan.models.lora import save_lora

        save_lora(model, folder, state_dict)

    def load_model(self, name: str, model, folder: Path) -> None:
        if not self.lora:
            return super().load_model(name, model, folder)
        from opensora_plan.models.lora import load_lora_weights_into, read_lora

        config, weights = read_lora(folder)
        current = model._lora_config
        saved = (config.r, float(config.lora_alpha), sorted(config.target_modules))
        wanted = (current.r, float(current.lora_alpha), sorted(current.target_modules))
        if saved != wanted:
            raise ValueError(f"{folder} holds a LoRA with (rank, alpha, targets) = {saved}, this run trains {wanted}; "
                             f"resume with the same --lora_rank / --lora_alpha / --lora_target_modules.")
        load_lora_weights_into(model, weights, str(folder))

    def run_report(self) -> dict:
        """Samples replaced during the run, and with buckets the videos the plan left out at the start
        (unreadable, or fitting no bucket; recomputed on resume, so a resumed run reports them too)."""
        report = self.skipped.run_report()
        plan = getattr(self.dataset, "plan", None)
        if plan is not None:
            report.update(unreadable_videos_left_out=len(plan.unreadable), unfit_videos_left_out=len(plan.unfit))
        elif getattr(self.dataset, "index_unreadable", None) is not None:  # --data_index without buckets
            report.update(unreadable_videos_left_out=len(self.dataset.index_unreadable))
        if self.validation_data is not None:
            report.update(held_out_clips=len(self.validation_data),
                          held_out_unreadable=len(getattr(self.validation_data, "unreadable", [])))
        return report

    def epoch_report(self) -> dict:
        report = {}
        if self.skipped.total:
            report = {"skipped_videos": self.skipped.total, "details": self.skipped.summary()}
            self.skipped.reset()
        return report


def _temporal_length(model, video_frames: int | None):
    """:func:`opensora_plan.models.latte.temporal_length`: the per-batch temporal embedding swap of buckets
    of other durations (sampling at another length uses the same one)."""
    from opensora_plan.models.latte import temporal_length

    return temporal_length(model, video_frames)



# --------------------------------------------------------------------------------------------
# Wiring (what `opensora-plan train-t2v` calls)
# --------------------------------------------------------------------------------------------


def build_t2v(options: T2VTrainOptions | Mapping) -> tuple[T2VTask, TrainConfig]:
    """Task and loop configuration from ``train-t2v`` options (a mapping: missing keys take the defaults)."""
    if not isinstance(options, T2VTrainOptions):
        options = T2VTrainOptions.from_mapping(options)
    opts = options.to_dict()
    loop_keys = {f for f in TrainConfig.__dataclass_fields__ if f != "extra"}
    config = options.loop_config()
    validate_t2v_options(opts)  # every cheap check before any model loads or any file is written
    dataset = _dataset(opts)
    buckets = getattr(dataset, "buckets", None)
    if buckets:  # one clip of every bucket loads, or the bucket is left out (warning) before any model loads
        dataset.drop_unusable_buckets()
    elif not getattr(dataset, "has_latents", False):
        dataset.load_clip_or_substitute(0)  # NoUsableVideoError now when no video of the list is readable
    cached = getattr(dataset, "has_latents", False), getattr(dataset, "has_text", False)
    held_out = _validation_dataset(opts)
    held_out_needs = (held_out is not None and not getattr(held_out, "has_latents", False),
                      held_out is not None and not getattr(held_out, "has_text", False))
    vae = None if cached[0] and not held_out_needs[0] else _load_vae(opts)
    tokenizer = text_encoder = None
    if not cached[1] or opts["validation_prompts"] or held_out_needs[1]:
        from opensora_plan.models.text_encoder import load_t5

        if not opts["text_encoder_name"]:
            raise ValueError("--text_encoder_name (a local T5 folder) is required unless the captions are cached.")
        tokenizer, text_encoder = load_t5(opts["text_encoder_name"], meta=opts["dry_run"])  # dry run: no weights read
    if opts["validation_prompts"] and vae is None:
        vae = _load_vae(opts)

    # Latent sizes follow the data: the VAE's compression, or the cached latents themselves.
    if buckets:  # the first bucket is the model's configured size; other buckets run at their own (loss())
        sample_size = [buckets[0].height // vae.spatial_compression, buckets[0].width // vae.spatial_compression]
        video_length = (buckets[0].frames - 1) // vae.temporal_compression + 1
    elif vae is not None and not cached[0]:
        sample_size = opts["max_image_size"] // vae.spatial_compression
        video_length = (opts["num_frames"] - 1) // vae.temporal_compression + 1
    else:
        latents = dataset[0]["latents"]  # (C, t + n, h, w)
        sample_size = list(latents.shape[-2:])
        video_length = latents.shape[1] - opts["use_image_num"]
    caption_channels = text_encoder.config.d_model if text_encoder is not None else dataset.null_text.shape[-1]

    torch.manual_seed(opts["seed"])  # same initial weights on every process
    transformer = build_transformer(opts["model"], sample_size, video_length, caption_channels,
                                    opts["attention_mode"])
    if buckets:
        multiple = vae.spatial_compression * transformer.config.patch_size
        bad = [b.name for b in buckets if b.height % multiple or b.width % multiple]
        if bad:
            raise ValueError(f"Buckets {bad} have sides that are not multiples of {multiple} (the VAE's "
                             f"{vae.spatial_compression} x patch size {transformer.config.patch_size}); fix --buckets.")
    frames = video_length + opts["use_image_num"]
    positions = math.prod(transformer.config.sample_size) // transformer.config.patch_size**2
    if opts["sp_size"] > 1 and min(frames, positions) < opts["sp_size"]:
        raise ValueError(f"--sp_size {opts['sp_size']} is larger than the {frames} latent frames or {positions} patch "
                         "positions per sample; use a smaller --sp_size.")
    if opts["pretrained"]:
        from opensora_plan.train.pretrained import load_pretrained_weights

        report = None if opts["dry_run"] else Path(opts["output_dir"]) / "pretrained_report.json"  # dry run: no writes
        load_pretrained_weights(transformer, opts["pretrained"], report)
    if opts["lora_rank"]:
        from opensora_plan.models.lora import add_lora, lora_config

        trainable = add_lora(transformer, lora_config(opts["lora_rank"], opts["lora_alpha"],
                                                      opts["lora_target_modules"], base_model=opts["pretrained"]))
        logger.info("LoRA rank %d: %d adapter tensors (%d parameters) trained, the base is frozen.",
                    opts["lora_rank"], len(trainable),
                    sum(p.numel() for p in transformer.parameters() if p.requires_grad))
        if opts["mixed_precision"] == "bf16":  # autocast runs the base in bf16 anyway: store it so
            from opensora_plan.models.lora import cast_frozen_base

            cast_frozen_base(transformer, torch.bfloat16)
    if opts["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    prompts = opts["validation_prompts"]
    task = T2VTask(
        transformer, dataset, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder,
        use_image_num=opts["use_image_num"],
        model_max_length=opts["model_max_length"], learning_rate=opts["learning_rate"],
        adam_betas=(opts["adam_beta1"], opts["adam_beta2"]), adam_weight_decay=opts["adam_weight_decay"],
        adam_epsilon=opts["adam_epsilon"], max_grad_norm=opts["max_grad_norm"], validation_prompts=prompts,
        validation_sampling_steps=opts["validation_sampling_steps"], validation_data=held_out,
        validation_num_timesteps=opts["validation_num_timesteps"], validation_batch_size=opts["train_batch_size"],
        validation_sample_method=opts["validation_sample_method"],
        validation_guidance_scale=opts["validation_guidance_scale"], validation_fps=preview_fps(opts["pretrained"]),
        seed=opts["seed"], train_batch_size=opts["train_batch_size"],
    )
    # What `sample --model_path <checkpoint>` needs to find the run's models again (absolute paths); a
    # feature cache names the VAE / T5 it was extracted with.
    settings = getattr(dataset, "settings", {})
    recorded = {"ae_path": opts["ae_path"] or settings.get("ae"),
                "text_encoder_name": opts["text_encoder_name"] or settings.get("text_encoder"),
                "pretrained": opts["pretrained"], "cached_features": opts["cached_features"]}
    task.paths = {k: str(Path(v).resolve()) if v and Path(v).exists() else v for k, v in recorded.items()}
    config.extra = {k: v for k, v in opts.items() if k not in loop_keys and not k.startswith("_")}
    return task, config


def train_t2v(options: T2VTrainOptions | Mapping) -> dict:
    """Build and run a text-to-video training; returns the trainer's summary.

    With ``dry_run``: build everything (options, data, models), train nothing, write nothing, and return
    :func:`dry_run_report` (``{"dry_run": True, "report": text, ...}``).
    """
    task, config = build_t2v(options)
    if config.extra["dry_run"]:
        return dry_run_report(task, config)
    return train(task, config)



# --------------------------------------------------------------------------------------------
# --dry_run: what a run would do, before it spends any GPU time
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _param_counts(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def memory_estimate(task: T2VTask, config: TrainConfig) -> dict:
    """Bytes per process for weights (by dtype, as trained), gradients, AdamW states and EMA (DDP layout).

    The transformer as built (LoRA: frozen base possibly cast), the VAE in float32 and T5 in the
    mixed-precision dtype (what :meth:`T2VTask.setup` does). Gradients take the trainable parameters'
    dtype, AdamW keeps two states of that dtype, EMA one float32 copy. Activations are not included.
    """
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    weights: dict[str, int] = {}

    def add(dtype, count):
        name = _DTYPE_NAMES.get(dtype, str(dtype))
        weights[name] = weights.get(name, 0) + count * torch.empty((), dtype=dtype).element_size()

    transformer = task.models["model"]
    for p in transformer.parameters():
        add(p.dtype, p.numel())
    if task.vae is not None:
        add(torch.float32, sum(p.numel() for p in task.vae.parameters()))
    if task.text_encoder is not None:
        add(mixed, sum(p.numel() for p in task.text_encoder.parameters()))
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    adamw = 2 * grads
    ema = 4 * sum(p.numel() for p in trainable) if config.use_ema else 0
    total = sum(weights.values()) + grads + adamw + ema
    return {"weights": weights, "gradients": grads, "adamw_states": adamw, "ema": ema, "total": total}


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:10.3f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:10.3f} MiB"


def _validation_summary(task: T2VTask, config: TrainConfig) -> str:
    """One line: held-out clips read (unreadable ones left out), timesteps, how often; preview prompts."""
    prompts = len(task.validation_prompts)
    if task.validation_data is None and not prompts:
        return "validation: none (no --validation_data_path or --validation_prompts)"
    every = f"every {plural(config.validation_steps, 'step')}" if config.validation_steps else "never (no --validation_steps)"
    if task.validation_data is None:
        held = "no held-out loss"
    else:
        unreadable = len(getattr(task.validation_data, "unreadable", []))
        held = (f"{len(task.validation_data)} held-out clips ({unreadable} unreadable), loss at "
                f"{task.validation_num_timesteps} timesteps")
    return f"validation: {held} {every}; {prompts} preview prompt{'' if prompts == 1 else 's'}"


def dry_run_report(task: T2VTask, config: TrainConfig) -> dict:
    """The resolved options, data plan (bucket histogram), parameter counts and memory estimate, as text and dict."""
    options = {**{k: getattr(config, k) for k in TrainConfig.__dataclass_fields__ if k != "extra"}, **config.extra}
    dataset = task.dataset
    bucketed = bool(getattr(dataset, "buckets", None))
    unused = {"num_frames", "max_image_size"} if bucketed else set()
    lines = ["train-t2v --dry_run: nothing is trained and nothing is written to --output_dir.", "", "options:"]
    lines += [f"  {key} = {options[key]!r}" + ("  (not used: --buckets sets the sizes)" if key in unused else "")
              for key in sorted(options)]
    from opensora_plan.train.checkpoint import resolve_resume

    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)  # checked by validate_t2v_options
    lines += ["", "resume: " + (f"from {resume}" if resume else "none: a fresh run" + (
        f" (no checkpoint in {config.output_dir} yet)" if config.resume_from_checkpoint else ""))]
    lines += ["", "data:"]
    if bucketed:
        from opensora_plan.data.buckets import format_bucket_report

        task.batch_sampler(config.seed, 0, 1)  # ValueError when no bucket fills one batch
        lines += ["  " + line for line in format_bucket_report(dataset.plan).splitlines()]
        unreadable = dataset.plan.unreadable
        lines += [f"  UNREADABLE   entry {item['index']}: {item['reason']}" for item in unreadable[:10]]
        if len(unreadable) > 10:
            lines.append(f"  ... and {len(unreadable) - 10} more unreadable videos (`opensora-plan data check` lists "
                         "them all)")
        lines.append("  (batches per epoch for one process; with N processes each gets about 1/N of them)")
    else:
        lines.append(f"  {plural(len(dataset), 'sample')}, batch {config.train_batch_size} per process")
    lines += ["", _validation_summary(task, config)]
    held_out = task.validation_data
    for item in getattr(held_out, "unreadable", [])[:10]:
        lines.append(f"  UNREADABLE held-out entry {item['index']}: {item['reason']}")
    counts = {"transformer": _param_counts(task.models["model"])}
    if task.vae is not None:
        counts["vae"] = _param_counts(task.vae)
        counts["vae"].update(trainable=0, frozen=counts["vae"]["total"])  # frozen by setup()
    if task.text_encoder is not None:
        counts["text_encoder"] = _param_counts(task.text_encoder)
        counts["text_encoder"].update(trainable=0, frozen=counts["text_encoder"]["total"])
    lines += ["", "parameters:"] + [f"  {name:<13} {c['total']:>14,} total  {c['trainable']:>14,} trainable  "
                                     f"{c['frozen']:>14,} frozen" for name, c in counts.items()]
    if task.lora:
        lines.append("  (LoRA: only the adapters are trainable)")
    memory = memory_estimate(task, config)
    lines += ["", "memory per process (estimate, DDP layout; activations not included):"]
    lines += [f"  weights {dtype:<5}     {_size(size)}" for dtype, size in memory["weights"].items()]
    lines += [f"  gradients         {_size(memory['gradients'])}", f"  AdamW states      {_size(memory['adamw_states'])}"]
    if memory["ema"]:
        lines.append(f"  EMA (fp32)        {_size(memory['ema'])}")
    lines.append(f"  total             {_size(memory['total'])}  (+ activations, which grow with batch, frames and "
                 "resolution; --gradient_checkpointing lowers them)")
    if config.sharding != "ddp":
        lines.append(f"  with --sharding {config.sharding} the gradients and AdamW states (and with fsdp2/zero3 the "
                     "trainable weights) are split over the processes")
    return {"dry_run": True, "report": "\n".join(lines), "parameters": counts, "memory": memory,
            "buckets": dataset.plan.histogram() if getattr(dataset, "buckets", None) else None}
