"""RGT x2 upscaling: peak memory and time per frame, tiled vs untiled; seam PSNRs; a flicker figure.

Full-size RGT (the released x2 configuration, 13.2M parameters) with random weights, float32, CPU unless
``--device cuda``. Every configuration runs in a fresh subprocess so its peak memory belongs to that
forward alone: on CPU the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after the model is
built) minus the RSS before the forward; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
before. Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so large tensors are released immediately.

    python benchmarks/upscale.py                              # 256->512 and 512->1024 (slow on CPU)
    python benchmarks/upscale.py --sizes 64 128 --threads 1   # what fits a shared 2-core machine

Prints a markdown table, then seam figures: PSNR of the blended tiles vs the whole-frame output, and of the
official hard-paste tiling (``use_chop``) vs the same. ``--flicker N`` adds the temporal-stability figure:
the mean absolute change between consecutive output frames of an N-frame slow pan (1 px per frame), for
RGT and for bicubic upscaling. With random weights the flicker figure shows the mechanism, not the quality
of the released model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only).")


def smooth_frame(size: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: low-frequency colour waves and a soft disc, panned right by ``shift`` px."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.rand(3, 2, generator=g) * 6 + 1
    phase = torch.rand(3, generator=g) * 6.28
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    xx = xx - shift / (size - 1)  # exactly ``shift`` pixels
    waves = [0.5 + 0.3 * torch.sin(freq[c, 0] * 3.14 * xx + freq[c, 1] * 3.14 * yy + phase[c]) for c in range(3)]
    disc = torch.sigmoid((0.2 - ((xx - 0.5) ** 2 + (yy - 0.45) ** 2).sqrt()) * 60)
    return torch.stack([w * (1 - 0.6 * disc) + 0.6 * disc for w in waves])[None].clamp(0, 1)


def build(seed: int, device: str):
    from opensora_plan.models.rgt import build_rgt

    torch.manual_seed(seed)
    model = build_rgt("RGT-x2").eval()
    # The parity-fixture recipe (fixtures README): noise on biases and 1-D weights, Linear weights at
    # std fan_in^-1/2, so attention and position bias matter as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)
            elif p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(m.weight.shape[1] ** -0.5 / 0.02)
    return model.to(device)


def worker(args) -> None:
    """One measurement: prints a JSON line {seconds, peak_mib}; saves the output when --save is given."""
    from opensora_plan.pipelines.upscale import upscale_official_chop, upscale_tensor

    torch.set_num_threads(args.threads)
    model = build(args.seed, args.device)
    x = smooth_frame(args.size).to(args.device)
    with torch.no_grad():
        model(smooth_frame(32).to(args.device))  # warm-up (kernels, allocator)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    with torch.no_grad():
        if args.mode == "whole":
            out = model(x)
        elif args.mode == "chop":
            out = upscale_official_chop(model, x)
        else:
            out = upscale_tensor(model, x, args.tile, args.overlap)
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_kib("VmHWM") * 1024 - before
    seconds = time.perf_counter() - start
    if args.save:
        torch.save(out.cpu(), args.save)
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 2**20}))


def run_worker(args, mode: str, size: int, save: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--size", str(size), "--tile", str(args.tile),
           "--overlap", str(args.overlap), "--threads", str(args.threads), "--seed", str(args.seed),
           "--device", args.device] + (["--save", save] if save else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"worker {mode} {size} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def flicker(args) -> None:
    from opensora_plan.pipelines.upscale import upscale_tensor

    torch.set_num_threads(args.threads)
    model = build(args.seed, args.device)
    frames = torch.cat([smooth_frame(args.flicker_size, shift=t) for t in range(args.flicker)]).to(args.device)
    with torch.no_grad():
        ours = torch.cat([upscale_tensor(model, f[None]) for f in frames]).clamp(0, 1)
    bicubic = F.interpolate(frames, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)

    def change(video, step: int = 0):
        """Mean |frame t+1 - frame t| in 8-bit levels; with ``step``, after undoing the pan (step px/frame)."""
        later, earlier = video[1:], video[:-1]
        if step:  # content moved right by ``step`` px: compare each pixel with where it came from
            later, earlier = later[..., 8 + step:-8], earlier[..., 8:-8 - step]
        return (later - earlier).abs().mean().item() * 255

    print(f"\nFlicker: {args.flicker}-frame pan of a {args.flicker_size}px frame by 1 px/frame; mean |frame t+1 - "
          "frame t| in 8-bit levels, raw and motion-compensated (pan undone, 8 px borders dropped). Random weights: "
          "the mechanism, not the released model's stability.")
    print("| | input | bicubic x2 | RGT x2 |\n|---|---|---|---|")
    print(f"| raw | {change(frames):.3f} | {change(bicubic):.3f} | {change(ours):.3f} |")
    print(f"| motion-compensated | {change(frames, 1):.3f} | {change(bicubic, 2):.3f} | {change(ours, 2):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[256, 512], help="input sides (x2 output); none: skip")
    p.add_argument("--tile", type=int, default=192, help="tile side of the tiled runs (input px)")
    p.add_argument("--overlap", type=int, default=48, help="tile overlap (input px)")
    p.add_argument("--modes", nargs="+", default=["whole", "blend", "chop"], choices=["whole", "blend", "chop"],
                   help="untiled, blended tiles, official hard paste (whole is always run: the PSNR reference)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--flicker", type=int, default=0, help="frames of the flicker pan (0: skip)")
    p.add_argument("--flicker-size", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="whole", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import tempfile

    from opensora_plan.metrics import psnr

    load = os.getloadavg()[0]
    print(f"RGT x2 (full size, random weights), float32, {args.device}, {args.threads} thread(s), "
          f"load average {load:.2f} at start, torch {torch.__version__}")
    print("\n| input -> output | mode | s / frame | peak MiB (excl. weights) | PSNR vs whole frame |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results = {}
            for mode in ("whole", "blend", "chop"):
                if (mode == "blend" and size <= args.tile) or (mode != "whole" and mode not in args.modes):
                    continue
                path = os.path.join(tmp, f"{mode}{size}.pt")
                results[mode] = run_worker(args, mode, size, path)
                out = torch.load(path).clamp(0, 1)
                if mode == "whole":
                    whole = out
                label = {"whole": "untiled", "blend": f"blended tiles {args.tile}/{args.overlap}",
                         "chop": "official hard paste (use_chop)"}[mode]
                quality = "-" if mode == "whole" else f"{psnr(out, whole).item():.2f} dB"
                print(f"| {size} -> {2 * size} | {label} | {results[mode]['seconds']:.2f} | "
                      f"{results[mode]['peak_mib']:.0f} | {quality} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    if args.flicker:
        flicker(args)


if __name__ == "__main__":
    main()
