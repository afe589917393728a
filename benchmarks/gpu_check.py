"""The one prepared GPU check (fast-sampling issue, part 4): random full-size weights, one script.

Prints and writes (``--json``) for the 65x512x512 version (LatteT2V-XL/122 at full depth, bf16,
PyTorch's SDPA kernel choice, i.e. flash on CUDA):

1. the denoising loop per step (CFG batch 2, 300 caption tokens, DDIM): eager, ``--cache fast``
   (TeaCache 0.1, with the share of steps whose blocks were skipped), compiled blocks (warm-up timed
   on its own), compiled + cached; and a distilled student (``opensora-plan distill``): seconds per video
   with LCM in 4 steps at batch 1 against the 250 guided steps of the release recipe;
2. the CausalVAE decode of the same clip (1, 4, 17, 64, 64) latents: time and
   ``torch.cuda.max_memory_allocated`` for full / lossless chunks / approximate chunks / spatial tiling,
   through ``benchmarks/vae.py`` (one subprocess per mode, so each peak is its own).

Nothing is downloaded; the weights are random, so the cached rows say how much work is skipped, not
how good the video is (docs/sampling.md says how to check quality on released weights).

Usage on the GPU machine (about 5-8 minutes on an H100/H200)::

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json

and on a CPU, to check that the script runs (tiny sizes, 1 layer, a few steps; numbers meaningless)::

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def denoising_rows(args) -> list[dict]:
    """Per-step seconds of the sampling loop: eager, cached, compiled, compiled + cached."""
    import torch
    from diffusers import DDIMScheduler

    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.latte import LatteT2V, latte_config
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    device, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                "fp32": torch.float32}[args.dtype]
    frames, height, width = args.size
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    torch.manual_seed(0)
    config = latte_config("LatteT2V-XL/122", num_layers=args.layers, sample_size=[h, w], video_length=t)
    if args.smoke:  # a narrow model so a CPU finishes in seconds
        config.update(num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64, caption_channels=64)
    transformer = LatteT2V(**config).to(device=device, dtype=dtype).eval()
    vae = CausalVAEModel.from_config(json.loads(_vae_config(args).read_text())).eval()  # only its factors are used
    pipe = OpenSoraPlanPipeline(vae=vae, transformer=transformer, scheduler=DDIMScheduler(clip_sample=False),
                                text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, t, h, w, generator=generator).to(device, dtype)
    text = torch.randn(1, args.tokens, config["caption_channels"], generator=generator).to(device, dtype)
    negative = torch.randn(1, args.tokens, config["caption_channels"], generator=generator).to(device, dtype)

    def loop() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompt_embeds=text, negative_prompt_embeds=negative, latents=latents.clone(), num_frames=frames,
                 height=height, width=width, num_inference_steps=args.steps, guidance_scale=7.5,
                 output_type="latent")
        _sync(device)
        return (time.perf_counter() - start) / args.steps

    rows = []

    def record(name: str, cached: bool, warmup_s: float | None = None) -> None:
        step = min(loop() for _ in range(args.repeat))
        row = {"row": name, "step_s": step}
        if cached:
            row["skipped_fraction"] = pipe.cache_stats.skipped_fraction
        if warmup_s is not None:
            row["warmup_s"] = warmup_s
        rows.append(row)
        print(json.dumps(row), flush=True)

    loop()  # warm-up (cuDNN/cuBLAS heuristics, allocator)
    record("eager", cached=False)
    rows.append(student_row(pipe, latents, text, frames, height, width, rows[-1]["step_s"], args))
    print(json.dumps(rows[-1]), flush=True)
    pipe.enable_cache("teacache:0.1")
    record("eager + cache teacache 0.1", cached=True)
    pipe.disable_cache()
    transformer.compile_blocks()
    warmup = loop() * args.steps  # the first compiled loop: compilation + one loop
    record("compiled", cached=False, warmup_s=warmup)
    pipe.enable_cache("teacache:0.1")
    record("compiled + cache teacache 0.1", cached=True)
    return rows


def _vae_config(args) -> Path:
    """The release CausalVAE config (manifests), or the tiny fixture one for --smoke."""
    reference = ROOT / "tests" / "fixtures" / "reference"
    if args.smoke:
        return reference / "fixtures" / "causalvae_tiny_config" / "config.json"
    return reference / "manifests" / "checkpoint_configs" / "vae" / "config.json"


def vae_rows(args) -> list[dict]:
    """Decode rows through benchmarks/vae.py (its JSON), one mode per subprocess."""
    # beside --json, else in a temporary folder (never a stray file in the repository)
    out = Path(args.json).with_suffix(".vae.json") if args.json else Path(tempfile.mkdtemp()) / "gpu_check.vae.json"
    size = "x".join(map(str, args.size))
    command = [sys.executable, str(ROOT / "benchmarks" / "vae.py"), "--device", args.device, "--sizes", size,
               "--dtypes", args.dtype, "--modes", args.vae_modes, "--phases", "decode", "--chunk", "4",
               "--context", "2", "--timeout", str(args.vae_timeout), "--json", str(out)]
    if args.smoke:
        command += ["--config", str(_vae_config(args))]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, text=True)
    if done.returncode or not out.exists():
        return [{"row": "vae", "error": f"benchmarks/vae.py exited {done.returncode}"}]
    return json.loads(out.read_text())["rows"]


def student_row(pipe, latents, text, frames, height, width, teacher_step_s: float, args) -> dict:
    """A distilled student (``opensora-plan distill``, docs/distill.md): the same transformer sampled with LCM in
    ``--student_steps`` steps at guidance 1 (batch 1, no unconditional half); seconds per video against the
    release recipe's 250 guided steps (250 x the eager CFG step above). Random weights time a trained student
    exactly: the architecture is the teacher's."""
    import torch

    from opensora_plan.diffusion.schedulers import create_scheduler

    teacher_scheduler, pipe.scheduler = pipe.scheduler, create_scheduler("LCM")
    device = latents.device

    def video() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompt_embeds=text, latents=latents.clone(), num_frames=frames, height=height, width=width,
                 num_inference_steps=args.student_steps, guidance_scale=1.0, output_type="latent")
        _sync(device)
        return time.perf_counter() - start

    video()  # warm-up
    seconds = min(video() for _ in range(args.repeat))
    pipe.scheduler = teacher_scheduler
    teacher = 250 * teacher_step_s
    return {"row": f"distilled student: LCM {args.student_steps} steps, guidance 1 (batch 1), per video",
            "video_s": seconds, "teacher_250_steps_cfg_video_s": teacher, "speedup": teacher / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--size", default="65x512x512", help="FRAMESxHEIGHTxWIDTH of the video (default 65x512x512)")
    parser.add_argument("--layers", type=int, default=28, help="Latte layers (default 28, the release)")
    parser.add_argument("--tokens", type=int, default=300, help="caption tokens (default 300, the release maximum)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per timed loop (default 10)")
    parser.add_argument("--repeat", type=int, default=2, help="timed loops per row; the fastest is kept")
    parser.add_argument("--student_steps", type=int, default=4, help="LCM steps of the distilled-student row")
    parser.add_argument("--vae_modes", default="full,lossless,approximate,tiling")
    parser.add_argument("--vae_timeout", type=int, default=300, help="seconds per VAE case (default 300)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny sizes, numbers meaningless")
    parser.add_argument("--json", default=None, help="write the rows here (and the VAE rows beside it)")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.layers, args.tokens, args.steps, args.repeat = "9x64x64", 1, 8, 4, 1
    args.size = tuple(int(v) for v in args.size.split("x"))

    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result = {"device": device_name, "torch": torch.__version__, "size": args.size, "dtype": args.dtype,
              "layers": args.layers, "steps": args.steps, "denoising": denoising_rows(args), "vae": vae_rows(args)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
