"""Activation memory per process of a LatteT2V training forward vs sequence-parallel size (and step time).

What is measured: the bytes of the tensors autograd saves for backward (unique storages, counted with
``torch.autograd.graph.saved_tensors_hooks``) during one training forward of a LatteT2V of the chosen
width on random latents, in the chosen precision, with gradient checkpointing off and on; then one
backward, timed with the forward. That is the activation memory a GPU holds at the peak (weights,
gradients, optimizer state and transient workspaces come on top; see docs/training.md). It is
device-independent, so the CPU numbers give the GPU bytes; step times here are CPU times.

Run it with ``torchrun --nproc_per_node S`` to split every sample over S processes (S = 1 without
torchrun). Each rank reports its own bytes; the script prints rank 0's.

Usage::

    python benchmarks/sp_memory.py                                   # XL width, 2 layer pairs, sp 1
    torchrun --nproc_per_node 2 benchmarks/sp_memory.py              # the same, sp 2
    python benchmarks/sp_memory.py --layers 28 --frames 17 --latent 64 --device cuda   # full 65x512x512
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from opensora_plan.models.latte import build_latte


def saved_bytes(fn, weight_shapes: set) -> tuple[int, object]:
    """Bytes of the unique storages autograd saves while ``fn()`` runs, and its result. Tensors shaped like
    a parameter (the weights themselves, or autocast's bf16 copies of them) are weights, not activations,
    and are left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and tuple(t.shape) not in weight_shapes:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="LatteT2V-XL/122")
    parser.add_argument("--layers", type=int, default=2, help="layer pairs (bytes scale linearly; XL has 28)")
    parser.add_argument("--frames", type=int, default=17, help="latent video frames")
    parser.add_argument("--images", type=int, default=0, help="joint-training images per sample")
    parser.add_argument("--latent", type=int, default=16, help="latent height = width (64 for 512 px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here (rank 0)")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(args.device)
    group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    sp = torch.distributed.get_world_size() if group is None and torch.distributed.is_initialized() else 1
    torch.manual_seed(0)
    model = build_latte(args.model, num_layers=args.layers, sample_size=(args.latent, args.latent),
                        video_length=args.frames, caption_channels=64).to(device).train()
    if sp > 1:
        from opensora_plan.models.parallel import enable_sequence_parallel

        enable_sequence_parallel(model)
    frames = args.frames + args.images
    latents = torch.randn(args.batch, 4, frames, args.latent, args.latent, device=device)
    slots = (1 + args.images,) if args.images else ()
    captions = torch.randn(args.batch, *slots, 120, 64, device=device)
    tokens = args.batch * frames * (args.latent // 2) ** 2
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            nbytes, out = saved_bytes(lambda: model(latents, 500, captions, use_image_num=args.images).sample,
                                      {tuple(p.shape) for p in model.parameters()})
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        results.append({"sp_size": sp, "checkpointing": checkpointing, "tokens_per_sample": tokens // args.batch,
                        "layers": args.layers, "saved_MiB_per_rank": nbytes / 2**20,
                        "saved_bytes_per_token_per_layer_pair": nbytes / tokens / args.layers,
                        "fwd_bwd_s": elapsed, "precision": args.precision, "device": str(device)})
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        for r in results:
            print(json.dumps(r))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
