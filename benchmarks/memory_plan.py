"""Measure the memory plan on this machine: ``opensora-plan sample`` at full size under ``--memory_gb`` budgets.

For each budget the command runs as a child process (``-v``); a thread reads its ``RssAnon`` (anonymous resident
memory: the weights files that are memory-mapped while loading are not counted, the models and activations are)
from ``/proc/<pid>/status`` every 50 ms, and the log lines mark the stages: loading T5 + encoding, loading the
transformer (ends with the plan's line), denoising, VAE decode, writing. Prints and writes (``--json``) per budget:
the plan line, peak anonymous RSS per stage and overall, seconds per stage, user / system CPU seconds, and
compares the videos of the budgets with each other (lossless plans must agree).

Weights: ``benchmarks/release_weights.py`` (random, release layouts). Usage (about 30-60 min per budget at
65x512x512 on 2 cores; run through /work/heavy on the shared machine)::

    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --root /work/scratch-mem --memory_gb 12 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

MARKERS = [("load T5 + encode", "Encoded "), ("load transformer", "Memory plan for"),
           ("denoise", "Denoising loop:"), ("decode", "VAE decode done"), ("write", "wrote ")]


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_for_memory(gib: float) -> None:
    """Wait until the machine has ``gib`` GiB available (it is shared with other jobs)."""
    while True:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
        if available >= gib:
            return
        print(f"waiting: {available:.1f} GiB available, {gib:g} GiB needed", flush=True)
        time.sleep(30)


def run_budget(args, memory_gb: float) -> dict:
    wait_for_memory(memory_gb + 3)
    out = args.root / f"mem_out_{memory_gb:g}"
    command = [sys.executable, "-m", "opensora_plan", "-v", "sample", args.prompt, "--model_path",
               str(args.root / "Open-Sora-Plan-v1.0.0"), "--version", args.version, "--text_encoder_name",
               str(args.root / "t5-v1_1-xxl"), "--dtype", "bf16", "--sample_method", "DDIM", "--num_sampling_steps",
               str(args.steps), "--memory_gb", f"{memory_gb:g}", "--save_img_path", str(out), *args.extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            samples.append((time.perf_counter() - start, rss_anon(child.pid)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    marks, plan_line, log = {}, None, []
    for line in child.stdout:
        now = time.perf_counter() - start
        log.append(line.rstrip())
        for stage, text in MARKERS:
            if text in line and stage not in marks:
                marks[stage] = now
        if "Memory plan for" in line:
            plan_line = line.split(": ", 1)[-1].strip()
    child.wait()
    done.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.perf_counter() - start
    if child.returncode != 0:
        print("\n".join(log[-30:]))
        raise SystemExit(f"budget {memory_gb:g}: the sample command failed ({child.returncode})")
    stages, previous = {}, 0.0
    for stage, _ in MARKERS:
        end = marks.get(stage, total)
        peak = max((rss for t, rss in samples if previous <= t <= end), default=0)
        stages[stage] = {"seconds": round(end - previous, 1), "peak_anon_gib": round(peak / 2**30, 2)}
        previous = end
    return {"memory_gb": memory_gb, "plan": plan_line, "stages": stages,
            "peak_anon_gib": round(max(rss for _, rss in samples) / 2**30, 2), "seconds": round(total, 1),
            "user_s": round(after.ru_utime - before.ru_utime, 1), "system_s": round(after.ru_stime - before.ru_stime, 1),
            "video": str(next(out.glob("*.mp4"))), "log_tail": log[-12:]}


def compare(videos: list[str]) -> list[dict]:
    import torch

    from opensora_plan.data.video_io import read_video

    first = read_video(videos[0])[0].float()
    rows = []
    for other in videos[1:]:
        frames = read_video(other)[0].float()
        mse = float(((frames - first) ** 2).mean())
        rows.append({"a": videos[0], "b": other, "max_abs_diff": float((frames - first).abs().max()),
                     "psnr_db": float("inf") if mse == 0 else round(10 * torch.log10(torch.tensor(255**2 / mse)).item(), 2),
                     "same_file_bytes": Path(videos[0]).read_bytes() == Path(other).read_bytes()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/work/scratch-mem"))
    parser.add_argument("--memory_gb", type=float, nargs="+", default=[12.0, 16.0])
    parser.add_argument("--version", default="65x512x512")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--prompt", default="a dog running on the beach at sunset")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sample flags")
    args = parser.parse_args()
    results = []
    for memory_gb in args.memory_gb:
        result = run_budget(args, memory_gb)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"runs": results}, indent=1))
    comparison = compare([r["video"] for r in results]) if len(results) > 1 else []
    print(json.dumps(comparison, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "comparison": comparison, "uptime": os.getloadavg()},
                                        indent=1))


if __name__ == "__main__":
    main()
