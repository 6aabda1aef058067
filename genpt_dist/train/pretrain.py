"""`pretrain`: maximum likelihood on prepared shards, on N Ray Train x DeepSpeed workers."""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any, Iterable, Iterator

import torch

from genpt_dist import storage
from genpt_dist.checkpoint import load_tokenizer, resolve
from genpt_dist.config import Config
from genpt_dist.data.loader import ShardLoader
from genpt_dist.data.manifest import Manifest, load_manifest
from genpt_dist.errors import UserError
from genpt_dist.train.loop import Batch, Job, run_worker

log = logging.getLogger(__name__)


def to_batch(tokens: torch.Tensor, pad_id: int) -> Batch:
    """(B, T+1) samples -> inputs and next-token targets; pad targets carry no loss."""
    targets = tokens[:, 1:].clone()
    targets[targets == pad_id] = -100
    return Batch(idx=tokens[:, :-1], targets=targets)


class ShardSource:
    """The pretraining data source: the train split streamed, the val split's first batches for eval."""

    def __init__(self, job: Job, cfg: Config, rank: int, world: int):
        self.manifest: Manifest = load_manifest(job.data)
        self.tokenizer = self.manifest.load_tokenizer()
        self.data_fingerprint = self.manifest.sha256
        self.cfg = cfg
        kw = dict(batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
                  max_bad_shard_fraction=cfg.loader.max_bad_shard_fraction)
        self.train = ShardLoader(self.manifest, "train", seed=cfg.loader.seed, num_workers=cfg.loader.num_workers,
                                 shuffle=True, **kw)
        self.val = ShardLoader(self.manifest, "val", shuffle=False, **kw) if self.manifest.num_samples("val") else None

    def train_batches(self) -> Iterator[Batch]:
        pad = self.tokenizer.pad_id
        return (to_batch(t, pad) for t in self.train)

    def eval_batches(self) -> Iterable[Batch]:
        if self.val is None:
            return []
        self.val.load_state_dict({"epoch": 0, "batch": 0})
        n = min(self.cfg.train.eval_batches, self.val.batches_per_epoch)
        return [to_batch(t, self.tokenizer.pad_id) for t in islice(self.val.iter_epoch(), n)]

    def state_dict(self) -> dict[str, Any]:
        return self.train.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state)


def check_init_matches(init: str, tokenizer_sha256: str, data_url: str) -> None:
    """`--init` must be a generator checkpoint trained with the data's tokenizer."""
    ref = resolve(init)
    if ref.meta.get("model") is None:
        raise UserError(f"--init {init} is not a generator checkpoint")
    tok = load_tokenizer(ref)
    if tok.sha256 != tokenizer_sha256:
        raise UserError(f"--init {ref.url} was trained with a different tokenizer than the data at {data_url}")


def pretrain(data: str, run: str, cfg: Config, init: str | None = None, address: str | None = None) -> dict[str, Any]:
    from genpt_dist.train.launcher import fit

    manifest = load_manifest(data)
    if manifest.seq_len > cfg.block_size:
        raise UserError(f"the data has {manifest.seq_len}-token samples, model.block_size is {cfg.block_size}")
    if manifest.seq_len != cfg.data.seq_len:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": manifest.seq_len})})
    if init:
        check_init_matches(init, manifest.tokenizer_sha256, manifest.url)
    run = storage.normalize(run)
    storage.check_bucket(run)
    job = Job(stage="pretrain", config=cfg.model_dump(mode="json"), data=manifest.url, run=run, init=init)
    metrics = fit(job, cfg, run_worker, address=address, make_source=ShardSource)
    keys = ("step", "train_loss", "val_loss", "val_ppl", "val_bpb", "tokens_seen", "tokens_per_s", "mfu", "checkpoint")
    return {"command": "pretrain", "run": run, **{k: metrics.get(k) for k in keys}}
