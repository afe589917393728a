"""A small random T5 encoder in the ``DeepFloyd/t5-v1_1-xxl`` file layout, for the demo model and tests.

Its sentencepiece vocabulary is trained on the given captions, so prompts of the demo's vocabulary
tokenise into real pieces and :func:`opensora_plan.models.text_encoder.load_t5` loads the folder exactly
as it loads the released T5.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import torch


def build_tiny_t5(
    folder: str | os.PathLike,
    captions: Iterable[str],
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    vocab_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a small random T5 encoder + a sentencepiece vocabulary trained on ``captions`` to ``folder``.

    The folder has the ``DeepFloyd/t5-v1_1-xxl`` layout (``config.json``, ``model.safetensors``,
    ``spiece.model``, ``tokenizer_config.json``; no ``tokenizer.json``, so loading converts the
    sentencepiece model as it does for the real repository) and loads with :func:`load_t5`.
    ``vocab_size`` is a soft upper bound for the trained vocabulary (small caption sets give fewer
    pieces); the model's embedding table is sized to the tokenizer, including T5's 100 sentinel ids.
    Same-architecture options as T5 v1.1 (gated-GELU feed-forward, untied embeddings).
    """
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("build_tiny_t5 needs at least one non-empty caption to train its vocabulary on.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = io.BytesIO()
    # T5's special ids: pad 0, eos 1, unk 2, no bos. hard_vocab_limit=False: small corpora give fewer pieces.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model_bytes.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.save_pretrained(str(folder))
    (folder / "tokenizer.json").unlink(missing_ok=True)  # keep the DeepFloyd file set

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(str(folder))
    return folder
