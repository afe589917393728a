"""Random full-size weights in the release file layouts, for memory and speed measurements (nothing downloaded).

Writes under ``--out`` (default ``/work/scratch-mem``):

- ``Open-Sora-Plan-v1.0.0/<version>/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, float32 as
  released) and ``Open-Sora-Plan-v1.0.0/vae/`` (the release config, the 248 model tensors and the 56 ``loss.*``
  tensors the official file also carries), key for key and shape for shape from the manifests in
  ``tests/fixtures/reference/manifests`` (produced from the official classes);
- ``t5-v1_1-xxl/``: DeepFloyd/t5-v1_1-xxl's config (T5 v1.1 XXL: d_model 4096, 24 layers, 64 heads, d_ff 10240,
  gated-GELU, vocabulary 32128) with its encoder weights as sharded ``pytorch_model-0000k-of-0000n.bin`` files
  plus ``pytorch_model.bin.index.json`` in float16, as the DeepFloyd repository ships them. The decoder half is
  left out (``T5EncoderModel`` ignores it) to save 10 GB of disk; the spiece.model is the demo's (a small
  vocabulary: token ids stay below 32128, which is all the measurements need).

Values: N(0, 0.02) for weights, 1 for norm scales, 0 for biases and running statistics, so every stage stays
finite. Usage::

    OMP_NUM_THREADS=1 python benchmarks/release_weights.py --out /work/scratch-mem --versions 65x512x512
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "fixtures" / "reference" / "manifests"
DEMO_T5 = ROOT / "src" / "opensora_plan" / "assets" / "demo" / "text_encoder"

T5_XXL_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "torch_dtype": "float32",
    "vocab_size": 32128,
}


def _value(name: str, shape: list[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("bias", "running_mean", "num_batches_tracked", "shift", "logvar") or name.endswith("y_embedding"):
        return torch.zeros(shape, dtype=torch.long if leaf == "num_batches_tracked" else dtype)
    if leaf in ("running_var", "scale") or (len(shape) == 1 and ("norm" in name or "layer_norm" in name)):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_safetensors_folder(folder: Path, config: dict, shapes: dict[str, list[int]], seed: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _value(name, shape, torch.float32, generator) for name, shape in shapes.items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def t5_encoder_shapes(config: dict) -> dict[str, list[int]]:
    d, ff, heads, kv = config["d_model"], config["d_ff"], config["num_heads"], config["d_kv"]
    shapes = {"shared.weight": [config["vocab_size"], d]}
    for i in range(config["num_layers"]):
        p = f"encoder.block.{i}.layer."
        for proj in "qkv":
            shapes[f"{p}0.SelfAttention.{proj}.weight"] = [heads * kv, d]
        shapes[f"{p}0.SelfAttention.o.weight"] = [d, heads * kv]
        if i == 0:
            shapes[f"{p}0.SelfAttention.relative_attention_bias.weight"] = [config["relative_attention_num_buckets"],
                                                                             heads]
        shapes[f"{p}0.layer_norm.weight"] = [d]
        shapes[f"{p}1.DenseReluDense.wi_0.weight"] = [ff, d]
        shapes[f"{p}1.DenseReluDense.wi_1.weight"] = [ff, d]
        shapes[f"{p}1.DenseReluDense.wo.weight"] = [d, ff]
        shapes[f"{p}1.layer_norm.weight"] = [d]
    shapes["encoder.final_layer_norm.weight"] = [d]
    return shapes


def write_t5(folder: Path, shard_bytes: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = t5_encoder_shapes(T5_XXL_CONFIG)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(shards, 1):
        file = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
        tensors = {name: _value(name, shapes[name], torch.float16, generator) for name in names}
        torch.save(tensors, folder / file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        print(f"  {file}: {len(names)} tensors", flush=True)
        del tensors
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(T5_XXL_CONFIG, indent=2))
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(DEMO_T5 / name, folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/work/scratch-mem"))
    parser.add_argument("--versions", nargs="+", default=["65x512x512"])
    parser.add_argument("--shard_gib", type=float, default=2.0, help="T5 shard size (keeps this script's memory low)")
    parser.add_argument("--skip_t5", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    release = args.out / "Open-Sora-Plan-v1.0.0"
    configs = MANIFESTS / "checkpoint_configs"
    vae = json.loads((MANIFESTS / "CausalVAE_4x8x8.json").read_text())
    print("vae", flush=True)
    write_safetensors_folder(release / "vae", json.loads((configs / "vae" / "config.json").read_text()),
                             {**vae["state_dict"], **vae["loss_state_dict"]}, seed=1)
    for version in args.versions:
        print(version, flush=True)
        latte = json.loads((MANIFESTS / f"LatteT2V_{version}.json").read_text())
        write_safetensors_folder(release / version, json.loads((configs / version / "config.json").read_text()),
                                 latte["state_dict"], seed=2)
    if not args.skip_t5:
        print("t5-v1_1-xxl", flush=True)
        write_t5(args.out / "t5-v1_1-xxl", int(args.shard_gib * 2**30), seed=3)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
