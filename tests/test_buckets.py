"""Buckets (mixed resolutions, aspect ratios and durations in one run) and ``train-t2v --dry_run``."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import read_log  # noqa: E402

from opensora_plan import cli  # noqa: E402
from opensora_plan.data.buckets import (  # noqa: E402
    PRESETS,
    Bucket,
    BucketedVideoDataset,
    ClipInfo,
    assign_bucket,
    check_buckets,
    parse_buckets,
    resolve_batch_sizes,
)
from opensora_plan.data.datasets import collate_video_caption  # noqa: E402
from opensora_plan.data.transforms import video_bucket_transform, video_train_transform  # noqa: E402
from opensora_plan.data.video_io import write_video  # noqa: E402
from opensora_plan.train.sampler import BucketBatchSampler, SeededSamples  # noqa: E402

CAPTIONS = ["a red ball rolls to the left", "waves on a beach", "a green square moves up", "snow falls on a city"]
# Tiny-model buckets (CausalVAE 4x8x8 + patch 2 -> sides in multiples of 16): square, wide, tall, longer, images.
TINY_SPEC = "5x32x32,5x32x48,5x48x32,9x32x32,1x32x32"


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


def test_spec_string_preset_json_and_yaml_parse_alike(tmp_path):
    buckets = parse_buckets("17x256x256, 17x192x320,1x256x256")
    assert [(b.frames, b.height, b.width) for b in buckets] == [(17, 256, 256), (17, 192, 320), (1, 256, 256)]
    assert [b.name for b in parse_buckets("t2v_256")] == PRESETS["t2v_256"].split(",")
    items = [{"frames": 17, "height": 256, "width": 256}, {"frames": 65, "height": 256, "width": 256, "batch_size": 3}]
    (tmp_path / "b.json").write_text(json.dumps(items))
    (tmp_path / "b.yaml").write_text("buckets:\n" + "".join(
        f"  - {{frames: {i['frames']}, height: {i['height']}, width: {i['width']}"
        + (f", batch_size: {i['batch_size']}" if "batch_size" in i else "") + "}\n" for i in items))
    for path in (tmp_path / "b.json", tmp_path / "b.yaml"):
        assert parse_buckets(str(path)) == [Bucket(17, 256, 256), Bucket(65, 256, 256, 3)]


@pytest.mark.parametrize("spec, phrase", [
    ("", "empty bucket spec"),
    ("17x256", "is not FRAMESxHEIGHTxWIDTH"),
    ("t2v_999", "is not FRAMESxHEIGHTxWIDTH"),
    ("16x256x256", r"not 1 or 1 \+ 4k"),
    ("17x250x256", "multiples of 16"),
    ("0x256x256", "positive integer"),
    ("17x256x256,17x256x256", "more than once"),
    ("missing.json", "does not exist"),
])
def test_bad_specs_are_one_clear_error(spec, phrase):
    with pytest.raises((ValueError, FileNotFoundError), match=phrase):
        parse_buckets(spec)


def test_bad_spec_file_items_name_the_item(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([{"frames": 17, "height": 256}]))
    with pytest.raises(ValueError, match="item 0 .* needs 'frames', 'height' and 'width'"):
        parse_buckets(str(tmp_path / "b.json"))
    (tmp_path / "c.json").write_text(json.dumps([{"frames": 17, "height": 256, "width": 256, "batch_size": 0}]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        parse_buckets(str(tmp_path / "c.json"))
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be parsed"):
        parse_buckets(str(tmp_path / "d.json"))


def test_batch_sizes_follow_the_token_budget_of_the_first_bucket_unless_given():
    buckets = resolve_batch_sizes(parse_buckets("17x256x256,17x192x320,65x256x256,1x256x256,65x512x512")
                                  + [Bucket(17, 512, 512, batch_size=3)], 4)
    # tokens: 5x16x16 = 1280 (budget 5120), 5x12x20 = 1200, 17x16x16 = 4352, 1x16x16 = 256, 17x32x32 = 17408
    assert [b.batch_size for b in buckets] == [4, 4, 1, 20, 1, 3]


def test_token_budget_counts_the_joint_training_images_of_every_bucket():
    """Each sample carries t + n latent frames: with n = 4 images, 17x256x256 is (5 + 4) x 256 tokens and
    an image bucket (1 + 4) x 256, so the image bucket's batch is 4 x 9 // 5 = 7, not 4 x 5 // 1 = 20."""
    spec = parse_buckets("17x256x256,1x256x256,65x256x256")
    assert [b.batch_size for b in resolve_batch_sizes(spec, 4, use_image_num=4)] == [4, 7, 1]
    assert spec[0].latent_tokens(use_image_num=4) == 9 * 16 * 16
    assert [b.batch_size for b in resolve_batch_sizes(spec, 4)] == [4, 20, 1]


def test_a_spec_file_batch_on_the_first_bucket_sets_the_budget(tmp_path):
    (tmp_path / "b.yaml").write_text("- {frames: 17, height: 256, width: 256, batch_size: 2}\n"
                                     "- {frames: 1, height: 256, width: 256}\n")
    buckets = resolve_batch_sizes(parse_buckets(str(tmp_path / "b.yaml")), 8)  # --train_batch_size 8 is not used
    assert [b.batch_size for b in buckets] == [2, 10]


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------


