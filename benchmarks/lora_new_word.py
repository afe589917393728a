"""Teach the shipped demo model a new word with a LoRA, and judge it (issue 11's LoRA demo).

The demo model knows three shapes and five colours. ``--word diamond`` (shapes.NEW_SHAPES, default) or
``--word magenta`` (shapes.NEW_COLOURS) is a word it never saw. This script

1. ``data``: writes synthetic clips of the new word plus clips of the demo's own vocabulary (replayed so
   the untouched prompts stay right), a held-out set of new clips of the word, and extracts the training
   clips' VAE / T5 features (``opensora-plan extract``);
2. ``train``: LoRA fine-tunes the shipped demo transformer (``train-t2v --pretrained ... --lora_rank``) with
   ``--validation_data_path`` (held-out loss at fixed timesteps and noise, EMA weights) and
   ``--validation_prompts`` (preview mp4 files under ``<out>/run/validation/step-N/``);
3. ``judge``: samples every prompt of the new word (3 seeds) and a spread subset of the demo's 60 prompts
   with the base model and with the LoRA's EMA adapter (the ``demo eval`` code path) and judges every
   video with the demo judge (candidates: the demo's words plus the new one).

It prints the held-out loss per validation step and the before/after accuracies, and writes
``<out>/lora_new_word.json``. On the 2-core CPU with one thread the whole script takes about 20 minutes
(docs/training.md has the measured results for crimson, diamond and magenta):
``OMP_NUM_THREADS=1 python benchmarks/lora_new_word.py --out /tmp/lora_diamond --word diamond``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


WORDS = {  # the new word -> make_dataset / select_prompts arguments, preview prompts
    "magenta": ({"colours": ["magenta"]}, ["a magenta circle moving left", "a magenta triangle moving up",
                                           "a red square moving right"]),
    "diamond": ({"shapes": ["diamond"]}, ["a red diamond moving left", "a blue diamond moving up",
                                          "a green square moving right"]),
    "crimson": ({"colours": ["crimson"]}, ["a crimson circle moving left", "a crimson triangle moving up",
                                           "a green square moving right"]),
}


def make_data(out: Path, args) -> None:
    from opensora_plan.data.features import extract_features
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.demo.shapes import make_dataset

    demo = default_model_path()
    word = WORDS[args.word][0]
    new = make_dataset(out / "data" / "new", args.num_new, seed=101, **word)
    old = make_dataset(out / "data" / "old", args.num_replay, seed=102)
    entries = []
    for part, path in (("new", new), ("old", old)):
        entries += [{**e, "path": f"{part}/{e['path']}"} for e in json.loads(path.read_text())]
    (out / "data" / "train.json").write_text(json.dumps(entries, indent=1))
    make_dataset(out / "held_out", args.num_held_out, seed=103, paraphrases=False, **word)
    extract_features(out / "data" / "train.json", out / "features", text_encoder_name=demo / "text_encoder",
                     ae_path=demo / "vae", num_frames=17, max_image_size=64, model_max_length=32, text_dtype="fp32",
                     device="cpu", progress=False)


def train(out: Path, args) -> dict:
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.train.t2v import train_t2v

    demo = default_model_path()
    started = time.perf_counter()
    summary = train_t2v({
        "model": str(demo / "17x64x64"), "pretrained": str(demo / "17x64x64"),
        "ae_path": str(demo / "vae"), "text_encoder_name": str(demo / "text_encoder"),
        "cached_features": str(out / "features"), "num_frames": 17, "max_image_size": 64, "model_max_length": 32,
        "cfg_dropout": 0.1, "lora_rank": args.rank, "learning_rate": args.lr, "train_batch_size": args.batch,
        "max_train_steps": args.steps, "checkpointing_steps": args.steps, "mixed_precision": "bf16",
        "use_ema": True, "ema_decay": 0.99, "seed": 0, "report_to": "tensorboard",
        "validation_data_path": str(out / "held_out" / "data.json"), "validation_steps": args.validation_steps,
        "validation_prompts": WORDS[args.word][1],
        "validation_sample_method": "EulerAncestralDiscrete", "validation_guidance_scale": 3.0,
        "validation_sampling_steps": 25, "output_dir": str(out / "run"),
    })
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def judge(out: Path, args) -> dict:
    from opensora_plan.demo.evaluate import evaluate_demo, select_prompts

    adapter = out / "run" / f"checkpoint-{args.steps}" / "ema"
    results = {}
    new_prompts = select_prompts(**WORDS[args.word][0])
    for name, prompts, seeds in ((f"new word ({args.word}, {len(new_prompts)} prompts)", new_prompts, args.seeds),
                                 (f"untouched ({args.num_untouched} of the 60 prompts)",
                                  select_prompts(args.num_untouched), args.untouched_seeds)):
        for label, lora in (("base", None), ("LoRA", adapter)):
            report = evaluate_demo(prompts=prompts, seeds=tuple(seeds), lora=lora, progress=False,
                                   save_dir=out / "judged" / f"{'new' if 'new' in name else 'old'}-{label}")
            results[f"{name} | {label}"] = {"accuracy": report.accuracy(), "videos": len(report.videos),
                                            "judged_colours": _count(v["judged"]["colour"] for v in report.videos)}
            print(f"{name:<36} {label:<5} " + "  ".join(f"{k} {v:6.1%}" for k, v in report.accuracy().items()),
                  flush=True)
    return results


def _count(values) -> dict:
    counts: dict = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return counts


def held_out_curve(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "val_loss": r["val_loss"], "val_mse": r["val_mse"], "val_vb": r["val_vb"]}
            for r in lines if "val_loss" in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work folder (data, features, run, judged videos, result JSON)")
    p.add_argument("--stages", default="data,train,judge", help="comma-separated subset of data,train,judge")
    p.add_argument("--word", choices=sorted(WORDS), default="diamond", help="the new word (default diamond)")
    p.add_argument("--num_new", type=int, default=60, help="training clips of the new word (default 60)")
    p.add_argument("--num_replay", type=int, default=60, help="clips of the demo's own vocabulary (default 60)")
    p.add_argument("--num_held_out", type=int, default=20, help="held-out clips of the new word (default 20)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per magenta prompt")
    p.add_argument("--num_untouched", type=int, default=24, help="demo prompts checked for regressions")
    p.add_argument("--untouched_seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    result_path = out / "lora_new_word.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result["settings"] = vars(args)
    if "data" in stages:
        started = time.perf_counter()
        make_data(out, args)
        result["data_seconds"] = time.perf_counter() - started
    if "train" in stages:
        summary = train(out, args)
        result["train"] = {k: summary[k] for k in ("step", "first_step_seconds", "samples_per_s", "wall_seconds")}
        result_path.write_text(json.dumps(result, indent=1, default=str))
    if (out / "run" / "log.jsonl").is_file():
        result["held_out_loss"] = held_out_curve(out)
        print(f"held-out loss ({args.num_held_out} {args.word} clips x 8 fixed timesteps, fixed noise; EMA weights):")
        for r in result["held_out_loss"]:
            print(f"  step {r['step']:>5}  val_loss {r['val_loss']:.4f}  mse {r['val_mse']:.4f}  vb {r['val_vb']:.4f}")
    if "judge" in stages:
        started = time.perf_counter()
        result["judged"] = judge(out, args)
        result["judge_seconds"] = time.perf_counter() - started
    result_path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {result_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
