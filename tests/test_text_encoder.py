"""T5 loading from a DeepFloyd-layout folder, tokenisation rules, caption cleaning, the tiny-T5 builder."""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch

from opensora_plan.demo.tiny_t5 import build_tiny_t5
from opensora_plan.models import text_encoder as te

CAPTIONS = [
    "a cat playing the piano in a sunny living room",
    "a drone shot of waves crashing on a rocky coast at sunset",
    "a dog running on the beach",
    "time lapse of clouds over a mountain lake",
]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"), CAPTIONS, d_model=32, num_layers=1)


def test_tiny_t5_has_the_deepfloyd_file_set_and_loads(tiny_t5):
    names = {p.name for p in tiny_t5.iterdir()}
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"} <= names
    assert "tokenizer.json" not in names  # like DeepFloyd/t5-v1_1-xxl: the sentencepiece model is converted on load
    tokenizer, encoder = te.load_t5(tiny_t5)
    assert encoder.config.d_model == 32 == te.t5_hidden_size(tiny_t5)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # The trained vocabulary round-trips a caption it was trained on, without <unk>.
    ids = tokenizer(CAPTIONS[0]).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTIONS[0]


def test_tokenize_pads_to_300_with_eos_and_mask(tiny_t5):
    tokenizer = te.load_tokenizer(tiny_t5)
    tokens = te.tokenize(tokenizer, [CAPTIONS[1], ""])
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (2, te.MAX_LENGTH)
    n = int(tokens.attention_mask[0].sum())
    assert tokens.input_ids[0, n - 1] == tokenizer.eos_token_id
    assert (tokens.input_ids[0, n:] == tokenizer.pad_token_id).all() and (tokens.attention_mask[0, n:] == 0).all()
    # The empty string (the reference's default negative prompt) is only EOS.
    assert tokens.attention_mask[1].sum() == 1 and tokens.input_ids[1, 0] == tokenizer.eos_token_id


def test_tokenize_truncates_long_prompts_keeping_eos(tiny_t5):
    tokenizer = te.load_tokenizer(tiny_t5)
    tokens = te.tokenize(tokenizer, " ".join(CAPTIONS * 40))
    assert tokens.input_ids.shape == (1, te.MAX_LENGTH) and tokens.attention_mask.all()
    assert tokens.input_ids[0, -1] == tokenizer.eos_token_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_texts_shapes_dtype_and_padding_independence(tiny_t5, dtype):
    tokenizer, encoder = te.load_t5(tiny_t5, torch_dtype=dtype)
    embeds, mask = te.encode_texts(tokenizer, encoder, CAPTIONS[:2])
    assert embeds.shape == (2, te.MAX_LENGTH, 32) and embeds.dtype == dtype
    assert torch.isfinite(embeds.float()).all()
    # With the attention mask, valid positions do not depend on how much padding follows.
    short, _ = te.encode_texts(tokenizer, encoder, CAPTIONS[:1], max_length=40)
    n = int(mask[0].sum())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(short[0, :n].float(), embeds[0, :n].float(), atol=tol, rtol=tol)


def test_missing_folder_names_path_and_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*spiece.model.*DeepFloyd/t5-v1_1-xxl"):
        te.load_t5(tmp_path / "nowhere")


@pytest.mark.parametrize("remove, what", [("spiece.model", "tokenizer"), ("model.safetensors", "weights"),
                                          ("config.json", "config.json")])
def test_incomplete_folder_names_what_is_missing(tiny_t5, tmp_path, remove, what):
    broken = shutil.copytree(tiny_t5, tmp_path / "t5")
    (broken / remove).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{broken}.* lacks {what}"):
        te.load_t5(broken)


def test_build_tiny_t5_is_seeded(tmp_path):
    a = te.load_text_encoder(build_tiny_t5(tmp_path / "a", CAPTIONS, seed=3))
    b = te.load_text_encoder(build_tiny_t5(tmp_path / "b", CAPTIONS, seed=3))
    c = te.load_text_encoder(build_tiny_t5(tmp_path / "c", CAPTIONS, seed=4))
    wa, wb, wc = (m.shared.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ValueError, match="at least one non-empty caption"):
        build_tiny_t5(tmp_path / "d", ["", "  "])


# --------------------------------------------------------------------------------------------
# Caption cleaning
# --------------------------------------------------------------------------------------------

# Outputs of the reference cleaner (PixArt/DeepFloyd _clean_caption, with ftfy and bs4).
CLEANING_CASES = [
    ("A Cat <b>playing</b> the piano!! https://example.com/x.jpg @bob #12 photo_001.png", "a cat playing the piano!! ."),
    ("this-is-my-cute-cat_really", "this is my cute cat really"),
    ("  Hello%20World  &amp; &quot;ok&quot; 中文字 ", 'hello world "ok"'),
    ("'a dog'", "a dog"),
    ("A drone shot: the coast, at sunset.The waves crash.", "a drone shot: the coast, at sunset. the waves crash."),
    ("Free shipping! 1920x1080 poster jc6640 page 3 from 192.168.0.1", "! poster from"),
]


@pytest.fixture
def fresh_cleaners():
    te._optional_cleaners.cache_clear()
    te._warned_missing.clear()
    yield
    te._optional_cleaners.cache_clear()
    te._warned_missing.clear()


@pytest.mark.parametrize("caption, expected", CLEANING_CASES)
def test_clean_caption_matches_reference_outputs(caption, expected, fresh_cleaners):
    pytest.importorskip("ftfy")
    pytest.importorskip("bs4")
    assert te.clean_caption(caption) == expected


def test_clean_caption_equals_diffusers_pixart_cleaner(fresh_cleaners):
    """Cross-check against the same cleaner as shipped in diffusers (its copy of the reference's code)."""
    pytest.importorskip("ftfy")
    pytest.importorskip("bs4")
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline

    holder = PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)
    extra = ["“Quoted” — text… ÃƒÂ© cafÃ© ip 10.0.0.1 id 1234567 file.mp4 #123456 {x} [y] *z*", "<person> at work"]
    for caption, _ in CLEANING_CASES:
        extra.append(caption)
    for caption in extra:
        assert te.clean_caption(caption) == holder._clean_caption(caption), caption


def test_clean_caption_without_ftfy_and_bs4_warns_once_and_still_cleans(monkeypatch, caplog, fresh_cleaners):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes "import ftfy" raise ImportError
    monkeypatch.setitem(sys.modules, "bs4", None)
    with caplog.at_level(logging.WARNING, logger=te.logger.name):
        outputs = [te.clean_caption(caption) for caption, _ in CLEANING_CASES]
        te.clean_caption("again")
    assert outputs == [expected for _, expected in CLEANING_CASES]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("opensora-plan[captions]" in w for w in warnings)


def test_preprocess_texts_cleans_twice_or_only_lowercases(fresh_cleaners):
    assert te.preprocess_texts("  A Cat  ", clean=False) == ["a cat"]
    assert te.preprocess_texts(["A <i>Cat</i>", "B"], clean=True) == ["a cat", "b"]
