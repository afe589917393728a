"""Judge the shipped demo super-resolution model (``assets/demo/upscaler``): held-out PSNR, the demo judge, flicker.

(a) Held-out clips: renders ``--num_clips`` 17-frame 128x128 clips of the demo's world (every colour, shape and
    direction cycled, random start, size and speed as ``demo make-data`` draws them, but from ``--seed``, which
    no training or validation set used), makes the 64 px input with the training degradation (antialiased
    bicubic, rounded to 8 bits: ``data.frames.bicubic_degradation``), upscales it x2 with ``upscale_frames`` and
    with plain bicubic (``F.interpolate``, rounded), and prints PSNR and SSIM of both against the true 128 px
    render, and the gain. Per frame (uint8 / 255, RGB, whole frame), averaged over the frames of all clips.
    The same for a 64 px input that also went through the demo's CausalVAE (encode -> decode, each frame alone:
    ``data.frames.vae_degradation``, ``train-sr --degradation vae``), the kind of frame the T2V demo decodes.
(b) The demo judge: samples the shipped text-to-video demo on the 60 prompts (seed 0, noise seeded as
    ``demo eval`` does; ``demo.evaluate.evaluate_demo`` writes each mp4), then upscales every video read back
    from its mp4 (64 -> 128 px) with the model and with bicubic, writes each to mp4, reads it back (the path a
    user's video takes) and judges all three: accuracy of colour / shape / direction / clean background / all;
    also the shape accuracy of the upscaled videos area-downscaled back to 64 px, and every video whose shape
    reading changes with its fill ratios (the judge's shape measure).
(c) Flicker of (b)'s videos: mean absolute change between consecutive frames (uint8 levels, frames as read back
    from the mp4 files), averaged over the videos, for the model's and bicubic's 128 px videos (and the 64 px
    originals). The object moves, so the figure is never 0; what matters is the model against bicubic.

Examples:
  OMP_NUM_THREADS=1 python benchmarks/demo_upscale.py                  # 60 clips, 60 prompts
  OMP_NUM_THREADS=1 python benchmarks/demo_upscale.py --num_clips 12 --num_prompts 12
  python benchmarks/demo_upscale.py --model_path runs/sr/checkpoint-1800/ema   # another RGT folder
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opensora_plan.data.frames import bicubic_degradation, vae_degradation
from opensora_plan.data.video_io import read_video, write_video
from opensora_plan.demo.evaluate import ATTRIBUTES, evaluate_demo, select_prompts
from opensora_plan.demo.judge import judge_video
from opensora_plan.demo.shapes import COLOURS, DIRECTIONS, SHAPES, parse_caption, random_clip, render
from opensora_plan.metrics import psnr, ssim
from opensora_plan.models.rgt import load_rgt
from opensora_plan.pipelines.model_folder import default_model_path, stage_model, vae_folder
from opensora_plan.pipelines.reconstruct import load_vae
from opensora_plan.pipelines.upscale import upscale_frames

HELD_OUT_SEED = 2026  # training clips: make-data --seed 1, validation clips: --seed 1001


def bicubic_up(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> uint8 ``(T, sH, sW, 3)``: plain bicubic (torch, a = -0.75), clamped and rounded."""
    x = frames.permute(0, 3, 1, 2).float() / 255
    y = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    return (y.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _as_float(frames: torch.Tensor) -> torch.Tensor:
    return frames.permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)


