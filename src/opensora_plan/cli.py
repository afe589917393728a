"""``opensora-plan`` command line: argument parsing only, each command calls one library function.

Every sub-command has one ``_add_<name>(subparsers)`` function below that declares its flags and
sets ``func``; the heavy imports happen inside the command, so ``--help`` is instant.
User errors (missing files, bad shapes, bad flags) end with one ``error: ...`` line and exit code 1;
set ``OPENSORA_PLAN_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


# --------------------------------------------------------------------------------------------
# reconstruct (CausalVAE video reconstruction)
# --------------------------------------------------------------------------------------------


def _add_reconstruct(subparsers) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        help="encode + decode videos with the CausalVAE; write mp4 and print PSNR/SSIM",
        description="Reconstruct a video (or every video in a folder) with a CausalVAE folder "
        "(config.json + diffusion_pytorch_model.safetensors), write H.264 mp4 and report PSNR/SSIM "
        "against the preprocessed input. Folder mode skips unreadable or short videos, lists them, "
        "and writes <rec_path>/metrics.json.",
    )
    p.add_argument("--model_path", required=True, help="CausalVAE folder (e.g. the release's vae/)")
    p.add_argument("--video_path", required=True, help="input video, or a folder of mp4/avi/webm/mkv/mov")
    p.add_argument("--rec_path", required=True, help="output .mp4 (file mode) or output folder")
    p.add_argument("--num_frames", type=int, default=65, help="frames to reconstruct, 1 + 4k (default 65)")
    p.add_argument("--sample_rate", type=int, default=1, help="take every n-th frame from frame 0 (default 1)")
    p.add_argument("--resolution", type=int, default=512, help="short side is resized to this (default 512)")
    p.add_argument("--crop_size", type=int, default=None, help="center crop to a square of this size")
    p.add_argument("--enable_tiling", action="store_true", help="spatial tiling (frames larger than 256 px)")
    p.add_argument("--tile_overlap_factor", type=float, default=0.25, help="tile overlap (default 0.25)")
    p.add_argument("--temporal_chunk", type=int, default=0,
                   help="decode this many latent frames at a time to bound memory (0: all at once)")
    p.add_argument("--temporal_mode", default="lossless", choices=["lossless", "approximate"],
                   help="lossless (default): same output as decoding all at once; approximate: per-chunk GroupNorm")
    p.add_argument("--temporal_context", type=int, default=None,
                   help="approximate mode: latent frames of context decoded before each chunk and dropped (default 4)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype (default fp32)")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mode")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    p.add_argument("--gif", action="store_true", help="also write <name>.gif beside each mp4")
    p.add_argument("--fps", type=float, default=None, help="output fps (default: source fps / sample_rate)")
    p.add_argument("--backend", default="auto", choices=["auto", "pyav", "decord"], help="video reader")
    p.set_defaults(func=_run_reconstruct)


def _run_reconstruct(args) -> int:
    from opensora_plan.pipelines.reconstruct import SUMMARY_NAME, reconstruct

    summary = reconstruct(
        model_path=args.model_path, video_path=args.video_path, rec_path=args.rec_path,
        num_frames=args.num_frames, sample_rate=args.sample_rate, resolution=args.resolution,
        crop_size=args.crop_size, enable_tiling=args.enable_tiling,
        tile_overlap_factor=args.tile_overlap_factor, temporal_chunk=args.temporal_chunk or None,
        temporal_context=args.temporal_context, temporal_mode=args.temporal_mode, device=args.device, dtype=args.dtype,
        sample=args.sample, seed=args.seed, gif=args.gif, fps=args.fps, backend=args.backend,
    )
    for r in summary.results:
        print(f"{r.output_path}: {r.num_frames} frames {r.width}x{r.height}  PSNR {r.psnr:.2f} dB  "
              f"SSIM {r.ssim:.4f}  ({r.seconds:.1f} s)")
    if os.path.isdir(args.video_path):
        if summary.results:
            print(f"mean over {len(summary.results)} videos: PSNR {summary.mean_psnr:.2f} dB  "
                  f"SSIM {summary.mean_ssim:.4f}  (summary: {os.path.join(args.rec_path, SUMMARY_NAME)})")
        if summary.skipped:
            print(f"skipped {len(summary.skipped)} file(s):")
            for path, reason in summary.skipped:
                print(f"  {path}: {reason}")
    return 0 if summary.results else 1


# --------------------------------------------------------------------------------------------
# sample (text-to-video)
# --------------------------------------------------------------------------------------------


def _memory_budget(text: str) -> float | str | None:
    """``--vae_memory_gb``: 'auto', 0 (never chunk) or a positive number of GiB."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of GiB >= 0 or 'auto', got {text!r}")
    return value or None


