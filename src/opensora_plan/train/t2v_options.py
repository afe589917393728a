"""The options of ``opensora-plan train-t2v`` (:class:`T2VTrainOptions`, reference flag names, spec section 6) and
the checks that need the file system (:func:`validate_t2v_options`), run before any model loads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from opensora_plan.models.text_encoder import MODEL_MAX_LENGTH, T5_MAX_LENGTH
from opensora_plan.options import option, option_fields
from opensora_plan.train.t2v_validation import PREVIEW_DEFAULTS, preview_defaults
from opensora_plan.train.trainer import TrainConfig, check_adamw, check_new_run_folder, check_resume_options
from opensora_plan.utils import valid_num_frames

logger = logging.getLogger(__name__)

SUPPORTED_AE = ("CausalVAEModel_4x8x8",)
STAGE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train_t2v"
TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION = 4, 8  # CausalVAEModel_4x8x8


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
    data_path: str | None = option(None, help="JSON list of {'path': ..., 'cap': [...] or '...'}, or a folder of "
                                   "videos with same-name .txt captions", group="data")
    video_folder: str | None = option(None, help="base folder for relative paths in --data_path", group="data")
    data_index: str | None = option(None, help="index of --data_path written by `opensora-plan data index`: start "
                                    "without opening the videos (only changed ones are probed again); unreadable "
                                    "ones are left out", group="data")
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
    validation_data_path: str | None = option(None, help="held-out clips (JSON list or folder like --data_path, or "
                                              "an extract folder): diffusion loss at fixed timesteps and noise every "
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


def load_stage_config(spec: str) -> dict:
    """Options from a config file (JSON or YAML), or the name of a shipped stage (``stage1_17x256x256``, ...).

    Keys starting with ``_`` are comments; any other key must be a train-t2v option (ValueError naming
    the closest one otherwise).
    """
    from opensora_plan.options import read_options_file

    return read_options_file(T2VTrainOptions, spec)



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
        _take_cache_settings(opts)  # compared as the run recorded them: the cache's, not the flags' defaults
        check_resume_options(opts)  # a changed option: refused, or applied (and said) by one rule
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
    if opts["data_index"]:
        if opts["cached_features"]:
            raise ValueError("--data_index indexes the videos of --data_path; an `extract` cache has its own shard "
                             "index: drop --data_index or --cached_features.")
        if not opts["data_path"]:
            raise ValueError("--data_index needs --data_path (the dataset JSON it indexes).")
        from opensora_plan.data.index import read_index_meta

        read_index_meta(opts["data_index"])  # a missing or foreign file fails now, before anything loads
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
        from opensora_plan.models.text_encoder import emptied_by_cleaning, preprocess_texts

        for prompt, cleaned in zip(opts["validation_prompts"], preprocess_texts(list(opts["validation_prompts"]))):
            if emptied_by_cleaning(prompt, cleaned):
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

        from opensora_plan.pipelines.pipeline_opensora_plan import check_scheduler_steps

        try:
            scheduler = create_scheduler(opts["validation_sample_method"])
        except ValueError as err:
            raise ValueError(f"--validation_sample_method: {err}") from None
        if opts["validation_sampling_steps"] < 1:
            raise ValueError(f"--validation_sampling_steps must be at least 1, got {opts['validation_sampling_steps']}.")
        try:  # checked here, not after hours of training (PNDM's Runge-Kutta warm-up needs 4 steps; others run 1)
            check_scheduler_steps(scheduler, opts["validation_sampling_steps"])
        except ValueError as err:
            raise ValueError(f"--validation_sampling_steps {opts['validation_sampling_steps']} with "
                             f"--validation_sample_method {opts['validation_sample_method']}: {err}") from None


def _check_model_spec(spec: str) -> None:
    """FileNotFoundError unless ``spec`` is a LatteT2V size name or a config.json / folder holding one."""
    from opensora_plan.models.latte import LATTE_CONFIGS

    path = Path(spec)
    if spec in LATTE_CONFIGS or path.is_file() or (path / "config.json").is_file():
        return
    from opensora_plan.models.loading import model_subfolders

    inside = model_subfolders(path, "LatteT2V") if path.is_dir() else []
    hint = f"; {path} holds a whole model: pass one of its transformer folders, e.g. --model {inside[0]}" if inside else ""
    raise FileNotFoundError(f"--model {spec} is neither a known size ({', '.join(LATTE_CONFIGS)}) nor a LatteT2V "
                            f"config.json or folder holding one{hint}.")


CACHE_SETTINGS = ("num_frames", "max_image_size", "use_image_num", "sample_rate", "model_max_length")


def _take_cache_settings(opts: dict) -> None:
    """With ``--cached_features``: the options an ``extract`` cache fixes (:data:`CACHE_SETTINGS`) set to the
    cache's values (its ``meta.json``), one warning per flag that asked for another. A missing or unreadable cache
    is left to the dataset, which names what it expected."""
    from opensora_plan.data.features import META_FILE
    from opensora_plan.utils import read_json_file

    meta = Path(opts["cached_features"] or "") / META_FILE
    if not opts["cached_features"] or not meta.is_file():
        return
    apply_cache_settings(opts, read_json_file(meta, "The feature cache's meta.json").get("settings", {}))


def apply_cache_settings(opts: dict, settings: dict) -> None:
    """Set the options an ``extract`` cache fixes (:data:`CACHE_SETTINGS`) to its ``settings``: one warning per flag
    that asked for another value; a flag left at its default (most likely not given: the options cannot tell) is
    only logged at DEBUG (QA 6, 7)."""
    defaults = T2VTrainOptions.defaults()
    for key in CACHE_SETTINGS:
        if key in settings and opts[key] != settings[key]:
            log = logger.debug if opts[key] == defaults.get(key) else logger.warning
            log("--%s %s: the feature cache was extracted with %s, which is used.", key, opts[key], settings[key])
            opts[key] = settings[key]
