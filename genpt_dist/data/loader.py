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
   split into contiguous runs, one per DataLoader worker (lengths differ by at most one, longer
   first). Every worker emits the same number of items per epoch, M = the longest run: its batches,
   then empty tensors (dropped by the consumer) for a shorter run. torch's DataLoader takes items
   from its workers in a fixed cycle, so the batch order is the runs interleaved round-robin, the
   same in every epoch, and one DataLoader (one set of worker processes) serves epoch after epoch.
   Resuming after k batches of an epoch: items before k are all real batches, so the worker that
   plays run w has emitted ceil((k - w) / W) of them; the runs are rotated by k across the worker
   processes so that the run whose turn is next sits in worker 0, where the DataLoader starts.

A shard is fetched whole through the storage seam, checked against the manifest's size and sha256,
and decoded in bulk by `data.shards.decode_shard` (one fancy index, not a `tarfile` + `np.load` per
sample; foreign tars fall back to webdataset's tar iterator). Importing this module also registers an
`s3://` opener with webdataset, so plain `wds.WebDataset(urls)` pipelines read the same shards.
A shard that fails to read or verify, or holds a different sample count than the manifest says, is
counted once and warned about once per process; its samples become all-<pad> rows, which the loss
ignores, so batch shapes and counts stay the same on every rank. Past `max_bad_shard_fraction` of the
split's shards the loader stops with an error.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from genpt_dist import storage
from genpt_dist.data.manifest import Manifest, ShardInfo
from genpt_dist.data.shards import decode_shard
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


def _as_is(item):
    return item


class _Stream(IterableDataset):
    """One rank's items from (epoch, batch `consumed`) on: this epoch only, or forever (runs in workers)."""

    def __init__(self, loader: ShardLoader, epoch: int, consumed: int, forever: bool):
        self.loader, self.epoch, self.consumed, self.forever = loader, epoch, consumed, forever

    def __iter__(self) -> Iterator[np.ndarray]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        yield from self.loader._worker_items(self.epoch, self.consumed, worker, n_workers, self.forever)


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
        self._bad: set[int] = set()  # indices of shards found bad in this process

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch"])

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches forever, epoch after epoch, from the current position (one set of worker processes)."""
        return self._iterate(forever=True)

    def iter_epoch(self) -> Iterator[torch.Tensor]:
        """The rest of the current epoch; the position advances as batches are taken."""
        return self._iterate(forever=False)

    def _iterate(self, forever: bool) -> Iterator[torch.Tensor]:
        if self.batch_in_epoch >= self.batches_per_epoch:  # a state saved right after an epoch's last batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        stream = _Stream(self, self.epoch, self.batch_in_epoch, forever)
        workers = min(self.num_workers, self.batches_per_epoch)
        # Workers hand over compact numpy arrays (pickled, a few KiB); a torch tensor would travel
        # through a fresh shared-memory segment per batch, which costs more than the batch itself.
        items = (
            DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4, collate_fn=_as_is)
            if workers
            else stream
        )
        for rows in items:
            if rows.size == 0:  # the filler of a shorter worker run
                continue
            if self.batch_in_epoch == self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.batch_in_epoch += 1
            yield torch.from_numpy(rows.astype(np.int64))
            if not forever and self.batch_in_epoch == self.batches_per_epoch:
                break
        if not forever:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _worker_items(
        self, epoch: int, consumed: int, worker: int, n_workers: int, forever: bool
    ) -> Iterator[np.ndarray]:
        """What DataLoader worker `worker` emits: its run's batches then fillers, M items an epoch."""
        ranges = split_evenly(self.batches_per_epoch, n_workers)
        longest = ranges[0][1] - ranges[0][0]
        run = (worker + consumed) % n_workers  # rotated so that the next batch comes from worker 0
        done = max(0, -(-(consumed - run) // n_workers))  # items this run emitted before the resume
        filler = np.zeros((0, self.manifest.seq_len + 1), dtype=np.int64)
        while True:
            lo, hi = ranges[run]
            yield from self._batches(epoch, min(lo + done, hi), hi)
            for _ in range(longest - (hi - lo) - max(0, done - (hi - lo))):
                yield filler
            if not forever:
                return
            epoch, done = epoch + 1, 0

    def _batches(self, epoch: int, b0: int, b1: int) -> Iterator[np.ndarray]:
        """Batches [b0, b1) of this rank's epoch as (B, T+1) token arrays (shards before b0 are not read)."""
        if b0 >= b1:
            return
        base = self.rank * self.per_rank
        start, end = base + b0 * self.batch_size, base + min(b1 * self.batch_size, self.per_rank)
        order = shard_order(len(self.shards), self.seed, epoch, self.shuffle)
        pending: list[np.ndarray] = []  # sample blocks not yet cut into batches, in order
        have, B = 0, self.batch_size
        for piece in pieces_for_span(self.counts, order, start, end):
            samples = self._read_shard(piece.shard)
            perm = sample_order(self.counts[piece.shard], self.seed, epoch, piece.shard, self.shuffle)
            pending.append(samples[perm[piece.lo : piece.hi]])
            have += piece.hi - piece.lo
            if have >= B:
                block = np.concatenate(pending) if len(pending) > 1 else pending[0]  # (have, T+1)
                full = have - have % B
                for i in range(0, full, B):
                    yield block[i : i + B]
                pending, have = ([block[full:]] if full < have else []), have - full
        if have:
            yield np.concatenate(pending)

    def _read_shard(self, index: int) -> np.ndarray:
        """(count, seq_len + 1) tokens of one shard; all-pad rows if it is corrupt."""
        shard = self.shards[index]
        url = self.manifest.shard_url(shard)
        if index in self._bad:
            return np.full((shard.samples, self.manifest.seq_len + 1), self.manifest.tokenizer.pad_id, np.int64)
        try:
            data = storage.read_bytes(url)
            if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
                raise ValueError(f"{len(data)} bytes that do not match the manifest's size and sha256")
            rows = decode_shard(data, self.manifest.seq_len + 1)
            if len(rows) != shard.samples:
                raise ValueError(f"{len(rows)} samples, manifest says {shard.samples}")
            return rows
        except UserError:
            raise  # storage problems the user must fix (credentials, bucket): not a bad shard
        except Exception as exc:  # noqa: BLE001 - any read or parse failure marks the shard bad
            self._mark_bad(index, url, exc)
            pad = self.manifest.tokenizer.pad_id
            return np.full((shard.samples, self.manifest.seq_len + 1), pad, dtype=np.int64)

    def _mark_bad(self, index: int, url: str, exc: Exception) -> None:
        """Count a bad shard once (it stays bad for later epochs); warn on the first; stop past the limit."""
        if index in self._bad:
            return
        self._bad.add(index)
        if len(self._bad) == 1:
            log.warning(
                "skipping corrupt shard %s (%s); its samples become <pad> rows, further bad shards "
                "are counted silently",
                url,
                exc,
            )
        if len(self._bad) > self.max_bad_shard_fraction * len(self.shards):
            raise UserError(
                f"{len(self._bad)} of {len(self.shards)} {self.split} shards of {self.manifest.url} are "
                f"unreadable (limit loader.max_bad_shard_fraction={self.max_bad_shard_fraction}); prepare again"
            ) from None

    @property
    def bad_shards(self) -> int:
        """Bad shards this process has met (with loader workers, each worker keeps its own count)."""
        return len(self._bad)
