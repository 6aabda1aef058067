"""What the training loops read: batches for training, fixed batches for evaluation.

A data source is plain (no Ray, no DeepSpeed): the loops and the engine only call the `DataSource`
methods. `ShardSource` streams a prepared dataset (pretraining, the RL stage's real text, fine-tuning
on a prepared corpus); `train.finetune.TaskSource` reads a task file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import torch

from genpt_dist.config import LoaderConfig
from genpt_dist.data.loader import ShardLoader
from genpt_dist.data.manifest import load_manifest
from genpt_dist.tokenizer import Tokenizer


@dataclass
class Batch:
    """One micro batch on its way into the model."""

    idx: torch.Tensor  # (B, T) input token ids
    targets: torch.Tensor  # (B, T) next-token ids, -100 where no loss is taken (pad, masked prompt)


class DataSource(Protocol):
    """Training batches (an endless, resumable stream) and the fixed evaluation batches."""

    tokenizer: Tokenizer
    data_fingerprint: str
    batch_size: int  # rows per training batch of this rank (the unit of the loader position)

    def train_batches(self) -> Iterator[Batch]: ...
    def eval_batches(self) -> Iterable[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def to_batch(tokens: torch.Tensor, pad_id: int | None) -> Batch:
    """(B, T+1) samples -> inputs and next-token targets; pad targets carry no loss (`pad_id` None: the pad is
    also the real <eos>, GPT-2's `<|endoftext|>`, so every target keeps its loss; `Tokenizer.loss_pad_id`)."""
    targets = tokens[:, 1:].clone()
    if pad_id is not None:
        targets[targets == pad_id] = -100
    return Batch(idx=tokens[:, :-1], targets=targets)


class ShardSource:
    """A prepared dataset: the train split streamed (shuffled per epoch, split by rank), the val split's
    first `eval_batches` batches of this rank (`eval_batch_size` rows each, default `batch_size`) for
    evaluation."""

    def __init__(
        self,
        data_url: str,
        *,
        batch_size: int,
        eval_batches: int,
        loader: LoaderConfig,
        rank: int,
        world: int,
        eval_batch_size: int | None = None,
    ):
        manifest = load_manifest(data_url)
        self.tokenizer = manifest.load_tokenizer()
        self.data_fingerprint = manifest.sha256
        self.batch_size, self.n_eval = batch_size, eval_batches
        kw: dict[str, Any] = dict(rank=rank, world_size=world, max_bad_shard_fraction=loader.max_bad_shard_fraction)
        self.train = ShardLoader(
            manifest,
            "train",
            batch_size=batch_size,
            seed=loader.seed,
            num_workers=loader.num_workers,
            shuffle=True,
            **kw,
        )
        self.val = (
            ShardLoader(manifest, "val", batch_size=eval_batch_size or batch_size, shuffle=False, **kw)
            if manifest.num_samples("val")
            else None
        )

    def train_batches(self) -> Iterator[Batch]:
        pad = self.tokenizer.loss_pad_id
        return (to_batch(t, pad) for t in self.train)

    def eval_batches(self) -> Iterable[Batch]:
        if self.val is None:
            return []
        self.val.load_state_dict({"epoch": 0, "batch": 0})
        n = min(self.n_eval, self.val.batches_per_epoch)
        return [to_batch(t, self.tokenizer.loss_pad_id) for t in islice(self.val.iter_epoch(), n)]

    def state_dict(self) -> dict[str, Any]:
        return self.train.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state)
