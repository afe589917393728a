"""Data at scale, by simulation: start-up to the first step, memory and shard reading at 10k .. 400k entries.

No large data set is needed: every simulated entry is a hard link to one of 8 tiny real clips (so ``stat``,
opening and decoding are real), the data index is written from those clips' probe rows (metadata-only rows:
the values ``data index`` would find), and the feature store holds tiny latents (4 x 2 x 4 x 4 posterior
mean and log-variance per clip, 6 to 12 caption tokens of width 32) in extract's layout, 256 clips per shard.

Measured (each a real ``torchrun --nproc_per_node 2 ... train-t2v`` with the tiny LatteT2V, T5 and CausalVAE,
one data-loader worker per process, ``--max_train_steps 1``):

* **start-up**: seconds from launch to the first record in ``log.jsonl`` (step 1 done), for
  ``today`` (the code in ``--baseline_src``, e.g. main: the JSON list, every video probed for buckets, every
  shard's metadata read for a cache) and ``index`` (this tree: ``--data_index`` / the shard index);
* **peak RSS** (``VmHWM``) of each training process and each data-loader worker, and their peak PSS
  (``smaps_rollup``: pages shared after fork are split between the processes that share them);
* **shards/s** one data-loader worker reads from the 400k feature store in shard order (ShardBatchSampler)
  and, for comparison, samples/s in a random order;
* **resume after a kill**: a 2-process run on the feature store is SIGKILLed after its first checkpoint,
  resumed, and compared with the straight run (losses and final weights, bit for bit).

Usage (heavy: run through /work/heavy on the shared machine)::

    python benchmarks/data_scale.py --work /tmp/scale --sizes 10000 100000 400000 --baseline_src /path/main/src \\
        --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CLIPS = 8
CAPTIONS = ["a red ball rolls to the left", "waves on a beach", "a green square moves up", "snow falls on a city",
            "a cat sleeps on a sofa", "a car drives at night", "rain on a window", "a bird in the sky"]


# --------------------------------------------------------------------------------------------
# Simulated data
# --------------------------------------------------------------------------------------------


def make_assets(work: Path) -> dict:
    """Tiny T5 (width 32), tiny CausalVAE, 8 real clips (9 frames, 40x48)."""
    from opensora_plan.data.video_io import write_video
    from opensora_plan.demo.tiny_t5 import build_tiny_t5
    from opensora_plan.models.causalvae import CausalVAEModel

    assets = work / "assets"
    if not (assets / "done").is_file():
        assets.mkdir(parents=True, exist_ok=True)
        build_tiny_t5(assets / "t5", CAPTIONS, d_model=32)
        torch.manual_seed(0)
        CausalVAEModel(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1).save_pretrained(assets / "vae")
        for i in range(CLIPS):
            frames = torch.zeros(9, 40, 48, 3, dtype=torch.uint8)
            for t in range(9):
                frames[t, 4 + t : 16 + t, 4 + 3 * i : 16 + 3 * i] = 255
            write_video(assets / f"clip{i}.mp4", frames, fps=8)
        (assets / "done").write_text("")
    return {"t5": assets / "t5", "vae": assets / "vae", "clips": [assets / f"clip{i}.mp4" for i in range(CLIPS)]}


def make_dataset(work: Path, n: int, assets: dict) -> Path:
    """``n`` entries (hard links to the 8 clips, 1000 per folder), data.json and a metadata-only index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opensora_plan.data import index as index_mod

    root = work / f"videos_{n}"
    data = root / "data.json"
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    entries, rows = [], []
    probes = [index_mod.probe_video(p) for p in assets["clips"]]
    for k in range(n):
        folder = root / "videos" / f"{k // 1000:04d}"
        if k % 1000 == 0:
            folder.mkdir(parents=True)
        path = folder / f"{k}.mp4"
        os.link(assets["clips"][k % CLIPS], path)
        caps = [CAPTIONS[k % len(CAPTIONS)], CAPTIONS[(k + 1) % len(CAPTIONS)]]
        entries.append({"path": f"videos/{k // 1000:04d}/{k}.mp4", "cap": caps})
        rows.append({"entry": k, "path": str(path.resolve()), **probes[k % CLIPS], "captions": caps,
                     "caption_count": 2, "caption_tokens": None})
    data.write_text(json.dumps(entries))
    meta = {"format": index_mod.INDEX_FORMAT, "data_path": str(data.resolve()), "video_folder": None,
            "source_fingerprint": index_mod.source_fingerprint(data), "decode": True, "text_encoder": None,
            "model_max_length": 16, "num_entries": n}
    table = pa.Table.from_pylist(rows, schema=index_mod._schema())
    table = table.replace_schema_metadata({index_mod.META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, root / "index.parquet", row_group_size=index_mod.ROW_GROUP)
    (root / "done").write_text("")
    return root


def make_feature_store(work: Path, n: int, shard_size: int = 256) -> Path:
    """An extract-layout cache of ``n`` tiny entries (latents 4x2x4x4, text 6..12 x 32 bf16), shard index included."""
    from safetensors.torch import save_file

    from opensora_plan.data import features

    out = work / f"features_{n}"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    settings = {"format": features.CACHE_FORMAT, "text_encoder": "tiny-t5", "ae": "tiny-vae", "num_frames": 5,
                "sample_rate": 1, "max_image_size": 32, "use_image_num": 0, "model_max_length": 16,
                "shard_size": shard_size, "text_dtype": "bf16", "clean_captions": True}
    num_shards = (n + shard_size - 1) // shard_size
    meta = {"settings": settings, "fingerprint": "simulated", "num_entries": n, "num_shards": num_shards,
            "data_path": "simulated.json", "video_folder": None, "scaling_factor": 0.18215}
    (out / features.META_FILE).write_text(json.dumps(meta))
    generator = torch.Generator().manual_seed(0)
    save_file({"text": torch.randn(2, 32, generator=generator).bfloat16()}, str(out / features.NULL_TEXT_FILE))
    for shard in range(num_shards):
        tensors, captions = {}, {}
        indices = range(shard * shard_size, min((shard + 1) * shard_size, n))
        block = torch.randn(len(indices), 2, 4, 2, 4, 4, generator=generator)
        for j, index in enumerate(indices):
            tensors[f"{index}.latent_mean"] = block[j, 0].clone()
            tensors[f"{index}.latent_logvar"] = block[j, 1].clone() - 4
            for c in range(2):
                tokens = 6 + (index + c) % 7
                tensors[f"{index}.text.{c}"] = torch.randn(tokens, 32, generator=generator).bfloat16()
            captions[str(index)] = [CAPTIONS[index % 8], CAPTIONS[(index + 1) % 8]]
        shard_meta = {"fingerprint": "simulated", "entries": list(indices), "captions": captions, "skipped": []}
        save_file(tensors, str(out / features.shard_name(shard)), metadata={"opensora_plan": json.dumps(shard_meta)})
    features.write_shard_index(out, num_shards)
    (out / "done").write_text("")
    return out


# --------------------------------------------------------------------------------------------
# Measuring a 2-process run
# --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/{'smaps_rollup' if key == 'Pss' else 'status'}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_to_first_step(argv: list[str], src: Path, out: Path, timeout: float = 1800) -> dict:
    """Launch ``torchrun --nproc_per_node 2 -m opensora_plan *argv`` with PYTHONPATH=src; seconds to the first
    log record, peak RSS / PSS (MiB) of the ranks and of their data-loader workers; the run is then stopped."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "opensora_plan", *argv, "--output_dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    log = open(out.with_suffix(".log"), "w")
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peaks: dict[int, dict] = {}
    first = None
    try:
        while time.monotonic() - began < timeout:
            ranks = _children(proc.pid)
            for rank_pid in ranks:
                for pid, role in [(rank_pid, "rank")] + [(w, "worker") for w in _children(rank_pid)]:
                    hwm, pss = _status_kb(pid, "VmHWM"), _status_kb(pid, "Pss")
                    if hwm is None:
                        continue
                    entry = peaks.setdefault(pid, {"role": role, "rss_kb": 0, "pss_kb": 0})
                    entry["rss_kb"] = max(entry["rss_kb"], hwm)
                    entry["pss_kb"] = max(entry["pss_kb"], pss or 0)
            logfile = out / "log.jsonl"
            if logfile.is_file() and logfile.read_text().strip():
                first = time.monotonic() - began
                break
            if proc.poll() is not None:
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    if first is None:
        tail = out.with_suffix(".log").read_text()[-2000:]
        raise RuntimeError(f"no first step ({' '.join(argv[:3])}...):\n{tail}")
    ranks = [p for p in peaks.values() if p["role"] == "rank"]
    workers = [p for p in peaks.values() if p["role"] == "worker"]
    mib = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {"first_step_s": round(first, 1), "rank_rss_mib": max(mib(p["rss_kb"]) for p in ranks),
            "rank_pss_mib": max(mib(p["pss_kb"]) for p in ranks),
            "worker_rss_mib": max((mib(p["rss_kb"]) for p in workers), default=None),
            "worker_pss_mib": max((mib(p["pss_kb"]) for p in workers), default=None)}


def video_argv(root: Path, assets: dict, *extra: str) -> list[str]:
    shape = [] if "--buckets" in extra else ["--num_frames", "5", "--max_image_size", "32"]
    return ["train-t2v", "--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(assets["t5"]), "--ae_path",
            str(assets["vae"]), "--data_path", str(root / "data.json"), *shape, "--model_max_length", "16", "--train_batch_size", "1", "--max_train_steps", "1", "--checkpointing_steps",
            "1000", "--mixed_precision", "no", "--report_to", "none", "--dataloader_num_workers", "1", "-q", *extra]


def cached_argv(store: Path, *extra: str, steps: int = 1, checkpointing: int = 1000) -> list[str]:
    return ["train-t2v", "--model", "LatteT2V-Tiny/122", "--cached_features", str(store), "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpointing), "--mixed_precision", "no",
            "--report_to", "none", "--dataloader_num_workers", "1", "-q", *extra]


# --------------------------------------------------------------------------------------------
# Shard reading and resume
# --------------------------------------------------------------------------------------------


def shard_read_rate(store: Path, seconds: float = 15.0) -> dict:
    """Samples/s and shards/s of one data-loader worker over the store: shard order vs a random order."""
    from torch.utils.data import DataLoader

    from opensora_plan.data.datasets import collate_video_caption
    from opensora_plan.data.features import CachedFeatureDataset
    from opensora_plan.train.sampler import ResumableSampler, SeededSamples, ShardBatchSampler

    dataset = CachedFeatureDataset(store)
    samples = SeededSamples(dataset, seed=0)
    results = {}
    for name, loader_args in (
            ("shard_order", {"batch_sampler": ShardBatchSampler(dataset.shard, 16, seed=0)}),
            ("random_order", {"batch_size": 16, "sampler": ResumableSampler(len(dataset), seed=0), "drop_last": True})):
        loader = DataLoader(samples, num_workers=1, collate_fn=collate_video_caption, **loader_args)
        count, shards, began = 0, set(), None
        for batch in loader:
            if began is None:  # the worker's start-up is not counted
                began = time.monotonic()
                continue
            count += len(batch["index"])
            shards.update(int(i) // dataset.settings["shard_size"] for i in batch["index"].tolist())
            if time.monotonic() - began > seconds:
                break
        elapsed = time.monotonic() - began
        results[name] = {"samples_per_s": round(count / elapsed, 1), "shards_per_s": round(len(shards) / elapsed, 2),
                         "distinct_shards": len(shards), "seconds": round(elapsed, 1)}
    return results


def resume_after_kill(store: Path, src: Path, work: Path, steps: int = 6) -> dict:
    """Straight 2-process run of ``steps`` steps vs one SIGKILLed after its first checkpoint and resumed."""
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "opensora_plan"]
    straight, killed = work / "resume_straight", work / "resume_killed"
    for folder in (straight, killed):
        shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(base + cached_argv(store, steps=steps, checkpointing=2) + ["--output_dir", str(straight)],
                   env=env, check=True, capture_output=True)
    proc = subprocess.Popen(base + cached_argv(store, steps=steps, checkpointing=2) + ["--output_dir", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not (killed / "checkpoint-2").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    state = torch.load(killed / f"checkpoint-{kept[-1]}" / "training_state.pt", weights_only=False)
    logged = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines() if line.strip()]
    subprocess.run(base + cached_argv(store, "--resume_from_checkpoint", "latest", steps=steps, checkpointing=2)
                   + ["--output_dir", str(killed)], env=env, check=True, capture_output=True)
    read = lambda d: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines() if line.strip()]  # noqa
    weights = f"checkpoint-{steps}/model/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(str(straight / weights)), load_file(str(killed / weights))
    return {"killed_after_step": max(logged) if logged else 0, "resumed_from_step": kept[-1],
            "saved_epoch": state["epoch"], "saved_position_batches": state["position"],
            "data_order": state["data_order"],
            "losses_equal": [(r["step"], r["loss"]) for r in read(straight)] == [(r["step"], r["loss"])
                                                                                 for r in read(killed)],
            "weights_equal": all(torch.equal(wa[k], wb[k]) for k in wa)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (hard links, stores, runs)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 400000])
    parser.add_argument("--baseline_src", type=Path, required=True, help="src/ of the code to compare with (main)")
    parser.add_argument("--probe_all_sizes", type=int, nargs="*", default=[10000],
                        help="sizes at which today's --buckets run (every video probed per process) is timed")
    parser.add_argument("--parts", nargs="+", default=["startup", "index_build", "shards", "resume"])
    parser.add_argument("--runs", nargs="*", default=None, help="only these start-up runs (e.g. video_index)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    here = Path(__file__).resolve().parents[1] / "src"
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "threads": 1, "load_before": os.getloadavg()}
    assets = make_assets(args.work)

    def save():
        args.json.write_text(json.dumps(results, indent=2))

    if "startup" in args.parts:
        for n in args.sizes:
            began = time.monotonic()
            root = make_dataset(args.work, n, assets)
            store = make_feature_store(args.work, n)
            print(f"[{n}] data made in {time.monotonic() - began:.0f} s", flush=True)
            runs = {
                "video_today": (video_argv(root, assets), args.baseline_src),
                "video_index": (video_argv(root, assets, "--data_index", str(root / "index.parquet")), here),
                "buckets_index": (video_argv(root, assets, "--buckets", "9x32x32,5x32x48", "--data_index",
                                             str(root / "index.parquet")), here),
                "cache_today": (cached_argv(store), args.baseline_src),
                "cache_index": (cached_argv(store), here),
            }
            if n in args.probe_all_sizes:
                runs["buckets_today"] = (video_argv(root, assets, "--buckets", "9x32x32,5x32x48"), args.baseline_src)
            for name, (run_argv, src) in runs.items():
                if args.runs is not None and name not in args.runs:
                    continue
                result = run_to_first_step(run_argv, src, args.work / f"run_{name}_{n}")
                result["load"] = os.getloadavg()[0]
                results.setdefault("startup", {}).setdefault(str(n), {})[name] = result
                print(f"[{n}] {name}: {result}", flush=True)
                save()
    if "index_build" in args.parts:  # the real `data index` over the smallest simulated set (2 worker processes)
        from opensora_plan.data.index import build_index

        n = min(args.sizes)
        root = make_dataset(args.work, n, assets)
        rows = {}
        for decode in (True, False):
            out = args.work / f"built_{n}_{'decode' if decode else 'open'}.parquet"
            out.unlink(missing_ok=True)
            began = time.monotonic()
            summary = build_index(root / "data.json", out, decode=decode, num_workers=2, progress=False)
            rows["decode" if decode else "no_decode"] = {
                "entries": n, "seconds": round(time.monotonic() - began, 1),
                "videos_per_s": round(n / (time.monotonic() - began), 1), "readable": summary["readable"]}
            began = time.monotonic()
            again = build_index(root / "data.json", out, decode=decode, num_workers=2, progress=False)
            rows["decode" if decode else "no_decode"]["refresh_s"] = round(time.monotonic() - began, 1)
            rows["decode" if decode else "no_decode"]["refresh_probed"] = again["probed"]
        results["index_build"] = {**rows, "load": os.getloadavg()[0]}
        print(results["index_build"], flush=True)
        save()
    if "shards" in args.parts:
        store = make_feature_store(args.work, max(args.sizes))
        results["shard_read"] = {"entries": max(args.sizes), **shard_read_rate(store), "load": os.getloadavg()[0]}
        print(results["shard_read"], flush=True)
        save()
    if "resume" in args.parts:
        store = make_feature_store(args.work, max(args.sizes))
        results["resume"] = {"entries": max(args.sizes), **resume_after_kill(store, here, args.work)}
        print(results["resume"], flush=True)
        save()
    results["machine"]["load_after"] = os.getloadavg()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
