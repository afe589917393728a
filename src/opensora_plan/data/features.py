"""Offline feature cache: T5 caption embeddings and/or CausalVAE latent posteriors in safetensors shards.

``extract_features`` (``opensora-plan extract``) runs the frozen text encoder and VAE once over a
dataset JSON so that training does not have to; :class:`CachedFeatureDataset` reads the cache.

Layout of the output folder::

    meta.json                  settings, dataset fingerprint, number of shards, latent scaling factor
    null_text.safetensors      the empty-string embedding (the classifier-free-guidance input)
    shard-00000.safetensors    entries [0, shard_size), ...
    shards.parquet             the shard index: one row per entry (entry, shard, cached, caption_count, reason)

Each shard holds, for every usable entry ``i`` of its range:

* ``{i}.latent_mean`` / ``{i}.latent_logvar`` (float32, (C, t + n, h, w)): the VAE posterior of the
  clip (and of its n joint-training images, each encoded as a one-frame video, as the reference does).
  Mean and log-variance rather than one sample, so training draws a fresh posterior sample every
  time, as the reference does when it encodes on the fly (spec 3.1).
* ``{i}.text.{j}`` ((n_j, D), the text encoder's dtype): embedding of caption j cut to its n_j valid
  tokens. Padding positions are dropped because the transformer masks them with a -10000 bias, so
  they have exactly zero attention weight; the dataset pads with zeros and rebuilds the mask.

plus JSON metadata: which entries it holds, their captions, and the videos that could not be read
(listed and skipped, never silently). Every shard is written atomically, so ``extract`` can be
stopped at any time and re-run: shards already complete are kept. Under ``torchrun`` rank ``r`` of ``W``
computes shards ``r, r + W, ...`` (each on its own GPU); rank 0 writes ``meta.json`` and, once every shard
is there, the shard index ``shards.parquet``, which is all a training run reads at start: it never opens
every shard, and holds three numbers per entry in numpy arrays (no Python object per entry).

What a cache cannot do: the clip is a fixed window (the middle one of the reference's random range),
centre-cropped and never flipped, so the temporal-crop and flip augmentations of the on-the-fly
dataset are lost (captions are still drawn at random and posterior samples are fresh).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import Dataset
from opensora_plan.utils import progress_bar

from ..options import Options, option
from ..utils import atomic_write_bytes, check_finite, parse_dtype, resolve_device, valid_num_frames
from .datasets import VideoCaptionDataset, load_video_entries
from .transforms import image_slot_indices, last_window_start, video_train_transform, window_indices
from ..models.text_encoder import MODEL_MAX_LENGTH
from .video_io import VideoReader, VideoReadError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
META_FILE = "meta.json"
NULL_TEXT_FILE = "null_text.safetensors"
SHARD_INDEX_FILE = "shards.parquet"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def dataset_fingerprint(entries, settings: dict) -> str:
    """sha256 of the resolved entries and the settings that change the cached tensors."""
    payload = json.dumps(
        {"settings": settings, "entries": [[str(e.path), list(e.captions)] for e in entries]}, sort_keys=True
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def read_shard_metadata(path: Path) -> dict | None:
    """The shard's JSON metadata, or None when the file is unreadable (e.g. a foreign or broken file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["opensora_plan"])
    except Exception:  # any failure means "not a complete shard of ours": it gets recomputed
        return None


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def cached_clip(path: Path, num_frames: int, sample_rate: int, max_image_size: int, use_image_num: int):
    """The deterministic clip a cache stores: middle window, centre crop, no flip -> (3, T + n, S, S)."""
    with VideoReader(path) as reader:
        start = last_window_start(reader.num_frames, num_frames, sample_rate) // 2
        frames = reader.get_frames(window_indices(reader.num_frames, num_frames, sample_rate, start))
    video = video_train_transform(frames, max_image_size, flip=False)  # (3, T, S, S)
    if use_image_num:
        video = torch.cat([video, video[:, image_slot_indices(num_frames, use_image_num)]], dim=1)
    return video


