"""Building a text-to-video run from its options: the transformer, the VAE, the training data and the held-out
data (what :func:`~opensora_plan.train.t2v.build_t2v` wires into a :class:`~opensora_plan.train.t2v.T2VTask`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from opensora_plan.train.t2v_options import SUPPORTED_AE, apply_cache_settings

logger = logging.getLogger(__name__)


def build_transformer(spec: str, sample_size: int | tuple[int, int], video_length: int, caption_channels: int,
                      attention_mode: str | None = None):
    """A randomly initialised LatteT2V from a registry name, a ``config.json`` or a model folder.

    ``sample_size`` / ``video_length`` come from the training data (so the position embeddings fit);
    a named size takes ``caption_channels`` from the text encoder, a config file must already agree.
    """
    from opensora_plan.models.latte import LATTE_CONFIGS, LatteT2V, latte_config

    sample_size = [sample_size, sample_size] if isinstance(sample_size, int) else list(sample_size)
    if spec in LATTE_CONFIGS:
        config = latte_config(spec, sample_size=sample_size, video_length=video_length,
                              caption_channels=caption_channels)
    else:
        path = Path(spec)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"--model {spec} is neither a known size ({', '.join(LATTE_CONFIGS)}) nor a LatteT2V config.json "
                f"or folder holding one."
            )
        from opensora_plan.utils import read_json_file

        config = {k: v for k, v in read_json_file(path, "--model config").items() if not k.startswith("_")}
        if config.get("caption_channels", 4096) != caption_channels:
            raise ValueError(
                f"--model {spec} has caption_channels={config.get('caption_channels')} but the text encoder gives "
                f"{caption_channels}-wide embeddings; use a config with caption_channels={caption_channels}."
            )
        config.update(sample_size=sample_size, video_length=video_length)
    if attention_mode:
        config["attention_mode"] = attention_mode
    return LatteT2V.from_config(config)


def _load_vae(opts: dict):
    from opensora_plan.models.causalvae import CausalVAEModel

    if opts["ae"] not in SUPPORTED_AE:
        raise ValueError(f"--ae {opts['ae']} is not supported; use {SUPPORTED_AE[0]} (the v1.0.0 CausalVAE).")
    if not opts["ae_path"]:
        raise ValueError("--ae_path is required to encode videos; give the CausalVAE folder (or use --cached_features).")
    path = Path(opts["ae_path"])
    subfolder = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
    vae = CausalVAEModel.from_pretrained(path, subfolder=subfolder)
    if opts["enable_tiling"]:
        vae.enable_tiling()
    return vae


def _dataset(opts: dict):
    """The training dataset: an ``extract`` cache or the JSON video list."""
    if opts["dataset"] != "t2v":
        raise ValueError(f"--dataset {opts['dataset']} is not supported; v1.0.0 trains with --dataset t2v.")
    index = None
    if opts.get("data_index"):
        from opensora_plan.data.index import DataIndex

        # Every process reads the same file and stats the videos (no video is opened unless it changed).
        index = DataIndex.open(opts["data_index"], opts["data_path"], opts["video_folder"],
                               progress=os.environ.get("RANK", "0") == "0")
    if opts["buckets"]:
        from opensora_plan.data.buckets import (
            BucketedVideoDataset,
            parse_buckets,
            resolve_batch_sizes,
        )

        buckets = resolve_batch_sizes(parse_buckets(opts["buckets"]), opts["train_batch_size"],
                                      use_image_num=opts["use_image_num"])
        return BucketedVideoDataset(opts["data_path"], buckets, sample_rate=opts["sample_rate"],
                                    use_image_num=opts["use_image_num"], video_folder=opts["video_folder"],
                                    cfg_dropout=opts["cfg_dropout"], index=index)
    if opts["cached_features"]:
        from opensora_plan.data.features import CachedFeatureDataset

        dataset = CachedFeatureDataset(opts["cached_features"], cfg_dropout=opts["cfg_dropout"])
        settings = dataset.settings
        apply_cache_settings(opts, settings)
        return dataset
    from opensora_plan.data.datasets import VideoCaptionDataset

    if not opts["data_path"]:
        raise ValueError("train-t2v needs --data_path (a JSON list of videos and captions) or --cached_features.")
    dataset = VideoCaptionDataset(opts["data_path"], opts["num_frames"], opts["max_image_size"],
                                  sample_rate=opts["sample_rate"], use_image_num=opts["use_image_num"],
                                  video_folder=opts["video_folder"], cfg_dropout=opts["cfg_dropout"],
                                  entries=None if index is None else index.entries(index.readable_entries()))
    if index is not None:
        dataset.index_unreadable = index.unreadable()  # left out before training (never drawn), reported
        if dataset.index_unreadable:
            logger.warning("--data_index: %d of %d videos are unreadable and left out (first: %s).",
                           len(dataset.index_unreadable), len(index), dataset.index_unreadable[0]["reason"])
        if not len(dataset):
            raise ValueError(f"--data_index {opts['data_index']}: none of the {len(index)} videos is readable; run "
                             f"`opensora-plan data check {opts['data_path']} --data_index {opts['data_index']}`.")
    return dataset


def _validation_dataset(opts: dict):
    """The held-out set of ``--validation_data_path``: an ``extract`` cache folder, a JSON video list or a folder
    of videos with same-name .txt captions.

    Read without augmentation or caption dropout; a JSON list resolves relative paths as ``--data_path``
    does (``--video_folder``, else the JSON's folder). None without the option.
    """
    path = opts["validation_data_path"]
    if not path:
        return None
    from opensora_plan.data.features import META_FILE

    if (Path(path) / META_FILE).is_file():  # an extract cache; any other folder is a folder of clips
        from opensora_plan.data.features import CachedFeatureDataset

        dataset = CachedFeatureDataset(path, cfg_dropout=0.0)
        dataset.unreadable = []
    else:
        from opensora_plan.data.datasets import VideoCaptionDataset
        from opensora_plan.data.video_io import VideoReadError

        # max_substitutions=0: a held-out clip is never replaced by another (that would reweight the loss).
        # With --buckets the held-out clips are read at the first bucket's shape: the model's own grid
        # (its sample_size / video_length), cropped to that aspect and never upscaled.
        frames, size, frame_size = opts["num_frames"], opts["max_image_size"], None
        if opts["buckets"]:
            from opensora_plan.data.buckets import parse_buckets

            first = parse_buckets(opts["buckets"])[0]
            frames, size, frame_size = first.frames, max(first.height, first.width), (first.height, first.width)
        dataset = VideoCaptionDataset(path, frames, size, sample_rate=opts["sample_rate"],
                                      video_folder=opts["video_folder"], cfg_dropout=0.0, random_flip=False,
                                      max_substitutions=0, frame_size=frame_size)
        from opensora_plan.data.video_io import VideoReader

        readable, unreadable = [], []
        for index, entry in enumerate(dataset.entries):  # opened (not decoded: the loss decodes each clip once)
            try:
                with VideoReader(entry.path) as reader:
                    if frame_size is not None and (reader.height < frame_size[0] or reader.width < frame_size[1]):
                        raise VideoReadError(f"Video {entry.path}: a {reader.height}x{reader.width} (HxW) frame is "
                                             f"smaller than the {frame_size[0]}x{frame_size[1]} bucket; buckets never "
                                             "upscale")
                readable.append(entry)
            except VideoReadError as err:
                unreadable.append({"index": index, "path": str(entry.path), "reason": str(err)})
        if dataset.entries and not readable:
            raise ValueError(f"--validation_data_path {path}: none of its {len(unreadable)} videos can be read "
                             f"(first: {unreadable[0]['reason']}); run `opensora-plan data check {path}`.")
        if unreadable:
            listed = "; ".join(f"entry {u['index']}: {u['path']}" for u in unreadable[:10])
            more = f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
            logger.warning("--validation_data_path: %d of %d held-out videos are unreadable and left out of the "
                           "held-out loss (%s%s).", len(unreadable), len(dataset.entries), listed, more)
        dataset.entries = readable
        dataset.unreadable = unreadable
    if len(dataset) == 0:
        raise ValueError(f"--validation_data_path {path} holds no clips; give a JSON list with at least one video.")
    return dataset

