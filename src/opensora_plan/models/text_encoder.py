"""T5 text encoder: loading from a local folder, tokenisation, caption cleaning (spec section 4).

The reference uses ``DeepFloyd/t5-v1_1-xxl`` (encoder only, d_model 4096) through ``transformers``'
``T5EncoderModel`` and ``T5Tokenizer``; prompts are cleaned PixArt/DeepFloyd style, tokenised to
exactly 300 tokens (padding to max length, truncation, EOS added) and encoded with their attention
mask. Nothing is downloaded here: :func:`load_t5` reads a local folder with the layout of that
Hugging Face repository (``config.json``, weights, ``spiece.model``, ``tokenizer_config.json``).

:func:`opensora_plan.demo.tiny_t5.build_tiny_t5` writes a small random T5 in that same layout (the demo
model and the tests use it to exercise the real loading code).
"""

from __future__ import annotations

import functools
import html
import logging
import os
import re
import urllib.parse as ul
from pathlib import Path
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 300  # tokens per prompt, as the reference's sampler and trainer (the one place of this number)
MAX_LENGTH = MODEL_MAX_LENGTH  # the older name
# T5 v1.1's tokenizer limit (model_max_length 512 of DeepFloyd/t5-v1_1-xxl): the most tokens a caption may get.
T5_MAX_LENGTH = 512
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def check_t5_folder(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path after checking it holds a T5 config, weights and a tokenizer.

    One ``FileNotFoundError`` names the folder and what is missing, so a wrong ``--text_encoder_name``
    fails before any model is loaded.
    """
    folder = Path(path)
    expected = (
        "config.json, the weights (model*.safetensors or pytorch_model*.bin, sharded with an index is fine) "
        "and spiece.model, i.e. a local copy of DeepFloyd/t5-v1_1-xxl"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"T5 folder {folder} does not exist; expected a folder with {expected}.")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("weights (" + " / ".join(WEIGHT_FILES) + ")")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer (spiece.model)")
    if missing:
        raise FileNotFoundError(f"T5 folder {folder} lacks {', '.join(missing)}; expected {expected}.")
    return folder


def t5_hidden_size(path: str | os.PathLike) -> int:
    """The encoder width (``d_model``) written in the folder's ``config.json``, without loading weights."""
    from opensora_plan.utils import read_json_file

    folder = check_t5_folder(path)
    config = read_json_file(folder / "config.json", "T5 config")
    if not isinstance(config, dict) or "d_model" not in config:
        raise ValueError(f"{folder / 'config.json'} is not a T5 config (no d_model); give a DeepFloyd/t5-v1_1-xxl folder.")
    return int(config["d_model"])


def load_tokenizer(path: str | os.PathLike):
    """The folder's ``T5Tokenizer`` (a ``spiece.model`` is converted, which needs ``protobuf``)."""
    from transformers import T5Tokenizer

    folder = check_t5_folder(path)
    return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)


def load_text_encoder(
    path: str | os.PathLike,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """The folder's ``T5EncoderModel`` in ``torch_dtype`` on ``device``, in eval mode.

    A full ``T5ForConditionalGeneration`` checkpoint (as DeepFloyd ships) loads too: transformers
    keeps the encoder weights and ignores the decoder ones.
    """
    from transformers import T5EncoderModel

    folder = check_t5_folder(path)
    model = T5EncoderModel.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True)
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False)


def empty_text_encoder(path: str | os.PathLike):
    """The folder's ``T5EncoderModel`` built from its ``config.json`` on the meta device, in float32: its
    parameters' shapes, no weights read (``--dry_run`` and memory plans: T5-XXL's weights are 19 GB in float32)."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights(include_buffers=False):
        model = T5EncoderModel(T5Config.from_pretrained(str(path), local_files_only=True))
    model.tie_weights()  # the token embedding is shared.weight, as from_pretrained ties it (counted once)
    return model.eval().requires_grad_(False)


def load_t5(
    path: str | os.PathLike,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    meta: bool = False,
):
    """``(tokenizer, text_encoder)`` from one local T5 folder; ``meta``: the encoder without its weights
    (:func:`empty_text_encoder`, for ``--dry_run``)."""
    if meta:
        return load_tokenizer(path), empty_text_encoder(path)
    return load_tokenizer(path), load_text_encoder(path, torch_dtype=torch_dtype, device=device)


def tokenize(tokenizer, texts: str | list[str], max_length: int = MODEL_MAX_LENGTH):
    """Token ids and attention mask, each (B, max_length): padded to max length, truncated, EOS added."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="pt",
    )


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, texts: str | list[str], max_length: int = MODEL_MAX_LENGTH):
    """``(embeddings (B, max_length, d_model), attention_mask (B, max_length))`` for raw texts."""
    tokens = tokenize(tokenizer, texts, max_length)
    device = text_encoder.device
    mask = tokens.attention_mask.to(device)
    embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]  # (B, L, d_model)
    return embeds, mask