@torch.no_grad()
def encode_latent_posterior(vae, video: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, T + n, S, S) -> posterior (mean, logvar), each (C, t + n, h, w) float32.

    The clip is encoded as one video, the n trailing images one frame at a time (spec 3.1).
    """
    device, dtype = vae.device, vae.dtype
    clip = video[:, :num_frames].unsqueeze(0).to(device, dtype)  # (1, 3, T, S, S)
    posterior = vae.encode(clip).latent_dist
    means, logvars = [posterior.mean[0]], [posterior.logvar[0]]  # (C, t, h, w)
    images = video[:, num_frames:]  # (3, n, S, S)
    if images.shape[1]:
        frames = images.permute(1, 0, 2, 3).unsqueeze(2).to(device, dtype)  # (n, 3, 1, S, S)
        image_posterior = vae.encode(frames).latent_dist
        means.append(image_posterior.mean[:, :, 0].permute(1, 0, 2, 3))  # (C, n, h, w)
        logvars.append(image_posterior.logvar[:, :, 0].permute(1, 0, 2, 3))
    mean, logvar = torch.cat(means, dim=1).float().cpu(), torch.cat(logvars, dim=1).float().cpu()
    # A NaN cached here would poison every training step that draws this clip: stop instead.
    check_finite(mean, "The VAE encoded a clip to a non-finite latent mean", dtype)
    return mean, logvar


@torch.no_grad()
def encode_captions_trimmed(tokenizer, text_encoder, captions: list[str], max_length: int) -> list[torch.Tensor]:
    """Each caption's embedding cut to its valid tokens: a list of (n_j, D) tensors on the CPU."""
    from ..models.text_encoder import encode_texts

    embeds, mask = encode_texts(tokenizer, text_encoder, captions, max_length)  # (K, L, D), (K, L)
    lengths = mask.sum(dim=1).tolist()
    # T5 pads on the right, so the valid tokens are a prefix; cutting there loses nothing.
    return [embeds[j, : int(n)].cpu().contiguous() for j, n in enumerate(lengths)]


