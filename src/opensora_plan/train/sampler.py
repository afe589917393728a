"""Deterministic, resumable data order for exact resume and data parallel training.

* ``ResumableSampler`` shuffles with a generator seeded by ``(seed, epoch)``, gives every process its own
  slice (``rank::world``) and can start part-way through an epoch, so a resumed run sees exactly the
  batches the interrupted run would have seen next.
* ``SeededSamples`` makes each sample's random augmentation (frame window, flip, caption choice) a
  function of ``(seed, epoch, index)`` only: the same whatever the number of data-loader workers and
  whether the run was resumed, and without touching the training process's own RNG streams.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, micro-batch, rank, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` pairs: this process's share of a seeded permutation of the dataset.

    Every process gets ``len(dataset) // world_size`` samples per epoch (the remainder is dropped so all
    processes take the same number of steps). ``set_epoch(epoch, start)`` skips the first ``start``
    samples of this process's share, which is how a run resumes mid-epoch.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples < world_size:
            raise ValueError(
                f"The dataset has {num_samples} samples but {world_size} processes need at least one each; "
                f"add data or use fewer processes."
            )
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def per_process(self) -> int:
        return self.num_samples // self.world_size

    def __len__(self) -> int:
        return self.per_process() - self.start

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        mine = order[: self.per_process() * self.world_size][self.rank :: self.world_size]
        for index in mine[self.start :]:
            yield self.epoch, index


class SeededSamples(Dataset):
    """Wraps a map-style dataset: ``self[(epoch, index)]`` = ``dataset[index]`` under RNGs seeded by
    ``(seed, epoch, index)``; the caller's python / numpy / torch RNG states are restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_seed = derive_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class BucketBatchSampler(Sampler):
    """Batches of one bucket each (data/buckets.py): this process's share of a seeded, interleaved order.

    Per epoch, the members of every bucket are shuffled with a seed from ``(seed, epoch, bucket)`` and cut
    into *groups* of ``batch_size_b x world_size`` (the remainder of each bucket is dropped); the groups
    of all buckets are then shuffled together with a seed from ``(seed, epoch)``, so a bucket's batches
    are spread over the epoch in proportion to its data. Process ``rank`` takes slice ``rank`` of every
    group: at each step all processes train on the same bucket (same shapes, which sequence parallelism
    and sharded models need) and all take the same number of steps. Each item is a list of
    ``(epoch, index)`` keys for :class:`SeededSamples`. ``set_epoch(epoch, start)`` skips the first
    ``start`` batches, which is how a run resumes mid-epoch.
    """

    def __init__(self, members: list[list[int]], batch_sizes: list[int], seed: int, rank: int = 0,
                 world_size: int = 1, names: list[str] | None = None):
        if len(members) != len(batch_sizes) or any(b < 1 for b in batch_sizes):
            raise ValueError(f"Need one batch size >= 1 per bucket, got {batch_sizes} for {len(members)} buckets.")
        self.members = [list(m) for m in members]
        self.batch_sizes = list(batch_sizes)
        self.names = names or [str(i) for i in range(len(members))]
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        if self.per_process() < 1:
            counts = ", ".join(f"{n}: {len(m)} clips / batch {b}" for n, m, b in zip(self.names, self.members,
                                                                                        self.batch_sizes))
            raise ValueError(f"No bucket has enough clips for one batch on each of {world_size} process(es) "
                             f"({counts}); add data, lower --train_batch_size or use fewer processes.")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def batches_per_bucket(self) -> list[int]:
        """Batches per epoch of each bucket, per process (drop_last per bucket)."""
        return [len(m) // (b * self.world_size) for m, b in zip(self.members, self.batch_sizes)]

    def per_process(self) -> int:
        return sum(self.batches_per_bucket())

    def signature(self) -> str:
        """What the order depends on besides the seed (checkpoints compare it before resuming the position)."""
        return ";".join(f"{n}:{len(m)}/{b}" for n, m, b in zip(self.names, self.members, self.batch_sizes)) + \
            f";world={self.world_size}"

    def groups(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``(bucket, indices)`` of every group of ``epoch`` in order (all processes' batches)."""
        groups = []
        for b, (members, batch) in enumerate(zip(self.members, self.batch_sizes)):
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, b + 1))
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            size = batch * self.world_size
            groups += [(b, shuffled[k * size : (k + 1) * size]) for k in range(len(shuffled) // size)]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]

    def __len__(self) -> int:
        return self.per_process() - self.start

    def __iter__(self):
        for bucket, group in self.groups(self.epoch)[self.start :]:
            batch = self.batch_sizes[bucket]
            yield [(self.epoch, index) for index in group[self.rank * batch : (self.rank + 1) * batch]]


class ShardBatchSampler(Sampler):
    """Fixed-size batches read shard by shard (an ``extract`` cache, data/features.py): this process's share.

    ``shard_of[i]`` is the shard of dataset item ``i`` (non-decreasing: items are in shard order). Per epoch
    the shards are shuffled with a seed from ``(seed, epoch)`` and the items of each shard with a seed from
    ``(seed, epoch, shard)``; the items, shard after shard, are cut into groups of ``batch_size x
    world_size`` (the remainder dropped) and process ``rank`` takes slice ``rank`` of every group. So a
    batch holds the items of one or two shards, and a data-loader worker streams through a few shards
    instead of opening one at random per sample. Each item is a list of ``(epoch, index)`` keys for
    :class:`SeededSamples`; ``set_epoch(epoch, start)`` skips the first ``start`` batches (exact resume).
    Memory: one int64 per item for the epoch's order (made when iterating starts).
    """

    def __init__(self, shard_of, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.shard_of = np.asarray(shard_of)
        if len(self.shard_of) and np.any(np.diff(self.shard_of) < 0):
            raise ValueError("shard_of must be non-decreasing (items in shard order).")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        if self.per_process() < 1:
            raise ValueError(f"The feature cache has {len(self.shard_of)} clips, fewer than one batch of "
                             f"{batch_size} on each of {world_size} process(es); add data, lower --train_batch_size "
                             "or use fewer processes.")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def per_process(self) -> int:
        """Batches per epoch per process."""
        return len(self.shard_of) // (self.batch_size * self.world_size)

    def signature(self) -> str:
        return f"shards:{len(self.shard_of)}/{self.batch_size};world={self.world_size}"

    def order(self, epoch: int) -> np.ndarray:
        """All items of ``epoch`` in reading order (every process's), int64."""
        shards, starts = np.unique(self.shard_of, return_index=True)
        ends = np.append(starts[1:], len(self.shard_of))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        parts = []
        for k in torch.randperm(len(shards), generator=generator).tolist():
            inner = torch.Generator().manual_seed(derive_seed(self.seed, epoch, int(shards[k]) + 1))
            parts.append(starts[k] + torch.randperm(int(ends[k] - starts[k]), generator=inner).numpy())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.per_process() - self.start

    def __iter__(self):
        group = self.batch_size * self.world_size
        order = self.order(self.epoch)
        for b in range(self.start, self.per_process()):
            mine = order[b * group + self.rank * self.batch_size : b * group + (self.rank + 1) * self.batch_size]
            yield [(self.epoch, int(i)) for i in mine]
