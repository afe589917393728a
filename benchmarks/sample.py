"""Text-to-video sampling speed: the demo's denoising loop (eager / compiled / cached), per-step LatteT2V
latency and peak memory at the released width, and end-to-end time.

0. ``loop`` (default on): the shipped demo model's sampling, side by side in one run: the
   denoising loop per step with PyTorch's plain ``F.linear`` kernels (what the reference runs),
   eager (this project's fused kernels), compiled blocks, the ``fast`` step cache, and compiled +
   cached; the compile warm-up; VAE decode time and peak memory; and the demo's end-to-end time
   (text encoding, denoising, decoding and writing the mp4, as ``opensora-plan sample`` does).

Random weights with the released architecture (LatteT2V-XL/122 width 1152, T5-XXL width 4096,
CausalVAE 4x8x8 release config); nothing is downloaded. Two parts:

1. ``step``: one denoising step = one transformer forward on the classifier-free-guidance batch
   (2 x (4, F, h, w) latents, ``--tokens`` caption tokens), for every version x dtype x attention
   backend (``default`` = PyTorch's SDPA choice, flash/memory-efficient kernels; ``math`` = the
   reference formula). Median of ``--repeat`` runs after one warm-up.
2. ``e2e``: the whole pipeline for one prompt (T5 encode, ``--e2e-steps`` DDIM steps, VAE decode),
   each phase timed, in one dtype per version.

On CUDA the full depth is used (28 Latte layers, 24 T5 layers) and memory is
``torch.cuda.max_memory_allocated``. On CPU the depth is reduced (``--layers 2``, ``--t5-layers 1``:
full width, so per-layer cost is real; multiply by 14 for the 28-layer model) and memory is the
process's peak resident set (VmHWM, reset before each case, includes the weights already loaded).

Examples:
  python benchmarks/sample.py --loop-only                            # the demo table only
  python benchmarks/sample.py                                        # CPU, reduced depth, 17x256x256
  python benchmarks/sample.py --versions 17x256x256,65x256x256 --dtypes fp32,bf16 --repeat 2
  python benchmarks/sample.py --device cuda --versions 17x256x256,65x256x256,65x512x512 --e2e
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

VERSIONS = {  # latent (F, h, w) of each shipped version
    "17x256x256": (5, 32, 32),
    "65x256x256": (17, 32, 32),
    "65x512x512": (17, 64, 64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Memory and timing helpers
# --------------------------------------------------------------------------------------------


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _attention_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return contextlib.nullcontext() if name == "default" else sdpa_kernel(SDPBackend.MATH)


# --------------------------------------------------------------------------------------------
# Models (random, released widths)
# --------------------------------------------------------------------------------------------


def build_transformer(version: str, layers: int, dtype: torch.dtype, device: torch.device):
    from opensora_plan.models.latte import LatteT2V, latte_config

    frames, h, w = VERSIONS[version]
    model = LatteT2V(**latte_config("LatteT2V-XL/122", num_layers=layers, sample_size=(h, w), video_length=frames))
    return model.to(device=device, dtype=dtype).eval()


def build_t5(layers: int, dtype: torch.dtype, device: torch.device):
    """T5 v1.1 XXL encoder shape (d_model 4096, 64 heads, d_ff 10240) with ``layers`` layers."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return T5EncoderModel(config).to(device=device, dtype=dtype).eval()


def build_vae(dtype: torch.dtype, device: torch.device):
    from opensora_plan.models.causalvae import CausalVAEModel

    return CausalVAEModel().to(device=device, dtype=dtype).eval()  # release config defaults


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def bench_step(version, dtype_name, backend, args, device) -> dict:
    dtype = DTYPES[dtype_name]
    model = build_transformer(version, args.layers, dtype, device)
    frames, h, w = VERSIONS[version]
    latents = torch.randn(2, 4, frames, h, w, device=device, dtype=dtype)  # CFG batch [uncond; cond]
    text = torch.randn(2, args.tokens, 4096, device=device, dtype=dtype)
    timestep = torch.full((2,), 500, device=device)
    _reset_peak(device)
    with _attention_backend(backend):
        seconds = _timed(lambda m=model: m(latents, timestep, text), device, args.repeat)
    peak = _peak_gib(device)
    del model
    return dict(version=version, dtype=dtype_name, backend=backend, step_s=seconds, peak_gib=peak)