@dataclass
class ExtractOptions(Options):
    """Every option of ``opensora-plan extract`` / :func:`extract_features`, with its default and checks."""

    COMMAND: ClassVar[str] = "extract"
    CONFIG: ClassVar[bool] = True  # --config FILE holds any of these options

    data_path: str = option(help="dataset JSON list")
    out_dir: str = option(flag="--out", help="output folder of the cache")
    video_folder: str | None = option(None, help="base folder for relative paths (unset: the JSON's folder)")
    text_encoder_name: str | None = option(None, help="local T5 folder: cache caption embeddings")
    ae_path: str | None = option(None, help="CausalVAE folder: cache latent posteriors (mean, logvar)")
    num_frames: int = option(17, help="frames per clip, 1 + 4k")
    sample_rate: int = option(1, help="temporal stride")
    max_image_size: int = option(256, help="square frame size in pixels: the largest centred square is cropped, "
                                 "then resized to this")
    use_image_num: int = option(0, help="joint-training images per clip")
    model_max_length: int = option(MODEL_MAX_LENGTH, help="T5 tokens per caption")
    shard_size: int = option(64, help="entries per shard")
    text_dtype: str = option("bf16", choices=["fp32", "bf16", "fp16"],
                             help="T5 dtype, also the stored dtype (bf16 as the reference trainer)")
    enable_tiling: bool = option(False, help="encode in spatial tiles (for 512 px)")
    clean_captions: bool = option(True, flag="--no_clean_caption", help="only lower-case captions instead of "
                                  "the reference's caption cleaning")
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)")

    def __post_init__(self):
        if self.text_encoder_name is None and self.ae_path is None:
            raise ValueError("Nothing to extract: pass --text_encoder_name (T5 folder), --ae_path (VAE folder) or "
                             "both.")
        for name, least in (("shard_size", 1), ("sample_rate", 1), ("model_max_length", 1), ("use_image_num", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name} must be at least {least}, got {getattr(self, name)}.")
        if self.ae_path is not None and not valid_num_frames(self.num_frames):
            raise ValueError(f"--num_frames {self.num_frames} is not a length the CausalVAE accepts; use 1 + 4k "
                             "(e.g. 17 or 65).")


def extract_features(*args, progress: bool = True, **kwargs) -> dict:
    """Cache T5 embeddings (``text_encoder_name``) and/or VAE posteriors (``ae_path``) of a dataset.

    Resumable: shards already written with the same settings are kept. Returns a summary dict
    (shards written / reused, entries cached, skipped videos with reasons).
    Takes an :class:`ExtractOptions`, or its fields (data_path, out_dir positionally).
    """
    o = ExtractOptions.of(*args, **kwargs)
    entries = load_video_entries(o.data_path, o.video_folder)
    out_dir = Path(o.out_dir)
    settings = {
        "format": CACHE_FORMAT,
        "text_encoder": str(o.text_encoder_name) if o.text_encoder_name else None,
        "ae": str(o.ae_path) if o.ae_path else None,
        "num_frames": o.num_frames,
        "sample_rate": o.sample_rate,
        "max_image_size": o.max_image_size,
        "use_image_num": o.use_image_num,
        "model_max_length": o.model_max_length,
        "shard_size": o.shard_size,
        "text_dtype": o.text_dtype if o.text_encoder_name else None,
        "clean_captions": o.clean_captions,
    }
    fingerprint = dataset_fingerprint(entries, settings)
    num_shards = (len(entries) + o.shard_size - 1) // o.shard_size

    meta_path = out_dir / META_FILE
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            changed = [k for k in settings if previous.get("settings", {}).get(k) != settings[k]]
            what = f"settings {', '.join(changed)} differ" if changed else "the dataset entries differ"
            raise ValueError(
                f"{out_dir} already holds a feature cache made differently ({what}); "
                f"use a new --out folder or delete that one."
            )

    def shard_done(k: int) -> bool:
        return (read_shard_metadata(out_dir / shard_name(k)) or {}).get("fingerprint") == fingerprint

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    todo = [k for k in range(rank, num_shards, world) if not shard_done(k)]  # this rank's share
    logger.info("extract (rank %d of %d): %d entries in %d shards, %d to compute here", rank, world, len(entries),
                num_shards, len(todo))
    index_path = out_dir / SHARD_INDEX_FILE
    if not todo and (rank or (meta_path.is_file() and index_path.is_file() and (
            o.text_encoder_name is None or (out_dir / NULL_TEXT_FILE).is_file()))):
        return _finish(out_dir, fingerprint, len(entries), num_shards, 0, rank, progress)

    device = resolve_device(o.device)
    if o.device is None and device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    tokenizer = text_encoder = vae = None
    scaling_factor = None
    if o.text_encoder_name is not None:
        from ..models.text_encoder import load_t5, preprocess_texts

        tokenizer, text_encoder = load_t5(o.text_encoder_name, torch_dtype=parse_dtype(o.text_dtype), device=device)
    if o.ae_path is not None:
        from ..models.causalvae import CausalVAEModel

        # The VAE stays in float32, as in the reference trainer.
        vae = CausalVAEModel.from_pretrained(o.ae_path, device=device).eval().requires_grad_(False)
        vae.enable_tiling(o.enable_tiling)
        scaling_factor = float(vae.config.scaling_factor)

    meta = {"settings": settings, "fingerprint": fingerprint, "num_entries": len(entries), "num_shards": num_shards,
            "data_path": str(Path(o.data_path).resolve()),
            "video_folder": str(o.video_folder) if o.video_folder is not None else None,
            "scaling_factor": scaling_factor}
    if rank == 0:
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode("utf-8"))
    if rank == 0 and text_encoder is not None and not (out_dir / NULL_TEXT_FILE).is_file():
        (null,) = encode_captions_trimmed(tokenizer, text_encoder, [""], o.model_max_length)
        atomic_write_bytes(out_dir / NULL_TEXT_FILE, safetensors_save({"text": null}))

    written = 0
    bar = progress_bar(total=sum(min(o.shard_size, len(entries) - k * o.shard_size) for k in todo), desc="extract",
               unit="video", disable=not progress)
    for shard in todo:
        tensors, present, captions, skipped = {}, [], {}, []
        for index in range(shard * o.shard_size, min((shard + 1) * o.shard_size, len(entries))):
            entry = entries[index]
            if vae is not None:
                try:
                    video = cached_clip(entry.path, o.num_frames, o.sample_rate, o.max_image_size, o.use_image_num)
                except VideoReadError as err:
                    logger.warning("extract: skipping entry %d: %s", index, err)
                    skipped.append({"index": index, "path": str(entry.path), "reason": str(err)})
                    bar.update()
                    continue
                mean, logvar = encode_latent_posterior(vae, video, o.num_frames)
                tensors[f"{index}.latent_mean"], tensors[f"{index}.latent_logvar"] = mean, logvar
            if text_encoder is not None:
                texts = preprocess_texts(list(entry.captions), clean=o.clean_captions)
                for j, emb in enumerate(encode_captions_trimmed(tokenizer, text_encoder, texts, o.model_max_length)):
                    tensors[f"{index}.text.{j}"] = emb
            present.append(index)
            captions[str(index)] = list(entry.captions)
            bar.update()
        shard_meta = {"fingerprint": fingerprint, "entries": present, "captions": captions, "skipped": skipped}
        data = safetensors_save(tensors, metadata={"opensora_plan": json.dumps(shard_meta)})
        atomic_write_bytes(out_dir / shard_name(shard), data)
        written += 1
    bar.close()
    return _finish(out_dir, fingerprint, len(entries), num_shards, written, rank, progress)