def test_assignment_prefers_the_closest_aspect_then_the_longest():
    buckets = parse_buckets("t2v_256")
    names = [b.name for b in buckets]

    def name_of(frames, height, width, sample_rate=1):
        index, reason = assign_bucket(ClipInfo(frames, height, width), buckets, sample_rate)
        return names[index] if index is not None else reason

    assert name_of(100, 1080, 1920) == "17x192x320"  # 16:9 wins over length
    assert name_of(100, 1920, 1080) == "17x320x192"
    assert name_of(100, 720, 720) == "65x256x256"  # square and long enough: the longest square bucket
    assert name_of(40, 720, 720) == "17x256x256"  # too short for 65
    assert name_of(40, 720, 720, sample_rate=3) == "1x256x256"  # 17 x 3 = 51 source frames needed
    assert name_of(1, 300, 400) == "1x256x256"  # an image
    # 200x400 is wide, but 200 < 256 for the square buckets and 400 >= 320, 200 >= 192: the wide one fits
    assert name_of(100, 200, 400) == "17x192x320"
    assert name_of(30, 90, 120) == "too small: 90x120 < 192x320 (HxW)"


def test_too_short_names_the_frames_needed_and_ties_are_deterministic():
    buckets = parse_buckets("17x256x256,65x256x256")
    assert assign_bucket(ClipInfo(9, 512, 512), buckets) == (None, "too short: 9 frames < 17 needed")
    assert assign_bucket(ClipInfo(9, 512, 512), buckets, sample_rate=2) == (None, "too short: 9 frames < 33 needed")
    # Same aspect distance on both sides of a square clip: same frames and area, so the earlier bucket wins.
    tie = parse_buckets("17x192x320,17x320x192")
    assert assign_bucket(ClipInfo(17, 400, 400), tie) == (0, "")
    assert assign_bucket(ClipInfo(17, 400, 400), tie[::-1]) == (0, "")


# --------------------------------------------------------------------------------------------
# Crop and resize
# --------------------------------------------------------------------------------------------


def _disc_frame(height: int, width: int, radius: int) -> torch.Tensor:
    """uint8 (1, H, W, 3): a white disc of ``radius`` in the centre of a black frame."""
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    disc = ((y - height / 2) ** 2 + (x - width / 2) ** 2) <= radius**2
    return (disc[None, :, :, None].expand(1, height, width, 3) * 255).to(torch.uint8)


@pytest.mark.parametrize("frame_hw, bucket_hw", [((200, 400), (64, 96)), ((400, 200), (96, 64)),
                                                  ((300, 300), (48, 80)), ((240, 320), (64, 64))])
def test_crop_never_stretches_and_keeps_the_content_centred(frame_hw, bucket_hw):
    frames = _disc_frame(*frame_hw, radius=60)
    video = video_bucket_transform(frames, *bucket_hw, flip=False)  # (3, 1, h, w)
    assert video.shape == (3, 1, *bucket_hw)
    bright = video[0, 0] > 0
    rows = bright.any(dim=1).nonzero().flatten()
    cols = bright.any(dim=0).nonzero().flatten()
    extent_h, extent_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(int(extent_h) - int(extent_w)) <= 1  # still a disc: the same scale on both axes
    assert abs((rows.min() + rows.max() + 1) / 2 - bucket_hw[0] / 2) <= 1  # centred
    assert abs((cols.min() + cols.max() + 1) / 2 - bucket_hw[1] / 2) <= 1
    # A plain resize of the whole frame (what "stretch" would be) is visibly not a disc for unequal aspects.
    scale = min(frame_hw[0] / bucket_hw[0], frame_hw[1] / bucket_hw[1])
    assert extent_h == pytest.approx(120 / scale, abs=2)


def test_square_bucket_is_exactly_the_square_training_transform():
    frames = torch.randint(0, 256, (3, 40, 56, 3), dtype=torch.uint8)
    for flip in (False, True):
        assert torch.equal(video_bucket_transform(frames, 32, 32, flip), video_train_transform(frames, 32, flip))


def test_bucket_transform_refuses_to_upscale():
    with pytest.raises(ValueError, match="never upscale"):
        video_bucket_transform(torch.zeros(1, 20, 40, 3, dtype=torch.uint8), 32, 32, flip=False)


# --------------------------------------------------------------------------------------------
# The batch sampler
# --------------------------------------------------------------------------------------------


def _members():
    """Three buckets of 600, 100 and 50 items (indices disjoint), batch sizes 2, 1 and 5."""
    return [list(range(600)), list(range(600, 700)), list(range(700, 750))], [2, 1, 5]


def test_every_batch_holds_one_bucket_at_its_batch_size_and_each_item_once():
    members, sizes = _members()
    sampler = BucketBatchSampler(members, sizes, seed=0)
    assert sampler.batches_per_bucket() == [300, 100, 10] and len(sampler) == 410
    seen = []
    for batch in sampler:
        epochs, indices = zip(*batch)
        assert set(epochs) == {0}
        buckets = {next(b for b, m in enumerate(members) if i in m) for i in indices}
        assert len(buckets) == 1 and len(indices) == sizes[buckets.pop()]
        seen += indices
    assert sorted(seen) == list(range(750))  # no remainder here: every item once


def test_buckets_are_drawn_in_proportion_to_their_data():
    members, sizes = _members()
    sampler = BucketBatchSampler(members, sizes, seed=1)
    order = [next(b for b, m in enumerate(members) if batch[0][1] in m) for batch in sampler]
    for part in (order[:205], order[205:]):  # each half of the epoch holds about half of every bucket's batches
        counts = Counter(part)
        assert abs(counts[0] - 150) <= 20 and abs(counts[1] - 50) <= 15 and 1 <= counts[2] <= 9