@torch.no_grad()
def bench_e2e(version, dtype_name, args, device) -> dict:
    from opensora_plan.diffusion.schedulers import create_scheduler
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    dtype = DTYPES[dtype_name]
    t5 = build_t5(args.t5_layers, dtype, device)
    pipe = OpenSoraPlanPipeline(vae=build_vae(dtype, device), transformer=build_transformer(version, args.layers, dtype, device),
                                scheduler=create_scheduler("DDIM"))
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(3, 32000, (2, 300), device=device)  # prompt + negative, 300 tokens each
    mask = torch.zeros(2, 300, dtype=torch.long, device=device)
    mask[0, : args.tokens], mask[1, :1] = 1, 1
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    embeds = t5(ids, attention_mask=mask)[0][:, : args.tokens]  # single-prompt cut (spec 4)
    _sync(device)
    encode_s = time.perf_counter() - start
    del t5
    start = time.perf_counter()
    latents = pipe(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], num_inference_steps=args.e2e_steps,
                   generator=torch.Generator().manual_seed(0), output_type="latent").frames
    _sync(device)
    denoise_s = time.perf_counter() - start
    start = time.perf_counter()
    pipe.decode_latents(latents)
    _sync(device)
    decode_s = time.perf_counter() - start
    return dict(version=version, dtype=dtype_name, encode_s=encode_s, denoise_s=denoise_s, decode_s=decode_s,
                total_s=encode_s + denoise_s + decode_s, peak_gib=_peak_gib(device))


@torch.no_grad()
def bench_loop(args) -> None:
    """The demo model's denoising loop in each mode, interleaved over ``--repeat`` rounds (median)."""
    import tempfile
    from pathlib import Path

    from opensora_plan.data.video_io import write_video
    from opensora_plan.demo.evaluate import load_demo_pipeline
    from opensora_plan.models.layers import fused_linear_kernels

    device = torch.device("cpu")
    pipe, info = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    steps, scale = info["num_sampling_steps"], info["guidance_scale"]
    prompt = "a red circle moving left"
    embeds, negative = pipe.encode_prompt(prompt)

    def loop():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                    guidance_scale=scale, generator=torch.Generator().manual_seed(0), output_type="latent").frames

    def plain_kernels():
        with fused_linear_kernels(False):
            return loop()

    modes = {"eager, plain F.linear (reference kernels)": (plain_kernels, "none"),
             "eager (fused kernels)": (loop, "none"),
             "cached (fast)": (loop, "fast")}
    times = {name: [] for name in modes}
    skipped = {}
    for _ in range(args.repeat):
        for name, (fn, cache) in modes.items():
            pipe.enable_cache(cache)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            if pipe.cache_stats is not None:
                skipped[name] = pipe.cache_stats.skipped_fraction
    pipe.disable_cache()
    start = time.perf_counter()
    pipe.transformer.compile_blocks()
    loop()
    warmup = time.perf_counter() - start
    for name, cache in (("compiled", "none"), ("compiled + cached (fast)", "fast")):
        pipe.enable_cache(cache)
        times[name] = []
        for _ in range(args.repeat):  # after the eager modes: compilation cannot be undone in place
            start = time.perf_counter()
            loop()
            times[name].append(time.perf_counter() - start)
        if pipe.cache_stats is not None:
            skipped[name] = pipe.cache_stats.skipped_fraction
    pipe.disable_cache()
    base = statistics.median(times["eager, plain F.linear (reference kernels)"])
    print(f"\n# demo denoising loop: {info['sample_method']} {steps} steps, guidance {scale}, CFG batch 2, "
          f"{torch.get_num_threads()} threads; median of {args.repeat}; fast = {pipe.fast_cache_options}")
    print("| mode | loop s | per step ms | vs plain kernels | blocks skipped |\n|---|---|---|---|---|")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"| {name} | {t:.3f} | {1000 * t / steps:.1f} | {t / base:.2f} | "
              f"{f'{skipped[name]:.0%}' if name in skipped else '-'} |")
    print(f"compile warm-up (first compiled loop, incl. compilation): {warmup:.1f} s")

    latents = loop()
    _reset_peak(device)
    decode = _timed(lambda: pipe.decode_latents(latents), device, args.repeat)
    print(f"VAE decode {tuple(latents.shape)} latents: {1000 * decode:.1f} ms, peak RSS {_peak_gib(device):.2f} GiB")

    pipe2, _ = load_demo_pipeline()
    pipe2.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        def end_to_end():
            video = pipe2(prompt, num_inference_steps=steps, guidance_scale=scale,
                          generator=torch.Generator().manual_seed(0)).frames
            write_video(Path(tmp) / "sample.mp4", video[0], fps=info.get("fps", 8))

        e2e = _timed(end_to_end, device, args.repeat)
    print(f"demo end to end (encode + denoise + decode + mp4, models loaded): {e2e:.2f} s")