def _finish(out_dir: Path, fingerprint: str, num_entries: int, num_shards: int, written: int, rank: int,
            progress: bool, poll_s: float = 2.0) -> dict:
    """Rank 0: wait for every shard (the other ranks write theirs), write the shard index, summarise.
    Other ranks: summarise their own part (``"shards"`` counts only theirs)."""
    import time

    if rank != 0:
        return {"out": str(out_dir), "entries": num_entries, "rank": rank, "shards_written": written}
    missing = list(range(num_shards))
    waited = False
    while True:
        missing = [k for k in missing if (read_shard_metadata(out_dir / shard_name(k)) or {}).get("fingerprint")
                   != fingerprint]
        if not missing:
            break
        if not waited:
            logger.info("extract: waiting for %d shards of the other ranks", len(missing))
            waited = True
        time.sleep(poll_s)
    table = write_shard_index(out_dir, num_shards, progress=progress)
    import pyarrow.compute as pc

    cached = table.column("cached").to_numpy(zero_copy_only=False)
    skipped = [{"index": r["entry"], "path": r["path"], "reason": r["reason"]}
               for r in table.filter(pc.invert(table.column("cached"))).to_pylist()]
    return {"out": str(out_dir), "entries": num_entries, "cached": int(cached.sum()), "shards": num_shards,
            "shards_written": written, "shards_reused": num_shards - written, "skipped": skipped}


def write_shard_index(out_dir: Path, num_shards: int, progress: bool = False):
    """Write ``shards.parquet`` (:func:`shard_index_table`) and return the table."""
    import pyarrow.parquet as pq

    from ..utils import atomic_path

    table = shard_index_table(out_dir, num_shards, progress)
    with atomic_path(out_dir / SHARD_INDEX_FILE) as tmp:
        pq.write_table(table, tmp)
    return table