# --------------------------------------------------------------------------------------------
# Caption cleaning (PixArt / DeepFloyd ``clean_caption``)
# --------------------------------------------------------------------------------------------

_BAD_PUNCT = re.compile(r"[" + "#®•©™&@·º½¾¿¡§~" + r"\)\(\]\[\}\{\|\\\/\*" + r"]{1,}")
_URL_RES = [
    re.compile(
        r"\b((?:" + scheme + r":(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)"
        r"[\w/-]*\b\/?(?!@)))"
    )
    for scheme in ("https?", "www")
]
_CJK_RANGES = ("\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf", "\u4dc0-\u4dff", "\u4e00-\u9fff")
_DASHES = (
    "[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
    "\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)
_warned_missing: set[str] = set()


@functools.lru_cache(maxsize=None)
def _optional_cleaners():
    """``(strip_html, fix_text)``: BeautifulSoup / ftfy when installed, simple stand-ins otherwise.

    The stand-ins (a tag-stripping regex; no mojibake repair) give the same result on ordinary
    prompts; one warning per missing package says how to get the exact reference behaviour.
    """
    try:
        import warnings

        from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

        def strip_html(text: str) -> str:
            # A caption that looks like a URL or a file name is still a caption, not markup to fetch.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
                return BeautifulSoup(text, features="html.parser").text
    except ImportError:
        _warn_once("beautifulsoup4")

        def strip_html(text: str) -> str:
            return html.unescape(re.sub(r"<[^>]*>", "", text))

    try:
        import ftfy

        fix_text = ftfy.fix_text
    except ImportError:
        _warn_once("ftfy")

        def fix_text(text: str) -> str:
            return text

    return strip_html, fix_text


def _warn_once(package: str) -> None:
    if package not in _warned_missing:
        _warned_missing.add(package)
        logger.warning(
            "Caption cleaning without %s uses a simpler stand-in; install opensora-plan[captions] "
            "for the reference's exact cleaning.", package,
        )


def clean_caption(caption: str) -> str:
    """One pass of the reference's caption cleaner (PixArt-alpha / DeepFloyd-IF ``_clean_caption``).

    Lower-cases, removes URLs, HTML, @handles, CJK characters, file names, long numbers and ids,
    shop boilerplate ("free shipping"), normalises dashes and quotes, and collapses whitespace.
    """
    strip_html, fix_text = _optional_cleaners()
    caption = ul.unquote_plus(str(caption)).strip().lower()
    caption = re.sub("<person>", "person", caption)
    for url_re in _URL_RES:
        caption = url_re.sub("", caption)
    caption = strip_html(caption)
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @nickname
    for cjk in _CJK_RANGES:
        caption = re.sub(f"[{cjk}]+", "", caption)
    caption = re.sub(_DASHES, "-", caption)
    caption = re.sub(r"[`´«»“”¨]", '"', caption)
    caption = re.sub(r"[‘’]", "'", caption)
    caption = re.sub(r"&quot;?", "", caption)
    caption = re.sub(r"&amp", "", caption)
    caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)  # ip addresses
    caption = re.sub(r"\d:\d\d\s+$", "", caption)  # article ids
    caption = re.sub(r"\\n", " ", caption)
    caption = re.sub(r"#\d{1,3}\b", "", caption)
    caption = re.sub(r"#\d{5,}\b", "", caption)
    caption = re.sub(r"\b\d{6,}\b", "", caption)
    caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)  # file names
    caption = re.sub(r"[\"\']{2,}", r'"', caption)
    caption = re.sub(r"[\.]{2,}", r" ", caption)
    caption = _BAD_PUNCT.sub(" ", caption)
    caption = re.sub(r"\s+\.\s+", r" ", caption)
    separators = re.compile(r"(?:\-|\_)")  # this-is-my-cute-cat -> words
    if len(separators.findall(caption)) > 3:
        caption = separators.sub(" ", caption)
    caption = fix_text(caption)
    caption = html.unescape(html.unescape(caption))
    caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)  # jc6640
    caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)  # jc6640vc
    caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)  # 6640vc231
    caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
    caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
    caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
    caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
    caption = re.sub(r"\bpage\s+\d+\b", "", caption)
    caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)  # j2d1a2a...
    caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)  # sizes like 1920x1080
    caption = re.sub(r"\b\s+\:\s+", r": ", caption)
    caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)
    caption = re.sub(r"\s+", " ", caption)
    caption = re.sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", caption)
    caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
    caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
    caption = re.sub(r"^\.\S+$", "", caption)
    return caption.strip()