@torch.no_grad()
def bench_cache_random(args, device) -> None:
    """Share of block work each cache setting skips on random released-width weights (no quality meaning)."""
    from opensora_plan.diffusion.schedulers import create_scheduler
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    version = args.cache_version
    dtype = DTYPES[args.e2e_dtype]
    torch.manual_seed(0)
    transformer = build_transformer(version, args.layers, dtype, device)
    pipe = OpenSoraPlanPipeline(vae=build_vae(dtype, device), transformer=transformer,
                                scheduler=create_scheduler(args.cache_sampler))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, args.tokens, 4096, generator=g).to(device, dtype)
    uncond = torch.randn(1, args.tokens, 4096, generator=g).to(device, dtype)
    print(f"\n# random weights, {version}, {args.layers} of 28 layers at width 1152, {args.e2e_dtype}, "
          f"{args.cache_sampler} {args.cache_steps} steps, CFG 7.5")
    print("| cache | forwards | blocks skipped |\n|---|---|---|")
    for setting in args.cache_settings.split(","):
        method, _, threshold = setting.partition(":")
        pipe.enable_cache(method, **({"threshold": float(threshold)} if threshold else {}))
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.cache_steps,
             guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="latent")
        stats = pipe.cache_stats
        print(f"| {setting} {pipe.transformer.step_cache.options()} | {stats.computed + stats.skipped} | "
              f"{stats.skipped_fraction:.0%} |", flush=True)
    pipe.disable_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--versions", default=None, help="comma list (default: all on CUDA, 17x256x256 on CPU)")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--backends", default="default,math")
    parser.add_argument("--layers", type=int, default=None, help="Latte layers (default 28 on CUDA, 2 on CPU)")
    parser.add_argument("--t5-layers", type=int, default=None, help="T5 layers (default 24 on CUDA, 1 on CPU)")
    parser.add_argument("--tokens", type=int, default=32, help="valid caption tokens (the prompt's length)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--e2e", action="store_true", help="also time the whole pipeline per version")
    parser.add_argument("--e2e-steps", type=int, default=None, help="DDIM steps for --e2e (default 50 CUDA, 2 CPU)")
    parser.add_argument("--e2e-dtype", default=None, help="dtype for --e2e (default fp16 CUDA as the reference, bf16 CPU)")
    parser.add_argument("--no-loop", action="store_true", help="skip the demo loop table (part 0)")
    parser.add_argument("--cache-random", action="store_true",
                        help="also report the share of block work each cache setting skips on random weights")
    parser.add_argument("--cache-version", default="17x256x256")
    parser.add_argument("--cache-sampler", default="PNDM")
    parser.add_argument("--cache-steps", type=int, default=50)
    parser.add_argument("--cache-settings", default="fast,teacache:0.1,teacache:0.2,first_block:0.05,first_block:0.1")
    parser.add_argument("--loop-only", action="store_true", help="only the demo loop table (part 0)")
    args = parser.parse_args()
    if not args.no_loop:
        bench_loop(args)
        if args.loop_only:
            return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    versions = (args.versions or (",".join(VERSIONS) if cuda else "17x256x256")).split(",")
    args.layers = args.layers or (28 if cuda else 2)
    args.t5_layers = args.t5_layers or (24 if cuda else 1)
    args.e2e_steps = args.e2e_steps or (50 if cuda else 2)
    args.e2e_dtype = args.e2e_dtype or ("fp16" if cuda else "bf16")
    for v in versions:
        if v not in VERSIONS:
            parser.error(f"unknown version {v!r}; choose from {', '.join(VERSIONS)}")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device: {name}; torch {torch.__version__}; Latte layers {args.layers} (width 1152), "
          f"{args.tokens} caption tokens, CFG batch 2")
    mem = "peak GiB (cuda alloc)" if cuda else "peak RSS GiB (process)"
    print(f"\n| version | dtype | attention | step latency (ms) | ÷ layers (ms) | {mem} |")
    print("|---|---|---|---|---|---|")
    for version in versions:
        for dtype_name in args.dtypes.split(","):
            for backend in args.backends.split(","):
                r = bench_step(version, dtype_name, backend, args, device)
                print(f"| {version} | {dtype_name} | {backend} | {1000 * r['step_s']:.1f} | "
                      f"{1000 * r['step_s'] / args.layers:.1f} | {r['peak_gib']:.2f} |", flush=True)
    if args.cache_random:
        bench_cache_random(args, device)
    if args.e2e:
        print(f"\n| version | dtype | T5 encode (s) | denoise {args.e2e_steps} steps (s) | VAE decode (s) | total (s) "
              f"| {mem} |")
        print("|---|---|---|---|---|---|---|")
        for version in versions:
            r = bench_e2e(version, args.e2e_dtype, args, device)
            print(f"| {version} | {r['dtype']} | {r['encode_s']:.2f} | {r['denoise_s']:.2f} | {r['decode_s']:.2f} | "
                  f"{r['total_s']:.2f} | {r['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
