"""Calibrate step caching on a demo model: speed of the denoising loop vs judged accuracy, side by side.

Runs ``opensora-plan demo eval`` (every prompt x seed, judged by the demo judge) once without a
cache and once per cache setting, all in this process with the same seeds, and prints one table:
denoising-loop seconds (wall and process CPU) and the speed-up over uncached in CPU time (the
steadier figure when the cores are shared; run with OMP_NUM_THREADS=1), the share of transformer forwards whose blocks
were skipped, judged accuracy (colour / shape / direction / background / all four) and the median
PSNR of each cached video against the uncached video of the same prompt and seed (decoded uint8
frames as written to mp4 and read back).

Examples:
  python benchmarks/cache_calibration.py                           # shipped demo, 60 prompts x 3 seeds
  python benchmarks/cache_calibration.py --num_prompts 12 --seeds 0 \\
      --settings teacache:0.05,teacache:0.1,first_block:0.05
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from opensora_plan.data.video_io import read_video
from opensora_plan.demo.evaluate import evaluate_demo, select_prompts
from opensora_plan.metrics import psnr


def parse_setting(text: str) -> tuple[str, dict]:
    """"teacache:0.1" -> ("teacache", {"threshold": 0.1}); "fast" and "none" as they are."""
    method, _, threshold = text.partition(":")
    return method, ({"threshold": float(threshold)} if threshold else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="demo model folder (default: the shipped one)")
    parser.add_argument("--num_prompts", type=int, default=None, help="first N prompts of the vocabulary (default all 60)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sample_method", default=None)
    parser.add_argument("--num_sampling_steps", type=int, default=None)
    parser.add_argument("--settings", default="fast", help="comma list of fast | METHOD:THRESHOLD")
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    prompts = select_prompts(args.num_prompts)
    common = dict(model_path=args.model_path, prompts=prompts, seeds=seeds, sample_method=args.sample_method,
                  num_sampling_steps=args.num_sampling_steps, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "none"
        base = evaluate_demo(save_dir=base_dir, **common)
        rows.append(("none", base, None, None))
        for text in args.settings.split(","):
            method, options = parse_setting(text)
            out_dir = Path(tmp) / text.replace(":", "_")
            report = evaluate_demo(save_dir=out_dir, cache=method, cache_options=options, **common)
            values = []
            for cached, exact in zip(report.videos, base.videos):
                a = read_video(cached["file"])[0].permute(0, 3, 1, 2).float() / 255  # (T, C, H, W)
                b = read_video(exact["file"])[0].permute(0, 3, 1, 2).float() / 255
                values.append(psnr(a, b).item())
            rows.append((text, report, statistics.median(values), report.settings["cache"]))
    print(f"# cache options: {'; '.join(f'{t} = {o}' for t, _, _, o in rows[1:])}")
    s = base.settings
    print(f"# {len(base.videos)} videos ({len(prompts)} prompts x {len(seeds)} seeds), {s['sample_method']} "
          f"{s['num_sampling_steps']} steps, guidance {s['guidance_scale']}, {torch.get_num_threads()} threads")
    print("| cache | denoise s (wall) | denoise s (CPU) | speed-up (CPU) | skipped | colour | shape | direction | "
          "background | all | median PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for text, report, median_psnr, _ in rows:
        acc = report.accuracy()
        skipped = report.settings.get("skipped_fraction")
        print(f"| {text} | {report.denoise_seconds:.1f} | {report.denoise_cpu_seconds:.1f} | "
              f"{base.denoise_cpu_seconds / report.denoise_cpu_seconds:.2f}x | "
              f"{'-' if skipped is None else f'{skipped:.0%}'} | "
              + " | ".join(f"{100 * acc[k]:.1f}" for k in ("colour", "shape", "direction", "background", "all"))
              + f" | {'-' if median_psnr is None else f'{median_psnr:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
