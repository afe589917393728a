"""Temporal-chunked CausalVAE decoding: error vs the full decode, peak memory, time.

Prints a markdown table. Every configuration runs in a fresh subprocess so that its peak RSS
(``resource.getrusage(...).ru_maxrss``) belongs to that decode alone; the reported memory is the peak
minus the RSS just before ``decode`` (model weights and inputs excluded). Workers run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that large tensors are mmap-allocated and released immediately.

    python benchmarks/causalvae_chunking.py                       # release architecture, random weights
    python benchmarks/causalvae_chunking.py --tiny-fixture DIR    # the tiny parity-fixture model instead

Error metrics compare with the full (un-chunked) decode of the same latents: max |diff| and PSNR with
the full decode's value range as peak (random-weight outputs are not confined to [-1, 1]).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only).")


def _build(args):
    from opensora_plan.models.causalvae import CausalVAEModel

    torch.manual_seed(args.seed)
    if args.tiny_fixture:
        from safetensors.torch import load_file

        folder = Path(args.tiny_fixture)
        vae = CausalVAEModel.from_config(json.loads((folder / "causalvae_tiny_config" / "config.json").read_text()))
        vae.load_state_dict(load_file(str(folder / "causalvae_tiny_weights.safetensors")))
    else:
        vae = CausalVAEModel()  # constructor defaults = the release config
        # Same recipe as the parity fixtures: default init, then noise on biases and norm weights so
        # that no layer is an exact identity/zero.
        with torch.no_grad():
            for name, p in vae.named_parameters():
                if name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.02)
                elif p.ndim == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    return vae.eval().to(args.dtype_t)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    vae = _build(args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    z = torch.randn(1, vae.config.embed_dim, args.latent_frames, args.latent_size, args.latent_size, generator=gen)
    z = z.to(args.dtype_t)
    if args.chunk:
        vae.enable_temporal_chunking(args.chunk, args.context)
    before = _rss_kib()
    start = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(z).sample
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    torch.save(out.float(), args.out)
    print(json.dumps({"seconds": seconds, "peak_delta_mib": (peak - before) / 1024, "before_mib": before / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-frames", type=int, default=17, help="latent frames t (17 = 65 pixel frames)")
    parser.add_argument("--latent-size", type=int, default=8, help="latent height = width")
    parser.add_argument("--configs", default="4:4,4:8,2:2,1:1,1:4",
                        help="comma-separated chunk:context pairs (latent frames) to compare with the full decode")
    parser.add_argument("--tiny-fixture", default=None, help="fixtures folder: use the tiny parity model instead")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype_t = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.worker:
        worker(args)
        return

    runs = [(0, 0)] + [tuple(int(v) for v in pair.split(":")) for pair in args.configs.split(",") if pair]
    common = [f"--latent-frames={args.latent_frames}", f"--latent-size={args.latent_size}", f"--dtype={args.dtype}",
              f"--threads={args.threads}", f"--seed={args.seed}"]
    if args.tiny_fixture:
        common.append(f"--tiny-fixture={args.tiny_fixture}")
    # A fixed glibc mmap threshold sends every large tensor to mmap, so freed memory leaves the RSS at
    # once and the peak RSS tracks live tensors rather than allocator fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for chunk, context in runs:
            out = os.path.join(tmp, f"{chunk}_{context}.pt")
            proc = subprocess.run([sys.executable, __file__, "--worker", f"--chunk={chunk}", f"--context={context}",
                                   f"--out={out}", *common], capture_output=True, text=True, check=True, env=env)
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(chunk, context)] = (stats, torch.load(out))
            print(f"done chunk={chunk} context={context}: {stats}", file=sys.stderr)

    full_stats, full = results[(0, 0)]
    peak = full.max() - full.min()
    model = "tiny fixture model" if args.tiny_fixture else "release architecture, random weights"
    print(f"\n{model}; latents 1x4x{args.latent_frames}x{args.latent_size}x{args.latent_size} -> "
          f"output {tuple(full.shape)}, {args.dtype}, {args.threads} threads; full-decode value range {peak:.3f}\n")
    print("| chunk | context | max abs err | PSNR (dB) | decode peak RSS (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for (chunk, context), (stats, out) in results.items():
        if chunk == 0:
            err, psnr = "0", "inf"
        else:
            diff = out - full
            err = f"{diff.abs().max():.4f}"
            psnr = f"{10 * torch.log10(peak**2 / diff.pow(2).mean()):.2f}"
        label = ("full", "-") if chunk == 0 else (str(chunk), str(context))
        print(f"| {label[0]} | {label[1]} | {err} | {psnr} | {stats['peak_delta_mib']:.0f} | {stats['seconds']:.1f} |")


if __name__ == "__main__":
    main()
