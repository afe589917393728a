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

import json
import logging
import math
import os
import re
import time
from pathlib import Path

logger = logging.getLogger(__name__)

VERSIONS = ("17x256x256", "65x256x256", "65x512x512")
AE_NAMES = ("CausalVAEModel_4x8x8",)
DEFAULT_MODEL_PATH = "LanguageBind/Open-Sora-Plan-v1.0.0"
DEFAULT_TEXT_ENCODER = "DeepFloyd/t5-v1_1-xxl"


FILE_NAME_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".tsv", ".json", ".jsonl", ".prompts", ".text")
TEXT_CONDITIONING = ("per_prompt", "reference")


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
    if not (model_path / version).is_dir():
        present = sorted(d.name for d in model_path.iterdir() if d.is_dir())
        raise FileNotFoundError(
            f"Version folder {model_path / version} does not exist; --version must name a folder of --model_path "
            f"(found: {', '.join(present) or 'none'}; the release has {', '.join(VERSIONS)})."
        )
    for sub in (version, "vae"):
        find_weights(resolve_model_folder(model_path, sub))
    width = t5_hidden_size(text_encoder_name)
    latte_config = _read_config(model_path / version / "config.json", ("caption_channels", "in_channels", "video_length"),
                                f"a LatteT2V config; --version names a transformer folder ({', '.join(VERSIONS)}), not vae")
    vae_config = _read_config(model_path / "vae" / "config.json", ("embed_dim",), "a CausalVAE config")
    if latte_config["caption_channels"] != width:
        raise ValueError(
            f"The T5 in {text_encoder_name} is {width} wide but {model_path / version} expects caption_channels="
            f"{latte_config['caption_channels']}; use the text encoder that model was trained with."
        )
    if vae_config["embed_dim"] != latte_config["in_channels"]:
        raise ValueError(
            f"The VAE in {model_path / 'vae'} has {vae_config['embed_dim']} latent channels but {version} expects "
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

        path = path.with_suffix(".png")
        Image.fromarray(frames[0].numpy()).save(path)
        return path
    from opensora_plan.data.video_io import write_video

    return write_video(path, frames, fps)


def _sample_jobs(jobs, model_path, version, text_encoder_name, scheduler, torch_dtype, device, rank, tag, out_dir, *,
                 fps, guidance_scale, num_sampling_steps, seed, enable_tiling, tile_overlap_factor, negative_prompt,
                 batch_size, force_images, cache, compile, clean_caption=True,
                 text_conditioning="per_prompt", sp_group=None, cfg_group=None, writes=True, run=None, lora=None,
                 lora_scale=1.0, vae_memory_gb=None) -> list[Path]:
    """Load the three models, encode this rank's prompts, free T5, denoise and write each video."""
    import torch

    from opensora_plan.demo.model import fast_cache_options
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.models.text_encoder import load_t5
    from opensora_plan.pipelines.pipeline_opensora_plan import OpenSoraPlanPipeline

    tokenizer, text_encoder = load_t5(text_encoder_name, torch_dtype=torch_dtype, device=device)
    if run is not None:  # a train-t2v checkpoint (pipelines/training_run.py)
        from opensora_plan.pipelines.training_run import load_run_transformer

        transformer = load_run_transformer(run, torch_dtype, device, lora_scale)
    else:
        transformer = LatteT2V.from_pretrained(model_path / version, torch_dtype=torch_dtype, device=device)
    pipe = OpenSoraPlanPipeline(
        vae=CausalVAEModel.from_pretrained(run.vae if run is not None else model_path / "vae",
                                           torch_dtype=torch_dtype, device=device),
        transformer=transformer,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    del text_encoder  # the pipeline holds the only reference, so release_text_encoder() frees it
    if lora is not None:
        pipe.load_lora_weights(lora, lora_scale=lora_scale)
        if any(p.dtype != torch_dtype for p in pipe.transformer.parameters()):
            pipe.transformer.to(torch_dtype)  # the adapters are stored in float32
    pipe.fast_cache_options = fast_cache_options(model_path)
    pipe.enable_cache(cache)
    if compile:
        pipe.transformer.compile_blocks()
    if sp_group is not None:
        from opensora_plan.models.parallel import enable_sequence_parallel

        enable_sequence_parallel(pipe.transformer, sp_group)
    if cfg_group is not None:
        from opensora_plan.models.parallel import enable_batch_parallel

        enable_batch_parallel(pipe.transformer, cfg_group)  # [uncond; cond]: one half per rank
    if enable_tiling:
        pipe.enable_vae_tiling(tile_overlap_factor)
    pipe.set_vae_memory_budget(vae_memory_gb)
    pipe.set_progress_bar_config(disable=rank != 0 or not logger.isEnabledFor(logging.INFO))  # -q: no bars
    num_frames = 1 if force_images else None
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    do_cfg = guidance_scale > 1.0
    # Encode every prompt of this rank, then free T5 before denoising (spec 4: ~9.5 GB in fp16).
    encoded = [_encode_batch(pipe, [p for _, p in batch], negative_prompt, do_cfg, clean_caption, text_conditioning)
               for batch in batches]
    pipe.release_text_encoder()

    written = []
    for batch, (prompt_embeds, prompt_mask, negative_embeds, negative_mask) in zip(batches, encoded):
        # One generator per prompt, seeded as when the prompt is sampled alone: seed + its index.
        generators = [torch.Generator("cpu").manual_seed(seed + index) for index, _ in batch]
        videos = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            prompt_attention_mask=prompt_mask,
            negative_prompt_attention_mask=negative_mask,
            num_frames=num_frames,
            num_inference_steps=num_sampling_steps,
            guidance_scale=guidance_scale,
            generator=generators,
        ).frames  # (B, T, H, W, 3) uint8
        for (index, prompt), frames in zip(batch, videos):
            if not writes:
                continue
            written.append(_save(out_dir / video_filename(index, prompt), frames, fps))
            logger.info("%swrote %s", tag, written[-1])
    return written


def _encode_batch(pipe, prompts, negative_prompt, do_cfg, clean_caption, text_conditioning):
    """``(prompt_embeds, prompt_mask, negative_embeds, negative_mask)`` of one batch; masks are None for 'reference'."""
    if text_conditioning == "per_prompt":
        return pipe.encode_prompt_with_masks(prompts, negative_prompt, do_cfg, clean_caption=clean_caption)
    cond, uncond = pipe.encode_prompt(prompts, negative_prompt=negative_prompt, do_classifier_free_guidance=do_cfg,
                                      clean_caption=clean_caption)
    return cond, None, uncond, None


def sample_t2v(
    text_prompt: str | None = None,
    model_path: str | os.PathLike = DEFAULT_MODEL_PATH,
    version: str = "65x512x512",
    text_encoder_name: str | os.PathLike = DEFAULT_TEXT_ENCODER,
    ae: str = AE_NAMES[0],
    save_img_path: str | os.PathLike = "./sample_videos",
    fps: float = 24,
    guidance_scale: float = 7.5,
    num_sampling_steps: int = 50,
    sample_method: str = "PNDM",
    seed: int = 0,
    enable_tiling: bool = False,
    tile_overlap_factor: float = 0.25,
    dtype: str = "auto",
    device: str | None = None,
    negative_prompt: str = "",
    batch_size: int = 1,
    force_images: bool = False,
    prompt_file: str | os.PathLike | None = None,
    clean_caption: bool = True,
    text_conditioning: str = "per_prompt",
    cache: str = "none",
    compile: bool = False,
    sp_size: int = 1,
    cfg_parallel: bool = False,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    vae_memory_gb: float | str | None = "auto",
) -> list[Path]:
    """Sample one video per prompt into ``save_img_path``; returns the files this process wrote.

    Prompts: ``text_prompt`` (one prompt) or ``prompt_file`` (one per line). Every option, prompt,
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
    from opensora_plan.models.step_cache import parse_cache_spec
    from opensora_plan.models.text_encoder import preprocess_prompts
    from opensora_plan.utils import check_output_folder, parse_dtype, resolve_device

    # Everything cheap first: flags, prompts, folders, configs.
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    block = sp_size * (2 if cfg_parallel else 1)
    if sp_size < 1 or world % block:
        raise ValueError(f"--sp_size {sp_size}" + (" x 2 (--cfg_parallel)" if cfg_parallel else "") + f" must divide "
                         f"the number of processes ({world}); launch with torchrun --nproc_per_node a multiple of "
                         f"{block}.")
    if cfg_parallel and guidance_scale <= 1.0:
        raise ValueError(f"--cfg_parallel splits classifier-free guidance, which --guidance_scale {guidance_scale} "
                         "turns off; use a scale > 1 or drop --cfg_parallel.")
    if sp_size > 1 and force_images:
        raise ValueError("--force_images samples one frame, which cannot be split over --sp_size processes; "
                         "use --sp_size 1.")
    if not 0 <= seed < 2**63 - 2**32:
        raise ValueError(f"--seed must be a whole number from 0 to {2**63 - 2**32 - 1}, got {seed}.")
    if not guidance_scale >= 0 or math.isinf(guidance_scale):  # also NaN
        raise ValueError(f"--guidance_scale must be a finite number >= 0 (1 disables guidance), got {guidance_scale}.")
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}.")
    if num_sampling_steps < 1:
        raise ValueError(f"--num_sampling_steps must be at least 1, got {num_sampling_steps}.")
    if not 0.0 <= tile_overlap_factor < 1.0:
        raise ValueError(f"--tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}; the reference uses 0.25.")
    parse_cache_spec(cache)  # --cache NAME or METHOD:THRESHOLD, checked before anything loads
    if cache != "none" and sp_size > 1:
        raise ValueError(f"--cache {cache} cannot run with --sp_size {sp_size} (the ranks would decide apart); "
                         "use --cache none or --sp_size 1.")
    if text_conditioning not in TEXT_CONDITIONING:
        raise ValueError(f"--text_conditioning {text_conditioning} is not supported; use {' or '.join(TEXT_CONDITIONING)}.")
    if vae_memory_gb not in (None, "auto") and not (isinstance(vae_memory_gb, (int, float)) and vae_memory_gb > 0):
        raise ValueError(f"--vae_memory_gb must be a positive number of GiB or 'auto', got {vae_memory_gb!r}.")
    scheduler = create_scheduler(sample_method)
    prompts = read_prompts(text_prompt, prompt_file)
    preprocess_prompts(prompts, clean=clean_caption, warn=False)  # a prompt that cleaning empties: error now
    out_dir = check_output_folder(save_img_path, "--save_img_path")
    suffix = ".png" if force_images else ".mp4"
    for index, prompt in enumerate(prompts):  # a planned file that is a folder would fail only after sampling
        target = out_dir / video_filename(index, prompt, suffix)
        if target.is_dir():
            raise ValueError(f"--save_img_path {out_dir}: {target.name} (prompt {index}) is an existing folder; "
                             "remove it or choose another --save_img_path.")
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
        _check_model_folders(model_path, version, ae, str(text_encoder_name))
    if lora_scale != 1.0 and lora is None and (run is None or run.lora is None):
        raise ValueError(f"--lora_scale {lora_scale} needs a LoRA: pass --lora or a LoRA run's checkpoint.")
    if lora is not None:
        from opensora_plan.models.lora import find_lora

        if find_lora(lora) is None:
            raise FileNotFoundError(f"--lora {lora} holds no pytorch_lora_weights.safetensors; give the adapter "
                                    f"folder (e.g. runs/x/checkpoint-600/model).")
        if run is not None and run.lora is not None:
            raise ValueError(f"{model_path} is a LoRA run whose adapter is applied already; drop --lora "
                             f"(use --lora_scale to scale it).")
    resolve_device(device)  # a bad --device fails here, before torchrun joins a process group

    rank, world_size, device = _distributed_setup(device)
    torch_dtype = (torch.float16 if device.type == "cuda" else torch.float32) if dtype == "auto" else parse_dtype(dtype)
    groups = {"sp": None, "cfg": None, "dp_rank": rank, "dp_size": world_size, "writer": True}
    if block > 1:
        from opensora_plan.models.parallel import init_parallel_groups

        groups = init_parallel_groups(sp_size, 2 if cfg_parallel else 1)
    dp_rank, dp_size = groups["dp_rank"], groups["dp_size"]
    jobs = shard(list(enumerate(prompts)), dp_rank, dp_size)  # [(global index, prompt)]
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"[rank {rank}/{world_size}] " if world_size > 1 else ""

    start = time.perf_counter()
    written = []
    if jobs:  # more processes than prompts leaves some ranks idle
        written = _sample_jobs(
            jobs, model_path, version, text_encoder_name, scheduler, torch_dtype, device, rank, tag, out_dir,
            fps=fps, guidance_scale=guidance_scale, num_sampling_steps=num_sampling_steps, seed=seed,
            enable_tiling=enable_tiling, tile_overlap_factor=tile_overlap_factor, negative_prompt=negative_prompt,
            batch_size=batch_size, force_images=force_images, clean_caption=clean_caption,
            text_conditioning=text_conditioning, cache=cache, compile=compile, sp_group=groups["sp"],
            cfg_group=groups["cfg"], writes=groups["writer"], run=run, lora=lora, lora_scale=lora_scale,
            vae_memory_gb=vae_memory_gb,
        )
    elapsed = time.perf_counter() - start
    print(
        f"{tag}Sampled {len(written)} video(s) with {version} ({sample_method}, {num_sampling_steps} steps) "
        f"in {elapsed:.1f} s ({elapsed / max(len(written), 1):.1f} s per video) -> {out_dir}",
        flush=True,
    )
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return written