def _add_sample(subparsers) -> None:
    from opensora_plan.pipelines.sample_t2v import AE_NAMES, DEFAULT_MODEL_PATH, DEFAULT_TEXT_ENCODER, VERSIONS

    p = subparsers.add_parser(
        "sample",
        help="text-to-video: write one mp4 per prompt with LatteT2V + CausalVAE + T5",
        description="Sample videos from text prompts with a local copy of Open-Sora-Plan v1.0.0 (version "
        "folders + vae/) and of DeepFloyd/t5-v1_1-xxl. Launch with 'torchrun --nproc_per_node N -m "
        "opensora_plan sample ...' to split the prompts over N processes/GPUs.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --text_prompt)")
    p.add_argument("--model_path", default=None, help="folder with the version folders and vae/ (default: the "
                   f"shipped demo model, docs/demo.md; the release is {DEFAULT_MODEL_PATH})")
    p.add_argument("--version", default=None,
                   help=f"version folder under --model_path: {', '.join(VERSIONS)} (default 65x512x512; demo: its own)")
    p.add_argument("--text_encoder_name", default=None,
                   help=f"local T5 folder ({DEFAULT_TEXT_ENCODER} layout; default: the demo's, or {DEFAULT_TEXT_ENCODER})")
    p.add_argument("--text_prompt", default=None, help="the prompt (always text, never a file name)")
    p.add_argument("--prompt_file", default=None, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--no_clean_caption", action="store_true",
                   help="feed prompts as written (lower-cased) instead of the reference's caption cleaning, "
                   "which removes e.g. CJK characters, URLs and file names")
    p.add_argument("--text_conditioning", default="per_prompt", choices=["per_prompt", "reference"],
                   help="per_prompt (default): a prompt gets the same video alone and in any batch, and the negative "
                   "prompt keeps all its tokens; reference: the reference's batch rule (300 tokens, padded positions "
                   "attended to) and negative prompt cut to the prompt's length")
    p.add_argument("--negative_prompt", default="", help="negative prompt (default: empty, as the reference)")
    p.add_argument("--ae", default=AE_NAMES[0], help=f"autoencoder name (only {AE_NAMES[0]})")
    p.add_argument("--save_img_path", default="./sample_videos", help="output folder (default ./sample_videos)")
    p.add_argument("--fps", type=float, default=None, help="frames per second of the mp4 (default 24; demo: 8)")
    p.add_argument("--gif", action="store_true", help="also write <name>.gif beside each mp4")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance (default 7.5; demo: its demo.json)")
    p.add_argument("--num_sampling_steps", type=int, default=None, help="scheduler steps (default 50; demo: its demo.json)")
    p.add_argument("--sample_method", default=None, help="scheduler (default PNDM; demo: its demo.json): PNDM, DDIM, EulerDiscrete, DDPM, "
                   "DPMSolverMultistep, DPMSolverSinglestep, HeunDiscrete, EulerAncestralDiscrete, DEISMultistep, "
                   "KDPM2AncestralDiscrete, UniPCMultistep")
    p.add_argument("--seed", type=int, default=0, help="seed; prompt i uses seed + i (default 0)")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per denoising batch (default 1)")
    p.add_argument("--force_images", action="store_true", help="image mode: 1 frame, temporal attention off (png)")
    p.add_argument("--sp_size", type=int, default=1, help="sequence parallel: processes (of torchrun's) that split "
                   "each video's tokens (default 1)")
    p.add_argument("--cfg_parallel", action="store_true", help="two process groups run the unconditional and "
                   "conditional halves of guidance (world = prompt groups x 2 x sp_size)")
    p.add_argument("--enable_tiling", action="store_true", help="decode in spatial tiles (for 512 px)")
    p.add_argument("--tile_overlap_factor", type=float, default=0.25, help="tile overlap (default 0.25)")
    p.add_argument("--vae_memory_gb", type=_memory_budget, default="auto",
                   help="VAE decode memory budget in GiB; a decode that would need more runs losslessly in "
                        "temporal chunks (same output). auto (default): the device's free memory; 0: never")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fp16 on GPU (as the reference), fp32 on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--cache", default="none", help="step caching: none (exact, default), fast (the model's measured "
                   "preset), teacache, first_block, or METHOD:THRESHOLD e.g. teacache:0.5 (docs/sampling.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (pays a warm-up; "
                   "docs/sampling.md)")
    p.add_argument("--lora", default=None, help="LoRA adapter folder from train-t2v --lora_rank (pytorch_lora_weights"
                   ".safetensors + adapter_config.json), applied to the transformer (needs peft)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA (default 1; 0 = base model)")
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    from opensora_plan.demo.model import sample_defaults
    from opensora_plan.pipelines.sample_t2v import sample_t2v

    given = [name for name, value in (("the prompt argument", args.prompt), ("--text_prompt", args.text_prompt),
                                      ("--prompt_file", args.prompt_file)) if value is not None]
    if len(given) > 1:
        raise UserError(f"Give the prompt one way only, got {' and '.join(given)}.")
    if not given:
        raise UserError('No prompt given; run e.g. opensora-plan sample "a red circle moving left" (or --prompt_file).')
    if args.gif and args.force_images:
        raise UserError("--gif needs videos but --force_images writes single-frame png images; drop one of the two.")
    # No --model_path: the shipped demo model and its demo.json settings; flags given always win.
    opts = sample_defaults(args.model_path, version=args.version, text_encoder_name=args.text_encoder_name,
                           sample_method=args.sample_method, num_sampling_steps=args.num_sampling_steps,
                           guidance_scale=args.guidance_scale, fps=args.fps)
    written = sample_t2v(
        text_prompt=args.prompt if args.prompt is not None else args.text_prompt,
        prompt_file=args.prompt_file,
        clean_caption=not args.no_clean_caption,
        text_conditioning=args.text_conditioning,
        model_path=opts["model_path"],
        version=opts["version"],
        text_encoder_name=opts["text_encoder_name"],
        ae=args.ae,
        save_img_path=args.save_img_path,
        fps=opts["fps"],
        guidance_scale=opts["guidance_scale"],
        num_sampling_steps=opts["num_sampling_steps"],
        sample_method=opts["sample_method"],
        seed=args.seed,
        enable_tiling=args.enable_tiling,
        tile_overlap_factor=args.tile_overlap_factor,
        dtype=args.dtype,
        device=args.device,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        force_images=args.force_images,
        cache=args.cache,
        compile=args.compile,
        sp_size=args.sp_size,
        cfg_parallel=args.cfg_parallel,
        lora=args.lora,
        lora_scale=args.lora_scale,
        vae_memory_gb=args.vae_memory_gb,
    )
    if args.gif:
        from opensora_plan.data.video_io import read_video, write_gif

        for path in written:
            if path.suffix == ".mp4":
                print(f"wrote {write_gif(path.with_suffix('.gif'), read_video(path)[0], opts['fps'])}")
    return 0


