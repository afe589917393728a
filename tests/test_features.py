"""Offline feature cache (``extract``) and CachedFeatureDataset, with a tiny random T5 and CausalVAE."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from opensora_plan import cli
from opensora_plan.data import features
from opensora_plan.data.datasets import collate_video_caption
from opensora_plan.data.features import (
    CachedFeatureDataset,
    cached_clip,
    extract_features,
    shard_name,
)
from opensora_plan.data.video_io import write_video

NUM_FRAMES, SIZE, IMAGES = 5, 16, 2  # 5 = 1 + 4k frames for the VAE; 16 px -> 2x2 latents


def clip(seed: int, frames: int = 12, height: int = 24, width: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, height, width, 3), generator=generator, dtype=torch.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Videos (two good, one corrupt), a JSON, a tiny T5 and a tiny VAE folder."""
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.demo.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("features")
    write_video(root / "a.mp4", clip(0), fps=12)
    write_video(root / "b.mp4", clip(1), fps=12)
    (root / "broken.mp4").write_bytes(b"not a video" * 50)
    entries = [
        {"path": "a.mp4", "cap": ["a red car drives", "a car on a road"]},
        {"path": "broken.mp4", "cap": "a broken file"},
        {"path": "b.mp4", "cap": "a cat sleeps on a sofa"},
    ]
    (root / "data.json").write_text(json.dumps(entries))
    captions = [c for e in entries for c in ([e["cap"]] if isinstance(e["cap"], str) else e["cap"])]
    build_tiny_t5(root / "t5", captions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = CausalVAEModel(hidden_size=32, hidden_size_mult=(1, 1, 1, 1), num_res_blocks=1)
    vae.save_pretrained(root / "vae")
    return root


def run_extract(root, out, **overrides):
    kwargs = dict(
        text_encoder_name=root / "t5", ae_path=root / "vae", num_frames=NUM_FRAMES, max_image_size=SIZE,
        use_image_num=IMAGES, shard_size=2, device="cpu", text_dtype="fp32", clean_captions=False, progress=False,
    )
    kwargs.update(overrides)
    return extract_features(root / "data.json", out, **kwargs)


@pytest.fixture(scope="module")
def cache(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "features"
    summary = run_extract(setup, out)
    return out, summary


# --------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------


def test_cache_holds_vae_posterior_and_trimmed_text_embeddings(setup, cache):
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.text_encoder import encode_texts, load_t5

    out, summary = cache
    assert summary["entries"] == 3 and summary["cached"] == 2 and summary["shards"] == 2
    vae = CausalVAEModel.from_pretrained(setup / "vae")
    video = cached_clip(setup / "a.mp4", NUM_FRAMES, 1, SIZE, IMAGES)  # (3, T + n, S, S)
    with torch.no_grad():
        clip_post = vae.encode(video[:, :NUM_FRAMES].unsqueeze(0)).latent_dist
        image_post = vae.encode(video[:, NUM_FRAMES:].permute(1, 0, 2, 3).unsqueeze(2)).latent_dist
    tokenizer, encoder = load_t5(setup / "t5")
    full, mask = encode_texts(tokenizer, encoder, ["a red car drives", "a car on a road"])  # (2, 300, D)
    with safe_open(str(out / shard_name(0)), framework="pt") as f:
        mean, logvar = f.get_tensor("0.latent_mean"), f.get_tensor("0.latent_logvar")
        text = [f.get_tensor(f"0.text.{j}") for j in range(2)]
    latent_frames = clip_post.mean.shape[2]
    assert mean.shape == (4, latent_frames + IMAGES, *clip_post.mean.shape[3:])
    torch.testing.assert_close(mean[:, :latent_frames], clip_post.mean[0])
    torch.testing.assert_close(logvar[:, :latent_frames], clip_post.logvar[0])
    torch.testing.assert_close(mean[:, latent_frames:], image_post.mean[:, :, 0].permute(1, 0, 2, 3))
    for j in range(2):
        n = int(mask[j].sum())
        assert text[j].shape == (n, full.shape[-1]) and n < full.shape[1]
        torch.testing.assert_close(text[j], full[j, :n])


def test_unreadable_video_is_listed_and_left_out(cache):
    out, summary = cache
    assert [s["index"] for s in summary["skipped"]] == [1]
    assert "broken.mp4" in summary["skipped"][0]["path"]
    dataset = CachedFeatureDataset(out)
    assert len(dataset) == 2 and dataset.entry.tolist() == [0, 2]
    assert dataset.skipped_at_extraction[0]["index"] == 1


def test_rerun_resumes_and_rebuilds_only_missing_shards(setup, cache, tmp_path):
    out, _ = cache
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in out.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    kept = (copy / shard_name(0)).stat().st_mtime_ns
    rebuilt_before = (copy / shard_name(1)).read_bytes()
    (copy / shard_name(1)).unlink()
    summary = run_extract(setup, copy)
    assert summary["shards_written"] == 1 and summary["shards_reused"] == 1
    assert (copy / shard_name(0)).stat().st_mtime_ns == kept
    assert (copy / shard_name(1)).read_bytes() == rebuilt_before  # deterministic extraction
    assert run_extract(setup, copy)["shards_written"] == 0


def test_crash_mid_extract_leaves_only_complete_shards(setup, tmp_path, monkeypatch):
    real = features.encode_captions_trimmed
    calls = {"n": 0}

    def crash_in_second_shard(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # 1: the empty string, 2-3: entries 0-1 (shard 0), 4: entry 2 (shard 1)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(features, "encode_captions_trimmed", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_extract(setup, tmp_path / "c", ae_path=None)  # text only: quick
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["meta.json", "null_text.safetensors", shard_name(0)]
    with pytest.raises(ValueError, match="incomplete: shard-00001.safetensors is missing"):
        CachedFeatureDataset(tmp_path / "c")
    monkeypatch.setattr(features, "encode_captions_trimmed", real)
    summary = run_extract(setup, tmp_path / "c", ae_path=None)
    assert summary["shards_written"] == 1 and summary["cached"] == 3


def test_other_settings_into_the_same_folder_is_an_error(setup, cache):
    out, _ = cache
    with pytest.raises(ValueError, match="settings max_image_size differ.*new --out"):
        run_extract(setup, out, max_image_size=24)


def test_nothing_to_extract_is_an_error(setup, tmp_path):
    with pytest.raises(ValueError, match="Nothing to extract"):
        extract_features(setup / "data.json", tmp_path, progress=False)


# --------------------------------------------------------------------------------------------
# CachedFeatureDataset
# --------------------------------------------------------------------------------------------


def test_cached_sample_shapes_padding_and_fresh_posterior_samples(cache):
    out, _ = cache
    dataset = CachedFeatureDataset(out)
    with safe_open(str(out / shard_name(1)), framework="pt") as f:
        mean, logvar = f.get_tensor("2.latent_mean"), f.get_tensor("2.latent_logvar")
        text = f.get_tensor("2.text.0")
    scale = dataset.meta["scaling_factor"]
    torch.manual_seed(0)
    a, b = dataset[1], dataset[1]
    assert a["index"] == 2 and a["caption_index"] == 0
    assert a["latents"].shape == mean.shape
    assert not torch.equal(a["latents"], b["latents"])  # a fresh posterior sample each time
    draws = torch.stack([dataset[1]["latents"] for _ in range(400)])
    torch.testing.assert_close(draws.mean(0), mean * scale, atol=4 * scale * logvar.exp().sqrt().max() / 20, rtol=0)
    means_only = CachedFeatureDataset(out, sample_posterior=False)[1]["latents"]
    torch.testing.assert_close(means_only, mean * scale)

    n, max_length = text.shape[0], dataset.max_length
    assert a["text_emb"].shape == (1 + IMAGES, max_length, text.shape[1])
    assert a["text_mask"].shape == (1 + IMAGES, max_length)
    assert a["text_mask"].sum(dim=1).tolist() == [n] * (1 + IMAGES)
    torch.testing.assert_close(a["text_emb"][0, :n], text)
    assert a["text_emb"][:, n:].abs().max() == 0

    batch = collate_video_caption([dataset[0], dataset[1]])
    assert batch["latents"].shape == (2, *mean.shape)
    assert batch["text_emb"].shape == (2, 1 + IMAGES, max_length, text.shape[1])
    assert batch["skipped"] == []


def test_cached_captions_are_random_and_dropout_uses_the_empty_string_embedding(cache):
    out, _ = cache
    dataset = CachedFeatureDataset(out)
    torch.manual_seed(0)
    assert {dataset[0]["caption_index"] for _ in range(30)} == {0, 1}
    dropped = CachedFeatureDataset(out, cfg_dropout=1.0)[0]
    with safe_open(str(out / "null_text.safetensors"), framework="pt") as f:
        null = f.get_tensor("text")
    assert dropped["caption_index"] == -1
    torch.testing.assert_close(dropped["text_emb"][0, : null.shape[0]], null)
    assert dropped["text_mask"][0].sum() == null.shape[0]


def test_text_only_cache_reads_videos_on_the_fly(setup, tmp_path):
    text_only = tmp_path / "text"
    run_extract(setup, text_only, ae_path=None)
    dataset = CachedFeatureDataset(text_only)
    assert len(dataset) == 3  # videos are not opened at extraction without a VAE
    sample = dataset[1]  # the broken video: substituted by the next entry, reported
    assert sample["index"] == 2 and sample["video"].shape == (3, NUM_FRAMES + IMAGES, SIZE, SIZE)
    assert "broken.mp4" in sample["skipped"][0]["path"]
    assert sample["text_emb"].shape[0] == 1 + IMAGES and "latents" not in sample


@pytest.mark.slow  # four more VAE encodes (~10 s on a loaded 2-core machine)
def test_latent_only_cache_gives_raw_captions(setup, tmp_path):
    latents_only = tmp_path / "latents"
    run_extract(setup, latents_only, text_encoder_name=None)
    sample = CachedFeatureDataset(latents_only)[1]
    assert sample["captions"] == ["a cat sleeps on a sofa"] * (1 + IMAGES) and "text_emb" not in sample
    assert sample["latents"].shape[1] == 2 + IMAGES


def test_not_a_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        CachedFeatureDataset(tmp_path)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_extract_command(setup, tmp_path, capsys):
    argv = ["extract", "--data_path", str(setup / "data.json"), "--out", str(tmp_path / "f"),
            "--text_encoder_name", str(setup / "t5"), "--num_frames", str(NUM_FRAMES),
            "--max_image_size", str(SIZE), "--text_dtype", "fp32", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "3 of 3 entries cached in 1 shard (1 written now, 0 kept from before)" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "(0 written now, 1 kept from before)" in capsys.readouterr().out


def test_data_check_counts_caption_tokens_with_a_t5_folder(setup):
    from opensora_plan.data.check import check_dataset
    from opensora_plan.models.text_encoder import load_tokenizer

    tokenizer = load_tokenizer(setup / "t5")
    captions = ["a red car drives", "a car on a road", "a broken file", "a cat sleeps on a sofa"]
    lengths = [len(tokenizer(c).input_ids) for c in captions]  # EOS included
    limit = sorted(lengths)[1]
    report = check_dataset(setup / "data.json", text_encoder_name=setup / "t5", model_max_length=limit, progress=False)
    assert report["captions"]["tokens"]["max"] == max(lengths) and report["captions"]["tokens"]["min"] == min(lengths)
    assert report["captions"]["over_max_length"] == sum(n > limit for n in lengths)


def test_cache_settings_override_the_flags_and_only_a_given_one_is_warned(cache, caplog):  # QA 6
    """The cache's frames / size / caption length are used; a flag left at its default (most likely not given) is
    only logged at DEBUG, a value that differs from both the default and the cache is warned."""
    from opensora_plan.train.t2v_build import _dataset
    from opensora_plan.train.t2v_options import T2VTrainOptions

    out, _ = cache
    opts = {**T2VTrainOptions.defaults(), "cached_features": str(out), "cfg_dropout": 0.0}
    with caplog.at_level("DEBUG"):
        _dataset(dict(opts))
    quiet = [r for r in caplog.records if "the feature cache was extracted with" in r.getMessage()]
    assert quiet and all(r.levelname == "DEBUG" for r in quiet)
    caplog.clear()
    with caplog.at_level("DEBUG"):
        _dataset({**opts, "model_max_length": 7})
    given = [r for r in caplog.records if r.getMessage().startswith("--model_max_length 7: the feature cache")]
    assert len(given) == 1 and given[0].levelname == "WARNING"
