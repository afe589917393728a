"""Judge the shipped demo interpolation model (``assets/demo/interpolation``): held-out PSNR and the demo judge.

(a) Held-out clips: renders ``--num_clips`` 33-frame 64x64 clips of the demo's world (every colour, shape and
    direction cycled, random start, size and speed as ``demo make-data`` draws them, but from ``--seed``, which
    no training or validation set used), drops every other frame (17 frames left), interpolates them back with
    ``interpolate_video(..., factor=2)`` and prints the PSNR of the 16 predicted frames of each clip against the
    true ones, next to the PSNR of the linear blend of the two neighbours ((f[i-1] + f[i+1]) / 2), and the gain.
    PSNR is per frame (uint8 frames / 255), averaged over the frames of all clips. The same clips are then
    measured once more through yuv420p mp4 files (inputs and truth), as a user's mp4 would be.
(b) The demo judge: samples the shipped text-to-video demo on the 60 prompts (seed 0, noise seeded as
    ``demo eval`` does; ``demo.evaluate.evaluate_demo`` writes each mp4), then interpolates every video read back
    from its mp4 (17 -> 33 frames, written to mp4 and read back, the path a user's video takes) and judges both:
    accuracy of colour / shape / direction / clean background / all four, side by side.

Examples:
  OMP_NUM_THREADS=1 python benchmarks/demo_interpolation.py                  # 60 clips, 60 prompts
  OMP_NUM_THREADS=1 python benchmarks/demo_interpolation.py --num_clips 12 --num_prompts 12
  python benchmarks/demo_interpolation.py --model_path runs/amt/checkpoint-5000/ema   # another AMT folder
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

from opensora_plan.data.video_io import read_video, write_video
from opensora_plan.demo.evaluate import ATTRIBUTES, evaluate_demo, select_prompts
from opensora_plan.demo.judge import judge_video
from opensora_plan.demo.shapes import COLOURS, DIRECTIONS, SHAPES, parse_caption, random_clip, render
from opensora_plan.metrics import psnr
from opensora_plan.pipelines.interpolate import interpolate_video, load_interpolation_model
from opensora_plan.pipelines.model_folder import stage_model

HELD_OUT_SEED = 2026  # training clips: make-data --seed 1, validation clips: --seed 1001


def _mp4_round_trip(frames: torch.Tensor, folder: Path) -> torch.Tensor:
    """The frames as an H.264 yuv420p mp4 (write_video's default, what `sample` writes) reads them back."""
    return read_video(write_video(folder / "clip.mp4", frames, fps=8))[0]


def held_out_psnr(model, num_clips: int, seed: int, num_frames: int = 33, size: int = 64, mp4: bool = False) -> dict:
    """PSNR (dB) of the interpolated odd frames and of the neighbours' blend against the rendered truth.

    ``mp4``: the kept frames and the truth each go through a yuv420p mp4 first (halved colour resolution)."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    model_values, blend_values = [], []
    folder = Path(tempfile.mkdtemp())
    for i in range(num_clips):
        clip = random_clip(rng, *combos[i % len(combos)], size)
        truth = torch.from_numpy(render(clip, num_frames, size))  # (T, H, W, 3) uint8
        kept = truth[::2]  # (T // 2 + 1, H, W, 3): every other frame dropped
        if mp4:
            truth, kept = _mp4_round_trip(truth, folder), _mp4_round_trip(kept, folder)
        out = interpolate_video(model, kept, factor=2, progress=False)  # (T, H, W, 3) uint8, rounded
        target = truth[1::2].float() / 255
        predicted = out[1::2].float() / 255
        blend = (kept[:-1].float() + kept[1:].float()) / 2 / 255
        model_values.append(psnr(predicted, target, reduction="none"))
        blend_values.append(psnr(blend, target, reduction="none"))
    model_psnr, blend_psnr = torch.cat(model_values), torch.cat(blend_values)
    return {"clips": num_clips, "frames": len(model_psnr), "model": model_psnr.mean().item(),
            "blend": blend_psnr.mean().item(), "model_median": model_psnr.median().item(),
            "blend_median": blend_psnr.median().item(),
            "model_wins": (model_psnr > blend_psnr).float().mean().item()}


def judge_before_after(model, prompts: list[str], seed: int) -> tuple[dict, dict, float, float]:
    """Accuracy of the demo's sampled videos as sampled and after 2x interpolation (mp4 round trips)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = evaluate_demo(prompts=prompts, seeds=(seed,), save_dir=Path(tmp) / "sampled", progress=False)
        sample_seconds = time.perf_counter() - start
        start = time.perf_counter()
        after = []
        for video in report.videos:
            frames, fps = read_video(video["file"])  # (17, H, W, 3) uint8, as the user's file holds it
            out = interpolate_video(model, frames, factor=2, progress=False)
            path = write_video(Path(tmp) / "x2" / Path(video["file"]).name, out, fps=fps * 2)
            verdict = judge_video(read_video(path)[0].numpy())
            after.append(verdict.matches(*parse_caption(video["prompt"])))
            changed = [a for a in ATTRIBUTES if after[-1][a] != video["correct"][a]]
            if changed:  # name every video whose verdict interpolation changed
                was = video["judged"]
                print(f"  {video['prompt']!r}: {', '.join(changed)} changed; judged {was['colour']}/{was['shape']}/"
                      f"{was['direction']} as sampled, {verdict.colour}/{verdict.shape}/{verdict.direction} "
                      f"(background clean: {verdict.background_clean}) after x2")
        interpolate_seconds = time.perf_counter() - start
    n = len(after)
    after_acc = {a: sum(v[a] for v in after) / n for a in ATTRIBUTES}
    after_acc["all"] = sum(all(v.values()) for v in after) / n
    return report.accuracy(), after_acc, sample_seconds, interpolate_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="AMT folder or file (default: the shipped demo's stage)")
    parser.add_argument("--num_clips", type=int, default=60, help="held-out clips for (a); 0 skips (a)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="seed of the held-out clips")
    parser.add_argument("--num_prompts", type=int, default=60, help="prompts for (b); 0 skips (b)")
    parser.add_argument("--sample_seed", type=int, default=0, help="demo eval seed of the sampled videos")
    args = parser.parse_args()
    model_path = stage_model("interpolate", args.model_path)
    model = load_interpolation_model(model_path, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    print(f"model {model_path} ({params:,} parameters); {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.num_clips:
        start = time.perf_counter()
        r = held_out_psnr(model, args.num_clips, args.seed)
        print(f"\n(a) held-out clips: {r['clips']} x 33 frames 64x64 (seed {args.seed}), every other frame dropped "
              f"and interpolated back: {r['frames']} predicted frames ({time.perf_counter() - start:.1f} s)")
        print("| predicted frames vs truth | mean PSNR (dB) | median PSNR (dB) |")
        print("|---|---|---|")
        print(f"| AMT (shipped demo model) | {r['model']:.2f} | {r['model_median']:.2f} |")
        print(f"| blend of the two neighbours | {r['blend']:.2f} | {r['blend_median']:.2f} |")
        print(f"| gain | **{r['model'] - r['blend']:+.2f}** | {r['model_median'] - r['blend_median']:+.2f} |")
        print(f"model better than the blend on {r['model_wins']:.1%} of the frames; target: gain >= +3 dB "
              f"({'met' if r['model'] - r['blend'] >= 3 else 'NOT met'})")
        m = held_out_psnr(model, args.num_clips, args.seed, mp4=True)
        print(f"the same clips through yuv420p mp4 files (kept frames and truth each written and read back): "
              f"AMT {m['model']:.2f} dB, blend {m['blend']:.2f} dB, gain {m['model'] - m['blend']:+.2f} dB")
    if args.num_prompts:
        prompts = select_prompts(args.num_prompts)
        before, after, sample_s, interp_s = judge_before_after(model, prompts, args.sample_seed)
        print(f"\n(b) demo judge: {len(prompts)} prompts x seed {args.sample_seed}, shipped T2V demo defaults "
              f"(17 frames) vs the same videos interpolated 2x (33 frames); sampling {sample_s:.0f} s, "
              f"interpolation + judging {interp_s:.1f} s")
        print("| attribute | sampled (17 frames) | interpolated x2 (33 frames) |")
        print("|---|---|---|")
        for name in (*ATTRIBUTES, "all"):
            label = {"background": "background clean", "all": "all four"}.get(name, name)
            print(f"| {label} | {before[name]:.1%} | {after[name]:.1%} |")
        equal = all(after[a] >= before[a] for a in ("colour", "shape", "direction"))
        print(f"colour / shape / direction at the uninterpolated accuracy: {'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
