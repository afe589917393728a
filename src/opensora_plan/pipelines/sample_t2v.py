"""The ``opensora-plan sample`` command: prompts -> mp4 files, on one device or sharded with ``torchrun``.

Mirrors the reference's ``opensora/sample/sample_t2v.py`` (its flags, plus ``--negative_prompt``,
``--batch_size``, ``--seed``, ``--dtype``, ``--device``) with what it lacked: every path is checked before anything heavy is loaded, sampling is seeded per prompt, the
T5 encoder is freed after all prompts are encoded, and ``torchrun --nproc_per_node N`` splits the
prompts over N processes (rank r takes prompts r, r+N, ...), each writing its own files.

Each video gets its own generator seeded with ``seed + prompt index``, so a prompt's video does not
depend on how many processes share the work (with ``batch_size`` 1; batches follow the reference's
batch rule for text embeddings, see ``OpenSoraPlanPipeline.encode_prompt``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

logger = logging.getLogger(__name__)

VERSIONS = ("17x256x256", "65x256x256", "65x512x512")
AE_NAMES = ("CausalVAEModel_4x8x8",)
DEFAULT_MODEL_PATH = "LanguageBind/Open-Sora-Plan-v1.0.0"
DEFAULT_TEXT_ENCODER = "DeepFloyd/t5-v1_1-xxl"


def read_prompts(text_prompt: str) -> list[str]:
    """One prompt, or the non-empty lines of a ``.txt`` file (one prompt per line)."""
    if text_prompt.endswith(".txt"):
        path = Path(text_prompt)
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {path} does not exist; pass a .txt file with one prompt per line or a prompt.")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"Prompt file {path} has no prompts; write one prompt per line.")
        return prompts
    if not text_prompt.strip():
        raise ValueError("The prompt is empty; pass --text_prompt 'a description' or a .txt file of prompts.")
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
        raise FileNotFoundError(
            f"--model_path {model_path} does not exist; expected a local copy of {DEFAULT_MODEL_PATH} with the "
            f"version folders ({', '.join(VERSIONS)}) and vae/."
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
    latte_config = json.loads((model_path / version / "config.json").read_text())
    if latte_config["caption_channels"] != width:
        raise ValueError(
            f"The T5 in {text_encoder_name} is {width} wide but {model_path / version} expects caption_channels="
            f"{latte_config['caption_channels']}; use the text encoder that model was trained with."
        )
    vae_config = json.loads((model_path / "vae" / "config.json").read_text())
    if vae_config["embed_dim"] != latte_config["in_channels"]:
        raise ValueError(
            f"The VAE in {model_path / 'vae'} has {vae_config['embed_dim']} latent channels but {version} expects "
            f"{latte_config['in_channels']}; use the VAE shipped with that model."
        )


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
                 batch_size, force_images, vae_memory_gb=None) -> list[Path]:
    """Load the three models, encode this rank's prompts, free T5, denoise and write each video."""
    import torch

    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.models.text_encoder import load_t5
    from opensora_plan.pipelines.pipeline_opensora_plan import OpenSoraPlanPipeline

    tokenizer, text_encoder = load_t5(text_encoder_name, torch_dtype=torch_dtype, device=device)
    pipe = OpenSoraPlanPipeline(
        vae=CausalVAEModel.from_pretrained(model_path / "vae", torch_dtype=torch_dtype, device=device),
        transformer=LatteT2V.from_pretrained(model_path / version, torch_dtype=torch_dtype, device=device),
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    del text_encoder  # the pipeline holds the only reference, so release_text_encoder() frees it
    if enable_tiling:
        pipe.enable_vae_tiling(tile_overlap_factor)
    pipe.set_vae_memory_budget(vae_memory_gb)
    pipe.set_progress_bar_config(disable=rank != 0)
    num_frames = 1 if force_images else None
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    do_cfg = guidance_scale > 1.0
    # Encode every prompt of this rank, then free T5 before denoising (spec 4: ~9.5 GB in fp16).
    encoded = [
        pipe.encode_prompt([p for _, p in batch], negative_prompt=negative_prompt, do_classifier_free_guidance=do_cfg)
        for batch in batches
    ]
    pipe.release_text_encoder()

    written = []
    for batch, (prompt_embeds, negative_embeds) in zip(batches, encoded):
        generators = [torch.Generator("cpu").manual_seed(seed + index) for index, _ in batch]
        videos = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_frames=num_frames,
            num_inference_steps=num_sampling_steps,
            guidance_scale=guidance_scale,
            generator=generators,
        ).video  # (B, T, H, W, 3) uint8
        for (index, prompt), frames in zip(batch, videos):
            written.append(_save(out_dir / video_filename(index, prompt), frames, fps))
            logger.info("%swrote %s", tag, written[-1])
    return written


def sample_t2v(
    text_prompt: str,
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
    vae_memory_gb: float | str | None = "auto",
) -> list[Path]:
    """Sample one video per prompt into ``save_img_path``; returns the files this process wrote.

    ``vae_memory_gb``: decode losslessly in temporal chunks when a plain VAE decode would need more
    (GiB; ``"auto"`` = the device's free memory at decode time; None = never).
    """
    import torch

    from opensora_plan.diffusion.schedulers import create_scheduler
    from opensora_plan.utils import parse_dtype

    # Everything cheap first: flags, prompts, folders, configs.
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}.")
    if num_sampling_steps < 1:
        raise ValueError(f"--num_sampling_steps must be at least 1, got {num_sampling_steps}.")
    if not 0.0 <= tile_overlap_factor < 1.0:
        raise ValueError(f"--tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}; the reference uses 0.25.")
    if vae_memory_gb not in (None, "auto") and not (isinstance(vae_memory_gb, (int, float)) and vae_memory_gb > 0):
        raise ValueError(f"--vae_memory_gb must be a positive number of GiB or 'auto', got {vae_memory_gb!r}.")
    scheduler = create_scheduler(sample_method)
    prompts = read_prompts(text_prompt)
    model_path = Path(model_path)
    _check_model_folders(model_path, version, ae, str(text_encoder_name))

    rank, world_size, device = _distributed_setup(device)
    torch_dtype = (torch.float16 if device.type == "cuda" else torch.float32) if dtype == "auto" else parse_dtype(dtype)
    jobs = shard(list(enumerate(prompts)), rank, world_size)  # [(global index, prompt)]
    out_dir = Path(save_img_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"[rank {rank}/{world_size}] " if world_size > 1 else ""

    start = time.perf_counter()
    written = []
    if jobs:  # more processes than prompts leaves some ranks idle
        written = _sample_jobs(
            jobs, model_path, version, text_encoder_name, scheduler, torch_dtype, device, rank, tag, out_dir,
            fps=fps, guidance_scale=guidance_scale, num_sampling_steps=num_sampling_steps, seed=seed,
            enable_tiling=enable_tiling, tile_overlap_factor=tile_overlap_factor, negative_prompt=negative_prompt,
            batch_size=batch_size, force_images=force_images, vae_memory_gb=vae_memory_gb,
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