# --------------------------------------------------------------------------------------------
# serve (web UI)
# --------------------------------------------------------------------------------------------


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="web UI: generate videos in the browser (needs the [ui] extra)",
        description="Serve a Gradio page for text-to-video: prompt, negative prompt, version, steps, guidance, "
        "seed, scheduler, a progress bar, mp4/gif downloads and a gallery of the session's videos. Requests "
        "are queued and run one at a time. Without --model_path it serves the shipped demo model (CPU is fine). "
        'Install with: pip install -e ".[ui]".',
    )
    p.add_argument("--model_path", default=None, help="demo or save_pretrained folder (model_index.json), or a "
                   "release folder with version folders and vae/ (default: the shipped demo)")
    p.add_argument("--version", default=None, help="version folder to load first (release folders; default 65x512x512)")
    p.add_argument("--text_encoder_name", default=None, help="local T5 folder (needed for a release folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fp16 on GPU, fp32 on CPU")
    p.add_argument("--out_dir", default=None, help="where the videos are written (default: a temporary folder)")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from opensora_plan.ui.app import _import_gradio, serve

    try:
        _import_gradio()
    except ImportError as err:
        raise UserError(str(err)) from None
    serve(model_path=args.model_path, version=args.version, text_encoder_name=args.text_encoder_name,
          host=args.host, port=args.port, device=args.device, dtype=args.dtype, out_dir=args.out_dir)
    return 0


# --------------------------------------------------------------------------------------------
# data check / extract (datasets, cached features)
# --------------------------------------------------------------------------------------------


def _add_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools (data check)",
                              description="Tools for text-to-video dataset JSON lists.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = sub.add_parser(
        "check",
        help="open every video of a dataset JSON; report count, readable/unreadable, frames, fps, size, captions",
        description="Check a dataset JSON list of {'path': ..., 'cap': [...] or '...'} before training: "
        "malformed entries, unreadable videos (listed with the reason), frames, fps, resolution and duration "
        "(min/median/max), caption lengths in words (and T5 tokens with --text_encoder_name). Every frame is "
        "decoded with the reader training uses, so what passes is what training reads (sizes are the displayed "
        "ones, rotation applied). Exit code 1 when any entry is malformed or any video unreadable.",
    )
    c.add_argument("data_path", help="dataset JSON list")
    c.add_argument("--video_folder", default=None, help="base folder for relative paths (default: the JSON's folder)")
    c.add_argument("--text_encoder_name", default=None, help="local T5 folder: also count caption tokens")
    c.add_argument("--model_max_length", type=int, default=300, help="token limit to report against (default 300)")
    c.add_argument("--num_frames", type=int, default=None, help="also count videos shorter than this window")
    c.add_argument("--sample_rate", type=int, default=1, help="window stride for --num_frames (default 1)")
    c.add_argument("--json_out", default=None, help="also write the full report as JSON here")
    c.add_argument("--no_decode", action="store_true",
                   help="only open the videos (fast) instead of decoding every frame; may pass files training skips")
    c.set_defaults(func=_run_data_check)


