"""LatteT2V training throughput: samples/s, latent tokens/s, peak memory and model FLOPs utilisation.

What is timed: one optimizer step of the T2V task's inner work — IDDPM hybrid loss
(``GaussianDiffusion.training_losses``) of LatteT2V on random latents and random caption embeddings,
backward, grad-norm clip 1.0 and AdamW — with the VAE and T5 left out (they are frozen; cache them with
``opensora-plan extract`` or add their encode time separately). Each configuration runs in its own
process so peak memory is per configuration (CPU: peak resident set size of that process; CUDA:
``torch.cuda.max_memory_allocated``).

FLOPs counting (model FLOPs, the usual MFU convention): a training step is 3 x the forward FLOPs
(backward = 2 x forward); the recomputation of gradient checkpointing is *not* counted, so MFU drops
when checkpointing is on although the hardware does more work. Forward FLOPs = 2 x multiply-adds of

* every linear layer on every token (spatial block: q, k, v, out of self-attention, q and out of
  cross-attention, 4x MLP = 14 D^2 per token; temporal block: 12 D^2 per video token), cross-attention
  k and v on the L caption tokens (2 D^2 L per sample, per frame with joint images), patch embedding,
  caption projection, timestep embedding and the final projection;
* attention scores and weighted sums: 2 N^2 D per frame (spatial), 2 N L D per frame (cross),
  2 F^2 D per patch position (temporal, video frames only).

Checked against ``torch.utils.flop_counter.FlopCounterMode`` on one forward: the linear/conv part
agrees exactly with and without joint images; the counter does not see CPU SDPA, whose analytic
term is what remains.

MFU = achieved model FLOP/s / peak. Peak: ``--peak_tflops``, or the dense bf16 (tf32 for fp32)
number of known GPUs (H100/H200 SXM 989/495, A100 312/156); on CPU no MFU is printed unless
``--peak_tflops`` is given.

Usage::

    python benchmarks/train.py                       # CPU: reduced config, fp32/bf16 x checkpointing off/on
    python benchmarks/train.py --device cuda         # GPU: full LatteT2V-XL/122 at 17x256x256 and 65x512x512
    python benchmarks/train.py --configs reduced --precisions bf16 --json out.json
    python benchmarks/train.py --threads 1           # shared CPU machine: CPU s/step is the reliable number
    python benchmarks/train.py --lora_ranks 0 16     # full fine-tuning vs LoRA rank 16 (needs peft)

LoRA (``--lora_ranks R``, 0 = full): peft adapters on every attention / MLP projection (train-t2v's
default targets), base frozen (stored in bf16 for bf16 rows, as train-t2v does), adapters float32,
AdamW over the adapters only. The
model-FLOPs columns keep the full-training convention (3 x forward), so for LoRA rows they overstate
the work (no weight gradients are formed for the frozen base): compare LoRA and full by s/step and memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# name -> (LatteT2V size overrides, pixel frames, pixel size, batch, joint images, caption tokens)
CONFIGS = {
    # CPU-sized: LatteT2V-S/122 width (384) with 4 layers, 17x128x128 (5x16x16 latents = 320 tokens/sample).
    "reduced": dict(model="LatteT2V-S/122", overrides=dict(num_layers=4, caption_channels=512), frames=17,
                    size=128, batch=2, images=0, caption_tokens=32),
    # The released model at the stage 1 and stage 3 settings of the reference (spec 6), T5-XXL width captions.
    "17x256x256": dict(model="LatteT2V-XL/122", overrides={}, frames=17, size=256, batch=4, images=4,
                       caption_tokens=300),
    "65x512x512": dict(model="LatteT2V-XL/122", overrides={}, frames=65, size=512, batch=2, images=16,
                       caption_tokens=300),
}
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "no": 494.7}, "H200": {"bf16": 989.0, "no": 494.7},
               "A100": {"bf16": 312.0, "no": 156.0}}
VAE_SPATIAL, VAE_TEMPORAL = 8, 4  # CausalVAE 4x8x8


def forward_flops(cfg: dict, model_config) -> float:
    """Model forward FLOPs of one batch (see the module docstring)."""
    D = model_config.num_attention_heads * model_config.attention_head_dim
    p = model_config.patch_size
    h = w = cfg["size"] // VAE_SPATIAL
    frames_video = (cfg["frames"] - 1) // VAE_TEMPORAL + 1
    frames = frames_video + cfg["images"]
    N = (h // p) * (w // p)
    B, L, layers = cfg["batch"], cfg["caption_tokens"], model_config.num_layers
    tokens, video_tokens = B * frames * N, B * frames_video * N
    slots = 1 + cfg["images"] if cfg["images"] else 1  # caption slots per sample (video + one per image)
    # Joint image-video input gives every frame its own caption context (the model's per-frame path), so
    # cross-attention k/v run per frame; a plain video batch shares one context per sample.
    contexts = B * frames if cfg["images"] else B
    macs = tokens * model_config.in_channels * p * p * D  # patch embedding
    macs += B * slots * L * (model_config.caption_channels * D + D * D)  # caption projection
    macs += B * (256 * D + D * D + 6 * D * D)  # timestep embedding + adaLN-single (per sample)
    per_layer = (
        tokens * 14 * D * D + contexts * L * 2 * D * D  # spatial linears + cross-attention k, v on captions
        + video_tokens * 12 * D * D  # temporal linears
        + B * frames * (2 * N * N * D + 2 * N * L * D)  # spatial self- and cross-attention
        + B * N * 2 * frames_video * frames_video * D  # temporal attention
    )
    macs += layers * per_layer
    macs += tokens * D * p * p * model_config.out_channels  # final projection
    return 2.0 * macs


def run_single(name: str, precision: str, checkpointing: bool, device: str, steps: int, warmup: int,
               threads: int | None = None, lora_rank: int = 0) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from opensora_plan.diffusion import GaussianDiffusion
    from opensora_plan.models.latte import build_latte

    cfg = CONFIGS[name]
    h = cfg["size"] // VAE_SPATIAL
    video_length = (cfg["frames"] - 1) // VAE_TEMPORAL + 1
    torch.manual_seed(0)
    model = build_latte(cfg["model"], sample_size=(h, h), video_length=video_length, **cfg["overrides"]).to(device)
    if lora_rank:
        from opensora_plan.models.lora import add_lora, lora_config

        add_lora(model, lora_config(lora_rank))
        if precision == "bf16":  # as train-t2v: the frozen base stored in bf16, adapters fp32
            from opensora_plan.models.lora import cast_frozen_base

            cast_frozen_base(model, torch.bfloat16)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), weight_decay=1e-2)
    diffusion = GaussianDiffusion()
    B, n, L = cfg["batch"], cfg["images"], cfg["caption_tokens"]
    latents = torch.randn(B, model.config.in_channels, video_length + n, h, h, device=device)
    slots = (B, 1 + n) if n else (B,)
    text = torch.randn(*slots, L, model.config.caption_channels, device=device)
    mask = torch.ones(*slots, L, device=device, dtype=torch.long)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        t = diffusion.sample_timesteps(B, device=device)
        with autocast:
            terms = diffusion.training_losses(
                lambda x, tt: model(x, tt, encoder_hidden_states=text, encoder_attention_mask=mask,
                                    use_image_num=n, return_dict=False)[0], latents, t)
        terms["loss"].mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - started) / steps
        cpu_seconds = (time.process_time() - cpu_started) / steps
    except torch.OutOfMemoryError:
        return {"config": name, "precision": precision, "checkpointing": checkpointing, "lora_rank": lora_rank,
                "error": "out of memory"}
    peak_gib = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    tokens = B * (video_length + n) * (h // model.config.patch_size) ** 2
    flops = 3 * forward_flops(cfg, model.config)
    result = {
        "config": name, "model": cfg["model"], "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "lora_rank": lora_rank, "trainable_params_M": sum(p.numel() for p in params) / 1e6,
        "precision": precision, "checkpointing": checkpointing, "batch": B, "images": n,
        "s_per_step": elapsed, "cpu_s_per_step": cpu_seconds, "samples_per_s": B / elapsed, "tokens_per_s": tokens / elapsed,
        "peak_memory_GiB": peak_gib, "model_TFLOPs_per_step": flops / 1e12, "achieved_TFLOP_s": flops / elapsed / 1e12,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
    }
    return result


def _kind(result: dict) -> str:
    if not result.get("lora_rank"):
        return "full"
    trainable = result.get("trainable_params_M")
    return f"LoRA r{result['lora_rank']}" + (f" ({trainable:.2f}M)" if trainable is not None else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--configs", nargs="+", help=f"subset of {list(CONFIGS)} (default: reduced on CPU, full on GPU)")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="CPU threads (on a shared machine 1 gives honest CPU s/step)")
    parser.add_argument("--peak_tflops", type=float, help="peak FLOP/s of the device in TFLOP/s (for MFU)")
    parser.add_argument("--lora_ranks", nargs="+", type=int, default=[0],
                        help="0 = full fine-tuning, R > 0 = LoRA rank R (e.g. --lora_ranks 0 16; default 0)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._single:
        job = json.loads(args._single)
        print("RESULT " + json.dumps(run_single(**job)))
        return 0

    configs = args.configs or (["reduced"] if args.device == "cpu" else ["17x256x256", "65x512x512"])
    results = []
    for name in configs:
        runs = [(p, c, r) for p in args.precisions for c in args.checkpointing for r in args.lora_ranks]
        for precision, ckpt, rank in runs:
            job = dict(name=name, precision=precision, checkpointing=ckpt == "on", device=args.device,
                       steps=args.steps, warmup=args.warmup, threads=args.threads, lora_rank=rank)
            proc = subprocess.run([sys.executable, __file__, "--_single", json.dumps(job)], capture_output=True,
                                  text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                results.append({"config": name, "precision": precision, "checkpointing": ckpt == "on",
                                "lora_rank": rank, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(results[-1]), file=sys.stderr)

    for r in results:
        peak = args.peak_tflops
        if peak is None:
            peak = next((v[r["precision"]] for k, v in PEAK_TFLOPS.items() if k in r.get("device", "")), None)
        r["MFU"] = r["achieved_TFLOP_s"] / peak if peak and "error" not in r else None
    header = ("config", "train", "precision", "ckpt", "s/step", "CPU s/step", "samples/s", "tokens/s", "peak GiB", "TFLOP/step", "TFLOP/s", "MFU")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {_kind(r)} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | "
                  f"{r['error']} |")
            continue
        mfu = f"{100 * r['MFU']:.1f}%" if r["MFU"] is not None else "-"
        print(f"| {r['config']} | {_kind(r)} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {r['s_per_step']:.3f} | {r['cpu_s_per_step']:.2f} | "
              f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_memory_GiB']:.2f} | "
              f"{r['model_TFLOPs_per_step']:.3f} | {r['achieved_TFLOP_s']:.3f} | {mfu} |")
    if results and "error" not in results[0]:
        load = open("/proc/loadavg").read().split()[0] if sys.platform == "linux" else "?"
        print(f"\nload average at the end: {load} (s/step is wall time; CPU s/step is process CPU time, "
              "which other processes inflate less; with more than one thread, waiting threads spin and count too)")
        print(f"device: {results[0]['device']}; model: {results[0]['model']} ({results[0]['params_M']:.1f}M params)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
