"""Training data from a latent store: chunk-sized reads, shuffled, posterior-sampled, split across ranks.

``LatentLoader`` yields batches itself (the trainers' loader); ``LatentDataset`` is the same data one sample
at a time as a torch ``IterableDataset``, for ``torch.utils.data.DataLoader`` and its workers.

Each epoch the done rows are ordered by a seeded permutation of their row chunks (the same on every
rank), cut into one contiguous segment per rank, and read in pools of ``shuffle_buffer`` rows; each pool
is shuffled in memory, then every sample gets the flipped or unflipped posterior moments at random and
``z = mean + std * eps``. Everything is a function of ``(seed, epoch, rank)``. Rows without a
done-marker are never served. A background thread prefetches batches. With ``drop_last`` (the default)
every rank yields the same number of full batches, as DDP needs; without it ranks may differ by one.
"""
from __future__ import annotations

import copy
import os
import queue
import threading

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage.latent_store import FLIPPED_POSTERIOR_ARRAYS, POSTERIOR_ARRAYS, LatentStore

_END = object()


def default_memory_limit() -> int:
    """Bytes one loader may hold under ``in_memory="auto"``: a quarter of physical memory shared by the
    node's ranks (``LOCAL_WORLD_SIZE``, as torchrun sets it), at most 16 GiB."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(total // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 16 << 30)


class LatentLoader:
    """Iterate ``(latents float32 [B, C, h, w], labels int64 [B])`` over the done rows of a latent store."""

    def __init__(self, store_url: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 flip: bool = True, sample_posterior: bool = True, in_memory: bool | str = "auto",
                 drop_last: bool = True, shuffle_buffer: int = 4096, prefetch: int = 4,
                 version: str | None = None, memory_limit: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.store = LatentStore.open(store_url, version)
        self.batch_size = int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.flip = flip and self.store.has_flip
        self.sample_posterior = sample_posterior
        self.drop_last = drop_last
        self.shuffle_buffer = max(int(shuffle_buffer), self.batch_size)
        self.prefetch = prefetch
        self.epoch = 0
        self._names = [*POSTERIOR_ARRAYS, *(FLIPPED_POSTERIOR_ARRAYS if self.flip else ()), "labels"]
        self._rows = np.flatnonzero(self.store.done_rows())  # position -> row, ascending
        chunks = self._rows // self.store.chunk_rows
        self._chunk_starts = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]]) if len(chunks) else chunks
        self._memory = self._load() if self._fits(in_memory, memory_limit) else None

    # -- facts ------------------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return self.store.attrs

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.store.latent_shape

    @property
    def num_classes(self) -> int:
        return int(self.store.attrs["num_classes"])

    @property
    def rows_done(self) -> int:
        return len(self._rows)

    @property
    def rows_total(self) -> int:
        return self.store.num_samples

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (call before iterating, on every rank, like DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self._segment_length()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- planning ---------------------------------------------------------------------------------

    def _fits(self, in_memory: bool | str, memory_limit: int | None) -> bool:
        if in_memory != "auto":
            return bool(in_memory)
        per_row = sum(self.store.spec(n).dtype.itemsize * int(np.prod(self.store.spec(n).row_shape))
                      for n in self._names)
        return per_row * len(self._rows) <= (memory_limit if memory_limit is not None else default_memory_limit())

    def _load(self) -> dict[str, np.ndarray]:
        return {n: self.store.read(n, self._rows) for n in self._names} if len(self._rows) else {}

    def _segment_length(self) -> int:
        total = len(self._rows)
        if self.drop_last:
            return total // self.world_size
        return len(np.array_split(np.arange(total), self.world_size)[self.rank])

    def _segment(self, epoch: int) -> np.ndarray:
        """This rank's positions for ``epoch``: whole chunks in a seeded order, cut contiguously by rank."""
        total = len(self._rows)
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._chunk_starts))
        ends = np.r_[self._chunk_starts[1:], total]
        seq = np.concatenate([np.arange(self._chunk_starts[c], ends[c]) for c in order])
        if self.drop_last:
            n = total // self.world_size
            return seq[self.rank * n:(self.rank + 1) * n]
        return np.array_split(seq, self.world_size)[self.rank]

    # -- reading ----------------------------------------------------------------------------------

    def _read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays at sorted ``positions`` (from RAM, or chunk-wise from the store)."""
        if self._memory is not None:
            return {n: a[positions] for n, a in self._memory.items()}
        rows = self._rows[positions]
        return {n: self.store.read(n, rows) for n in self._names}

    def _latents(self, pool: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """The pool's latents from its posterior moments: the mean, or a sample ``mean + std * eps``."""
        post_mean, post_std = (pool[n].astype(np.float32) for n in POSTERIOR_ARRAYS)
        if self.flip:
            flipped = rng.random(len(post_mean)) < 0.5
            for moment, name in zip((post_mean, post_std), FLIPPED_POSTERIOR_ARRAYS):
                moment[flipped] = pool[name][flipped]
        if self.sample_posterior:
            post_mean += post_std * rng.standard_normal(post_mean.shape, dtype=np.float32)
        return post_mean

    def _pools(self, segment: np.ndarray, rng: np.random.Generator):
        """``(latents, labels)`` of ``segment`` in pools of ``shuffle_buffer`` rows, each shuffled in memory."""
        for start in range(0, len(segment), self.shuffle_buffer):
            positions = np.sort(segment[start:start + self.shuffle_buffer])
            pool = self._read(positions)
            perm = rng.permutation(len(positions))
            pool = {n: a[perm] for n, a in pool.items()}
            yield self._latents(pool, rng), pool["labels"].astype(np.int64)

    def _batches(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        carry_z = np.zeros((0, *self.latent_shape), np.float32)
        carry_y = np.zeros(0, np.int64)
        for z, y in self._pools(self._segment(epoch), rng):
            z = np.concatenate([carry_z, z])
            y = np.concatenate([carry_y, y])
            full = len(z) // self.batch_size * self.batch_size
            for b in range(0, full, self.batch_size):
                yield torch.from_numpy(z[b:b + self.batch_size]), torch.from_numpy(y[b:b + self.batch_size])
            carry_z, carry_y = z[full:], y[full:]
        if len(carry_z) and not self.drop_last:
            yield torch.from_numpy(carry_z), torch.from_numpy(carry_y)

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self._batches(self.epoch):
                    if not put(batch):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                put(e)

        thread = threading.Thread(target=produce, name="latent-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


def _distributed_rank() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed``, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LatentDataset(IterableDataset):
    """Samples ``(latent float32 [C, h, w], label int)`` of a latent store, for ``torch.utils.data.DataLoader``.

    The latent is normalised (SiT's input): the row's posterior mean, or with ``sample_posterior`` a posterior
    sample ``mean + std * eps``, of the image or (``flip``, at random) its mirror. The done rows, fixed when the
    dataset is made, are split among ranks as ``LatentLoader`` splits them (``rank``/``world_size``, default
    from ``torch.distributed``), and each rank's share among its DataLoader workers in contiguous parts: the
    (rank, worker) parts are disjoint, and with ``drop_last=False`` they cover every done row exactly once per
    epoch (``drop_last=True`` gives every rank the same count, as DDP needs). Call ``set_epoch`` before each
    epoch on every rank, as with ``DistributedSampler``: what each rank serves is a function of ``(seed,
    epoch)``, the order and noise also of its worker count (persistent workers keep the epoch they started).
    A worker process opens the store again, with its own storage clients. The store's facts (``attrs``: the
    provenance with the channel statistics ``latents_mean``/``latents_std``; ``latent_shape``,
    ``num_classes``, ``rows_done``, ``rows_total``) are the loader's.
    """

    FACTS = ("attrs", "latent_shape", "num_classes", "rows_done", "rows_total")

    def __init__(self, store_url: str, rank: int | None = None, world_size: int | None = None, seed: int = 0,
                 flip: bool = True, sample_posterior: bool = True, drop_last: bool = False,
                 shuffle_buffer: int = 1024, in_memory: bool | str = False, version: str | None = None):
        if rank is None or world_size is None:
            rank, world_size = _distributed_rank()
        self.loader = LatentLoader(store_url, batch_size=1, rank=rank, world_size=world_size, seed=seed, flip=flip,
                                   sample_posterior=sample_posterior, in_memory=in_memory, drop_last=drop_last,
                                   shuffle_buffer=shuffle_buffer, version=version)
        self.epoch = 0
        self._pid = os.getpid()

    def __getattr__(self, name: str):
        if name in self.FACTS:
            return getattr(self.loader, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Samples this rank serves per epoch (all its workers together)."""
        return self.loader._segment_length()

    def __iter__(self):
        if os.getpid() != self._pid:  # a forked DataLoader worker: storage clients do not survive a fork
            self.loader = copy.copy(self.loader)
            self.loader.store = self.loader.store.reopened()
            self._pid = os.getpid()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        loader = self.loader
        part = np.array_split(loader._segment(self.epoch), workers)[worker]
        rng = np.random.default_rng([loader.seed, self.epoch, loader.rank, workers, worker])
        for z, y in loader._pools(part, rng):
            for i in range(len(y)):
                yield torch.from_numpy(z[i]), int(y[i])