def _word_chars(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def emptied_by_cleaning(before: str, after: str) -> bool:
    """Whether caption cleaning left nothing of a text that said something: no letter or digit survives (a URL
    with a trailing full stop cleans to ``"."``, which T5 reads as next to the unconditional prompt)."""
    return bool(before.strip()) and not _word_chars(after)


def preprocess_prompts(texts: str | Iterable[str], clean: bool = True, what: str = "prompt",
                       empty_is_error: bool = True, warn: bool = True) -> list[str]:
    """:func:`preprocess_texts` that refuses to lose a prompt silently.

    A non-empty text that cleaning turns into ``""`` or into punctuation alone (e.g. a prompt written only in
    Chinese, or only a URL: the reference cleaner removes CJK characters and URLs) would be sampled as the unconditional prompt: that is
    a ValueError (a warning when ``empty_is_error`` is False, e.g. for a negative prompt). When
    cleaning keeps less than half of the letters and digits, a warning says what is left
    (``warn=False``: only the error, for an early check before the prompts are encoded).
    """
    raw = [texts] if isinstance(texts, str) else list(texts)
    cleaned = preprocess_texts(raw, clean=clean)
    if not clean:
        return cleaned
    for index, (before, after) in enumerate(zip(raw, cleaned)):
        label = f"{what} {before!r}" if len(raw) == 1 else f"{what} {index} ({before!r})"
        if emptied_by_cleaning(before, after):
            message = (f"The {label} is empty after caption cleaning (the reference cleaner removes CJK characters, "
                       "URLs, HTML, file names, ...), so it would be sampled as the unconditional prompt; write it "
                       "in English or turn cleaning off with --no_clean_caption (clean_caption=False).")
            if empty_is_error:
                raise ValueError(message)
            if warn:
                logger.warning(message)
        elif warn and _word_chars(after) < 0.5 * _word_chars(before):
            logger.warning("Caption cleaning removed most of the %s; the model reads %r. Pass --no_clean_caption "
                           "(clean_caption=False) to keep the text as written.", label, after)
    return cleaned


def warn_truncated(tokenizer, texts: list[str], max_length: int, what: str = "prompt") -> list[int]:
    """Token count of each text (EOS included); one warning per text longer than ``max_length`` tokens."""
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=True).input_ids]
    for index, (text, count) in enumerate(zip(texts, counts)):
        if count > max_length:
            label = what if len(texts) == 1 else f"{what} {index}"
            logger.warning("The %s has %d tokens but the model reads %d: the last %d (%r...) are dropped.", label,
                           count, max_length, count - max_length, text[:40])
    return counts


def preprocess_texts(texts: str | Iterable[str], clean: bool = True) -> list[str]:
    """The reference's ``_text_preprocessing``: clean each text twice, or only lower-case and strip."""
    if isinstance(texts, str):
        texts = [texts]
    if clean:
        return [clean_caption(clean_caption(t)) for t in texts]
    return [t.lower().strip() for t in texts]
