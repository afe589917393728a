"""Text-to-video sampling speed: per-step LatteT2V latency and peak memory, and end-to-end time.

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
        seconds = _timed(lambda: model(latents, timestep, text), device, args.repeat)
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
    args = parser.parse_args()
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