def test_order_is_seeded_by_seed_and_epoch_and_resumes_from_a_batch_position():
    members, sizes = _members()
    a, b, c = (BucketBatchSampler(members, sizes, seed=s) for s in (0, 0, 1))
    assert list(a) == list(b) and list(a) != list(c)
    b.set_epoch(1)
    second = list(b)
    assert [i for _, i in second[0]] and second[0][0][0] == 1 and [x for _, x in sum(second, [])] != \
        [x for _, x in sum(list(a), [])]
    b.set_epoch(1, start=37)
    assert list(b) == second[37:] and len(b) == len(second) - 37


def test_processes_see_the_same_bucket_at_each_step_and_disjoint_items():
    members, sizes = _members()
    ranks = [BucketBatchSampler(members, sizes, seed=0, rank=r, world_size=2) for r in range(2)]
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == sum(len(m) // (2 * s) for m, s in zip(members, sizes))
    for x, y in zip(*batches):
        bucket_x = {next(b for b, m in enumerate(members) if i in m) for _, i in x}
        bucket_y = {next(b for b, m in enumerate(members) if i in m) for _, i in y}
        assert bucket_x == bucket_y and len(bucket_x) == 1
        assert not {i for _, i in x} & {i for _, i in y}


def test_no_batch_at_all_is_a_clear_error():
    with pytest.raises(ValueError, match="No bucket has enough clips for one batch"):
        BucketBatchSampler([[0, 1], [2]], [4, 2], seed=0)


# --------------------------------------------------------------------------------------------
# The dataset on real files
# --------------------------------------------------------------------------------------------


def _moving_square(frames: int, height: int, width: int, shift: int = 0) -> torch.Tensor:
    video = torch.zeros(frames, height, width, 3, dtype=torch.uint8)
    for t in range(frames):
        video[t, 4 + t : 14 + t, 4 + shift + t : 14 + shift + t] = 255
    return video


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Clips of every kind for TINY_SPEC: square 9- and 6-frame, wide, tall, two images (a PNG and a 2-frame
    clip), one too small and one broken file. Returns (root, data.json, {name: expected bucket or reason})."""
    from PIL import Image

    root = tmp_path_factory.mktemp("buckets")
    clips = {"sq9a": (9, 40, 40), "sq9b": (9, 44, 40), "sq6a": (6, 40, 40), "sq6b": (6, 40, 44),
             "wide": (6, 36, 60), "tall": (6, 60, 36), "two": (2, 40, 40), "small": (8, 24, 24)}
    entries = []
    for i, (name, (frames, height, width)) in enumerate(clips.items()):
        write_video(root / f"{name}.mp4", _moving_square(frames, height, width, shift=i), fps=8)
        entries.append({"path": f"{name}.mp4", "cap": [CAPTIONS[i % 4], CAPTIONS[(i + 1) % 4]]})
    Image.fromarray(_moving_square(1, 48, 40)[0].numpy()).save(root / "image.png")
    entries.append({"path": "image.png", "cap": "a still"})
    (root / "broken.mp4").write_bytes(b"not a video")
    entries.append({"path": "broken.mp4", "cap": "never read"})
    (root / "data.json").write_text(json.dumps(entries))
    expected = {"sq9a": "9x32x32", "sq9b": "9x32x32", "sq6a": "5x32x32", "sq6b": "5x32x32", "wide": "5x32x48",
                "tall": "5x48x32", "two": "1x32x32", "image": "1x32x32", "small": "too small"}
    return root, root / "data.json", expected


def test_dataset_assigns_every_clip_and_batches_hold_one_shape(mixed):
    root, data, expected = mixed
    buckets = resolve_batch_sizes(parse_buckets(TINY_SPEC), 1)
    assert [b.batch_size for b in buckets] == [1, 1, 1, 1, 2]
    dataset = BucketedVideoDataset(data, buckets, use_image_num=1, progress=False)
    names = [e.path.stem for e in dataset.entries]
    got = {names[i]: buckets[b].name for i, b in dataset.bucket_of.items()}
    assert got == {k: v for k, v in expected.items() if v != "too small"}
    assert [(Path(u["path"]).stem, u["reason"]) for u in dataset.plan.unfit] == [
        ("small", "too small: 24x24 < 32x32 (HxW)")]
    assert [Path(u["path"]).name for u in dataset.plan.unreadable] == ["broken.mp4"]
    sampler = BucketBatchSampler(dataset.plan.members, [b.batch_size for b in buckets], seed=0)
    loader = DataLoader(SeededSamples(dataset, 0), batch_sampler=sampler, collate_fn=collate_video_caption)
    shapes = Counter()
    for batch in loader:
        bucket = buckets[dataset.bucket_of[int(batch["index"][0])]]
        assert {dataset.bucket_of[int(i)] for i in batch["index"]} == {buckets.index(bucket)}
        # (B, 3, F + n, H, W): the joint-training image follows the bucket's size
        assert batch["video"].shape == (bucket.batch_size, 3, bucket.frames + 1, bucket.height, bucket.width)
        assert batch["video"].min() >= -1 - 1e-6 and batch["video"].max() <= 1 + 1e-6
        assert len(batch["captions"][0]) == 2
        shapes[bucket.name] += 1
    assert shapes == {"9x32x32": 2, "5x32x32": 2, "5x32x48": 1, "5x48x32": 1, "1x32x32": 1}


def test_probe_reads_what_the_training_reader_reads(mixed):
    from opensora_plan.data.buckets import probe_clip
    from opensora_plan.data.video_io import VideoReader, VideoReadError

    root, _, expected = mixed
    for name in expected:
        path = next(root.glob(f"{name}.*"))
        with VideoReader(path) as reader:
            assert probe_clip(path) == ClipInfo(reader.num_frames, reader.height, reader.width), name
    with pytest.raises(VideoReadError, match="broken.mp4"):
        probe_clip(root / "broken.mp4")
    with pytest.raises(VideoReadError, match="missing.mp4"):
        probe_clip(root / "missing.mp4")


def test_data_check_prints_the_histogram_and_the_clips_that_fit_no_bucket(mixed, capsys):
    root, data, _ = mixed
    code = cli.main(["data", "check", str(data), "--buckets", TINY_SPEC, "--no_decode"])
    out = capsys.readouterr().out
    assert code == 1  # the broken file is still reported as unreadable by the plain check
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:1].isdigit() and "x" in line.split()[0]}
    assert rows == {"5x32x32": ["2", "1", "2"], "5x32x48": ["1", "1", "1"], "5x48x32": ["1", "1", "1"],
                    "9x32x32": ["2", "1", "2"], "1x32x32": ["2", "2", "1"]}
    assert "8 clips in buckets, 1 fit no bucket, 1 unreadable" in out
    assert "small.mp4): too small: 24x24 < 32x32 (HxW)" in out
    plan = check_buckets(data, "1x32x32", base_batch_size=1, progress=False)
    assert len(plan.members[0]) == 8  # every readable clip has at least one frame of 32x32


def test_data_check_rejects_a_bad_spec_before_decoding(mixed, capsys):
    _, data, _ = mixed
    assert cli.main(["data", "check", str(data), "--buckets", "17x250x256"]) != 0
    err = capsys.readouterr().err
    assert "multiples of 16" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# train-t2v with buckets (tiny models): exact resume, options, --dry_run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, fixtures_dir):
    """Tiny T5 (width 32) and the fixture-config CausalVAE (4x8x8, random weights)."""
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.demo.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("bucket_models")
    t5 = build_tiny_t5(root / "t5", CAPTIONS, d_model=32)
    torch.manual_seed(0)
    vae_config = json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text())
    CausalVAEModel.from_config(vae_config).save_pretrained(root / "vae")
    return t5, root / "vae"


def _argv(mixed, models, out: Path, steps: int, *extra: str) -> list[str]:
    t5, vae = models
    return ["train-t2v", "--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(t5), "--ae_path", str(vae),
            "--data_path", str(mixed[1]), "--buckets", TINY_SPEC, "--use_image_num", "1",
            "--model_max_length", "16", "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--checkpointing_steps", "4", "--mixed_precision", "no", "--report_to", "none", "--learning_rate", "1e-3",
            "--output_dir", str(out), *extra]


def test_bucket_training_resumes_exactly_and_sees_every_bucket(mixed, models, tmp_path):
    """One epoch = 8 batches of 5 shapes (the image bucket's batch is 1: its image slot counts in the
    token budget); 4 steps + resume + 3 steps equals 7 straight steps bit for bit."""
    from safetensors.torch import load_file

    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(_argv(mixed, models, full, 7)) == 0
    assert cli.main(_argv(mixed, models, part, 4)) == 0
    assert cli.main(_argv(mixed, models, part, 7, "--resume_from_checkpoint", "latest")) == 0
    log_full, log_part = read_log(full), read_log(part)
    assert [r["step"] for r in log_part] == list(range(1, 8))
    assert [r["loss"] for r in log_full] == [r["loss"] for r in log_part]
    assert all(r["epoch"] == 0 for r in log_full)
    # tokens per step differ by bucket: 1 + 1 image frames of 2x2 patches x 2 for the image bucket, ...
    assert len({round(r["tokens_per_s"] / r["samples_per_s"], 6) for r in log_full}) >= 3
    a = load_file(full / "checkpoint-7" / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(part / "checkpoint-7" / "model" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoint records the first bucket's size (5 frames -> 2 latent frames of 4x4), not the last batch's.
    config = json.loads((full / "checkpoint-7" / "model" / "config.json").read_text())
    assert config["video_length"] == 2 and config["sample_size"] == [4, 4]
    state = torch.load(full / "checkpoint-7" / "training_state.pt", weights_only=False)
    assert state["data_order"].startswith("buckets:5x32x32:2/1;") and state["position"] == 7
    options = json.loads((full / "options.json").read_text())
    assert options["extra"]["buckets"] == TINY_SPEC


def test_bucket_options_that_cannot_work_fail_before_any_model_loads(mixed, models, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(_argv(mixed, models, out, 1, "--cached_features", str(tmp_path))) != 0
    assert "drop --cached_features or --buckets" in capsys.readouterr().err
    assert cli.main(_argv(mixed, models, out, 1, "--sp_size", "2")) != 0
    assert "--buckets with --sp_size > 1 is not supported" in capsys.readouterr().err
    assert cli.main([*_argv(mixed, models, out, 1)[:-2], "--buckets", "5x30x32", "--output_dir", str(out)]) != 0
    assert "multiples of 16" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(mixed, models, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(_argv(mixed, models, out, 5, "--dry_run", "--use_ema")) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "buckets = '5x32x32,5x32x48,5x48x32,9x32x32,1x32x32'" in text and "max_train_steps = 5" in text
    assert "1x32x32" in text and "small.mp4): too small" in text
    from opensora_plan.train.t2v import build_t2v, dry_run_report

    task, config = build_t2v({**_options(mixed, models, out), "use_ema": True, "dry_run": True})
    report = dry_run_report(task, config)
    transformer = task.models["model"]
    total = sum(p.numel() for p in transformer.parameters())
    counts = report["parameters"]
    assert counts["transformer"] == {"total": total, "trainable": total, "frozen": 0}
    assert counts["vae"]["frozen"] == sum(p.numel() for p in task.vae.parameters()) and counts["vae"]["trainable"] == 0
    assert f"{total:,}" in text and "activations not included" in text
    memory = report["memory"]
    assert memory["gradients"] == 4 * total and memory["adamw_states"] == 8 * total and memory["ema"] == 4 * total
    vae_t5 = 4 * sum(p.numel() for p in task.vae.parameters()) + 4 * sum(p.numel() for p in task.text_encoder.parameters())
    assert memory["weights"] == {"fp32": 4 * total + vae_t5}  # --mixed_precision no: T5 stays fp32
    assert not out.exists()
    # Without buckets too: the plain dataset is opened, nothing is written.
    plain = _argv(mixed, models, out, 5, "--dry_run")
    at = plain.index("--buckets")
    plain[at : at + 2] = ["--num_frames", "5", "--max_image_size", "32"]
    assert cli.main(plain) == 0
    text = capsys.readouterr().out
    assert "10 samples, batch 1 per process" in text and "buckets = None" in text and not out.exists()


def test_dry_run_with_lora_counts_adapters_as_trainable(mixed, models, tmp_path, capsys):
    pytest.importorskip("peft")
    from opensora_plan.models.latte import build_latte

    torch.manual_seed(3)
    build_latte("LatteT2V-Tiny/122", caption_channels=32, sample_size=[4, 4], video_length=2).save_pretrained(
        tmp_path / "base")
    out = tmp_path / "never"
    argv = _argv(mixed, models, out, 5, "--dry_run", "--pretrained", str(tmp_path / "base"), "--lora_rank", "2")
    argv[argv.index("--mixed_precision") + 1] = "bf16"
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.strip().startswith("transformer"))
    total, trainable, frozen = (int(v.replace(",", "")) for v in line.split()[1::2])
    assert 0 < trainable < frozen and total == trainable + frozen
    assert "LoRA: only the adapters are trainable" in text and "weights bf16" in text
    assert not out.exists()  # not even pretrained_report.json


def _options(mixed, models, out) -> dict:
    t5, vae = models
    return dict(model="LatteT2V-Tiny/122", text_encoder_name=str(t5), ae_path=str(vae), data_path=str(mixed[1]),
                buckets=TINY_SPEC, use_image_num=1, model_max_length=16, train_batch_size=1, max_train_steps=5,
                mixed_precision="no", report_to="none", output_dir=str(out))


def test_model_runs_other_lengths_only_inside_the_loss(mixed, models, tmp_path):
    """The per-batch temporal length swap leaves the model's configured length and embedding untouched."""
    from opensora_plan.train.t2v import _temporal_length, build_t2v

    task, _ = build_t2v(_options(mixed, models, tmp_path / "o"))
    model = task.models["model"]
    before = model.temp_pos_embed.clone()
    with _temporal_length(model, 3):
        assert model.config.video_length == 3 and model.temp_pos_embed.shape[1] == 3
    assert model.config.video_length == 2 and torch.equal(model.temp_pos_embed, before)
    assert task.find_unused_parameters  # the 1-frame bucket skips the temporal blocks


@pytest.mark.slow
def test_two_process_ddp_with_buckets_including_images(mixed, models, tmp_path):
    """torchrun x 2 (gloo): every step one bucket on both processes, the 1-frame bucket (no temporal blocks,
    find_unused_parameters) included; the trainer checks at the end that both replicas hold equal weights."""
    import os
    import subprocess

    spec = tmp_path / "buckets.json"  # batch 1 everywhere: 9x32x32, 5x32x32 and 1x32x32 fill one group of 2
    spec.write_text(json.dumps([{"frames": f, "height": h, "width": w, "batch_size": 1}
                                for f, h, w in ((5, 32, 32), (5, 32, 48), (5, 48, 32), (9, 32, 32), (1, 32, 32))]))
    out = tmp_path / "ddp"
    argv = _argv(mixed, models, out, 3)
    argv[argv.index("--buckets") + 1] = str(spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "opensora_plan", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["epoch"] == 0 for r in log)
    # tokens per sample: 9x32x32 + image = 4 x 4, 5x32x32 + image = 3 x 4, 1x32x32 + image = 2 x 4
    assert sorted(round(r["tokens_per_s"] / r["samples_per_s"]) for r in log) == [8, 12, 16]
    assert "replicas hold identical weights" in result.stderr


def test_a_rotated_phone_clip_is_probed_upright_and_goes_to_the_tall_bucket(tmp_path):
    import av

    from opensora_plan.data.buckets import probe_clip

    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w", format="mp4") as container:  # coded 64x48 landscape, displayed portrait
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert probe_clip(path) == ClipInfo(5, 64, 48)
    buckets = parse_buckets("5x32x32,5x32x48,5x48x32")
    assert buckets[assign_bucket(probe_clip(path), buckets)[0]].name == "5x48x32"


def test_resuming_with_other_buckets_starts_a_new_epoch_with_a_warning(mixed, models, tmp_path, caplog):
    out = tmp_path / "run"
    assert cli.main(_argv(mixed, models, out, 2, "--checkpointing_steps", "2")) == 0
    other = _argv(mixed, models, out, 3, "--resume_from_checkpoint", "latest")
    other[other.index("--buckets") + 1] = "5x32x32,9x32x32"  # the wide, tall and image clips now fit no bucket
    with caplog.at_level("WARNING"):
        assert cli.main(other) == 0
    assert "other data batching" in caplog.text
    assert [(r["step"], r["epoch"]) for r in read_log(out)] == [(1, 0), (2, 0), (3, 1)]


def test_data_check_keeps_entry_numbers_when_some_entries_are_malformed(mixed, tmp_path):
    root, data, _ = mixed
    entries = json.loads(data.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"cap": "no path"}] + entries))
    plan = check_buckets(bad, TINY_SPEC, video_folder=root, progress=False)
    assert [(u["index"], Path(u["path"]).name) for u in plan.unfit] == [(8, "small.mp4")]
    assert sorted(i for m in plan.members for i in m) == [1, 2, 3, 4, 5, 6, 7, 9]


