"""The shipped demo's distilled student against its teacher: end-to-end ``sample`` CPU time, and where it goes.

(a) ``opensora-plan sample PROMPT`` (today's default: the shipped teacher, EulerAncestralDiscrete 50 steps,
    guidance 3 = batch 2) and ``sample PROMPT --model_path <demo>/student`` (LCM, its own steps, batch 1), each a
    fresh process, alternating, ``--repeat`` times; CPU time (user + sys of the child) and wall time.
    With ``--baseline_src DIR`` (the ``src`` folder of an earlier checkout, e.g. ``git archive <commit> src | tar
    -x``), both commands also run from that code, in the same alternation: the before/after of a start-up change.
(b) The same two samplings in one process, phase by phase (process CPU time): loading the models, T5 encoding,
    the denoising loop, the VAE decode, writing the mp4; and the import of the sampling stack measured in a
    fresh process (``python -c "import opensora_plan.pipelines.sample_t2v, ...pipeline_opensora_plan"``).

Usage (1 thread, as the docs' numbers)::

    OMP_NUM_THREADS=1 python benchmarks/distill_demo.py --repeat 3 --json distill_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle moving left"


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(argv: list[str], src: str | None = None) -> tuple[float, float]:
    """``(cpu seconds, wall seconds)`` of one ``python -m opensora_plan ...`` process; ``src``: run that source tree
    (PYTHONPATH) instead of the installed one."""
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    before, start = _child_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "opensora_plan", *argv], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=env)
    return _child_cpu() - before, time.perf_counter() - start


def end_to_end(student: Path, repeat: int, baseline_src: str | None = None) -> dict:
    variants = [("teacher", [], None), ("student", ["--model_path", str(student)], None)]
    if baseline_src:
        variants += [(f"{name}_before", extra, baseline_src) for name, extra, _ in variants]
    runs = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for name, extra, src in variants:
                cpu, wall = run_cli(["sample", PROMPT, *extra, "--save_img_path", f"{tmp}/{name}{i}", "-q"], src)
                runs[name].append({"cpu_s": cpu, "wall_s": wall})
                print(json.dumps({"run": name, "cpu_s": round(cpu, 3), "wall_s": round(wall, 2)}), flush=True)
    median = {name: statistics.median(r["cpu_s"] for r in rows) for name, rows in runs.items()}
    median_wall = {name: statistics.median(r["wall_s"] for r in rows) for name, rows in runs.items()}
    result = {"runs": runs, "median_cpu_s": median, "median_wall_s": median_wall,
              "cpu_speedup": median["teacher"] / median["student"]}
    if baseline_src:  # the ratio: the student against the default command as it was before
        result["cpu_speedup_vs_teacher_before"] = median["teacher_before"] / median["student"]
    return result


def phases(student: Path | None, repeat: int) -> dict:
    """Process CPU seconds per phase of one video (median of ``repeat``), for the teacher (None) or a student."""
    import torch

    from opensora_plan.data.video_io import write_video
    from opensora_plan.demo.evaluate import load_demo_pipeline

    load_demo_pipeline(student, device="cpu")  # the first load imports the stack: measured by import_cpu()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            t0 = time.process_time()
            pipe, info = load_demo_pipeline(student, device="cpu")
            pipe.set_progress_bar_config(disable=True)
            t1 = time.process_time()
            scale = info["guidance_scale"]
            embeds, negative = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=scale > 1.0)
            t2 = time.process_time()
            latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative,
                           num_inference_steps=info["num_sampling_steps"], guidance_scale=scale,
                           generator=torch.Generator().manual_seed(i), output_type="latent").frames
            t3 = time.process_time()
            video = pipe.decode_latents(latents)[0]
            t4 = time.process_time()
            write_video(Path(tmp) / f"{i}.mp4", video, fps=8)
            t5 = time.process_time()
            rows.append({"load": t1 - t0, "t5": t2 - t1, "denoise": t3 - t2, "vae_decode": t4 - t3, "write": t5 - t4})
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]} | {
        "sample_method": info["sample_method"], "steps": info["num_sampling_steps"], "guidance_scale": scale}


def import_cpu() -> float:
    """CPU seconds of importing the sampling stack in a fresh process the way ``sample`` starts (opensora_plan/cli.py,
    ``_quick_start``: the libraries it routes the logs of, then the command's modules, without the cyclic GC)."""
    code = ("import importlib\nfrom opensora_plan import cli\nwith cli._quick_start(True):\n"
            "    for m in ('diffusers.utils.logging', 'transformers.utils.logging', 'opensora_plan.pipelines.sample_t2v', "
            "*cli._STACKS['sample']):\n        importlib.import_module(m)")
    before = _child_cpu()
    subprocess.run([sys.executable, "-c", code], check=True)
    return _child_cpu() - before


def main() -> None:
    from opensora_plan.demo.model import default_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=str(default_model_path() / "student"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--baseline_src", default=None, help="an earlier checkout's src folder: also run its commands")
    args = parser.parse_args()
    student = Path(args.student)
    result = {"threads": os.environ.get("OMP_NUM_THREADS"), "load_before": os.getloadavg(),
              "end_to_end": end_to_end(student, args.repeat, args.baseline_src),
              "import_cpu_s": statistics.median(import_cpu() for _ in range(args.repeat))}
    teacher_phases, student_phases = phases(None, args.repeat), phases(student, args.repeat)
    result.update(phases={"teacher": teacher_phases, "student": student_phases},
                  denoise_speedup=teacher_phases["denoise"] / student_phases["denoise"], load_after=os.getloadavg())
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
