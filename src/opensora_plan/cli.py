"""``opensora-plan`` command line: argument parsing only, each command calls one library function.

Every sub-command has one ``_add_<name>(subparsers)`` function below that declares its flags and
sets ``func``; the heavy imports happen inside the command, so ``--help`` is instant.
User errors (missing files, bad shapes, bad flags) end with one ``error: ...`` line and exit code 1, Ctrl-C with
one ``interrupted`` line and exit code 130; set ``OPENSORA_PLAN_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys


logger = logging.getLogger("opensora_plan.cli")


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


# The command being parsed: only its options class is imported (they live beside torch code), so
# `opensora-plan --help` and other commands' parsing stay instant. None: every command (build_parser()).
_WANTED: str | None = None


def _import(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def _generate_options(parser: argparse.ArgumentParser, command: str, load) -> None:
    """Generate ``parser``'s arguments from the options dataclass ``load()`` returns (opensora_plan/options.py)."""
    if _WANTED is None or _WANTED == command:
        from opensora_plan.options import add_options

        add_options(parser, load())


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
    _generate_options(p, "reconstruct", lambda: _import("opensora_plan.pipelines.reconstruct", "ReconstructOptions"))
    p.set_defaults(func=_run_reconstruct)


def _run_reconstruct(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.pipelines.reconstruct import SUMMARY_NAME, ReconstructOptions, reconstruct
    from opensora_plan.pipelines.outputs import skipped_lines
    from opensora_plan.utils import plural

    summary = reconstruct(options_from_args(ReconstructOptions, args))
    for r in summary.results:
        print(f"{r.output_path}: {plural(r.num_frames, 'frame')} {r.width}x{r.height}  PSNR {r.psnr:.2f} dB  "
              f"SSIM {r.ssim:.4f}  ({r.seconds:.1f} s)")
    if os.path.isdir(args.video_path):
        if summary.results:
            print(f"mean over {plural(len(summary.results), 'video')}: PSNR {summary.mean_psnr:.2f} dB  "
                  f"SSIM {summary.mean_ssim:.4f}  (summary: {os.path.join(args.rec_path, SUMMARY_NAME)})")
        for line in skipped_lines(summary.skipped):
            print(line)
    return 0 if summary.results else 1


# --------------------------------------------------------------------------------------------
# interpolate (AMT frame interpolation)
# --------------------------------------------------------------------------------------------


def _add_interpolate(subparsers) -> None:
    p = subparsers.add_parser(
        "interpolate",
        help="raise a video's frame rate 2/4/8x with AMT frame interpolation (AMT-G, CC BY-NC 4.0)",
        description="Insert frames between every two frames of a video (or every video in a folder) with AMT: "
        "m frames become factor*(m-1)+1, written as H.264 mp4 at the input fps x factor. AMT-G's weights "
        "(amt-g.pth) are licensed CC BY-NC 4.0: non-commercial use only.",
    )
    _generate_options(p, "interpolate", lambda: _import("opensora_plan.pipelines.interpolate", "InterpolateOptions"))
    p.set_defaults(func=_run_interpolate)


def _run_interpolate(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.pipelines.interpolate import InterpolateOptions, interpolate
    from opensora_plan.pipelines.outputs import skipped_lines

    results = interpolate(options_from_args(InterpolateOptions, args))
    for r in results:
        print(f"{r.output_path}: {r.num_frames_in} -> {r.num_frames_out} frames at {r.fps:g} fps  ({r.seconds:.1f} s)")
    for line in skipped_lines(results.skipped):
        print(line)
    return 0 if results else 1


# --------------------------------------------------------------------------------------------
# upscale (RGT super-resolution of videos and images)
# --------------------------------------------------------------------------------------------


def _add_upscale(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="super-resolve videos or images x2 / x4 with RGT",
        description="Upscale a video, an image (png/jpg) or a folder of them with RGT (an official RGT_x2.pth / "
        "RGT_x4.pth or a save_pretrained folder). Large frames run in overlapping, blended tiles sized from "
        "--sr_memory_gb.",
    )
    _generate_options(p, "upscale", lambda: _import("opensora_plan.pipelines.upscale", "UpscaleOptions"))
    p.set_defaults(func=_run_upscale)


def _run_upscale(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.pipelines.upscale import UpscaleOptions, upscale
    from opensora_plan.pipelines.outputs import skipped_lines

    results = upscale(options_from_args(UpscaleOptions, args))
    for r in results:
        print(f"{r.output_path}: {r.num_frames} frame{'' if r.num_frames == 1 else 's'} {r.width}x{r.height}  "
              f"({r.seconds:.1f} s)")
    for line in skipped_lines(results.skipped):
        print(line)
    return 0 if results else 1


# --------------------------------------------------------------------------------------------
# sample (text-to-video)
# --------------------------------------------------------------------------------------------


def _add_sample(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="text-to-video: write one mp4 per prompt with LatteT2V + CausalVAE + T5",
        description="Sample videos from text prompts with a local copy of Open-Sora-Plan v1.0.0 (version "
        "folders + vae/) and of DeepFloyd/t5-v1_1-xxl. Launch with 'torchrun --nproc_per_node N -m "
        "opensora_plan sample ...' to split the prompts over N processes/GPUs.",
    )
    _generate_options(p, "sample", lambda: _import("opensora_plan.pipelines.sample_t2v", "SampleOptions"))
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.pipelines import sample_t2v

    sample_t2v.sample_t2v(options=options_from_args(sample_t2v.SampleOptions, args))
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
    _generate_options(p, "serve", lambda: _import("opensora_plan.ui.app", "ServeOptions"))
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.ui.app import ServeOptions, _import_gradio, serve

    _import_gradio()  # a missing [ui] extra is one line (MissingExtraError), before any model loads
    serve(options_from_args(ServeOptions, args))
    return 0


# --------------------------------------------------------------------------------------------
# data check / extract (datasets, cached features)
# --------------------------------------------------------------------------------------------


def _add_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools (data check, data index)",
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
    _generate_options(c, "data", lambda: _import("opensora_plan.data.check", "DataCheckOptions"))
    c.set_defaults(func=_run_data_check)
    i = sub.add_parser(
        "index",
        help="probe every video once (in parallel, resumable) and write a Parquet index that data check and "
        "train-t2v read with --data_index",
        description="Write one Parquet row per dataset entry: path, size, mtime, frames, fps, displayed height/width, "
        "duration, readable (+ reason), captions (+ T5 token lengths with --text_encoder_name). Runs in worker "
        "processes (and under torchrun each rank takes a share), resumes after a kill, refreshes an existing index "
        "of the same dataset by probing only new or changed videos. See docs/data.md.",
    )
    _generate_options(i, "data", lambda: _import("opensora_plan.data.index", "DataIndexOptions"))
    i.set_defaults(func=_run_data_index)


def _run_data_index(args) -> int:
    from opensora_plan.data.index import DataIndexOptions, build_index, format_index_summary
    from opensora_plan.options import options_from_args

    summary = build_index(options_from_args(DataIndexOptions, args))
    print(format_index_summary(summary))
    return 0


def _run_data_check(args) -> int:
    from opensora_plan.data.check import DataCheckOptions, check_dataset, format_check_report
    from opensora_plan.options import options_from_args

    report = check_dataset(options_from_args(DataCheckOptions, args))
    print(format_check_report(report))
    untrainable = "buckets" in report and not report["buckets"]["trainable"]  # training would fail at once
    return 1 if report["malformed"] or report["unreadable"] or untrainable else 0


def _add_extract(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="cache T5 caption embeddings and/or CausalVAE latents of a dataset (resumable safetensors shards)",
        description="Run the frozen text encoder and/or VAE once over a dataset JSON and cache the results in "
        "safetensors shards under --out, so training can skip them. Re-running the same command resumes "
        "(finished shards are kept). Unreadable videos are listed and left out. See docs/data.md.",
    )
    _generate_options(p, "extract", lambda: _import("opensora_plan.data.features", "ExtractOptions"))
    p.set_defaults(func=_run_extract)


def _run_extract(args) -> int:
    from opensora_plan.data.features import ExtractOptions, extract_features
    from opensora_plan.options import options_from_args
    from opensora_plan.utils import plural

    summary = extract_features(options_from_args(ExtractOptions, args))
    if "cached" not in summary:  # a torchrun rank other than 0 (rank 0 prints the whole cache's summary)
        return 0
    print(f"{summary['out']}: {summary['cached']} of {plural(summary['entries'], 'entry', 'entries')} cached in "
          f"{plural(summary['shards'], 'shard')} ({summary['shards_written']} written now, {summary['shards_reused']} "
          "kept from before)")
    if summary["skipped"]:
        print(f"skipped {plural(len(summary['skipped']), 'unreadable video')}:")
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
        "reference's flag names. --config takes an options file (JSON or YAML, a run's options.json, or the name "
        "of a shipped stage: stage1_17x256x256, stage2_65x256x256, stage3_65x512x512); its values replace the "
        "defaults and flags given on the command line replace its values. Launch with torchrun / accelerate "
        "launch for many processes. See docs/training.md.",
    )
    _generate_options(p, "train-t2v", lambda: _import("opensora_plan.train.t2v", "T2VTrainOptions"))
    p.set_defaults(func=_run_train_t2v)


def _run_train_t2v(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.train import t2v

    summary = t2v.train_t2v(options_from_args(t2v.T2VTrainOptions, args))
    if summary.get("dry_run"):
        print(summary["report"])
        return 0
    return _report_training(summary)


def _add_distill(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a LatteT2V into a few-step student with guidance built in (consistency distillation)",
        description="Distil a frozen LatteT2V teacher (a model folder, version folder or train-t2v run) into a "
        "student that samples in 1-8 steps without a classifier-free-guidance batch (--method lcd: latent "
        "consistency distillation, LCM sampler; pcd: phased consistency distillation, TCD sampler; dmd: distribution "
        "matching (DMD2) with a fake score, best from an lcd student given as --student). Takes train-t2v's data, "
        "LoRA, optimisation and run options (same loop, checkpoints, resume, EMA, sharding, --dry_run); the run and "
        "its checkpoints carry a sampling_config.json, so `sample --model_path RUN` (or --lora RUN) samples the "
        "student with its own settings. See docs/distill.md.",
    )
    _generate_options(p, "distill", lambda: _import("opensora_plan.train.distill", "DistillOptions"))
    p.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.train import distill

    summary = distill.distill(options_from_args(distill.DistillOptions, args))
    if summary.get("dry_run"):
        print(summary["report"])
        return 0
    return _report_training(summary)


def _report_training(summary: dict) -> int:
    """Print a training run's summary line (main process only: one line per run, not one per process)."""
    if os.environ.get("RANK", "0") == "0":
        print(_train_summary_line(summary))
    return 0


def _train_summary_line(summary: dict) -> str:
    """The end-of-run line, saying in words what 'skipped' means (optimizer steps vs unreadable videos)."""
    steps = summary["skipped_steps"]
    parts = [f"trained to step {summary['step']}",
             f"{steps} optimizer step{'s' if steps != 1 else ''} skipped for a non-finite loss"]
    left_out = summary.get("unreadable_videos_left_out", 0)  # by the bucket plan, before training
    if left_out:
        parts.append(f"{left_out} unreadable video{'s' if left_out != 1 else ''} left out before training")
    if summary.get("unfit_videos_left_out"):
        unfit = summary["unfit_videos_left_out"]
        parts.append(f"{unfit} video{'s' if unfit != 1 else ''} fit no bucket")
    if "skipped_video_reads" in summary:
        reads, files = summary["skipped_video_reads"], summary["skipped_video_files"]
        parts.append(f"{reads} sample{'s' if reads != 1 else ''} replaced because the video was unreadable "
                     f"({files} file{'s' if files != 1 else ''}, listed in the log)" if reads
                     else "no sample replaced" if left_out else "no unreadable videos")
    if "held_out_clips" in summary:  # --validation_data_path: what the held-out loss averaged over
        left_out = summary.get("held_out_left_out") or {"unreadable": summary.get("held_out_unreadable", 0)}
        left_out = ", ".join(f"{count} {why}" for why, count in left_out.items() if count)
        parts.append(f"held-out loss over {summary['held_out_clips']} clip{'s' if summary['held_out_clips'] != 1 else ''}"
                     + (f" ({left_out} left out)" if left_out else ""))
    return "; ".join(parts) + f"; checkpoints in {summary['output_dir']}"


def _add_train_vae(subparsers) -> None:
    p = subparsers.add_parser(
        "train-vae",
        help="train / fine-tune the CausalVAE (L1+LPIPS, KL, PatchGAN)",
        description="Train the CausalVAE with the reference loss on a folder of videos or a JSON video list. "
        "Defaults are the reference's (train_causalvae.py). --config takes an options file (JSON or YAML, or a "
        "run's options.json); flags given on the command line replace its values. See docs/vae_training.md.",
    )
    _generate_options(p, "train-vae", lambda: _import("opensora_plan.train.vae", "VAETrainOptions"))
    p.set_defaults(func=_run_train_vae)


def _run_train_vae(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.train import vae

    summary = vae.train_vae(options_from_args(vae.VAETrainOptions, args))
    return _report_training(summary)


def _add_train_vfi(subparsers) -> None:
    p = subparsers.add_parser(
        "train-vfi",
        help="train / fine-tune AMT frame interpolation (Charbonnier + census on middle frames)",
        description="Train AMT on (frame f, f+g, f+2g) triplets of a folder of videos or a JSON video list, from "
        "scratch (--model_config) or from amt-g.pth (--pretrained). --config takes an options file (JSON or YAML, or "
        "a run's options.json); flags given on the command line replace its values. See docs/training_frames.md.",
    )
    _generate_options(p, "train-vfi", lambda: _import("opensora_plan.train.vfi", "VFITrainOptions"))
    p.set_defaults(func=_run_train_vfi)


def _run_train_vfi(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.train import vfi

    summary = vfi.train_vfi(options_from_args(vfi.VFITrainOptions, args))
    return _report_training(summary)


def _add_train_sr(subparsers) -> None:
    p = subparsers.add_parser(
        "train-sr",
        help="train / fine-tune RGT super-resolution (L1 on bicubic- or VAE-degraded video frames)",
        description="Train RGT on (LR, HR) crops of video frames from a folder of videos or a JSON video list, LR made "
        "by --degradation, from scratch (--model_config) or from RGT_x2.pth (--pretrained). --config takes an options "
        "file (JSON or YAML, or a run's options.json); flags given on the command line replace its values. See "
        "docs/training_frames.md.",
    )
    _generate_options(p, "train-sr", lambda: _import("opensora_plan.train.sr", "SRTrainOptions"))
    p.set_defaults(func=_run_train_sr)


def _run_train_sr(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.train import sr

    summary = sr.train_sr(options_from_args(sr.SRTrainOptions, args))
    return _report_training(summary)


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
    _generate_options(p, "eval-vae", lambda: _import("opensora_plan.pipelines.evaluate_vae", "EvalVAEOptions"))
    p.set_defaults(func=_run_eval_vae)


def _run_eval_vae(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.pipelines.evaluate_vae import EvalVAEOptions, evaluate_vae

    options = options_from_args(EvalVAEOptions, args)
    summary = evaluate_vae(options)
    print(summary.table())
    if options.json_out:
        print(f"wrote {options.json_out}")
    return 0 if summary.scores else 1


def _add_eval_t2v(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-t2v",
        help="CLIP score and FVD of a folder of generated videos (e.g. what 'sample' wrote)",
        description="Score generated videos with the standard protocols (docs/evaluation.md): CLIP score "
        "(frame-wise 100*max(cos, 0) against the prompt, local transformers CLIP) and FVD (Kinetics-400 I3D "
        "logits of 16-frame clips at 224 px, Fréchet distance to a real set). Prints a table, writes JSON.",
    )
    _generate_options(p, "eval-t2v", lambda: _import("opensora_plan.pipelines.evaluate_t2v", "EvalT2VOptions"))
    p.set_defaults(func=_run_eval_t2v)


def _run_eval_t2v(args) -> int:
    from opensora_plan.options import options_from_args
    from opensora_plan.pipelines.evaluate_t2v import EvalT2VOptions, evaluate_t2v

    summary = evaluate_t2v(options_from_args(EvalT2VOptions, args))
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
    _generate_options(q, "convert", lambda: _import("opensora_plan.models.causalvae.inflate", "InflateOptions"))
    q.set_defaults(func=_run_inflate_2d_vae)


def _run_inflate_2d_vae(args) -> int:
    from opensora_plan.models.causalvae.inflate import InflateOptions, compare_with_2d, inflate_2d_vae, synthetic_image
    from opensora_plan.options import options_from_args

    o = options_from_args(InflateOptions, args)
    config = None
    if o.model_config:
        if not os.path.isfile(o.model_config):
            raise FileNotFoundError(f"--model_config {o.model_config} does not exist; give a CausalVAE config.json.")
        from opensora_plan.utils import read_json_file

        config = read_json_file(o.model_config, "--model_config")
    model, report = inflate_2d_vae(o.vae_2d_path, o.output_dir, causal_config=config, subfolder=o.subfolder)
    print(report.summary())
    print(f"wrote {o.output_dir}")
    if o.verify_size:
        from diffusers import AutoencoderKL

        folder = os.path.join(o.vae_2d_path, o.subfolder) if o.subfolder else o.vae_2d_path
        vae_2d = AutoencoderKL.from_pretrained(folder).eval()
        frames = 1 + 2 * model.temporal_compression  # 9 for the release layout
        result = compare_with_2d(vae_2d, model, synthetic_image(o.verify_size), num_frames=frames)
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
    _generate_options(m, "demo", lambda: _import("opensora_plan.demo.shapes", "MakeDataOptions"))
    m.set_defaults(func=_run_demo_make_data)

    t = sub.add_parser("train", help="train the demo model end to end (data, T5, train-vae, extract, train-t2v)",
                       description="Run the demo recipe into --out; the model lands in <out>/model/ and the wall "
                       "time of each stage and the machine in <out>/demo_train_report.json.")
    _generate_options(t, "demo", lambda: _import("opensora_plan.demo.train", "DemoTrainOptions"))
    t.set_defaults(func=_run_demo_train)

    e = sub.add_parser("eval", help="sample prompts over the vocabulary and report colour/shape/direction accuracy")
    _generate_options(e, "demo", lambda: _import("opensora_plan.demo.evaluate", "DemoEvalOptions"))
    e.set_defaults(func=_run_demo_eval)


def _run_demo_make_data(args) -> int:
    from opensora_plan.demo.shapes import MakeDataOptions, make_dataset
    from opensora_plan.options import options_from_args
    from opensora_plan.utils import plural

    options = options_from_args(MakeDataOptions, args)
    path = make_dataset(options)
    print(f"wrote {plural(options.num_videos, 'video')} and {path}")
    return 0


def _run_demo_train(args) -> int:
    from opensora_plan.demo.train import DemoTrainOptions, train_demo
    from opensora_plan.options import options_from_args

    options = options_from_args(DemoTrainOptions, args)
    report = train_demo(options.out, options.recipe(), stages=tuple(options.stages))
    times = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    print(f"demo model in {report.get('model_dir', os.path.join(options.out, 'model'))} ({times})")
    return 0


def _run_demo_eval(args) -> int:
    from opensora_plan.demo.evaluate import DemoEvalOptions, evaluate_demo, select_prompts, write_report
    from opensora_plan.options import options_from_args

    o = options_from_args(DemoEvalOptions, args)
    report = evaluate_demo(o.model_path, prompts=select_prompts(o.num_prompts, o.colours, o.shapes),
                           seeds=tuple(o.seeds), num_sampling_steps=o.num_sampling_steps,
                           guidance_scale=o.guidance_scale, sample_method=o.sample_method, device=o.device,
                           save_dir=o.save_dir, cache=o.cache, lora=o.lora, lora_scale=o.lora_scale,
                           interpolate=o.interpolate, upscale=o.upscale, interpolate_model=o.interpolate_model,
                           upscale_model=o.upscale_model, overwrite=o.overwrite)
    print(report.table())
    if o.json_out:
        write_report(report, o.json_out)
        print(f"wrote {o.json_out}")
    return 0


# --------------------------------------------------------------------------------------------


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``argv``, only the command it names gets its options (imports stay lazy)."""
    global _WANTED
    _WANTED = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    parser = argparse.ArgumentParser(
        prog="opensora-plan",
        description="Open-Sora-Plan v1.0.0 text-to-video: sampling, reconstruction, training.",
        allow_abbrev=False,  # --max_train 1 is not --max_train_steps 1 (every sub-parser inherits the class below)
    )
    from opensora_plan import __version__

    parser.add_argument("--version", action="version", version=f"opensora-plan {__version__}",
                        help="print the package version and exit")
    _log_flags(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, add in sorted(globals().items()):
        if name.startswith("_add_") and callable(add):
            add(subparsers)
    _log_flags_after_commands(subparsers)
    return parser


class _Parser(argparse.ArgumentParser):
    """Sub-command parsers: no abbreviated flags; their own sub-commands are made of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", _Parser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str):
        """A bad flag or value: two short lines (a pointer to ``--help``, then the error), not argparse's full
        usage block, which runs to 30 lines for ``sample``. Exit status 2, as argparse."""
        self.exit(2, f"usage: {self.prog} [options]; {self.prog} --help lists them\n{self.prog}: error: {message}\n")


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)sub-command parser that ``args`` went through (``data check`` -> its parser)."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, action.dest, None) if action is not None else None
        if chosen is None or chosen not in action.choices:
            return parser
        parser = action.choices[chosen]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, but unknown flags are reported by the sub-command's parser (its usage line)
    with the closest flag it has."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _command_parser(parser, args)
        flags = [s for a in command._actions for s in a.option_strings]
        first = unknown[0]
        close = difflib.get_close_matches(first.split("=")[0], flags, n=1, cutoff=0.75) if first.startswith("-") else []
        hint = f"; did you mean {close[0]}?" if close else f"; see {command.prog} --help"
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


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
# torch's CPU allocator asks for transparent huge pages for its large blocks: the lossless VAE decode allocates and
# frees chunk-sized tensors all the time, and 4 KiB page faults were a quarter of its time (docs/sampling.md,
# "Memory plan"). Read by torch at the first allocation; a value in the environment wins.
_OPENMP_DEFAULTS["THP_MEM_ALLOC_ENABLE"] = "1"


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


def _route_dependency_noise(heavy: bool, quiet: bool) -> None:
    """One log format, one line per real problem: Python warnings (without their source line) and the
    diffusers / transformers loggers (which print through their own handlers) go through ``logging``,
    and a repeated warning is shown once; ``quiet`` also hides their progress bars (weight loading).
    ``heavy``: the command imports diffusers anyway."""
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
            if quiet:
                library.disable_progress_bar()


# The modules a command imports on every successful run (beyond torch / diffusers / transformers' start-up),
# imported inside the quick start below when the process runs that one command: 0.3-0.4 s of CPU less per demo
# sample, for a bad-input error that comes that much later (still one line, before any model loads).
_STACKS = {"sample": ("opensora_plan.pipelines.pipeline_opensora_plan", "opensora_plan.models.causalvae",
                      "transformers.models.t5.modeling_t5", "opensora_plan.data.video_io", "bs4", "ftfy")}


@contextlib.contextmanager
def _quick_start(active: bool):
    """The process's start-up (parsing, importing torch / diffusers / transformers) without the cyclic garbage
    collector, then ``gc.freeze()``: those imports make about 450,000 long-lived objects and next to no garbage,
    and the collector's passes over that growing heap were a quarter of the demo sample's CPU time
    (docs/distill.md, "Measured on the demo"); frozen, they are skipped by every later collection too (the one
    that frees T5 after encoding). ``active`` False (a caller passed ``argv`` to :func:`main`, e.g. a test): the
    caller's collector is left as it is."""
    if not active or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _one_line(err: Exception) -> str:
    """The error's message; an OSError straight from the system (``[Errno 13] Permission denied: 'x'``) becomes
    a sentence that names the path."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror and err.filename is not None:
        other = f" -> {err.filename2}" if err.filename2 else ""
        return (f"{err.filename}{other}: {err.strerror[0].lower()}{err.strerror[1:]} (the system refused this path); "
                "check the path and that you may read or write there.")
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0 done, 1 user error, 2 no command, 130 Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a crash: one line and the shell's exit code
        if os.environ.get("OPENSORA_PLAN_DEBUG"):
            raise
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    for name, value in _OPENMP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    fresh = argv is None  # the process's own command line (not a caller's argv, e.g. a test's)
    with _quick_start(active=fresh):
        argv = sys.argv[1:] if fresh else list(argv)
        parser = build_parser(argv)
        args = _parse(parser, argv)
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
        _route_dependency_noise(heavy=args.command != "data", quiet=args.quiet)
        if fresh:  # the command's own stack is imported inside the quick start too
            import importlib

            for module in _STACKS.get(args.command, ()):
                with contextlib.suppress(ImportError):  # a missing extra is the command's to report, in one line
                    importlib.import_module(module)
    if args.verbose:
        import torch

        for name in ("PIL", "matplotlib", "urllib3", "filelock", "fsspec", "httpx", "h5py"):
            logging.getLogger(name).setLevel(logging.INFO)  # their DEBUG chatter is not about this run
        logger.debug("opensora-plan %s: %s", args.command, {k: v for k, v in sorted(vars(args).items())
                                                            if k not in ("func", "verbose", "quiet")})
        logger.debug("torch %s, %d threads, OMP_NUM_THREADS=%s, cuda available: %s", torch.__version__,
                     torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS", "unset"), torch.cuda.is_available())
    from opensora_plan.utils import PROGRESS_ENV, MissingExtraError, NonFiniteError, OutOfMemory

    # -q hides every progress bar: ours (utils.progress_bar) and the libraries' (tqdm reads TQDM_DISABLE).
    # Each torchrun process parses -q itself; the variable is restored afterwards for callers of main().
    saved = os.environ.get(PROGRESS_ENV)
    if args.quiet:
        os.environ[PROGRESS_ENV] = "1"
    try:
        return int(args.func(args) or 0)
    except (UserError, OSError, ValueError, NonFiniteError, MissingExtraError, OutOfMemory) as err:  # OSError: a path refused
        if os.environ.get("OPENSORA_PLAN_DEBUG"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if args.quiet:
            if saved is None:
                os.environ.pop(PROGRESS_ENV, None)
            else:
                os.environ[PROGRESS_ENV] = saved


if __name__ == "__main__":
    sys.exit(main())