def held_out_psnr(model, num_clips: int, seed: int, num_frames: int = 17, size: int = 128, vae=None) -> dict:
    """PSNR / SSIM of the model's and bicubic's x2 upscales against the true render; the 64 px input made by
    ``bicubic_degradation``, or by ``vae_degradation`` with ``vae`` when it is given."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    scale = int(model.upscale)
    values = {k: [] for k in ("model_psnr", "bicubic_psnr", "model_ssim", "bicubic_ssim")}
    for i in range(num_clips):
        clip = random_clip(rng, *combos[i % len(combos)], size)
        truth = torch.from_numpy(render(clip, num_frames, size))  # (T, H, W, 3) uint8
        hr = _as_float(truth)
        low = bicubic_degradation(hr, scale) if vae is None else vae_degradation(hr, scale, vae=vae)  # 8-bit levels
        low = (low * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        target = _as_float(truth)
        for name, out in (("model", upscale_frames(model, low, batch_size=4, progress=False)),
                          ("bicubic", bicubic_up(low, scale))):
            values[f"{name}_psnr"].append(psnr(_as_float(out), target, reduction="none"))
            values[f"{name}_ssim"].append(ssim(_as_float(out), target, reduction="none"))
    r = {k: torch.cat(v) for k, v in values.items()}
    return {"clips": num_clips, "frames": len(r["model_psnr"]), **{k: v.mean().item() for k, v in r.items()},
            "model_median": r["model_psnr"].median().item(), "bicubic_median": r["bicubic_psnr"].median().item(),
            "model_wins": (r["model_psnr"] > r["bicubic_psnr"]).float().mean().item()}


def flicker(frames: torch.Tensor) -> float:
    """Mean absolute change between consecutive uint8 frames (levels)."""
    return (frames[1:].float() - frames[:-1].float()).abs().mean().item()


def judge_before_after(model, prompts: list[str], seed: int) -> dict:
    """Accuracy of the demo's sampled videos as sampled and after x2 upscaling (model, bicubic), mp4 round trips;
    the flicker figure of each."""
    scale = int(model.upscale)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = evaluate_demo(prompts=prompts, seeds=(seed,), save_dir=Path(tmp) / "sampled", progress=False)
        sample_seconds = time.perf_counter() - start
        verdicts = {"model": [], "bicubic": [], "model@64": [], "bicubic@64": []}
        flickers = {"sampled": [], "model": [], "bicubic": []}
        changed = []  # videos whose shape reading differs from the sampled video's
        seconds = 0.0
        for video in report.videos:
            frames, fps = read_video(video["file"])  # (17, 64, 64, 3) uint8, as the user's file holds it
            flickers["sampled"].append(flicker(frames))
            before = judge_video(frames.numpy())
            fills = {}
            start = time.perf_counter()
            up = upscale_frames(model, frames, batch_size=4, progress=False)
            seconds += time.perf_counter() - start
            for name, out in (("model", up), ("bicubic", bicubic_up(frames, scale))):
                path = write_video(Path(tmp) / name / Path(video["file"]).name, out, fps=fps)
                back = read_video(path)[0]
                flickers[name].append(flicker(back))
                verdict = judge_video(back.numpy())
                verdicts[name].append(verdict.matches(*parse_caption(video["prompt"])))
                # the same video judged at the demo's size: area-downscaled back to 64 px
                down = F.avg_pool2d(_as_float(back), scale) * 255
                small = down.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                verdicts[f"{name}@64"].append(judge_video(small).matches(*parse_caption(video["prompt"])))
                if verdict.shape != before.shape:
                    fills[name] = f"{verdict.shape} ({verdict.fill_ratio:.3f})"
            if fills:
                changed.append(f"{video['prompt']}: sampled {before.shape} ({before.fill_ratio:.3f}), "
                               + ", ".join(f"{k} {v}" for k, v in fills.items()))
    accuracy = {"sampled": report.accuracy()}
    for name, found in verdicts.items():
        n = len(found)
        accuracy[name] = {a: sum(v[a] for v in found) / n for a in ATTRIBUTES}
        accuracy[name]["all"] = sum(all(v.values()) for v in found) / n
    return {"accuracy": accuracy, "flicker": {k: float(np.mean(v)) for k, v in flickers.items()}, "changed": changed,
            "sample_seconds": sample_seconds, "upscale_seconds": seconds, "videos": len(report.videos)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="RGT folder or file (default: the shipped demo's stage)")
    parser.add_argument("--num_clips", type=int, default=60, help="held-out clips for (a); 0 skips (a)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="seed of the held-out clips")
    parser.add_argument("--num_prompts", type=int, default=60, help="prompts for (b) and (c); 0 skips them")
    parser.add_argument("--sample_seed", type=int, default=0, help="demo eval seed of the sampled videos")
    args = parser.parse_args()
    model_path = stage_model("upscale", args.model_path)
    model = load_rgt(model_path, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    print(f"model {model_path} (x{model.upscale}, {params:,} parameters); "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    if args.num_clips:
        vae = load_vae(vae_folder(default_model_path()))
        for label, degradation in (("bicubic-down to 64 px (antialiased, 8-bit)", None),
                                   ("bicubic-down to 64 px, then through the demo VAE (encode -> decode)", vae)):
            start = time.perf_counter()
            r = held_out_psnr(model, args.num_clips, args.seed, vae=degradation)
            print(f"\n(a) held-out clips: {r['clips']} x 17 frames 128x128 (seed {args.seed}), {label}, upscaled x2: "
                  f"{r['frames']} frames ({time.perf_counter() - start:.1f} s)")
            print("| x2 upscale vs true 128 px render | mean PSNR (dB) | median PSNR (dB) | mean SSIM |")
            print("|---|---|---|---|")
            name = "shipped demo model" if args.model_path is None else args.model_path
            print(f"| RGT ({name}) | {r['model_psnr']:.2f} | {r['model_median']:.2f} | "
                  f"{r['model_ssim']:.4f} |")
            print(f"| bicubic | {r['bicubic_psnr']:.2f} | {r['bicubic_median']:.2f} | {r['bicubic_ssim']:.4f} |")
            gain = r["model_psnr"] - r["bicubic_psnr"]
            print(f"| gain | **{gain:+.2f}** | {r['model_median'] - r['bicubic_median']:+.2f} | "
                  f"{r['model_ssim'] - r['bicubic_ssim']:+.4f} |")
            target = f"; target: gain >= +2 dB ({'met' if gain >= 2 else 'NOT met'})" if degradation is None else ""
            print(f"model better than bicubic on {r['model_wins']:.1%} of the frames{target}")
    if args.num_prompts:
        prompts = select_prompts(args.num_prompts)
        r = judge_before_after(model, prompts, args.sample_seed)
        acc = r["accuracy"]
        print(f"\n(b) demo judge: {r['videos']} videos ({len(prompts)} prompts x seed {args.sample_seed}, shipped T2V "
              f"demo defaults, 64x64) vs the same videos upscaled x2 to 128x128; sampling {r['sample_seconds']:.0f} s, "
              f"RGT upscaling {r['upscale_seconds']:.1f} s")
        print("| attribute | sampled (64 px) | RGT x2 (128 px) | bicubic x2 (128 px) |")
        print("|---|---|---|---|")
        for name in (*ATTRIBUTES, "all"):
            label = {"background": "background clean", "all": "all four"}.get(name, name)
            print(f"| {label} | {acc['sampled'][name]:.1%} | {acc['model'][name]:.1%} | {acc['bicubic'][name]:.1%} |")
        print(f"| shape, judged after area-downscaling back to 64 px | {acc['sampled']['shape']:.1%} | "
              f"{acc['model@64']['shape']:.1%} | {acc['bicubic@64']['shape']:.1%} |")
        for line in r["changed"]:
            print(f"shape read differently after upscaling (fill ratio): {line}")
        equal = all(acc["model"][a] >= acc["sampled"][a] for a in ("colour", "shape", "direction"))
        print(f"colour / shape / direction at the un-upscaled accuracy: {'yes' if equal else 'NO'}")
        f = r["flicker"]
        print("\n(c) flicker: mean |frame[t+1] - frame[t]| (8-bit levels) of the same videos, read back from mp4")
        print("| videos | flicker |")
        print("|---|---|")
        print(f"| sampled (64 px) | {f['sampled']:.3f} |")
        print(f"| RGT x2 (128 px) | {f['model']:.3f} |")
        print(f"| bicubic x2 (128 px) | {f['bicubic']:.3f} |")
        print(f"RGT / bicubic: {f['model'] / f['bicubic']:.3f} (target: <= 1, "
              f"{'met' if f['model'] <= f['bicubic'] else 'NOT met'})")


if __name__ == "__main__":
    main()
