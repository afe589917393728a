"""x2 super-resolution of real footage: RGT models against bicubic on a held-out clip (PSNR, SSIM, flicker).

The held-out clip's first ``--frames`` frames (cropped to multiples of 2) are the truth; the input is the
training degradation of them (antialiased bicubic, 8-bit: ``data.frames.bicubic_degradation``); each model
upscales it x2 with ``upscale_frames`` (whole frames) and plain bicubic (``F.interpolate``, rounded) is the
baseline. Per frame PSNR / SSIM (uint8 / 255, RGB, whole frame) against the truth, averaged; flicker = mean
|frame[t+1] - frame[t]| in 8-bit levels (the truth's own figure is printed too: the clip moves, so what
matters is how close each upscale is to the truth's).

    OMP_NUM_THREADS=1 python benchmarks/upscale_real_footage.py bikes.mp4 --model demo=<shipped> real=run/checkpoint-600/ema
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from opensora_plan.data.frames import bicubic_degradation
from opensora_plan.data.video_io import VideoReader
from opensora_plan.metrics import psnr, ssim
from opensora_plan.models.rgt import load_rgt
from opensora_plan.pipelines.model_folder import stage_model
from opensora_plan.pipelines.upscale import upscale_frames


def flicker(frames: torch.Tensor) -> float:
    """Mean absolute change between consecutive uint8 frames (levels)."""
    return (frames[1:].float() - frames[:-1].float()).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", help="the held-out clip (the truth)")
    parser.add_argument("--model", nargs="+", default=["demo="], metavar="NAME=PATH",
                        help="RGT models to judge (an empty PATH: the shipped demo upscaler)")
    parser.add_argument("--frames", type=int, default=50, help="first N frames of the clip")
    args = parser.parse_args()
    with VideoReader(args.video) as reader:
        truth = reader.get_frames(range(min(args.frames, reader.num_frames)))  # (T, H, W, 3) uint8
    truth = truth[:, : truth.shape[1] // 2 * 2, : truth.shape[2] // 2 * 2].contiguous()
    hr = truth.permute(0, 3, 1, 2).float() / 255
    low = (bicubic_degradation(hr, 2) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    print(f"{args.video}: {truth.shape[0]} frames {truth.shape[2]}x{truth.shape[1]}, input "
          f"{low.shape[2]}x{low.shape[1]}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    outputs = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        model = load_rgt(path or stage_model("upscale", None), device="cpu")
        start = time.perf_counter()
        outputs[name] = upscale_frames(model, low, batch_size=1, progress=False)
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{(time.perf_counter() - start) / len(low):.2f} s/frame")
    x = low.permute(0, 3, 1, 2).float() / 255
    up = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    outputs["bicubic"] = (up * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    print("| x2 upscale vs truth | mean PSNR (dB) | mean SSIM | flicker (levels) |")
    print("|---|---|---|---|")
    for name, out in outputs.items():
        y = out.permute(0, 3, 1, 2).float() / 255
        print(f"| {name} | {psnr(y, hr).item():.2f} | {ssim(y, hr).item():.4f} | {flicker(out):.3f} |")
    print(f"| truth | | | {flicker(truth):.3f} |")


if __name__ == "__main__":
    main()