# --------------------------------------------------------------------------------------------
# QA findings (new-user pass over buckets and --dry_run)
# --------------------------------------------------------------------------------------------


def test_probing_many_images_in_threads_leaves_stderr_where_it_was(tmp_path):
    """Images have no frame count in the header and go to the reader, which (with decord) redirects fd 2;
    two threads doing that at once used to leave fd 2 on a deleted temporary file for good."""
    import os

    from PIL import Image

    from opensora_plan.data.buckets import plan_buckets

    paths = []
    for i in range(24):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(_moving_square(1, 40, 40, shift=i % 8)[0].numpy()).save(paths[-1])
    before = os.readlink("/proc/self/fd/2") if os.path.exists("/proc/self/fd/2") else None
    stat_before = os.fstat(2)
    for _ in range(3):
        plan = plan_buckets(paths, parse_buckets("1x32x32"), progress=False)
        assert len(plan.members[0]) == 24
    stat_after = os.fstat(2)
    assert (stat_after.st_dev, stat_after.st_ino) == (stat_before.st_dev, stat_before.st_ino)
    if before is not None:
        assert os.readlink("/proc/self/fd/2") == before


def _truncated_clip(path: Path, frames: int, height: int, width: int) -> None:
    """An mp4 whose header (moov first) promises ``frames`` frames but whose data stops half way."""
    import av

    full = path.with_suffix(".full.mp4")
    rng = np.random.default_rng(0)
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):  # noise: every frame is large, so half the bytes is about half the frames
            frame = av.VideoFrame.from_ndarray((rng.random((height, width, 3)) * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    full.unlink()


def test_data_check_buckets_agree_with_its_decode_pass(tmp_path, capsys):
    """A file the decode pass finds unreadable (truncated: the header says 20 frames) is in no bucket,
    counted once as unreadable; and with no clip in any bucket, data check fails."""
    from opensora_plan.data.buckets import probe_clip

    _truncated_clip(tmp_path / "cut.mp4", 20, 32, 32)
    assert probe_clip(tmp_path / "cut.mp4").frames < 20  # counted as the reader counts, not from the header
    write_video(tmp_path / "ok.mp4", _moving_square(9, 32, 32), fps=8)
    (tmp_path / "data.json").write_text(json.dumps([{"path": "cut.mp4", "cap": "a"}, {"path": "ok.mp4", "cap": "b"}]))
    code = cli.main(["data", "check", str(tmp_path / "data.json"), "--buckets", "9x32x32,5x32x32"])
    out = capsys.readouterr().out
    assert code == 1  # the truncated file is unreadable
    assert "1 clips in buckets, 0 fit no bucket, 1 unreadable" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line[:1].isdigit() and "x" in line.split()[0]}
    assert rows == {"9x32x32": "1", "5x32x32": "0"}


def test_a_bucket_whose_clips_all_fail_is_left_out_before_training(tmp_path, caplog):
    """The only clip of the 9-frame bucket cannot be decoded: build_t2v's check drops that bucket with a
    warning (the run goes on with the others), instead of the run dying at its first batch of that bucket."""
    write_video(tmp_path / "cut.mp4", _moving_square(9, 32, 32), fps=8)
    for i in range(2):
        write_video(tmp_path / f"ok{i}.mp4", _moving_square(5, 32, 32, shift=i), fps=8)
    entries = [{"path": "cut.mp4", "cap": "a"}] + [{"path": f"ok{i}.mp4", "cap": "b"} for i in range(2)]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    buckets = resolve_batch_sizes(parse_buckets("5x32x32,9x32x32"), 1)
    dataset = BucketedVideoDataset(tmp_path / "data.json", buckets, random_flip=False, progress=False)
    assert dataset.plan.members == [[1, 2], [0]]
    (tmp_path / "cut.mp4").write_bytes(b"probed, then broken")  # what a probe passes and decoding fails
    with caplog.at_level("WARNING"):
        assert dataset.drop_unusable_buckets() == ["9x32x32"]
    assert "Buckets ['9x32x32'] are left out" in caplog.text
    assert dataset.plan.members == [[1, 2], []] and 0 not in dataset.bucket_of
    assert [u["index"] for u in dataset.plan.unreadable] == [0]
    sampler = BucketBatchSampler(dataset.plan.members, [b.batch_size for b in buckets], seed=0)
    assert sampler.batches_per_bucket() == [2, 0]


def test_a_failing_clip_is_replaced_by_one_of_another_bucket_in_this_buckets_shape(tmp_path):
    write_video(tmp_path / "long.mp4", _moving_square(9, 48, 48), fps=8)
    write_video(tmp_path / "short.mp4", _moving_square(5, 32, 48), fps=8)
    (tmp_path / "data.json").write_text(json.dumps([{"path": "short.mp4", "cap": "a"}, {"path": "long.mp4", "cap": "b"}]))
    buckets = resolve_batch_sizes(parse_buckets("5x32x48,9x32x32"), 1)
    dataset = BucketedVideoDataset(tmp_path / "data.json", buckets, progress=False)
    assert dataset.plan.members == [[0], [1]]
    (tmp_path / "short.mp4").write_bytes(b"gone bad after probing")
    used, clip, skipped = dataset.load_clip_or_substitute(0)
    assert used == 1 and clip.shape == (3, 5, 32, 48) and [Path(s["path"]).name for s in skipped] == ["short.mp4"]
    (tmp_path / "long.mp4").write_bytes(b"also bad")
    from opensora_plan.data.datasets import NoUsableVideoError

    with pytest.raises(NoUsableVideoError, match="fit bucket 5x32x48"):
        dataset.load_clip_or_substitute(0)


def test_image_buckets_take_images_whatever_the_sample_rate_and_clips_need_the_loaders_frames(tmp_path):
    """A 1-frame bucket needs 1 frame at any stride; an F-frame bucket needs (F - 1) x stride + 1 frames,
    exactly what the loader's window reads as F distinct frames sample_rate apart."""
    from opensora_plan.data.buckets import needed_frames
    from opensora_plan.data.transforms import temporal_window_indices

    buckets = parse_buckets("5x32x32,1x32x32")
    assert assign_bucket(ClipInfo(1, 32, 32), buckets, sample_rate=2) == (1, "")
    assert assign_bucket(ClipInfo(9, 32, 32), buckets, sample_rate=2) == (0, "")
    assert assign_bucket(ClipInfo(8, 32, 32), buckets, sample_rate=2) == (1, "")
    assert assign_bucket(ClipInfo(1, 32, 32), parse_buckets("5x32x32"), 2) == (None, "too short: 1 frame < 9 needed")
    for frames, rate in ((5, 2), (17, 3), (9, 1)):
        total = needed_frames(frames, rate)
        indices = temporal_window_indices(total, frames, rate)
        assert indices == list(range(0, total, rate))  # distinct, exactly `rate` apart
    write_video(tmp_path / "v.mp4", _moving_square(9, 32, 32), fps=8)
    from PIL import Image

    Image.fromarray(_moving_square(1, 32, 32)[0].numpy()).save(tmp_path / "i.jpg")
    (tmp_path / "data.json").write_text(json.dumps([{"path": "v.mp4", "cap": "a"}, {"path": "i.jpg", "cap": "b"}]))
    dataset = BucketedVideoDataset(tmp_path / "data.json", resolve_batch_sizes(buckets, 1), sample_rate=2,
                                   progress=False)
    assert dataset.plan.members == [[0], [1]] and not dataset.plan.unfit
    assert dataset.load_clip(0).shape == (3, 5, 32, 32) and dataset.load_clip(1).shape == (3, 1, 32, 32)


def test_an_empty_bucket_spec_is_an_error_not_ignored(mixed, models, tmp_path, capsys):
    _, data, _ = mixed
    assert cli.main(["data", "check", str(data), "--buckets", "", "--no_decode"]) != 0
    err = capsys.readouterr().err
    assert "empty bucket spec" in err and len(err.strip().splitlines()) == 1
    argv = _argv(mixed, models, tmp_path / "o", 1, "--dry_run")
    argv[argv.index("--buckets") + 1] = "  "
    assert cli.main(argv) != 0
    assert "empty bucket spec" in capsys.readouterr().err


def test_model_name_is_checked_before_clips_are_probed(mixed, models, tmp_path, capsys, monkeypatch):
    import opensora_plan.data.buckets as buckets_module

    def no_probing(*args, **kwargs):
        raise AssertionError("clips were probed before --model was checked")

    monkeypatch.setattr(buckets_module, "plan_buckets", no_probing)
    argv = _argv(mixed, models, tmp_path / "o", 1, "--dry_run")
    argv[argv.index("--model") + 1] = "LatteT2V-Tiny"
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert "--model LatteT2V-Tiny is neither a known size (LatteT2V-XL/122" in err and "LatteT2V-Tiny/122" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--num_frames", "65"), ("--max_image_size", "512")])
def test_sizes_given_with_buckets_are_refused_not_ignored(mixed, models, tmp_path, capsys, flag, value):
    assert cli.main(_argv(mixed, models, tmp_path / "o", 1, "--dry_run", flag, value)) != 0
    err = capsys.readouterr().err
    assert f"{flag} {value} is not used with --buckets" in err and len(err.strip().splitlines()) == 1


def test_data_check_fails_when_no_clip_can_train_and_warns_about_idle_buckets(tmp_path, capsys):
    for i in range(4):
        write_video(tmp_path / f"v{i}.mp4", _moving_square(5, 32, 32 if i < 3 else 48, shift=i), fps=8)
    (tmp_path / "data.json").write_text(json.dumps([{"path": f"v{i}.mp4", "cap": "a"} for i in range(4)]))
    data = str(tmp_path / "data.json")
    # Every file reads, but no clip is 9 frames long: training would stop at once, so data check fails.
    assert cli.main(["data", "check", data, "--buckets", "9x32x32"]) == 1
    out = capsys.readouterr().out
    assert "ERROR        no bucket fills one batch" in out and "4 fit no bucket" in out
    # Three square clips fill a batch of 3; the wide clip's bucket (batch 24 // 12 = 2 by the token budget)
    # never trains: a warning, exit 0.
    assert cli.main(["data", "check", data, "--buckets", "5x32x32,5x32x48", "--train_batch_size", "3"]) == 0
    out = capsys.readouterr().out
    assert "WARNING      buckets ['5x32x48'] have fewer clips than one batch" in out and "ERROR" not in out


def test_dry_run_checks_the_checkpoint_to_resume_and_lists_unreadable_files(mixed, models, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(_argv(mixed, models, out, 1, "--dry_run", "--resume_from_checkpoint", "checkpoint-9")) != 0
    err = capsys.readouterr().err
    assert "--resume_from_checkpoint checkpoint-9" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(_argv(mixed, models, out, 1, "--dry_run", "--resume_from_checkpoint", "latest")) == 0
    text = capsys.readouterr().out
    assert f"resume: none: a fresh run (no checkpoint in {out} yet)" in text
    assert "UNREADABLE   entry 9: Cannot read video" in text and "broken.mp4" in text
    assert not out.exists()


def test_run_summary_counts_the_videos_the_bucket_plan_left_out(mixed, models, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_argv(mixed, models, out, 1)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 unreadable video left out before training" in line and "1 video fit no bucket" in line
    assert "no unreadable videos" not in line
    assert cli.main(_argv(mixed, models, out, 2, "--resume_from_checkpoint", "latest")) == 0
    assert "1 unreadable video left out before training" in capsys.readouterr().out.strip().splitlines()[-1]


def test_a_bad_yaml_or_json_spec_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    (tmp_path / "b.yaml").write_text("- {frames: 17, height: 256, width: 256}\n- {frames: 1, height: [256, width: 256}\n")
    with pytest.raises(ValueError, match=r"b.yaml cannot be parsed \(line 2, column \d+: ") as err:
        parse_buckets(str(tmp_path / "b.yaml"))
    assert "\n" not in str(err.value)
    (tmp_path / "b.json").write_text('[{"frames": 17,\n "height": 256 "width": 256}]')
    with pytest.raises(ValueError, match=r"b.json cannot be parsed \(line 2, column \d+: Expecting ',' delimiter\)"):
        parse_buckets(str(tmp_path / "b.json"))
    assert cli.main(["data", "check", str(tmp_path / "x.json"), "--buckets", str(tmp_path / "b.yaml")]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_data_check_refuses_bucket_only_options_without_buckets(mixed, capsys):
    _, data, _ = mixed
    assert cli.main(["data", "check", str(data), "--train_batch_size", "4", "--no_decode"]) != 0
    err = capsys.readouterr().err
    assert "--train_batch_size is only used with --buckets" in err and len(err.strip().splitlines()) == 1


def test_a_bucket_trained_model_samples_at_another_buckets_shape(tmp_path):
    """any_size=True: another bucket's length and size run with the position embeddings bucket training
    uses (temporal one swapped for the call, spatial one on the new grid); the refusal stays the default."""
    from tiny_t2v import TINY_VERSION, build_tiny_t2v

    from opensora_plan.diffusion.schedulers import create_scheduler
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.models.text_encoder import load_t5
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    model_path, t5_path = build_tiny_t2v(tmp_path)
    tokenizer, text_encoder = load_t5(t5_path)
    pipe = OpenSoraPlanPipeline(vae=CausalVAEModel.from_pretrained(model_path / "vae"),
                                transformer=LatteT2V.from_pretrained(model_path / TINY_VERSION),
                                scheduler=create_scheduler("DDIM"), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = pipe.default_size()
    other = dict(num_frames=frames + 4, height=height, width=width + 16)
    with pytest.raises(ValueError, match="does not match this transformer"):
        pipe("a cat playing the piano", num_inference_steps=2, **other)
    before = pipe.transformer.temp_pos_embed.clone()
    video = pipe("a cat playing the piano", num_inference_steps=2, any_size=True, output_type="np",
                 generator=torch.Generator().manual_seed(0), **other).frames
    assert video.shape == (1, frames + 4, height, width + 16, 3) and np.isfinite(video).all()
    assert pipe.transformer.config.video_length == (frames - 1) // 4 + 1  # restored after the call
    assert torch.equal(pipe.transformer.temp_pos_embed, before)
    image = pipe("a cat playing the piano", num_inference_steps=2, any_size=True, output_type="np", num_frames=1,
                 height=height + 16, width=width).frames
    assert image.shape == (1, 1, height + 16, width, 3)
