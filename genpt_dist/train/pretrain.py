"""`pretrain`: maximum likelihood on prepared shards, on N Ray Train x DeepSpeed workers."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from genpt_dist import storage
from genpt_dist.checkpoint import check_init_matches, resolve
from genpt_dist.config import Config
from genpt_dist.data.manifest import load_manifest
from genpt_dist.errors import UserError
from genpt_dist.model.gpt import GPTConfig
from genpt_dist.train.engine import Engine, Job, Reporter
from genpt_dist.train.loop import train_mle
from genpt_dist.train.sources import ShardSource

log = logging.getLogger(__name__)


def pretrain_worker(job: Job, rank: int, world: int, reporter: Reporter) -> None:
    """One pretraining worker: the shard source, the engine (the global batch kept across world sizes),
    the MLE loop."""
    cfg = job.cfg
    source = ShardSource(
        job.data,
        batch_size=cfg.train.micro_batch_size,
        eval_batches=cfg.train.eval_batches,
        loader=cfg.loader,
        rank=rank,
        world=world,
    )
    train_mle(Engine(job, source, rank=rank, world=world, reporter=reporter))


def pretrain_job(data: str, run: str, cfg: Config, init: str | None = None) -> Job:
    """Validate the data (and `--init`) against the recipe at the edge; the job the workers run."""
    manifest = load_manifest(data)
    if not init and manifest.seq_len > cfg.block_size:
        raise UserError(f"the data has {manifest.seq_len}-token samples, model.block_size is {cfg.block_size}")
    m = cfg.model
    model = GPTConfig(
        vocab_size=manifest.load_tokenizer().vocab_size,
        block_size=cfg.model.block_size or manifest.seq_len,
        n_layer=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        activation=m.activation,
    )
    if init:  # continued pretraining: the shape (and activation, eps) is the init's, the dropout the recipe's
        check_init_matches(init, manifest.tokenizer_sha256, manifest.url)
        model = dataclasses.replace(
            resolve(init).model_config, dropout=m.dropout, attention_dropout=m.attention_dropout
        )
        if manifest.seq_len > model.block_size:
            raise UserError(f"the data has {manifest.seq_len}-token samples, --init's context is {model.block_size}")
    run = storage.normalize(run)
    storage.check_bucket(run)
    return Job(
        stage="pretrain",
        config=cfg.model_dump(mode="json"),
        model=dataclasses.asdict(model),
        seq_len=manifest.seq_len,
        data=manifest.url,
        run=run,
        init=init,
    )


def pretrain(data: str, run: str, cfg: Config, init: str | None = None, address: str | None = None) -> dict[str, Any]:
    from genpt_dist.train.launcher import fit

    job = pretrain_job(data, run, cfg, init)
    metrics = fit(job, cfg, pretrain_worker, address=address)
    keys = ("step", "train_loss", "val_loss", "val_ppl", "val_bpb", "tokens_seen", "tokens_per_s", "mfu", "checkpoint")
    return {"command": "pretrain", "run": job.run, **{k: metrics.get(k) for k in keys}}
