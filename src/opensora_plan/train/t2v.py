"""The LatteT2V text-to-video training task (``opensora-plan train-t2v``, spec 3.1, 5, 6).

:class:`T2VTask` is what the shared loop (:mod:`opensora_plan.train.trainer`) needs: one AdamW phase
over the transformer and ``loss(batch)`` = the IDDPM hybrid loss
(:class:`~opensora_plan.diffusion.GaussianDiffusion`) of the transformer on VAE latents conditioned on
T5 caption embeddings. The frozen encoders run inside the task: the VAE in float32 (posterior
*sample* x scaling factor, joint-training images encoded one frame at a time, spec 3.1), T5 in the
mixed-precision dtype. Either can be replaced by an ``opensora-plan extract`` cache
(``--cached_features``). Caption dropout (``--cfg_dropout``) happens in the dataset, which hands over
the empty string (or its cached embedding), the unconditional input used at sampling time.

:func:`train_t2v` wires everything from the command-line options (:class:`T2VTrainOptions` declares them with
their defaults; reference flag names, spec section 6).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from opensora_plan.models.text_encoder import MODEL_MAX_LENGTH, T5_MAX_LENGTH
from opensora_plan.options import option, option_fields
from opensora_plan.train.trainer import Phase, check_adamw, check_new_run_folder, TrainConfig, TrainTask, train
from opensora_plan.utils import valid_num_frames

logger = logging.getLogger(__name__)

SUPPORTED_AE = ("CausalVAEModel_4x8x8",)

STAGE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train_t2v"
TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION = 4, 8  # CausalVAEModel_4x8x8
# The held-out loss draws its fixed noise from this seed, never from --seed: runs with other seeds compare
# the same noise (T2VTask.held_out_loss).
VALIDATION_SEED = 0


@dataclass
class T2VTrainOptions(TrainConfig):
    """Every option of ``opensora-plan train-t2v`` (reference flag names, spec section 6), with its default.

    The loop's options (output_dir, max_train_steps, batch, checkpointing, sharding, ...) are inherited
    from :class:`~opensora_plan.train.trainer.TrainConfig`. Values are checked on construction (ValueError,
    one sentence); the checks that need the file system run in :func:`validate_t2v_options`.
    To add an option: one ``option(...)`` field here (and read it in :func:`build_t2v`).
    """

    COMMAND: ClassVar[str] = "train-t2v"
    CONFIG: ClassVar[bool] = True
    CONFIG_DIR: ClassVar[Path] = STAGE_CONFIG_DIR
    GROUPS: ClassVar[tuple[str, ...]] = ("models", "LoRA fine-tuning (needs peft; docs/training.md)", "data",
                                         "optimisation", "run")

    # models
    model: str = option("LatteT2V-XL/122", help="LatteT2V size (e.g. LatteT2V-XL/122) or a LatteT2V config.json / "
                        "folder", group="models")
    text_encoder_name: str | None = option(None, help="local T5 folder (DeepFloyd/t5-v1_1-xxl layout)", group="models")
    ae: str = option(SUPPORTED_AE[0], help="autoencoder type", group="models")
    ae_path: str | None = option(None, help="CausalVAE folder (or a release folder with a vae/ subfolder)",
                                 group="models")
    pretrained: str | None = option(None, help="initial weights: LatteT2V folder, .safetensors, or Latte t2v.pt",
                                    group="models")
    attention_mode: str | None = option(None, choices=["xformers", "flash", "math"], help="recorded in the config",
                                        group="models")
    # LoRA fine-tuning (peft): adapters on the attention / MLP projections, base frozen (models/lora.py)
    lora_rank: int | None = option(None, help="train rank-R LoRA adapters on a frozen --pretrained model",
                                   group="LoRA fine-tuning (needs peft; docs/training.md)")
    lora_alpha: float | None = option(None, help="LoRA alpha (unset: the rank, i.e. scaling 1)",
                                      group="LoRA fine-tuning (needs peft; docs/training.md)")
    lora_target_modules: list[str] | None = option(
        None, help="projections to adapt (unset: to_q to_k to_v to_out.0 ff.net.0.proj ff.net.2)",
        group="LoRA fine-tuning (needs peft; docs/training.md)")
    # data
    dataset: str = option("t2v", help="dataset type", group="data")
    data_path: str | None = option(None, help="JSON list of {'path': ..., 'cap': [...] or '...'}", group="data")
    video_folder: str | None = option(None, help="base folder for relative paths in --data_path", group="data")
    cached_features: str | None = option(None, help="folder written by `opensora-plan extract` (T5 and/or VAE "
                                         "cached)", group="data")
    num_frames: int = option(17, help="pixel frames per clip, 1 + 4k (17 or 65 for the released stages)",
                             group="data")
    buckets: str | None = option(None, help="mixed shapes in one run: FRAMESxHEIGHTxWIDTH list (e.g. 17x256x256,"
                                 "17x192x320,1x256x256), a preset (t2v_256, t2v_512) or a .json/.yaml file; replaces "
                                 "--num_frames/--max_image_size; --train_batch_size is the first bucket's "
                                 "(docs/training.md)", group="data")
    sample_rate: int = option(1, help="temporal stride", group="data")
    max_image_size: int = option(256, help="square frame size in pixels: the largest centred square is cropped, "
                                 "then resized to this (and flipped at random)",
                                 group="data")
    use_image_num: int = option(0, help="joint-training images per clip", group="data")
    use_img_from_vid: bool = option(False, help="accepted for the reference; images always come from the clip",
                                    group="data")
    model_max_length: int = option(MODEL_MAX_LENGTH, help="T5 tokens per caption", group="data")
    cfg_dropout: float = option(0.1, help="caption dropout for guidance (0 = reference)", group="data")
    # optimisation
    learning_rate: float = option(2e-5, help="AdamW lr", group="optimisation")
    adam_beta1: float = option(0.9, help="AdamW beta1", group="optimisation")
    adam_beta2: float = option(0.999, help="AdamW beta2", group="optimisation")
    adam_weight_decay: float = option(1e-2, help="AdamW weight decay", group="optimisation")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon", group="optimisation")
    max_grad_norm: float = option(1.0, help="grad-norm clip", group="optimisation")
    gradient_checkpointing: bool = option(False, help="recompute block activations in the backward pass",
                                          group="optimisation")
    enable_tiling: bool = option(False, help="tiled VAE encoding (stage 3)", group="optimisation")
    # validation previews
    validation_prompts: str | list[str] | None = option(None, nargs="+", metavar="PROMPT",
                                                        help="validation prompts, one or more after the flag "
                                                        "(text, never a file name; quote each)", group="run")
    validation_prompt_file: str | None = option(None, help="a text file with one validation prompt per line",
                                                group="run")
    validation_sampling_steps: int | None = option(None, help="denoising steps of validation videos (default: "
                                                   "the --pretrained folder's sampling_config.json or demo.json, "
                                                   "else 20)", group="run", show_default=False)
    validation_sample_method: str | None = option(None, help="scheduler of the preview videos (default: the "
                                                  "--pretrained folder's sampling_config.json or demo.json, else "
                                                  "PNDM)", group="run", show_default=False)
    validation_guidance_scale: float | None = option(None, help="guidance of the preview videos (default: the "
                                                     "--pretrained folder's sampling_config.json or demo.json, "
                                                     "else 7.5)", group="run", show_default=False)
    # held-out loss at fixed timesteps and fixed noise (T2VTask.held_out_loss)
    validation_data_path: str | None = option(None, help="held-out clips (JSON list like --data_path, or an extract "
                                              "folder): diffusion loss at fixed timesteps and noise every "
                                              "--validation_steps, as val_loss", group="run")
    validation_num_timesteps: int = option(8, help="fixed timesteps of the held-out loss", group="run")
    dry_run: bool = option(False, help="check options, data (bucket histogram) and models, print parameter counts "
                           "and a memory estimate, then exit without training or writing anything", group="run")

    def __post_init__(self):
        super().__post_init__()
        if self.ae not in SUPPORTED_AE:
            raise ValueError(f"--ae {self.ae} is not supported; use {SUPPORTED_AE[0]} (the v1.0.0 CausalVAE).")
        if not self.cached_features:
            if not valid_num_frames(self.num_frames, TEMPORAL_COMPRESSION):
                raise ValueError(f"--num_frames {self.num_frames} is not a length the {self.ae} accepts; use 1 + "
                                 f"{TEMPORAL_COMPRESSION}k (17 or 65 for the released stages).")
            if self.max_image_size < SPATIAL_COMPRESSION or self.max_image_size % SPATIAL_COMPRESSION:
                raise ValueError(f"--max_image_size {self.max_image_size} must be a positive multiple of "
                                 f"{SPATIAL_COMPRESSION} (256 or 512 for the released stages).")
        self.require_at_least(1, "sample_rate", "model_max_length", "max_nonfinite_steps")
        self.require_at_least(0, "use_image_num", "dataloader_num_workers")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"--cfg_dropout is a probability in [0, 1], got {self.cfg_dropout}.")
        if self.buckets is not None:
            if not self.buckets.strip():
                raise ValueError("--buckets is an empty bucket spec; give e.g. 17x256x256,1x256x256, a preset "
                                 "(t2v_256, t2v_512) or a .json/.yaml file, or leave --buckets out.")
            # The options cannot tell a value given as the default from no value: a non-default one is refused.
            defaults = type(self).defaults()
            ignored = [k for k in ("num_frames", "max_image_size") if getattr(self, k) != defaults[k]]
            if ignored:
                raise ValueError(f"--{ignored[0]} {getattr(self, ignored[0])} is not used with --buckets (each "
                                 "bucket sets its frames and size); drop it or put that shape in --buckets.")
        check_adamw(self.learning_rate, self.adam_beta1, self.adam_beta2, self.adam_epsilon, self.adam_weight_decay,
                    self.max_grad_norm)
        if self.model_max_length > T5_MAX_LENGTH:
            raise ValueError(f"--model_max_length {self.model_max_length} is more than T5's tokenizer handles "
                             f"({T5_MAX_LENGTH} tokens; the release uses {MODEL_MAX_LENGTH}); use at most "
                             f"{T5_MAX_LENGTH}.")

        if self.lora_rank is None:
            given = [k for k in ("lora_alpha", "lora_target_modules") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"--{given[0]} needs --lora_rank (the adapter rank, e.g. 16).")
        else:
            if not self.pretrained:
                raise ValueError("--lora_rank trains adapters on a frozen base model; give that model with "
                                 "--pretrained.")
            if self.sharding != "ddp":
                raise ValueError("--lora_rank is supported with --sharding ddp (the adapters are small); drop "
                                 "--sharding.")


# Every option with its default (None for the required output_dir / max_train_steps): derived from
# T2VTrainOptions, kept for code and tests that merge option dicts.
T2V_DEFAULTS: dict[str, Any] = {**{f.name: None for f in option_fields(T2VTrainOptions)},
                                 **T2VTrainOptions.defaults()}


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class T2VTask(TrainTask):
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
                 validation_guidance_scale: float = 7.5, seed: int = 0):
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
        self.validation_data = validation_data  # held-out dataset (cfg_dropout 0) or None
        self.validation_num_timesteps = validation_num_timesteps
        self.validation_batch_size = validation_batch_size
        self.seed = seed
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
        """With buckets: batches of one bucket each (train/sampler.py BucketBatchSampler); else None."""
        buckets = getattr(self.dataset, "buckets", None)
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

    # ---------------------------------------------------------------- validation

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

            held_out = []
            for index in range(len(self.validation_data)):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(VALIDATION_SEED, 7, index))  # 7: a tag that keeps this stream apart
                    sample = self.validation_data[index]
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


def _temporal_length(model, video_frames: int | None):
    """:func:`opensora_plan.models.latte.temporal_length`: the per-batch temporal embedding swap of buckets
    of other durations (sampling at another length uses the same one)."""
    from opensora_plan.models.latte import temporal_length

    return temporal_length(model, video_frames)


# --------------------------------------------------------------------------------------------
# Wiring (what `opensora-plan train-t2v` calls)
# --------------------------------------------------------------------------------------------


def build_transformer(spec: str, sample_size: int | tuple[int, int], video_length: int, caption_channels: int,
                      attention_mode: str | None = None):
    """A randomly initialised LatteT2V from a registry name, a ``config.json`` or a model folder.

    ``sample_size`` / ``video_length`` come from the training data (so the position embeddings fit);
    a named size takes ``caption_channels`` from the text encoder, a config file must already agree.
    """
    from opensora_plan.models.latte import LATTE_CONFIGS, LatteT2V, latte_config

    sample_size = [sample_size, sample_size] if isinstance(sample_size, int) else list(sample_size)
    if spec in LATTE_CONFIGS:
        config = latte_config(spec, sample_size=sample_size, video_length=video_length,
                              caption_channels=caption_channels)
    else:
        path = Path(spec)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"--model {spec} is neither a known size ({', '.join(LATTE_CONFIGS)}) nor a LatteT2V config.json "
                f"or folder holding one."
            )
        from opensora_plan.utils import read_json_file

        config = {k: v for k, v in read_json_file(path, "--model config").items() if not k.startswith("_")}
        if config.get("caption_channels", 4096) != caption_channels:
            raise ValueError(
                f"--model {spec} has caption_channels={config.get('caption_channels')} but the text encoder gives "
                f"{caption_channels}-wide embeddings; use a config with caption_channels={caption_channels}."
            )
        config.update(sample_size=sample_size, video_length=video_length)
    if attention_mode:
        config["attention_mode"] = attention_mode
    return LatteT2V.from_config(config)


def _load_vae(opts: dict):
    from opensora_plan.models.causalvae import CausalVAEModel

    if opts["ae"] not in SUPPORTED_AE:
        raise ValueError(f"--ae {opts['ae']} is not supported; use {SUPPORTED_AE[0]} (the v1.0.0 CausalVAE).")
    if not opts["ae_path"]:
        raise ValueError("--ae_path is required to encode videos; give the CausalVAE folder (or use --cached_features).")
    path = Path(opts["ae_path"])
    subfolder = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
    vae = CausalVAEModel.from_pretrained(path, subfolder=subfolder)
    if opts["enable_tiling"]:
        vae.enable_tiling()
    return vae


def _dataset(opts: dict):
    """The training dataset: an ``extract`` cache or the JSON video list."""
    if opts["dataset"] != "t2v":
        raise ValueError(f"--dataset {opts['dataset']} is not supported; v1.0.0 trains with --dataset t2v.")
    if opts["buckets"]:
        from opensora_plan.data.buckets import BucketedVideoDataset, parse_buckets, resolve_batch_sizes

        buckets = resolve_batch_sizes(parse_buckets(opts["buckets"]), opts["train_batch_size"],
                                      use_image_num=opts["use_image_num"])
        return BucketedVideoDataset(opts["data_path"], buckets, sample_rate=opts["sample_rate"],
                                    use_image_num=opts["use_image_num"], video_folder=opts["video_folder"],
                                    cfg_dropout=opts["cfg_dropout"])
    if opts["cached_features"]:
        from opensora_plan.data.features import CachedFeatureDataset

        dataset = CachedFeatureDataset(opts["cached_features"], cfg_dropout=opts["cfg_dropout"])
        settings = dataset.settings
        for key in ("num_frames", "max_image_size", "use_image_num", "sample_rate", "model_max_length"):
            if opts[key] != settings[key]:
                logger.warning("--%s %s: the feature cache was extracted with %s, which is used.", key, opts[key],
                               settings[key])
            opts[key] = settings[key]
        return dataset
    from opensora_plan.data.datasets import VideoCaptionDataset

    if not opts["data_path"]:
        raise ValueError("train-t2v needs --data_path (a JSON list of videos and captions) or --cached_features.")
    return VideoCaptionDataset(opts["data_path"], opts["num_frames"], opts["max_image_size"],
                               sample_rate=opts["sample_rate"], use_image_num=opts["use_image_num"],
                               video_folder=opts["video_folder"], cfg_dropout=opts["cfg_dropout"])


def _validation_dataset(opts: dict):
    """The held-out set of ``--validation_data_path``: an ``extract`` cache folder or a JSON video list.

    Read without augmentation or caption dropout; a JSON list resolves relative paths as ``--data_path``
    does (``--video_folder``, else the JSON's folder). None without the option.
    """
    path = opts["validation_data_path"]
    if not path:
        return None
    if Path(path).is_dir():
        from opensora_plan.data.features import CachedFeatureDataset

        dataset = CachedFeatureDataset(path, cfg_dropout=0.0)
        dataset.unreadable = []
    else:
        from opensora_plan.data.datasets import VideoCaptionDataset
        from opensora_plan.data.video_io import VideoReadError

        # max_substitutions=0: a held-out clip is never replaced by another (that would reweight the loss).
        # With --buckets the held-out clips are read at the first bucket's shape: the model's own grid
        # (its sample_size / video_length), cropped to that aspect and never upscaled.
        frames, size, frame_size = opts["num_frames"], opts["max_image_size"], None
        if opts["buckets"]:
            from opensora_plan.data.buckets import parse_buckets

            first = parse_buckets(opts["buckets"])[0]
            frames, size, frame_size = first.frames, max(first.height, first.width), (first.height, first.width)
        dataset = VideoCaptionDataset(path, frames, size, sample_rate=opts["sample_rate"],
                                      video_folder=opts["video_folder"], cfg_dropout=0.0, random_flip=False,
                                      max_substitutions=0, frame_size=frame_size)
        readable, unreadable = [], []
        for index, entry in enumerate(dataset.entries):  # read as the loss will: unreadable entries are dropped
            try:
                with torch.random.fork_rng(devices=[]):
                    dataset.load_clip(index)
                readable.append(entry)
            except VideoReadError as err:
                unreadable.append({"index": index, "path": str(entry.path), "reason": str(err)})
        if dataset.entries and not readable:
            raise ValueError(f"--validation_data_path {path}: none of its {len(unreadable)} videos can be read "
                             f"(first: {unreadable[0]['reason']}); run `opensora-plan data check {path}`.")
        if unreadable:
            listed = "; ".join(f"entry {u['index']}: {u['path']}" for u in unreadable[:10])
            more = f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
            logger.warning("--validation_data_path: %d of %d held-out videos are unreadable and left out of the "
                           "held-out loss (%s%s).", len(unreadable), len(dataset.entries), listed, more)
        dataset.entries = readable
        dataset.unreadable = unreadable
    if len(dataset) == 0:
        raise ValueError(f"--validation_data_path {path} holds no clips; give a JSON list with at least one video.")
    return dataset


def load_stage_config(spec: str) -> dict:
    """Options from a config file (JSON or YAML), or the name of a shipped stage (``stage1_17x256x256``, ...).

    Keys starting with ``_`` are comments; any other key must be a train-t2v option (ValueError naming
    the closest one otherwise).
    """
    from opensora_plan.options import read_options_file

    return read_options_file(T2VTrainOptions, spec)


# Preview settings when neither the flags nor the base model's folder file (sampling_config.json / demo.json) give them.
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


def validate_t2v_options(opts: Mapping) -> None:
    """The checks that need the file system (values were checked by :class:`T2VTrainOptions`): inputs
    that exist, an output folder that can be written, validation prompts read and cleaned, unset preview
    settings filled in (:func:`preview_defaults`)."""
    from opensora_plan.utils import check_output_folder

    check_output_folder(opts["output_dir"], "--output_dir")
    check_new_run_folder(opts["output_dir"], opts["resume_from_checkpoint"])
    _check_model_spec(opts["model"])  # before any clip is probed or model loaded
    if opts["resume_from_checkpoint"]:
        from opensora_plan.train.checkpoint import resolve_resume

        resolve_resume(opts["resume_from_checkpoint"], opts["output_dir"])  # a missing checkpoint fails now
    if opts["buckets"]:
        from opensora_plan.data.buckets import parse_buckets

        if opts["cached_features"]:
            raise ValueError("--buckets needs videos (--data_path): an `extract` cache holds latents of one shape; "
                             "drop --cached_features or --buckets.")
        if not opts["data_path"]:
            raise ValueError("--buckets needs --data_path (a JSON list of videos and captions).")
        if opts["sp_size"] > 1:
            raise ValueError("--buckets with --sp_size > 1 is not supported (bucket lengths may not split over the "
                             "group); use --sp_size 1.")
        parse_buckets(opts["buckets"])  # a bad spec fails now, before any video is probed
    for key in ("data_path", "cached_features", "ae_path", "pretrained", "text_encoder_name", "validation_data_path"):
        if opts[key] and not Path(opts[key]).exists():
            raise FileNotFoundError(f"--{key} {opts[key]} does not exist.")
    if opts["validation_prompts"] or opts["validation_prompt_file"]:
        # A prompt is text, a prompt file has its own flag: never guess which (sample_t2v.read_prompts).
        from opensora_plan.pipelines.sample_t2v import read_prompts

        given = opts["validation_prompts"]
        if given and opts["validation_prompt_file"]:
            raise ValueError("Give --validation_prompts or --validation_prompt_file, not both.")
        if opts["validation_prompt_file"]:
            opts["validation_prompts"] = read_prompts(None, opts["validation_prompt_file"], "--validation_prompt_file")
        else:
            given = [given] if isinstance(given, str) else list(given)
            opts["validation_prompts"] = [p for text in given for p in read_prompts(text, None,
                                                                                    "--validation_prompt_file")]
    if opts["lora_rank"] is not None:
        from opensora_plan.models.lora import lora_config

        lora_config(opts["lora_rank"], opts["lora_alpha"], opts["lora_target_modules"])  # peft installed, values valid
    if opts["validation_prompts"]:
        # Validation previews clean captions as sampling does: a prompt emptied by it fails now, not after training.
        from opensora_plan.models.text_encoder import preprocess_texts

        for prompt, cleaned in zip(opts["validation_prompts"], preprocess_texts(list(opts["validation_prompts"]))):
            if prompt.strip() and not cleaned:
                raise ValueError(f"Validation prompt {prompt!r} is empty after caption cleaning (it removes CJK "
                                 "characters, URLs, HTML, ...) and would preview the unconditional video; write it "
                                 "in English.")
    if any(opts[key] is None for key in PREVIEW_DEFAULTS):
        defaults, source = preview_defaults(opts["pretrained"])
        filled = {key: defaults[key] for key in PREVIEW_DEFAULTS if opts[key] is None}
        opts.update(filled)
        if source and opts["validation_prompts"]:
            logger.info("Preview settings from %s: %s.", source, ", ".join(f"--{k} {v}" for k, v in filled.items()))
    if opts["validation_data_path"] and not opts["validation_steps"]:
        raise ValueError("--validation_data_path needs --validation_steps (how often to compute the held-out loss, "
                         "e.g. 100).")
    if not opts["validation_steps"]:  # previews run only every --validation_steps
        given = [k for k in ("validation_prompt_file", "validation_prompts") if opts[k]]
        if given:
            raise ValueError(f"--{given[0]} has no effect without --validation_steps; add --validation_steps N "
                             f"(preview every N optimizer steps) or drop --{given[0]}.")
    if not 1 <= opts["validation_num_timesteps"] <= 1000:
        raise ValueError(f"--validation_num_timesteps must be in [1, 1000] (the diffusion has 1000 steps), got "
                         f"{opts['validation_num_timesteps']}.")
    if opts["validation_guidance_scale"] < 0:
        raise ValueError(f"--validation_guidance_scale must be >= 0, got {opts['validation_guidance_scale']}.")
    if opts["validation_prompts"]:
        from opensora_plan.diffusion.schedulers import create_scheduler

        try:
            create_scheduler(opts["validation_sample_method"])
        except ValueError as err:
            raise ValueError(f"--validation_sample_method: {err}") from None
    if opts["validation_prompts"] and opts["validation_sampling_steps"] < 4:
        # Checked here, not after hours of training: PNDM's Runge-Kutta warm-up needs 4 steps.
        raise ValueError(f"--validation_sampling_steps {opts['validation_sampling_steps']} is too few for the "
                         f"PNDM sampler; use 4 or more.")


def _check_model_spec(spec: str) -> None:
    """FileNotFoundError unless ``spec`` is a LatteT2V size name or a config.json / folder holding one."""
    from opensora_plan.models.latte import LATTE_CONFIGS

    path = Path(spec)
    if spec in LATTE_CONFIGS or path.is_file() or (path / "config.json").is_file():
        return
    raise FileNotFoundError(f"--model {spec} is neither a known size ({', '.join(LATTE_CONFIGS)}) nor a LatteT2V "
                            "config.json or folder holding one.")


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
        tokenizer, text_encoder = load_t5(opts["text_encoder_name"])
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
                                                      opts["lora_target_modules"]))
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
        validation_guidance_scale=opts["validation_guidance_scale"], seed=opts["seed"],
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
    every = f"every {config.validation_steps} steps" if config.validation_steps else "never (no --validation_steps)"
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
        lines.append(f"  {len(dataset)} samples, batch {config.train_batch_size} per process")
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