def shard_index_table(out_dir: Path, num_shards: int, progress: bool = False):
    """The shard index from the shards' metadata, a pyarrow Table with one row per entry: ``entry`` int64,
    ``shard`` int32, ``cached`` bool, ``caption_count`` int16, and ``path`` / ``reason`` of the videos skipped
    at extraction. Reads every shard's header once."""
    import pyarrow as pa

    rows = {"entry": [], "shard": [], "cached": [], "caption_count": [], "path": [], "reason": []}
    for shard in progress_bar(range(num_shards), desc="shard index", unit="shard", disable=not progress):
        shard_meta = read_shard_metadata(out_dir / shard_name(shard))
        for index in shard_meta["entries"]:
            rows["entry"].append(index)
            rows["shard"].append(shard)
            rows["cached"].append(True)
            rows["caption_count"].append(len(shard_meta["captions"][str(index)]))
            rows["path"].append(None)
            rows["reason"].append(None)
        for item in shard_meta["skipped"]:
            rows["entry"].append(item["index"])
            rows["shard"].append(shard)
            rows["cached"].append(False)
            rows["caption_count"].append(0)
            rows["path"].append(item["path"])
            rows["reason"].append(item["reason"])
    schema = pa.schema([("entry", pa.int64()), ("shard", pa.int32()), ("cached", pa.bool_()),
                        ("caption_count", pa.int16()), ("path", pa.string()), ("reason", pa.string())])
    return pa.Table.from_pydict(rows, schema=schema).sort_by("entry")


# --------------------------------------------------------------------------------------------
# Reading the cache
# --------------------------------------------------------------------------------------------


