"""``opensora-plan data index`` and ``--data_index``: build, resume after a kill, refresh, stale files, reading it
in ``data check`` and ``train-t2v`` (with and without buckets, one and two processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import read_log  # noqa: E402

from opensora_plan import cli  # noqa: E402
from opensora_plan.data import index as index_mod  # noqa: E402
from opensora_plan.data.index import DataIndex, build_index  # noqa: E402

CAPTIONS = ["a red ball rolls to the left", "waves on a beach", "a green square moves up", "snow falls on a city"]


def _write_clip(path: Path, i: int, frames: int = 9, height: int = 40, width: int = 48) -> None:
    from opensora_plan.data.video_io import write_video

    video = torch.zeros(frames, height, width, 3, dtype=torch.uint8)
    for t in range(frames):
        video[t, 4 + t : 16 + t, 4 + 3 * i : 16 + 3 * i] = 255
    write_video(path, video, fps=8)


@pytest.fixture
def assets(tmp_path, fixtures_dir):
    """Tiny T5 and CausalVAE, six clips (one of them 40x24 tall), a broken file and a malformed entry."""
    from opensora_plan.demo.tiny_t5 import build_tiny_t5
    from opensora_plan.models.causalvae import CausalVAEModel

    root = tmp_path / "assets"
    t5 = build_tiny_t5(root / "t5", CAPTIONS, d_model=32)
    torch.manual_seed(0)
    config = json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text())
    CausalVAEModel.from_config(config).save_pretrained(root / "vae")
    entries = []
    for i in range(6):
        _write_clip(root / f"clip{i}.mp4", i)
        entries.append({"path": f"clip{i}.mp4", "cap": [CAPTIONS[i % 4], CAPTIONS[(i + 1) % 4]]})
    (root / "broken.mp4").write_bytes(b"not a video")
    entries.insert(2, {"path": "broken.mp4", "cap": "never read"})
    (root / "data.json").write_text(json.dumps(entries))
    (root / "bad.json").write_text(json.dumps(entries + [{"path": "clip0.mp4"}]))
    return root, t5


def test_index_rows_unreadable_malformed_and_tokens(assets, tmp_path):
    root, t5 = assets
    summary = build_index(root / "bad.json", tmp_path / "i.parquet", text_encoder_name=str(t5), num_workers=2,
                          part_size=3, progress=False)
    assert summary["merged"] and summary["entries"] == 8 and summary["readable"] == 6
    assert [u["index"] for u in summary["unreadable"]] == [2] and "broken.mp4" in summary["unreadable"][0]["reason"]
    assert [m["index"] for m in summary["malformed"]] == [7] and "has no 'cap'" in summary["malformed"][0]["reason"]
    rows = pq.read_table(tmp_path / "i.parquet").to_pylist()
    assert [r["entry"] for r in rows] == list(range(8))
    clip = rows[0]
    assert (clip["frames"], clip["height"], clip["width"], clip["fps"]) == (9, 40, 48, 8.0)
    assert clip["duration_s"] == pytest.approx(9 / 8) and clip["readable"] and clip["reason"] is None
    assert clip["size"] == (root / "clip0.mp4").stat().st_size
    assert clip["mtime_ns"] == (root / "clip0.mp4").stat().st_mtime_ns
    assert clip["captions"] == [CAPTIONS[0], CAPTIONS[1]] and clip["caption_count"] == 2
    from opensora_plan.models.text_encoder import load_tokenizer

    tokenizer = load_tokenizer(str(t5))
    assert clip["caption_tokens"] == [len(tokenizer(c).input_ids) for c in clip["captions"]]
    assert not (tmp_path / "i.parquet.parts").exists()  # parts are merged and removed
    # Another dataset's index at --out is never overwritten.
    with pytest.raises(ValueError, match="index of another dataset"):
        build_index(root / "data.json", tmp_path / "i.parquet", progress=False)


def test_index_resumes_after_a_kill_and_refreshes_only_changed_videos(assets, tmp_path, monkeypatch):
    root, _ = assets
    out = tmp_path / "i.parquet"
    real_write, written = index_mod._write_parquet, []

    def killed_after_two_parts(path, table):
        if len(written) == 2:
            raise KeyboardInterrupt  # the run is killed while the third part is being written
        written.append(path)
        real_write(path, table)

    monkeypatch.setattr(index_mod, "_write_parquet", killed_after_two_parts)
    with pytest.raises(KeyboardInterrupt):
        build_index(root / "data.json", out, num_workers=1, part_size=2, progress=False)
    monkeypatch.setattr(index_mod, "_write_parquet", real_write)
    assert not out.exists() and len(list((tmp_path / "i.parquet.parts").glob("part-*.parquet"))) == 2
    summary = build_index(root / "data.json", out, num_workers=1, part_size=2, progress=False)
    assert summary["probed"] == 7 - 4 and summary["readable"] == 6  # only the two missing parts were probed
    straight = build_index(root / "data.json", tmp_path / "straight.parquet", part_size=2, progress=False)
    columns = ["entry", "path", "size", "mtime_ns", "frames", "fps", "height", "width", "readable", "reason"]
    assert pq.read_table(out, columns=columns).equals(pq.read_table(tmp_path / "straight.parquet", columns=columns))
    assert straight["probed"] == 7

    # Re-running refreshes: one re-encoded video (other size and mtime) is probed, the others kept.
    _write_clip(root / "clip3.mp4", 3, frames=5)
    summary = build_index(root / "data.json", out, part_size=2, progress=False)
    assert (summary["probed"], summary["reused"]) == (1, 6)
    assert pq.read_table(out).to_pylist()[4]["frames"] == 5  # entry 4 is clip3 (broken.mp4 is entry 2)


def test_stale_entries_are_reprobed_or_refused(assets, tmp_path):
    root, _ = assets
    out = tmp_path / "i.parquet"
    build_index(root / "data.json", out, progress=False)
    assert DataIndex.open(out, root / "data.json").stale_entries() == []
    (root / "clip1.mp4").write_bytes(b"replaced by junk")  # changed since indexing: now unreadable
    index = DataIndex.open(out, root / "data.json", progress=False)
    assert index.refreshed == [1] and not index.readable[1] and "clip1.mp4" in index.reasons[1]
    assert 1 not in index.readable_entries().tolist()
    with pytest.raises(ValueError, match=r"1 videos changed since indexing .*clip1.mp4.*re-run `opensora-plan data"):
        DataIndex.open(out, root / "data.json", max_stale=0)
    # An index of an older version of the dataset file, or of another file, is refused with one line.
    (root / "data.json").write_text((root / "data.json").read_text() + "\n")
    with pytest.raises(ValueError, match="is out of date"):
        DataIndex.open(out, root / "data.json")
    with pytest.raises(ValueError, match="is the index of"):
        DataIndex.open(out, root / "bad.json")
    with pytest.raises(ValueError, match="not a data index"):
        DataIndex.open(root / "data.json")


def test_data_check_reads_the_index(assets, tmp_path, capsys):
    root, _ = assets
    out = tmp_path / "i.parquet"
    assert cli.main(["data", "index", str(root / "bad.json"), "--out", str(out), "-q"]) == 0
    assert "8 entries, 6 readable, 1 unreadable, 1 malformed" in capsys.readouterr().out
    args = ["data", "check", str(root / "bad.json"), "--buckets", "9x32x32,9x32x48", "-q"]
    assert cli.main(args + ["--json_out", str(tmp_path / "plain.json")]) == 1
    assert cli.main(args + ["--data_index", str(out), "--json_out", str(tmp_path / "indexed.json")]) == 1
    plain, indexed = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "indexed.json"))
    assert indexed.pop("data_index") == {"path": str(out), "reprobed": []}
    assert plain == indexed
    assert "index        " + str(out) + " (up to date)" in capsys.readouterr().out
    # An index built without decoding cannot stand in for a decoding check.
    assert cli.main(["data", "index", str(root / "bad.json"), "--out", str(tmp_path / "n.parquet"), "--no_decode",
                     "-q"]) == 0
    assert cli.main(["data", "check", str(root / "bad.json"), "--data_index", str(tmp_path / "n.parquet")]) == 1
    assert "was built with --no_decode" in capsys.readouterr().err


def _train_argv(assets, out: Path, *extra: str) -> list[str]:
    root, t5 = assets
    return ["train-t2v", "--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(t5), "--ae_path",
            str(root / "vae"), "--data_path", str(root / "data.json"), "--model_max_length", "16",
            "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2", "--mixed_precision",
            "no", "--report_to", "none", "--output_dir", str(out), *extra]


def test_train_t2v_reads_the_index_with_and_without_buckets(assets, tmp_path, capsys):
    from opensora_plan.train.t2v import build_t2v
    from opensora_plan.train.t2v_options import T2VTrainOptions

    root, t5 = assets
    out = tmp_path / "i.parquet"
    build_index(root / "data.json", out, progress=False)
    plain = ["--num_frames", "5", "--max_image_size", "32"]
    assert cli.main(_train_argv(assets, tmp_path / "run", *plain, "--data_index", str(out))) == 0
    assert "1 unreadable video left out before training" in capsys.readouterr().out
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    options = T2VTrainOptions.from_mapping(dict(
        model="LatteT2V-Tiny/122", text_encoder_name=str(t5), ae_path=str(root / "vae"),
        data_path=str(root / "data.json"), model_max_length=16, output_dir=str(tmp_path / "x"), num_frames=5,
        max_image_size=32, data_index=str(out), max_train_steps=1))
    task, _ = build_t2v(options)
    assert len(task.dataset) == 6 and all("broken" not in str(task.dataset.entries[i].path) for i in range(6))
    assert task.dataset.entries[2].captions == (CAPTIONS[2], CAPTIONS[3])  # entry 3 of the JSON (clip2)

    # Buckets from the index: the same plan as probing every video, and nothing is opened to make it.
    buckets = ["--buckets", "9x32x32,5x32x48"]
    opts = dict(options.to_dict(), buckets="9x32x32,5x32x48", num_frames=17, max_image_size=256)
    with_index, _ = build_t2v(T2VTrainOptions.from_mapping(opts))
    without, _ = build_t2v(T2VTrainOptions.from_mapping(dict(opts, data_index=None)))
    assert with_index.dataset.plan.members == without.dataset.plan.members
    assert [u["index"] for u in with_index.dataset.plan.unreadable] == [2]
    assert cli.main(_train_argv(assets, tmp_path / "bucketed", *buckets, "--data_index", str(out))) == 0
    assert [r["step"] for r in read_log(tmp_path / "bucketed")] == [1, 2]
    # Flags that cannot go together fail with one line before anything loads.
    assert cli.main(_train_argv(assets, tmp_path / "y", "--data_index", str(out), "--cached_features",
                                str(tmp_path))) == 1
    assert "--data_index indexes the videos of --data_path" in capsys.readouterr().err


def _torchrun(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "opensora_plan", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_index_built_by_two_ranks_equals_one_process(assets, tmp_path):
    root, _ = assets
    _torchrun("data", "index", str(root / "data.json"), "--out", str(tmp_path / "two.parquet"), "--part_size", "2",
              "--num_workers", "1", "-q", timeout=300)
    build_index(root / "data.json", tmp_path / "one.parquet", part_size=2, progress=False)
    assert pq.read_table(tmp_path / "two.parquet").equals(pq.read_table(tmp_path / "one.parquet"))


@pytest.mark.slow
def test_two_process_run_reads_the_index(assets, tmp_path):
    root, _ = assets
    out = tmp_path / "i.parquet"
    build_index(root / "data.json", out, progress=False)
    plain = ["--num_frames", "5", "--max_image_size", "32", "--train_batch_size", "1"]
    _torchrun(*_train_argv(assets, tmp_path / "indexed", *plain, "--data_index", str(out))[:-2], "--output_dir",
              str(tmp_path / "indexed"))
    _torchrun(*_train_argv(assets, tmp_path / "bucketed", "--buckets", "9x32x32,5x32x48", "--train_batch_size", "1",
                           "--data_index", str(out)))
    for run in ("indexed", "bucketed"):
        assert [r["step"] for r in read_log(tmp_path / run)] == [1, 2]


# --------------------------------------------------------------------------------------------
# Sharded features (extract): the shard index, shard-ordered batches, exact resume mid-shard
# --------------------------------------------------------------------------------------------


def test_shard_batch_sampler_reads_shard_by_shard_and_resumes():
    from opensora_plan.train.sampler import ShardBatchSampler

    shard_of = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    ranks = [ShardBatchSampler(shard_of, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        order = ranks[0].order(epoch)
        assert sorted(order.tolist()) == list(range(11))
        runs = [shard_of[i] for i in order]
        assert runs == sorted(runs, key=runs.index)  # each shard's items are read in one run
        for sampler in ranks:
            sampler.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        assert len(batches[0]) == len(batches[1]) == 2  # 11 items // (2 x 2)
        flat = [i for b0, b1 in zip(*batches) for i in [k for _, k in b0] + [k for _, k in b1]]
        assert flat == order[:8].tolist()  # rank r takes slice r of every group of 2 x 2
        # Resuming at batch 1 gives exactly the rest of the epoch.
        ranks[1].set_epoch(epoch, 1)
        assert list(ranks[1]) == batches[1][1:]
    assert ranks[0].order(0).tolist() != ranks[0].order(1).tolist()
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShardBatchSampler([0, 0, 1], 2, seed=0, world_size=2)


def _extract(assets, out: Path, **kwargs) -> dict:
    from opensora_plan.data.features import extract_features

    root, t5 = assets
    return extract_features(root / "data.json", out, text_encoder_name=t5, ae_path=root / "vae", num_frames=5,
                            max_image_size=32, shard_size=3, model_max_length=16, device="cpu", text_dtype="fp32",
                            progress=False, **kwargs)


def _cached_argv(out: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return ["train-t2v", "--model", "LatteT2V-Tiny/122", "--cached_features", str(cache), "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--checkpointing_steps", "1", "--mixed_precision", "no", "--report_to",
            "none", "--learning_rate", "1e-3", "--output_dir", str(out), *extra]


def test_shard_index_and_resume_mid_shard_is_bit_exact(assets, tmp_path):
    from safetensors.torch import load_file

    from opensora_plan.data.features import CachedFeatureDataset

    cache = tmp_path / "cache"
    summary = _extract(assets, cache)
    assert (summary["entries"], summary["cached"], summary["shards"]) == (7, 6, 3)
    shards = pq.read_table(cache / "shards.parquet").to_pylist()
    assert [(r["entry"], r["shard"], r["cached"]) for r in shards] == [
        (0, 0, True), (1, 0, True), (2, 0, False), (3, 1, True), (4, 1, True), (5, 1, True), (6, 2, True)]
    assert "broken.mp4" in shards[2]["reason"] and shards[0]["caption_count"] == 2
    dataset = CachedFeatureDataset(cache)
    assert dataset.entry.tolist() == [0, 1, 3, 4, 5, 6] and dataset.shard.tolist() == [0, 0, 1, 1, 1, 2]
    assert [s["index"] for s in dataset.skipped_at_extraction] == [2]

    # 3 steps of batch 2 over shards of 2 / 3 / 1 clips: a stop after step 1 is mid-shard; the resumed run
    # equals the straight one bit for bit (losses, grad norms, weights).
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(_cached_argv(straight, cache, 3)) == 0
    assert cli.main(_cached_argv(resumed, cache, 1)) == 0
    state = torch.load(resumed / "checkpoint-1" / "training_state.pt", weights_only=False)
    assert state["position"] == 1 and state["data_order"].startswith("buckets:shards:6/2")
    assert cli.main(_cached_argv(resumed, cache, 3, "--resume_from_checkpoint", "latest")) == 0
    for a, b in zip(read_log(straight), read_log(resumed), strict=True):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    wa = load_file(str(straight / "checkpoint-3" / "model" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(resumed / "checkpoint-3" / "model" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_extract_on_two_ranks_and_two_process_resume_after_a_kill(assets, tmp_path):
    import signal
    import time

    from safetensors import safe_open
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    _extract(assets, one)
    root, t5 = assets
    _torchrun("extract", "--data_path", str(root / "data.json"), "--out", str(two), "--text_encoder_name", str(t5),
              "--ae_path", str(root / "vae"), "--num_frames", "5", "--max_image_size", "32", "--shard_size", "3",
              "--model_max_length", "16", "--device", "cpu", "--text_dtype", "fp32", "-q")
    assert pq.read_table(one / "shards.parquet").equals(pq.read_table(two / "shards.parquet"))
    for k in range(3):
        with safe_open(str(one / f"shard-0000{k}.safetensors"), "pt") as a, \
                safe_open(str(two / f"shard-0000{k}.safetensors"), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=0, atol=1e-5)

    # Two processes, batch 1 each: killed (SIGKILL) after a checkpoint, resumed: equal to the straight run.
    argv = lambda out, steps, *extra: _cached_argv(out, one, steps, "--train_batch_size", "1", *extra)  # noqa: E731
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _torchrun(*argv(straight, 3))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "opensora_plan", *argv(killed, 3)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-1").is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert done and done[-1] < 3, done  # killed before the end
    for p in killed.glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > 1:
            import shutil

            shutil.rmtree(p)  # resume from step 1: position 1 batch of 2 x 1 clips, inside the first shard read
    _torchrun(*argv(killed, 3, "--resume_from_checkpoint", "latest"))
    wa = load_file(str(straight / "checkpoint-3" / "model" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(killed / "checkpoint-3" / "model" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [(r["step"], r["loss"]) for r in read_log(straight)] == [(r["step"], r["loss"]) for r in read_log(killed)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killed_index_build_leaves_no_worker_running(tmp_path):
    """``kill -9`` of ``data index`` takes its probing workers with it (they were left running, then blocked on a
    pipe no one reads: QA 3)."""
    import signal
    import time

    _write_clip(tmp_path / "clip.mp4", 0)
    (tmp_path / "data.json").write_text(json.dumps([{"path": "clip.mp4", "cap": "a ball"}] * 3000))
    out = tmp_path / "killed-index.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "opensora_plan", "data", "index", str(tmp_path / "data.json"),
                             "--out", str(out), "--num_workers", "1", "--part_size", "20"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = Path(f"{out}.parts")
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and any(parts.glob("part-*.parquet"))) and time.monotonic() < deadline:
        assert proc.poll() is None, "the index build ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def survivors():
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and str(out).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # ended meanwhile
                pass
        return found

    deadline = time.monotonic() + 10
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = survivors()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers of the killed build still running: {left}"
