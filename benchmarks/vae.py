"""CausalVAE encode/decode speed and peak memory, full-size release architecture (random weights).

Every (size, dtype, mode, phase) case runs in a fresh Python subprocess, so its peak memory is its own:
on CPU the peak resident set size (``VmHWM``, reset just before the timed call through
``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated``. Each row also shows the
memory already in use before the call (weights, input, runtime), so the difference is what the call
itself needs. Times: wall clock, and (extra column) the process's CPU time, which on a machine shared
with other jobs is the fairer comparison when ``--threads 1``.

Modes:
  full                encode and decode the whole clip at once (the reference behaviour)
  tiling              spatial tiling as in the reference (``enable_tiling``; only acts on frames larger
                      than ``--tile_size`` px, 256 by default like the reference)
  lossless            decode ``--chunk`` latent frames at a time, streamed stage by stage with exact
                      GroupNorm statistics (``enable_temporal_chunking(mode="lossless")``; equals the
                      full decode). Stage outputs wait on ``--offload`` (default cpu).
  approximate         decode ``--chunk`` latent frames at a time with ``--context`` frames of context
                      (``mode="approximate"``, GroupNorm per chunk)
  tiling+lossless, tiling+approximate   both (decode only)
Temporal chunking leaves the encode unchanged, so chunked modes measure only the decode. Each decode
row also reports the max |difference| to the full decode of the same latents when ``--compare`` is
given (the full decode then runs in the same process, after the measured call).

Examples:
  python benchmarks/vae.py                                       # CPU table, 17 and 65 frames at 256 px
  python benchmarks/vae.py --sizes 17x256x256 --dtypes bf16 --modes full,lossless --repeat 3
  python benchmarks/vae.py --device cuda --sizes 65x512x512,65x256x256 --dtypes bf16,fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("full", "tiling", "lossless", "approximate", "tiling+lossless", "tiling+approximate")
ENCODE_MODES = ("full", "tiling")  # chunking only changes the decode


# --------------------------------------------------------------------------------------------
# Worker (one case, one phase, in its own process)
# --------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(case: dict) -> dict:
    import torch

    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.utils import parse_dtype

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device, dtype = torch.device(case["device"]), parse_dtype(case["dtype"])
    torch.manual_seed(0)
    if case["model_path"]:
        vae = CausalVAEModel.from_pretrained(case["model_path"], torch_dtype=dtype, device=device)
    elif case["config"]:
        with open(case["config"]) as f:
            vae = CausalVAEModel.from_config(json.load(f)).to(device=device, dtype=dtype)
    else:
        vae = CausalVAEModel().to(device=device, dtype=dtype)  # constructor defaults = release config
    vae.eval()
    mode = case["mode"]
    if "tiling" in mode:
        vae.enable_tiling()
        vae.tile_sample_min_size = case["tile_size"]
        vae.tile_latent_min_size = case["tile_size"] // vae.spatial_compression
    if "lossless" in mode:
        offload = None if case["offload"] == "none" else case["offload"]
        vae.enable_temporal_chunking(case["chunk"], mode="lossless", offload_device=offload)
    elif "approximate" in mode:
        vae.enable_temporal_chunking(case["chunk"], case["context"], mode="approximate")

    frames, height, width = case["size"]
    if case["phase"] == "encode":
        inputs = torch.rand(1, 3, frames, height, width, device=device).mul(2).sub(1).to(dtype)
        call = lambda: vae.encode(inputs).latent_dist.mode()  # noqa: E731
    else:
        t = 1 + (frames - 1) // vae.temporal_compression
        h, w = height // vae.spatial_compression, width // vae.spatial_compression
        inputs = torch.randn(1, vae.config.embed_dim, t, h, w, device=device, dtype=dtype)
        call = lambda: vae.decode(inputs).sample  # noqa: E731

    cuda = device.type == "cuda"
    times, cpu_times, peaks = [], [], []
    with torch.inference_mode():
        for _ in range(case["warmup"]):
            call()
        for _ in range(case["repeat"]):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                before = _rss_kib("VmRSS") * 1024
                if not _reset_peak_rss():
                    raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); Linux is needed")
            start, cpu_start = time.perf_counter(), time.process_time()
            out = call()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            peaks.append(torch.cuda.max_memory_allocated(device) if cuda else _rss_kib("VmHWM") * 1024)
        result = {"seconds": times, "cpu_seconds": cpu_times, "peak_bytes": max(peaks), "before_bytes": before}
        if case["compare"] and case["phase"] == "decode" and mode != "full":
            vae.disable_tiling()
            vae.disable_temporal_chunking()
            if "tiling" in mode:  # compare with the tiled decode: chunking is what is being checked
                vae.enable_tiling()
            result["max_abs_diff"] = float((out.float() - call().float()).abs().max())
        if case["phase"] == "decode" and "tiling" not in mode:
            from opensora_plan.models.causalvae.model import estimate_decode_memory

            est_mode = "lossless" if mode == "lossless" else "full" if mode == "full" else None
            if est_mode:
                result["estimate_bytes"] = estimate_decode_memory(
                    vae, tuple(inputs.shape), dtype, est_mode, case["chunk"],
                    None if case["offload"] == "none" else case["offload"])
    return result


def _worker_main(case_json: str) -> None:
    case = json.loads(case_json)
    if case["mem_limit_gib"] and case["device"] == "cpu":
        # Bound the case so that an oversized one fails cleanly ("can't allocate memory") instead of
        # pushing a shared machine into swap or the OOM killer.
        limit = int(case["mem_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        result = run_case(case)
    except (RuntimeError, MemoryError) as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        oom = "allocate" in text or "out of memory" in text.lower() or isinstance(err, MemoryError)
        result = {"error": "out of memory" if oom else text[:120]}
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like FRAMESxHEIGHTxWIDTH, e.g. 17x256x256") from None
    return frames, height, width


def run_in_subprocess(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(case)]
    try:
        # Large tensors mmap-allocated, so that freed memory leaves the RSS at once (fair peaks on CPU).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:100]}"}


def fmt_cell(result: dict | None) -> tuple[str, str]:
    if result is None:
        return "-", "-"
    if "error" in result:
        return result["error"], "-"
    seconds = statistics.median(result["seconds"])
    peak, before = result["peak_bytes"] / 2**30, result["before_bytes"] / 2**30
    return f"{seconds:.2f}", f"{peak:.2f} (+{peak - before:.2f})"


def fmt_extra(result: dict | None) -> str:
    """Estimated decode memory (GiB) and max |diff| to the unchunked decode, where measured."""
    if not result or "error" in result:
        return ""
    parts = [f"cpu {statistics.median(result['cpu_seconds']):.1f}s"] if "cpu_seconds" in result else []
    if "estimate_bytes" in result:
        parts.append(f"est +{result['estimate_bytes'] / 2**30:.2f}")
    if "max_abs_diff" in result:
        parts.append(f"maxdiff {result['max_abs_diff']:.2e}")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated FRAMESxHxW (default: 17x256x256,65x256x256 on CPU, plus 65x512x512 on CUDA)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated fp32,bf16,fp16 (default fp32,bf16)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {','.join(MODES)}")
    parser.add_argument("--phases", default="encode,decode", help="encode,decode (default both)")
    parser.add_argument("--repeat", type=int, default=1, help="timed calls per case; the median is shown (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 0 on CPU, 1 on CUDA)")
    parser.add_argument("--tile_size", type=int, default=256, help="tile size in pixels for tiling (default 256 = reference)")
    parser.add_argument("--chunk", type=int, default=4, help="latent frames per decode chunk (default 4)")
    parser.add_argument("--context", type=int, default=2, help="approximate: context latent frames per chunk (default 2)")
    parser.add_argument("--offload", default="cpu", help="lossless: where stage outputs wait, cpu | cuda | none (default cpu)")
    parser.add_argument("--compare", action="store_true", help="also report max |diff| of chunked/tiled decodes to the unchunked one")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is stopped (default 1800)")
    parser.add_argument("--mem_limit_gib", type=float, default=16, help="CPU: data-size limit per case in GiB (0: none)")
    parser.add_argument("--model_path", default=None, help="benchmark a real VAE folder instead of random weights")
    parser.add_argument("--config", default=None, help="random weights for this config.json instead of the release one")
    parser.add_argument("--json", default=None, help="also write all raw results to this JSON file")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        _worker_main(args._worker)
        return 0

    cuda = args.device.startswith("cuda")
    sizes = args.sizes or ("17x256x256,65x256x256,65x512x512" if cuda else "17x256x256,65x256x256")
    sizes = [parse_size(s) for s in sizes.split(",")]
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    phases = args.phases.split(",")
    warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)

    header = f"{'size':>11} {'dtype':>5} {'mode':>18} | {'encode s':>9} {'enc peak GiB':>16} | {'decode s':>9} {'dec peak GiB':>16}"
    model = (f"weights {args.model_path}" if args.model_path
             else f"config {args.config}, random weights" if args.config else "release architecture, random weights")
    print(f"CausalVAE ({model}), "
          f"device {args.device}, tile {args.tile_size}px, chunk {args.chunk} latent frames "
          f"(approximate: +{args.context} context; lossless: offload {args.offload}), "
          f"median of {args.repeat}; peak memory shown as total (+ the call's own)", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for size in sizes:
        for dtype in args.dtypes.split(","):
            for mode in modes:
                row = {"size": "x".join(map(str, size)), "dtype": dtype, "mode": mode}
                for phase in ("encode", "decode"):
                    if phase not in phases or (phase == "encode" and mode not in ENCODE_MODES):
                        row[phase] = None
                        continue
                    case = dict(size=size, dtype=dtype, mode=mode, phase=phase, device=args.device,
                                repeat=args.repeat, warmup=warmup, tile_size=args.tile_size, chunk=args.chunk,
                                context=args.context, offload=args.offload, compare=args.compare, threads=args.threads, mem_limit_gib=args.mem_limit_gib,
                                model_path=args.model_path, config=args.config)
                    row[phase] = run_in_subprocess(case, args.timeout)
                enc_s, enc_mem = fmt_cell(row["encode"])
                dec_s, dec_mem = fmt_cell(row["decode"])
                print(f"{row['size']:>11} {dtype:>5} {mode:>18} | {enc_s:>9} {enc_mem:>16} | {dec_s:>9} {dec_mem:>16}"
                      f"  {fmt_extra(row['decode'])}", flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