class CachedFeatureDataset(Dataset):
    """Training samples from an ``extract`` cache instead of running T5 and/or the VAE.

    Each sample holds (``n = use_image_num`` of the cache, ``L = model_max_length``):

    * ``latents`` (C, t + n, h, w): a fresh posterior sample x scaling factor (when latents are
      cached; ``sample_posterior=False`` gives the mean instead), else ``video`` (3, T + n, S, S) read
      and augmented on the fly by a :class:`VideoCaptionDataset` with the cache's settings;
    * ``text_emb`` (1 + n, L, D) and ``text_mask`` (1 + n, L) (when text is cached), else
      ``captions`` (1 + n raw strings), for a caption drawn at random each time; with ``cfg_dropout`` p
      the empty-string embedding (or "") is used instead;
    * ``caption_index`` (-1 when dropped), ``index`` (the JSON entry) and ``skipped`` (as
      :class:`VideoCaptionDataset`; videos that failed during extraction are excluded and listed in
      ``self.skipped_at_extraction``).
    """

    def __init__(self, cache_dir: str | os.PathLike, cfg_dropout: float = 0.0, sample_posterior: bool = True):
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.cache_dir} is not a feature cache (no {META_FILE}); run `opensora-plan extract`."
            )
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout is a probability in [0, 1], got {cfg_dropout}.")
        self.meta = json.loads(meta_path.read_text())
        self.settings = self.meta["settings"]
        if self.settings.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.cache_dir} has cache format {self.settings.get('format')}, this version reads "
                             f"{CACHE_FORMAT}; re-run extract into a new folder.")
        self.cfg_dropout = cfg_dropout
        self.sample_posterior = sample_posterior
        self.has_text = self.settings["text_encoder"] is not None
        self.has_latents = self.settings["ae"] is not None
        self.use_image_num = self.settings["use_image_num"]
        self.max_length = self.settings["model_max_length"]

        # Per cached entry, in entry order: its entry number, shard and caption count (numpy: no Python object per
        # entry, so forked data-loader workers share these pages instead of copying them).
        import pyarrow.compute as pc

        table = self._shard_table()
        cached = table.column("cached").to_numpy(zero_copy_only=False)
        self.entry = table.column("entry").to_numpy()[cached].copy()  # int64
        self.shard = table.column("shard").to_numpy()[cached].astype(np.int32)
        self.caption_count = table.column("caption_count").to_numpy()[cached].astype(np.int16)
        skipped = table.filter(pc.invert(table.column("cached")))
        self.skipped_at_extraction = [{"index": r["entry"], "path": r["path"], "reason": r["reason"]}
                                      for r in skipped.select(["entry", "path", "reason"]).to_pylist()]
        if not len(self.entry):
            raise ValueError(
                f"Feature cache {self.cache_dir} holds no usable entries (all videos failed at extraction)."
            )
        if self.skipped_at_extraction:
            logger.warning("feature cache %s: %d videos were unreadable at extraction and are left out",
                           self.cache_dir, len(self.skipped_at_extraction))
        if self.has_text:
            with safe_open(str(self.cache_dir / NULL_TEXT_FILE), framework="pt") as f:
                self.null_text = f.get_tensor("text")  # (n_null, D)
        self.videos = None
        if not self.has_latents:
            # Latents were not cached: read and augment the clips on the fly with the cache's settings.
            self.videos = VideoCaptionDataset(
                self.meta["data_path"], self.settings["num_frames"], self.settings["max_image_size"],
                sample_rate=self.settings["sample_rate"], use_image_num=self.use_image_num,
                video_folder=self.meta["video_folder"],
            )

    def _shard_table(self):
        """The shard index (``shards.parquet``); a cache written before it existed is read shard by shard."""
        import pyarrow.parquet as pq

        path = self.cache_dir / SHARD_INDEX_FILE
        for shard in (0, self.meta["num_shards"] - 1):  # a re-run extract rewrites them: check the ends are ours
            shard_meta = read_shard_metadata(self.cache_dir / shard_name(shard))
            if shard_meta is None or shard_meta["fingerprint"] != self.meta["fingerprint"]:
                path = None
        if path is not None and path.is_file():
            table = pq.read_table(path)
            if len(table) == self.meta["num_entries"]:
                return table
        for shard in range(self.meta["num_shards"]):
            path = self.cache_dir / shard_name(shard)
            shard_meta = read_shard_metadata(path)
            if shard_meta is None or shard_meta["fingerprint"] != self.meta["fingerprint"]:
                raise ValueError(f"Feature cache {self.cache_dir} is incomplete: {path.name} is missing or stale; "
                                 f"re-run the same `opensora-plan extract` command (it resumes).")
        return shard_index_table(self.cache_dir, self.meta["num_shards"])  # a cache older than shards.parquet

    def _captions(self, shard: Path) -> dict:
        """The raw captions of a shard's entries (its metadata; the last shard read is kept)."""
        if getattr(self, "_caption_cache", (None,))[0] != shard:
            self._caption_cache = (shard, read_shard_metadata(shard)["captions"])
        return self._caption_cache[1]

    def shard_path(self, shard: int) -> Path:
        return self.cache_dir / shard_name(int(shard))

    def __len__(self) -> int:
        return len(self.entry)

    def _padded_text(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D) valid-token embedding -> zero-padded (L, D) and mask (L,) with n ones."""
        n = emb.shape[0]
        padded = torch.zeros(self.max_length, emb.shape[1], dtype=emb.dtype)
        padded[:n] = emb
        mask = torch.zeros(self.max_length, dtype=torch.long)
        mask[:n] = 1
        return padded, mask

    def __getitem__(self, i: int) -> dict:
        index, shard = int(self.entry[i]), self.shard_path(self.shard[i])
        sample = {"skipped": []}
        if self.videos is not None:
            index, sample["video"], sample["skipped"] = self.videos.load_clip_or_substitute(index)
            shard = self.shard_path(index // self.settings["shard_size"])
        with safe_open(str(shard), framework="pt") as f:
            if self.has_latents:
                mean = f.get_tensor(f"{index}.latent_mean")  # (C, t + n, h, w)
                latents = mean
                if self.sample_posterior:
                    std = torch.exp(0.5 * f.get_tensor(f"{index}.latent_logvar"))
                    latents = mean + std * torch.randn(mean.shape)
                sample["latents"] = latents * self.meta["scaling_factor"]
            count = int(self.caption_count[np.searchsorted(self.entry, index)])
            dropped = self.cfg_dropout > 0 and bool(torch.rand(()) < self.cfg_dropout)
            choice = -1 if dropped else int(torch.randint(0, count, (1,)))
            slots = 1 + self.use_image_num
            if self.has_text:
                emb = self.null_text if dropped else f.get_tensor(f"{index}.text.{choice}")
                padded, mask = self._padded_text(emb)
                sample["text_emb"] = padded.expand(slots, -1, -1)  # (1 + n, L, D)
                sample["text_mask"] = mask.expand(slots, -1)  # (1 + n, L)
            else:
                captions = self._captions(shard)[str(index)]
                sample["captions"] = [captions[choice] if not dropped else ""] * slots
        sample["caption_index"] = choice
        sample["index"] = index
        return sample
