"""Peak memory and time per frame pair of AMT-G interpolation, with and without the chunked correlation.

Each (size, chunk) case runs in a fresh subprocess (so peaks do not carry over): AMT-G with random weights
(the timing and memory do not depend on the values), one pair of random size x size frames, t = 0.5,
float32, no grad. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, else the growth of the
process's peak RSS over its RSS before the first forward (ru_maxrss). Time is the median over --repeats
forwards after one warm-up (on the CPU, with as many threads as OMP_NUM_THREADS / --threads).

Example:
  OMP_NUM_THREADS=1 python benchmarks/interpolate.py --sizes 256 512 1024 --chunks 0 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(size: int, chunk: int, repeats: int, device: str, threads: int) -> dict:
    import resource

    import torch

    from opensora_plan.models.amt import build_amt

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_amt("AMT-G").eval().to(device)
    model.set_correlation_chunk(chunk or None)
    img0, img1 = torch.rand(2, 1, 3, size, size, device=device)
    times = []
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mib()
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(img0, img1, 0.5)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first call is a warm-up
                times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"size": size, "chunk": chunk, "peak_mib": peak, "seconds": statistics.median(times), "runs": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="square frame sides")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1024],
                        help="correlation chunk sizes in 1/8-size source pixels (0: the whole volume)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per case (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        size, chunk = map(int, args.case.split(","))
        print(json.dumps(run_case(size, chunk, args.repeats, args.device, args.threads)))
        return
    print(f"AMT-G, one pair per forward, float32, device {args.device}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'size':>6} {'chunk':>7} {'1/8 px':>7} {'peak MiB':>9} {'s / pair':>9}")
    for size in args.sizes:
        for chunk in args.chunks:
            out = subprocess.run([sys.executable, __file__, "--case", f"{size},{chunk}", "--repeats",
                                  str(args.repeats), "--device", args.device, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"{size:>6} {chunk or 'whole':>7}  failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{size:>6} {chunk or 'whole':>7} {(size // 8) ** 2:>7} {r['peak_mib']:>9.0f} {r['seconds']:>9.2f}",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