def _run_data_check(args) -> int:
    import json

    from opensora_plan.data.datasets import check_dataset, format_check_report
    from opensora_plan.utils import atomic_write_bytes, check_output_file

    if args.json_out:
        check_output_file(args.json_out, "--json_out")  # before the decode pass, not after it
    for name in ("num_frames", "sample_rate"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    report = check_dataset(args.data_path, video_folder=args.video_folder, text_encoder_name=args.text_encoder_name,
                           num_frames=args.num_frames, sample_rate=args.sample_rate,
                           model_max_length=args.model_max_length, decode=not args.no_decode)
    print(format_check_report(report))
    if args.json_out:
        atomic_write_bytes(args.json_out, json.dumps(report, indent=2).encode("utf-8"))
    return 1 if report["malformed"] or report["unreadable"] else 0


def _add_extract(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="cache T5 caption embeddings and/or CausalVAE latents of a dataset (resumable safetensors shards)",
        description="Run the frozen text encoder and/or VAE once over a dataset JSON and cache the results in "
        "safetensors shards under --out, so training can skip them. Re-running the same command resumes "
        "(finished shards are kept). Unreadable videos are listed and left out. See docs/data.md.",
    )
    p.add_argument("--data_path", required=True, help="dataset JSON list")
    p.add_argument("--video_folder", default=None, help="base folder for relative paths (default: the JSON's folder)")
    p.add_argument("--out", required=True, help="output folder of the cache")
    p.add_argument("--text_encoder_name", default=None, help="local T5 folder: cache caption embeddings")
    p.add_argument("--ae_path", default=None, help="CausalVAE folder: cache latent posteriors (mean, logvar)")
    p.add_argument("--num_frames", type=int, default=17, help="frames per clip, 1 + 4k (default 17)")
    p.add_argument("--sample_rate", type=int, default=1, help="temporal stride (default 1)")
    p.add_argument("--max_image_size", type=int, default=256, help="square frame size (default 256)")
    p.add_argument("--use_image_num", type=int, default=0, help="joint-training images per clip (default 0)")
    p.add_argument("--model_max_length", type=int, default=300, help="T5 tokens (default 300)")
    p.add_argument("--shard_size", type=int, default=64, help="entries per shard (default 64)")
    p.add_argument("--text_dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="T5 dtype, also the stored dtype (default bf16, as the reference trainer)")
    p.add_argument("--enable_tiling", action="store_true", help="encode in spatial tiles (for 512 px)")
    p.add_argument("--no_clean_caption", action="store_true", help="only lower-case captions instead of cleaning")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.set_defaults(func=_run_extract)


def _run_extract(args) -> int:
    from opensora_plan.data.features import extract_features

    summary = extract_features(
        args.data_path, args.out, video_folder=args.video_folder, text_encoder_name=args.text_encoder_name,
        ae_path=args.ae_path, num_frames=args.num_frames, sample_rate=args.sample_rate,
        max_image_size=args.max_image_size, use_image_num=args.use_image_num,
        model_max_length=args.model_max_length, shard_size=args.shard_size, device=args.device,
        text_dtype=args.text_dtype, enable_tiling=args.enable_tiling, clean_captions=not args.no_clean_caption,
    )
    print(f"{summary['out']}: {summary['cached']} of {summary['entries']} entries cached in {summary['shards']} "
          f"shards ({summary['shards_written']} written now, {summary['shards_reused']} kept from before)")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable video(s):")
        for item in summary["skipped"]:
            print(f"  entry {item['index']}: {item['reason']}")
    return 0


# --------------------------------------------------------------------------------------------
# train-t2v / train-vae
# --------------------------------------------------------------------------------------------


def _add_train_t2v(subparsers) -> None:
    p = subparsers.add_parser(
        "train-t2v",
        help="train / fine-tune LatteT2V text-to-video (IDDPM loss, the reference recipe)",
        description="Train LatteT2V on a JSON list of videos and captions (or an `extract` cache). Accepts the "
        "reference's flag names. --config takes a stage config (a JSON file, or the name of a shipped one: "
        "stage1_17x256x256, stage2_65x256x256, stage3_65x512x512); its values are defaults that flags override. "
        "Launch with torchrun / accelerate launch for many processes. See docs/training.md.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the config file
    )
    flag = argparse.BooleanOptionalAction
    p.add_argument("--config", help="stage config JSON (file path or shipped stage name)")
    model = p.add_argument_group("models")
    model.add_argument("--model", help="LatteT2V size (e.g. LatteT2V-XL/122) or a LatteT2V config.json / folder")
    model.add_argument("--text_encoder_name", help="local T5 folder (DeepFloyd/t5-v1_1-xxl layout)")
    model.add_argument("--ae", help="autoencoder type (CausalVAEModel_4x8x8)")
    model.add_argument("--ae_path", help="CausalVAE folder (or a release folder with a vae/ subfolder)")
    model.add_argument("--pretrained", help="initial weights: LatteT2V folder, .safetensors, or Latte t2v.pt")
    model.add_argument("--attention_mode", choices=["xformers", "flash", "math"], help="recorded in the config")
    lora = p.add_argument_group("LoRA fine-tuning (needs peft; docs/training.md)")
    lora.add_argument("--lora_rank", type=int, help="train rank-R LoRA adapters on a frozen --pretrained model")
    lora.add_argument("--lora_alpha", type=float, help="LoRA alpha (default: the rank, i.e. scaling 1)")
    lora.add_argument("--lora_target_modules", nargs="+",
                      help="projections to adapt (default: to_q to_k to_v to_out.0 ff.net.0.proj ff.net.2)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help="dataset type (t2v)")
    data.add_argument("--data_path", help="JSON list of {'path': ..., 'cap': [...] or '...'}")
    data.add_argument("--video_folder", help="base folder for relative paths in --data_path")
    data.add_argument("--cached_features", help="folder written by `opensora-plan extract` (T5 and/or VAE cached)")
    data.add_argument("--num_frames", type=int, help="pixel frames per clip (17 or 65; default 17)")
    data.add_argument("--sample_rate", type=int, help="temporal stride (default 1)")
    data.add_argument("--max_image_size", type=int, help="square frame size in pixels (default 256)")
    data.add_argument("--use_image_num", type=int, help="joint-training images per clip (default 0)")
    data.add_argument("--use_img_from_vid", action=flag, help="accepted for the reference; images always come from the clip")
    data.add_argument("--model_max_length", type=int, help="T5 tokens per caption (default 300)")
    data.add_argument("--cfg_dropout", type=float, help="caption dropout for guidance (default 0.1; 0 = reference)")
    data.add_argument("--dataloader_num_workers", type=int, help="data-loading processes (default 0)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, help="batch per process (default 1)")
    optim.add_argument("--gradient_accumulation_steps", type=int, help="(default 1)")
    optim.add_argument("--max_train_steps", type=int, help="optimizer steps (required)")
    optim.add_argument("--learning_rate", type=float, help="AdamW lr (default 2e-5)")
    optim.add_argument("--lr_scheduler", help="diffusers schedule name (default constant)")
    optim.add_argument("--lr_warmup_steps", type=int, help="(default 0)")
    optim.add_argument("--adam_beta1", type=float)
    optim.add_argument("--adam_beta2", type=float)
    optim.add_argument("--adam_weight_decay", type=float, help="(default 1e-2)")
    optim.add_argument("--adam_epsilon", type=float)
    optim.add_argument("--max_grad_norm", type=float, help="grad-norm clip (default 1.0)")
    optim.add_argument("--mixed_precision", choices=["no", "fp32", "bf16", "fp16"], help="(default bf16)")
    optim.add_argument("--gradient_checkpointing", action=flag)
    optim.add_argument("--allow_tf32", action=flag)
    optim.add_argument("--enable_tiling", action=flag, help="tiled VAE encoding (stage 3)")
    optim.add_argument("--compile", action=flag, help="torch.compile the transformer")
    optim.add_argument("--use_ema", action=flag, help="keep an EMA of the weights (saved as ema/)")
    optim.add_argument("--ema_decay", type=float, help="(default 0.9999)")
    optim.add_argument("--sharding", choices=["ddp", "fsdp2", "deepspeed"],
                       help="ddp (replicated, default), fsdp2 (sharded) or deepspeed (ZeRO, see --deepspeed_config)")
    optim.add_argument("--deepspeed_config", help="DeepSpeed JSON or shipped name: zero2 (default), zero2_offload, zero3")
    optim.add_argument("--sp_size", type=int, help="sequence parallel: processes that split each sample's "
                       "frames/patches (default 1; world = dp x sp, see docs/training.md)")
    optim.add_argument("--max_nonfinite_steps", type=int, help="stop after this many non-finite steps in a row (10)")
    optim.add_argument("--seed", type=int, help="(default 0)")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", help="checkpoints, options.json, log.jsonl, tensorboard/ (required)")
    run.add_argument("--checkpointing_steps", type=int, help="(default 500)")
    run.add_argument("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    run.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-<step> folder")
    run.add_argument("--report_to", choices=["tensorboard", "wandb", "none"],
                     help="tensorboard (default), wandb (needs `pip install wandb`; WANDB_MODE=offline works) or none")
    run.add_argument("--validation_prompts", help="a validation prompt (text, never a file name)")
    run.add_argument("--validation_prompt_file", help="a text file with one validation prompt per line")
    run.add_argument("--validation_steps", type=int, help="sample the validation prompts every N steps")
    run.add_argument("--validation_sampling_steps", type=int, help="denoising steps of validation videos (20)")
    run.add_argument("--validation_data_path", help="held-out clips (JSON list like --data_path, or an extract "
                     "folder): diffusion loss at fixed timesteps and noise every --validation_steps, as val_loss")
    run.add_argument("--validation_num_timesteps", type=int, help="fixed timesteps of the held-out loss (default 8)")
    run.add_argument("--validation_sample_method", help="scheduler of the preview videos (default PNDM)")
    run.add_argument("--validation_guidance_scale", type=float, help="guidance of the preview videos (default 7.5)")
    p.set_defaults(func=_run_train_t2v)


def _run_train_t2v(args) -> int:
    from opensora_plan.train.t2v import T2V_DEFAULTS, load_stage_config, train_t2v

    given = {k: v for k, v in vars(args).items() if k in T2V_DEFAULTS}  # only flags given on the command line
    options = {**(load_stage_config(args.config) if getattr(args, "config", None) else {}), **given}
    summary = train_t2v(options)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per process
        print(_train_summary_line(summary))
    return 0


def _train_summary_line(summary: dict) -> str:
    """The end-of-run line, saying in words what 'skipped' means (optimizer steps vs unreadable videos)."""
    steps = summary["skipped_steps"]
    parts = [f"trained to step {summary['step']}",
             f"{steps} optimizer step{'s' if steps != 1 else ''} skipped for a non-finite loss"]
    if "skipped_video_reads" in summary:
        reads, files = summary["skipped_video_reads"], summary["skipped_video_files"]
        parts.append(f"{reads} sample{'s' if reads != 1 else ''} replaced because the video was unreadable "
                     f"({files} file{'s' if files != 1 else ''}, listed in the log)" if reads
                     else "no unreadable videos")
    return "; ".join(parts) + f"; checkpoints in {summary['output_dir']}"


def _add_train_vae(subparsers) -> None:
    p = subparsers.add_parser(
        "train-vae",
        help="train / fine-tune the CausalVAE (L1+LPIPS, KL, PatchGAN)",
        description="Train the CausalVAE with the reference loss on a folder of videos or a JSON video list. "
        "Defaults are the reference's (train_causalvae.py). See docs/vae_training.md.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--video_path", help="folder of videos, searched recursively (mp4/avi/webm/mkv)")
    data.add_argument("--data_path", help="JSON video list (the text-to-video dataset format; captions unused)")
    data.add_argument("--video_folder", help="base folder for relative paths in --data_path")
    data.add_argument("--num_frames", type=int, default=17, help="frames per clip: 1 (images) or 1+4k")
    data.add_argument("--sample_rate", type=int, default=1, help="temporal stride of the clip window")
    data.add_argument("--resolution", type=int, default=64, help="center-crop size in pixels (no resize)")
    data.add_argument("--validation_videos", type=int, default=0,
                      help="hold out the last N videos for PSNR/SSIM + image logs every --validation_steps")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    model = p.add_argument_group("model and loss")
    model.add_argument("--model_config", help="CausalVAE config.json (or its folder); random initialisation")
    model.add_argument("--pretrained_model_path", help="CausalVAE folder to start from (e.g. convert inflate-2d-vae output)")
    model.add_argument("--perceptual_weight", type=float, default=1.0, help="LPIPS weight; 0 trains without LPIPS")
    model.add_argument("--lpips_path", nargs="+", help="LPIPS weight file(s): VGG16 features + LPIPS heads")
    model.add_argument("--disc_start", type=int, default=2001, help="step (batches) at which the GAN term starts")
    model.add_argument("--disc_weight", type=float, default=0.5)
    model.add_argument("--kl_weight", type=float, default=1e-6)
    model.add_argument("--logvar_init", type=float, default=0.0)
    model.add_argument("--rec_loss", default="l1", choices=["l1", "l2"],
                       help="pixel term: l1 (reference) or l2 (better on sparse frames, e.g. the demo's shapes)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=1e-5,
                       help="base lr (VAE, logvar, discriminator); VAE parameters named *time* get 10x")
    optim.add_argument("--time_lr_multiplier", type=float, default=10.0)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--train_batch_size", type=int, default=1)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=100000)
    optim.add_argument("--mixed_precision", default="bf16", choices=["no", "fp32", "bf16", "fp16"])
    optim.add_argument("--allow_tf32", action="store_true")
    optim.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--checkpointing_steps", type=int, default=2000)
    run.add_argument("--checkpoints_total_limit", type=int)
    run.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-<step> folder")
    run.add_argument("--validation_steps", type=int, default=500)
    run.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    run.add_argument("--max_nonfinite_steps", type=int, default=10)
    p.set_defaults(func=_run_train_vae)


def _run_train_vae(args) -> int:
    from opensora_plan.train.trainer import TrainConfig
    from opensora_plan.train.vae import train_vae

    task_options = {
        name: getattr(args, name)
        for name in (
            "model_config", "pretrained_model_path", "video_path", "data_path", "video_folder", "num_frames",
            "sample_rate", "resolution", "learning_rate", "time_lr_multiplier", "max_grad_norm",
            "perceptual_weight", "lpips_path", "disc_start", "disc_weight", "kl_weight", "logvar_init",
            "rec_loss", "validation_videos",
        )
    }
    config = TrainConfig(
        output_dir=args.output_dir,
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint,
        dataloader_num_workers=args.dataloader_num_workers,
        allow_tf32=args.allow_tf32,
        max_nonfinite_steps=args.max_nonfinite_steps,
        validation_steps=args.validation_steps if args.validation_videos else None,
        report_to=args.report_to,
        extra=task_options,
    )
    summary = train_vae(config, **task_options)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per process
        print(_train_summary_line(summary))
    return 0


# --------------------------------------------------------------------------------------------
# eval-vae / convert
# --------------------------------------------------------------------------------------------


def _add_eval_vae(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-vae",
        help="PSNR / SSIM / LPIPS of CausalVAE reconstructions over a folder of videos",
        description="Reconstruct every video under --video_path (recursive) and score it against the "
        "preprocessed input; prints a table next to the v1.0.0 report numbers and writes JSON.",
    )
    p.add_argument("--model_path", required=True, help="CausalVAE folder (config.json + weights)")
    p.add_argument("--video_path", required=True, help="a video file or a folder of videos (recursive)")
    p.add_argument("--num_frames", type=int, default=17)
    p.add_argument("--sample_rate", type=int, default=1)
    p.add_argument("--resolution", type=int, default=336, help="short side after resizing")
    p.add_argument("--crop_size", type=int, help="center crop after resizing")
    p.add_argument("--lpips_path", nargs="+", help="LPIPS weight file(s); without them LPIPS is not computed")
    p.add_argument("--subset_size", type=int, help="evaluate only the first N videos (sorted by path)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable_tiling", action="store_true")
    p.add_argument("--tile_overlap_factor", type=float, default=0.25)
    p.add_argument("--json_out", help="write the per-video scores and means here (JSON)")
    p.set_defaults(func=_run_eval_vae)


def _run_eval_vae(args) -> int:
    from opensora_plan.pipelines.evaluate_vae import evaluate_vae

    summary = evaluate_vae(
        args.model_path, args.video_path, num_frames=args.num_frames, sample_rate=args.sample_rate,
        resolution=args.resolution, crop_size=args.crop_size, lpips_path=args.lpips_path,
        subset_size=args.subset_size, device=args.device, dtype=args.dtype, sample=args.sample, seed=args.seed,
        enable_tiling=args.enable_tiling, tile_overlap_factor=args.tile_overlap_factor, json_out=args.json_out,
    )
    print(summary.table())
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0 if summary.scores else 1


def _add_eval_t2v(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-t2v",
        help="CLIP score and FVD of a folder of generated videos (e.g. what 'sample' wrote)",
        description="Score generated videos with the standard protocols (docs/evaluation.md): CLIP score "
        "(frame-wise 100*max(cos, 0) against the prompt, local transformers CLIP) and FVD (Kinetics-400 I3D "
        "logits of 16-frame clips at 224 px, Fréchet distance to a real set). Prints a table, writes JSON.",
    )
    p.add_argument("--videos", required=True, help="folder of generated videos (searched recursively)")
    p.add_argument("--metrics", default="clip_score,fvd", help="comma-separated: clip_score, fvd (default both)")
    p.add_argument("--prompts", help="prompt source: the .txt given to 'sample' (line i <-> video 000i-...) or a "
                   ".json (data list [{path, cap}] or {file name: prompt}); default: read back from the file names")
    p.add_argument("--real", help="real videos for FVD: a folder (recursive) or an .npz from --save_real_stats")
    p.add_argument("--clip_model", help="local CLIP folder (CLIPModel + CLIPProcessor files)")
    p.add_argument("--i3d_model", help="local I3D weights: pytorch-i3d rgb_imagenet.pt or StyleGAN-V i3d_torchscript.pt")
    p.add_argument("--i3d_sha256", help="expected sha256 of --i3d_model (checked before loading)")
    p.add_argument("--num_frames", type=int, default=16, help="FVD clip length, from frame 0 (default 16)")
    p.add_argument("--sample_rate", type=int, default=1, help="FVD clip: every n-th frame (default 1)")
    p.add_argument("--resolution", type=int, default=224, help="FVD frame size after resize + center crop (default 224)")
    p.add_argument("--clip_frames", type=int, default=0, help="CLIP score: N evenly spaced frames (default 0 = all)")
    p.add_argument("--batch_size", type=int, default=8, help="videos per I3D batch / frames per CLIP batch (default 8)")
    p.add_argument("--subset_size", type=int, help="use only the first N videos (sorted by path) of each set")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--json_out", help="where to write the results (default <videos>/eval_t2v.json)")
    p.add_argument("--save_real_stats", help="also save the real set's I3D mean/covariance to this .npz")
    p.set_defaults(func=_run_eval_t2v)


def _run_eval_t2v(args) -> int:
    from opensora_plan.pipelines.evaluate_t2v import evaluate_t2v

    summary = evaluate_t2v(
        args.videos, metrics=args.metrics.split(","), prompts=args.prompts, real=args.real,
        clip_model=args.clip_model, i3d_model=args.i3d_model, i3d_sha256=args.i3d_sha256,
        num_frames=args.num_frames, sample_rate=args.sample_rate, resolution=args.resolution,
        clip_frames=args.clip_frames, batch_size=args.batch_size, subset_size=args.subset_size,
        device=args.device, json_out=args.json_out, save_real_stats=args.save_real_stats,
    )
    print(summary.table())
    print(f"wrote {summary.settings['json_out']}")
    return 0 if summary.videos else 1


def _add_convert(subparsers) -> None:
    p = subparsers.add_parser("convert", help="weight conversions (inflate a 2-D image VAE into a CausalVAE)")
    kinds = p.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    q = kinds.add_parser(
        "inflate-2d-vae",
        help="diffusers AutoencoderKL folder -> CausalVAE folder (2-D kernels in the last temporal tap)",
        description="Initialise a CausalVAE from a 2-D image VAE as the reference did ('tail' inflation) and "
        "report every CausalVAE tensor that could not be filled.",
    )
    q.add_argument("--vae_2d_path", required=True, help="diffusers AutoencoderKL folder (config.json + weights)")
    q.add_argument("--subfolder", help="e.g. 'vae' inside a Stable Diffusion folder")
    q.add_argument("--output_dir", required=True, help="CausalVAE folder to write")
    q.add_argument("--model_config", help="CausalVAE config.json to inflate into (default: derived from the 2-D config)")
    q.add_argument("--verify_size", type=int, default=0,
                   help="also compare both VAEs on a synthetic SIZExSIZE image and a static video")
    q.set_defaults(func=_run_inflate_2d_vae)


def _run_inflate_2d_vae(args) -> int:
    from opensora_plan.models.causalvae.inflate import compare_with_2d, inflate_2d_vae, synthetic_image

    config = None
    if args.model_config:
        if not os.path.isfile(args.model_config):
            raise FileNotFoundError(f"--model_config {args.model_config} does not exist; give a CausalVAE config.json.")
        from opensora_plan.utils import read_json_file

        config = read_json_file(args.model_config, "--model_config")
    model, report = inflate_2d_vae(args.vae_2d_path, args.output_dir, causal_config=config, subfolder=args.subfolder)
    print(report.summary())
    print(f"wrote {args.output_dir}")
    if args.verify_size:
        from diffusers import AutoencoderKL

        folder = os.path.join(args.vae_2d_path, args.subfolder) if args.subfolder else args.vae_2d_path
        vae_2d = AutoencoderKL.from_pretrained(folder).eval()
        frames = 1 + 2 * model.temporal_compression  # 9 for the release layout
        result = compare_with_2d(vae_2d, model, synthetic_image(args.verify_size), num_frames=frames)
        print(f"image (T=1) max |inflated - 2-D| = {result['image_max_abs_diff']:.3g}")
        print(f"static {frames}-frame video, PSNR (dB) of each frame vs the 2-D reconstruction: "
              + ", ".join(f"{v:.2f}" for v in result["static_psnr_db"]))
    return 0


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the embedded 'shapes' demo model: make its data, train it, measure it (docs/demo.md)",
        description="The small text-to-video model shipped with the package: synthetic 'a {colour} {shape} "
        "moving {direction}' videos, the recipe that trains it with train-vae / extract / train-t2v, and an "
        "automatic evaluation of generated videos.",
    )
    sub = p.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    m = sub.add_parser("make-data", help="write synthetic 'shapes' mp4 videos + data.json (the trainer's JSON format)")
    m.add_argument("--out", required=True, help="output folder (videos/ and data.json)")
    m.add_argument("--num_videos", type=int, default=360, help="videos; the 60 combinations are cycled (default 360)")
    m.add_argument("--num_frames", type=int, default=17, help="frames per video (default 17)")
    m.add_argument("--size", type=int, default=64, help="frame size in pixels, square (default 64)")
    m.add_argument("--seed", type=int, default=0, help="seed of positions, sizes and speeds (default 0)")
    m.add_argument("--no_paraphrases", action="store_true", help="only the canonical caption per video")
    m.add_argument("--colours", nargs="+", default=None, help="colours to draw (default: the demo's five; "
                   "magenta is a word the shipped demo never saw, for fine-tuning)")
    m.add_argument("--shapes", nargs="+", default=None, help="shapes to draw (default: circle square triangle; "
                   "diamond is a word the shipped demo never saw)")
    m.set_defaults(func=_run_demo_make_data)

    t = sub.add_parser("train", help="train the demo model end to end (data, T5, train-vae, extract, train-t2v)",
                       description="Run the demo recipe into --out; the model lands in <out>/model/ and the wall "
                       "time of each stage and the machine in <out>/demo_train_report.json.")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--stages", default=None, help="comma-separated subset of data,t5,vae,extract,t2v,assemble "
                   "(default: all; later stages reuse what earlier runs wrote into --out)")
    t.add_argument("--micro", action="store_true", help="a few steps on a few videos: checks the wiring, learns nothing")
    for name, kind in (("num_videos", int), ("vae_steps", int), ("t2v_steps", int), ("t2v_batch_size", int),
                       ("t2v_learning_rate", float), ("latte_layers", int), ("seed", int)):
        t.add_argument(f"--{name}", type=kind, default=None, help="override the recipe's value (see docs/demo.md)")
    t.set_defaults(func=_run_demo_train)

    e = sub.add_parser("eval", help="sample prompts over the vocabulary and report colour/shape/direction accuracy")
    e.add_argument("--model_path", default=None, help="demo model folder (default: the shipped demo)")
    e.add_argument("--num_prompts", type=int, default=None, help="evaluate a spread subset of the 60 prompts")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per prompt (default 0 1 2)")
    e.add_argument("--num_sampling_steps", type=int, default=None, help="default: the model's demo.json")
    e.add_argument("--guidance_scale", type=float, default=None, help="default: the model's demo.json")
    e.add_argument("--sample_method", default=None, help="scheduler name; default: the model's demo.json")
    e.add_argument("--save_dir", default=None, help="keep the sampled mp4 files here")
    e.add_argument("--json_out", default=None, help="write the per-video verdicts and accuracies here")
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    e.add_argument("--cache", default="none", help="step caching as in `sample --cache` (default none)")
    e.add_argument("--colours", nargs="+", default=None, help="evaluate the prompts of these colours instead "
                   "(e.g. magenta, a word the shipped demo never saw; docs/training.md)")
    e.add_argument("--shapes", nargs="+", default=None, help="evaluate the prompts of these shapes instead "
                   "(e.g. diamond, a word the shipped demo never saw)")
    e.add_argument("--lora", default=None, help="LoRA adapter folder from train-t2v --lora_rank, applied to the model")
    e.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA (default 1)")
    e.set_defaults(func=_run_demo_eval)


def _run_demo_make_data(args) -> int:
    from opensora_plan.demo.shapes import make_dataset

    if args.num_videos < 1:
        raise ValueError(f"--num_videos must be at least 1, got {args.num_videos}.")
    path = make_dataset(args.out, args.num_videos, num_frames=args.num_frames, size=args.size, seed=args.seed,
                        paraphrases=not args.no_paraphrases, colours=args.colours, shapes=args.shapes)
    print(f"wrote {args.num_videos} videos and {path}")
    return 0


def _run_demo_train(args) -> int:
    from dataclasses import replace

    from opensora_plan.demo.train import STAGES, DemoRecipe, train_demo

    recipe = DemoRecipe.micro() if args.micro else DemoRecipe()
    overrides = {k: getattr(args, k) for k in ("num_videos", "vae_steps", "t2v_steps", "t2v_batch_size",
                                               "t2v_learning_rate", "latte_layers", "seed")
                 if getattr(args, k) is not None}
    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else STAGES
    report = train_demo(args.out, replace(recipe, **overrides), stages=stages)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    print(f"demo model in {report.get('model_dir', os.path.join(args.out, 'model'))} ({times})")
    return 0


def _run_demo_eval(args) -> int:
    from opensora_plan.demo.evaluate import evaluate_demo, select_prompts, write_report

    report = evaluate_demo(args.model_path, prompts=select_prompts(args.num_prompts, args.colours, args.shapes),
                           seeds=tuple(args.seeds), num_sampling_steps=args.num_sampling_steps,
                           guidance_scale=args.guidance_scale, sample_method=args.sample_method, device=args.device,
                           save_dir=args.save_dir, cache=args.cache, lora=args.lora, lora_scale=args.lora_scale)
    print(report.table())
    if args.json_out:
        write_report(report, args.json_out)
        print(f"wrote {args.json_out}")
    return 0


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opensora-plan",
        description="Open-Sora-Plan v1.0.0 text-to-video: sampling, reconstruction, training.",
    )
    from opensora_plan import __version__

    parser.add_argument("--version", action="version", version=f"opensora-plan {__version__}",
                        help="print the package version and exit")
    _log_flags(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add in sorted(globals().items()):
        if name.startswith("_add_") and callable(add):
            add(subparsers)
    _log_flags_after_commands(subparsers)
    return parser


def _log_flags(parser: argparse.ArgumentParser, default) -> None:
    """-v/--verbose and -q/--quiet; sub-commands use default=SUPPRESS so a flag given before them is kept."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def _log_flags_after_commands(subparsers) -> None:
    """Accept -v/-q after the sub-command too (``opensora-plan sample ... -v``), at every level."""
    for command in subparsers.choices.values():
        _log_flags(command, default=argparse.SUPPRESS)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _log_flags_after_commands(action)


# OpenMP threads that spin while waiting (libgomp's default) collapse when another process shares the
# cores: the demo sample took 27-39 s with 2 spinning threads on the loaded 2-core machine, 3.4-5 s with
# passive waiting (README, "Threads"). Set before torch loads; a value in the environment wins.
_OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
class _OncePerMessage(logging.Filter):
    """Drop a warning that was already shown word for word (libraries repeat theirs on every reload)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})"


def _route_dependency_noise(heavy: bool) -> None:
    """One log format, one line per real problem: Python warnings (without their source line) and the
    diffusers / transformers loggers (which print through their own handlers) go through ``logging``,
    and a repeated warning is shown once. ``heavy``: the command imports diffusers anyway."""
    import warnings

    warnings.formatwarning = _format_warning
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _OncePerMessage) for f in handler.filters):
            handler.addFilter(_OncePerMessage())
    if heavy:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        for library in (diffusers_logging, transformers_logging):
            library.disable_default_handler()
            library.enable_propagation()


def main(argv: list[str] | None = None) -> int:
    for name, value in _OPENMP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other; give one.")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _route_dependency_noise(heavy=args.command != "data")
    from opensora_plan.utils import NonFiniteError

    try:
        return int(args.func(args) or 0)
    except (UserError, OSError, ValueError, NonFiniteError) as err:  # OSError: a path the system refused
        if os.environ.get("OPENSORA_PLAN_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
