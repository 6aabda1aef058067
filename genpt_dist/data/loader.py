"""Streaming batches from WebDataset shards, split by rank and by DataLoader worker, resumable.

The epoch plan (a pure function of the manifest, seed, epoch, rank, world size, batch size and
worker count):
1. Shards are permuted by (seed, epoch); each shard's samples by (seed, epoch, shard index). Laid end
   to end they form the epoch's global sample sequence of N samples.
2. Rank r takes the contiguous slice [r*n, (r+1)*n) with n = N // world_size. Every rank therefore
   gets exactly the same number of samples and batches (uneven counts deadlock ZeRO collectives);
   the N % world_size samples at the end of the sequence, a different few each epoch, wait for the
   next epoch.
3. The rank's ceil(n / B) batches are cut from its slice in order (only the last may be short) and
   split into contiguous runs, one per DataLoader worker. torch's DataLoader yields worker outputs
   round-robin, so the yield order is a fixed function of the per-worker batch counts, and resuming
   after k batches means each worker skips its share of those k (whole shards are skipped unread).

Shards are read through `webdataset` (tar parsing and the `s3://` opener registered here, backed by
the storage seam). A shard that fails to read, or holds a different sample count than the manifest
says, is counted and warned about once per process; its samples become all-<pad> rows, which the loss
ignores, so batch shapes and counts stay the same on every rank. Past `max_bad_shard_fraction` of the
split's shards the loader stops with an error.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from genpt_dist import storage
from genpt_dist.data.manifest import Manifest, ShardInfo
from genpt_dist.errors import UserError

log = logging.getLogger(__name__)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    if mode != "rb":
        raise ValueError(f"s3 opener is read-only, got mode {mode!r}")
    return storage.open_stream(url)


wds.gopen_schemes["s3"] = _gopen_s3


@dataclass(frozen=True)
class Piece:
    shard: int  # index into the split's shard list
    lo: int  # first position in the shard's permuted sample order
    hi: int  # one past the last


def _rng(*seeds: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([s & 0xFFFFFFFF for s in seeds]))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return _rng(seed, epoch, 0xA11).permutation(num_shards) if shuffle else np.arange(num_shards)


def sample_order(count: int, seed: int, epoch: int, shard: int, shuffle: bool) -> np.ndarray:
    return _rng(seed, epoch, shard, 0x5A).permutation(count) if shuffle else np.arange(count)


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """[0, total) in `parts` contiguous runs whose lengths differ by at most one (longer first)."""
    q, r = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        bounds.append((start, end))
        start = end
    return bounds


def round_robin_skips(counts: list[int], consumed: int) -> list[int]:
    """How many of each worker's batches are among the first `consumed` yielded round-robin."""
    skips = [0] * len(counts)
    left = consumed
    while left > 0:
        progressed = False
        for w, c in enumerate(counts):
            if left and skips[w] < c:
                skips[w] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return skips


def pieces_for_span(counts: list[int], order: np.ndarray, start: int, end: int) -> list[Piece]:
    """Global sample span [start, end) of the epoch sequence -> per-shard pieces, in order."""
    pieces, offset = [], 0
    for shard in order:
        c = counts[shard]
        lo, hi = max(start - offset, 0), min(end - offset, c)
        if lo < hi:
            pieces.append(Piece(int(shard), lo, hi))
        offset += c
        if offset >= end:
            break
    return pieces


class _EpochStream(IterableDataset):
    """One rank's batches for one epoch, starting after `consumed` batches (runs in loader workers)."""

    def __init__(self, loader: "ShardLoader", epoch: int, consumed: int):
        self.loader, self.epoch, self.consumed = loader, epoch, consumed

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        yield from self.loader._worker_batches(self.epoch, self.consumed, worker, n_workers)


class ShardLoader:
    """Batches of (B, seq_len + 1) int64 tokens from one split of a prepared dataset."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        max_bad_shard_fraction: float = 0.1,
    ):
        self.manifest, self.split = manifest, split
        self.shards: list[ShardInfo] = manifest.shards(split)
        self.counts = [s.samples for s in self.shards]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers, self.shuffle = seed, num_workers, shuffle
        self.max_bad_shard_fraction = max_bad_shard_fraction
        self.per_rank = sum(self.counts) // world_size
        if self.per_rank == 0:
            raise UserError(
                f"the {split} split of {manifest.url} has {sum(self.counts)} samples, fewer than {world_size} workers"
            )
        self.batches_per_epoch = -(-self.per_rank // batch_size)
        self.epoch, self.batch_in_epoch = 0, 0
        self.bad_shards = 0

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch"])

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches forever, epoch after epoch, from the current position."""
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[torch.Tensor]:
        """The rest of the current epoch; the position advances as batches are taken."""
        stream = _EpochStream(self, self.epoch, self.batch_in_epoch)
        workers = min(self.num_workers, self.batches_per_epoch)
        if workers > 0:
            batches = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4)
        else:
            batches = stream
        for batch in batches:
            self.batch_in_epoch += 1
            yield batch
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _worker_batch_ranges(self, n_workers: int) -> list[tuple[int, int]]:
        return split_evenly(self.batches_per_epoch, n_workers)

    def _worker_batches(self, epoch: int, consumed: int, worker: int, n_workers: int) -> Iterator[torch.Tensor]:
        ranges = self._worker_batch_ranges(n_workers)
        skip = round_robin_skips([hi - lo for lo, hi in ranges], consumed)[worker]
        b0, b1 = ranges[worker][0] + skip, ranges[worker][1]
        if b0 >= b1:
            return
        base = self.rank * self.per_rank
        start, end = base + b0 * self.batch_size, base + min(b1 * self.batch_size, self.per_rank)
        order = shard_order(len(self.shards), self.seed, epoch, self.shuffle)
        rows: list[np.ndarray] = []
        for piece in pieces_for_span(self.counts, order, start, end):
            samples = self._read_shard(piece.shard)
            perm = sample_order(self.counts[piece.shard], self.seed, epoch, piece.shard, self.shuffle)
            rows.extend(samples[perm[piece.lo:piece.hi]])
            while len(rows) >= self.batch_size:
                yield torch.from_numpy(np.stack(rows[: self.batch_size]).astype(np.int64))
                rows = rows[self.batch_size:]
        if rows:
            yield torch.from_numpy(np.stack(rows).astype(np.int64))

    def _read_shard(self, index: int) -> np.ndarray:
        """(count, seq_len + 1) tokens of one shard; all-pad rows if it is corrupt."""
        shard = self.shards[index]
        url = self.manifest.shard_url(shard)
        try:
            rows = [np.load(io.BytesIO(s["tokens.npy"])) for s in wds.tarfile_samples([{"url": url}])]
            if len(rows) != shard.samples:
                raise ValueError(f"{len(rows)} samples, manifest says {shard.samples}")
            return np.stack(rows)
        except Exception as exc:  # noqa: BLE001 - any read or parse failure marks the shard bad
            self.bad_shards += 1
            if self.bad_shards == 1:
                log.warning("skipping corrupt shard %s (%s); further bad shards are counted silently", url, exc)
            if self.bad_shards > self.max_bad_shard_fraction * len(self.shards):
                raise UserError(
                    f"{self.bad_shards} of {len(self.shards)} {self.split} shards of {self.manifest.url} are "
                    f"unreadable (limit loader.max_bad_shard_fraction={self.max_bad_shard_fraction}); prepare again"
                ) from None
            pad = self.manifest.raw["tokenizer"]["pad_id"]
            return np.full((shard.samples, self.manifest.seq_len + 1), pad, dtype=np.int64)
