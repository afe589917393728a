"""The sampling loop side by side: this project's pipeline vs the official v1.0.0 ``VideoGenPipeline``.

Same workload in both (the one of ``../shared/reference/bench/perf_run.py``, grown into a sampling
loop): LatteT2V width 384 x 4 layers at 5x32x32 latents (17x256x256 video), 40 caption tokens of
width 512, classifier-free guidance 7.5 (transformer batch 2), DDIM 10 steps from fixed latents,
``output_type="latent"`` (the VAE is not timed here: see ``benchmarks/vae.py``). Rows: float32, and
bfloat16 autocast. The figure is the median seconds per denoising step (loop time / steps) over
``--repeat`` loops after one warm-up loop, and the same in process CPU seconds (steadier when the
two cores are shared).

Usage (from the repository root, the project's venv active; the official code's environment is
built by ``../shared/reference/bench/refenv.sh``)::

    eval "$(bash ../shared/reference/bench/refenv.sh)"
    REF_PY=$REF_PY REF_TREE=$REF_TREE python benchmarks/sample_vs_reference.py

It alternates official / ours ``--rounds`` times in fresh processes and prints ours/ref per row.
``python benchmarks/sample_vs_reference.py --run`` times whichever ``opensora_plan`` is importable
(the official code through ``refshim`` when ``PYTHONPATH`` points there) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("OPENSORA_PLAN_REFERENCE", ROOT.parent / "shared" / "reference")) / "bench"
CONFIGS = BENCH.parent / "manifests" / "checkpoint_configs"


def run(args) -> dict:
    """Time the loop with whichever implementation ``opensora_plan`` resolves to."""
    import torch
    from diffusers import DDIMScheduler

    from opensora_plan.models import CausalVAEModel, LatteT2V
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    torch.set_num_threads(args.threads)
    cfg = json.loads((CONFIGS / "17x256x256" / "config.json").read_text())
    cfg.update(num_layers=4, num_attention_heads=6, attention_head_dim=64, caption_channels=512,
               cross_attention_dim=384)
    torch.manual_seed(0)
    transformer = LatteT2V.from_config(cfg).eval()
    vae = CausalVAEModel.from_config(json.loads((CONFIGS / "vae" / "config.json").read_text())).eval()
    scheduler = DDIMScheduler(clip_sample=False)
    pipe = OpenSoraPlanPipeline(vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=None, tokenizer=None)
    if hasattr(pipe, "set_progress_bar_config"):  # the refshim wrapper disables its own
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 5, 32, 32, generator=generator)
    cond = torch.randn(1, 40, 512, generator=generator)
    uncond = torch.randn(1, 40, 512, generator=generator)

    def loop():
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(), num_frames=17, height=256, width=256,
             num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent")

    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loop()
            walls, cpus = [], []
            for _ in range(args.repeat):
                w0, c0 = time.perf_counter(), time.process_time()
                loop()
                walls.append((time.perf_counter() - w0) / args.steps)
                cpus.append((time.process_time() - c0) / args.steps)
        out[f"step_{name}"] = statistics.median(walls)
        out[f"step_{name}_cpu"] = statistics.median(cpus)
    return out


def compare(args) -> None:
    ref_py, ref_tree = os.environ.get("REF_PY"), os.environ.get("REF_TREE")
    if not (ref_py and ref_tree and Path(ref_py).exists() and Path(ref_tree).is_dir()):
        sys.exit(f'error: set REF_PY and REF_TREE (eval "$(bash {BENCH / "refenv.sh"})") to compare with the official code')
    me = [__file__, "--run", "--steps", str(args.steps), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    ref_env = dict(os.environ, PYTHONPATH=str(BENCH / "refshim"), REF_TREE=ref_tree)
    ours_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    refs, ours = [], []
    for _ in range(args.rounds):
        for python, env, sink in ((ref_py, ref_env, refs), (sys.executable, ours_env, ours)):
            done = subprocess.run([python, *me], env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"error: {python} failed:\n{done.stderr[-2000:]}")
            sink.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"# denoising step, seconds (median of {args.rounds} rounds x {args.repeat} loops of {args.steps} DDIM steps, "
          f"{args.threads} threads)")
    print("| row | reference | ours | ours/ref |\n|---|---|---|---|")
    for key in refs[0]:
        ratio = statistics.median(o[key] / r[key] for o, r in zip(ours, refs))
        print(f"| {key} | {statistics.median(r[key] for r in refs):.3f} | {statistics.median(o[key] for o in ours):.3f} "
              f"| {ratio:.2f} |")
    with open("/proc/loadavg") as f:
        print(f"load average: {' '.join(f.read().split()[:3])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="time the importable implementation, print JSON")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run(args)))
    else:
        compare(args)


if __name__ == "__main__":
    main()
