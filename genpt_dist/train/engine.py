"""The engine under every stage: one worker's policy engine, its checkpoints and its cadence.

`Engine` takes the job (plain data), this worker's rank and world size, a data source and a
reporter, and does what every stage loop needs, in one place:
* build: the GPT from the job's model shape, the DeepSpeed engine from the typed config
  (`train.deepspeed`), warm-started from `--init` when the run has no checkpoint yet;
* resume: rank 0's newest complete checkpoint, agreed by all ranks, restores step, counters, the
  engine (optimizer and LR schedule included), RNG, the loader position and every registered
  `CheckpointPart` (a stage's extra state: the RL stage's discriminator, fine-tuning's frozen
  weights); a checkpoint written by another world size is re-partitioned (`train.elastic`);
* save + report: each rank writes its ZeRO shard and its parts into a local folder, rank 0 adds
  tokenizer.json and meta.json (`CheckpointMeta`, listing every rank's files), and the reporter
  hands the folder over (Ray Train merges the ranks' folders into one checkpoint in the run's
  storage; `LocalReporter` uploads it itself in a one-process run);
* evaluate: val loss, perplexity and bits-per-byte over every rank's eval batches (`val_loss`);
* cadence: which steps log, evaluate and checkpoint (and always the last one).
The loops over it are plain: `train.loop.run_mle` (pretrain, finetune) and the RL stage's
`rl.stage.RLWorker.run` (started by `rl.driver.run_rl`). Nothing here imports Ray: with
`LocalReporter` and a one-rank process group (`collective.init_single_process_group`) the engine
runs in one process, which is how its tests drive it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from genpt_dist import storage
from genpt_dist.checkpoint import (
    CHECKPOINTS_DIR,
    DS_DIR,
    DS_TAG,
    TOKENIZER,
    CheckpointRef,
    download,
    latest_checkpoint,
    load_state_dict,
    resolve,
)
from genpt_dist.config import Config, TrainConfig
from genpt_dist.data.packing import token_byte_lengths
from genpt_dist.meta import META, CheckpointMeta
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.train.collective import all_gather_objects, all_reduce_sum, broadcast_object
from genpt_dist.train.metrics import MetricsLog
from genpt_dist.train.sources import Batch, DataSource
from genpt_dist.val_loss import LossSums, batch_loss_sums

log = logging.getLogger(__name__)

STOPPED = "stopped.json"  # a run stopped by a user error (see Engine.stop_for_user_error)


@dataclass
class Job:
    """What every stage's worker needs, as plain data: it crosses the Ray boundary as a dict, so it holds
    no live handle. A stage that needs more (the RL stage's inputs and its rollout pool) binds it to its
    stage function beside the Job (`train.launcher.StageFn`)."""

    stage: str  # "pretrain" | "finetune" | "adversarial" | "reinforce"
    config: dict[str, Any]  # Config.model_dump(mode="json")
    model: dict[str, Any]  # GPTConfig as a dict: the policy's shape
    seq_len: int  # tokens per training sample (for FLOPs per token and the global batch)
    data: str  # dataset or task URL
    run: str  # the stage's run URL
    init: str | None = None  # checkpoint to warm-start from when the run has none
    env: dict[str, str] = field(default_factory=dict)  # non-secret settings for the worker
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific settings (plain values)

    @functools.cached_property
    def cfg(self) -> Config:
        """`config` validated once per process: the dump crosses the Ray boundary as plain data, and a
        worker's set-up, its stage and its engine all read this one."""
        return Config.model_validate(self.config)


class CheckpointPart(Protocol):
    """State a stage keeps besides the policy engine, saved into and restored from each checkpoint."""

    def engines(self) -> list[Any]:
        """DeepSpeed engines of this part (re-partitioned with the policy's on an elastic resume)."""
        ...

    def save(self, folder: Path, rank: int) -> None:
        """Write this rank's files into the rank's checkpoint folder."""
        ...

    def load(self, folder: Path, meta: CheckpointMeta) -> None:
        """Read them back from the local copy of a checkpoint."""
        ...

    def meta_fields(self) -> dict[str, Any]:
        """The `CheckpointMeta` fields this part owns (e.g. `rl`, `finetune`)."""
        ...


Reporter = Callable[[dict[str, Any], "Path | None"], None]  # (metrics, this rank's checkpoint folder or None)


class RayTrainReporter:
    """Reports to Ray Train, which copies every rank's folder into one checkpoint of the run, and keeps
    the last metrics for the worker to return: Ray Train's `Result.metrics` is the last report its
    controller consolidated, and a report put while a poll of the worker has just found the queue empty
    is lost when the training thread ends before that poll asks whether it still runs (seen on a loaded
    machine: a 24-step run whose result said step 18). `Result.return_value` is read once the thread
    has ended, so it cannot miss the end."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def __call__(self, metrics: dict[str, Any], folder: Path | None) -> None:
        import ray.train

        self.last = dict(metrics)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalReporter:
    """A one-process run's reporter: uploads each checkpoint folder to `<run>/checkpoints/` and keeps
    the newest `keep` (what Ray Train does for a worker group)."""

    def __init__(self, run: str, keep: int):
        self.root = storage.join(storage.normalize(run), CHECKPOINTS_DIR)
        self.keep = keep
        self.last: dict[str, Any] = {}

    def __call__(self, metrics: dict[str, Any], folder: Path | None) -> None:
        self.last = dict(metrics)
        if folder is None:
            return
        step = int(metrics.get("step", 0))
        storage.upload_dir(str(folder), storage.join(self.root, f"checkpoint_{step:09d}_{time.time_ns()}"))
        names = sorted(
            {
                m.group(1)
                for f in storage.list_files(self.root)
                if (m := re.match(rf"{re.escape(self.root)}/(checkpoint_[^/]+)/", f))
            }
        )
        for old in names[: max(0, len(names) - self.keep)]:
            storage.delete_prefix(storage.join(self.root, old))


@dataclass(frozen=True)
class Cadence:
    """Which steps log, evaluate and checkpoint: every `*_every` steps, and always the last."""

    schedule: TrainConfig

    def last(self, step: int) -> bool:
        return step == self.schedule.steps

    def log(self, step: int) -> bool:
        return step % self.schedule.log_every == 0 or self.last(step)

    def evaluate(self, step: int) -> bool:
        return step % self.schedule.eval_every == 0 or self.last(step)

    def checkpoint(self, step: int) -> bool:
        return step % self.schedule.checkpoint_every == 0 or self.last(step)


def token_byte_table(tokenizer) -> torch.Tensor:
    """(V,) UTF-8 bytes per token id, for bits-per-byte."""
    return torch.from_numpy(token_byte_lengths(tokenizer))


class Engine:
    """One worker's policy engine and checkpoints (see the module docstring)."""

    def __init__(self, job: Job, source: DataSource, *, rank: int, world: int, reporter: Reporter):
        self.job, self.source, self.rank, self.world, self.reporter = job, source, rank, world, reporter
        self.cfg = job.cfg
        self.schedule, self.optim = self.cfg.stage_schedule(job.stage)
        self.cadence = Cadence(self.schedule)
        self.model_cfg = GPTConfig(**job.model)
        self.tok = source.tokenizer
        self.byte_table = token_byte_table(self.tok)
        self.parts: list[CheckpointPart] = []
        self.step, self.tokens_seen = 0, 0
        self.metrics: dict[str, Any] = {}
        self.engine: Any = None
        self.grad_accum = 1
        self.mlog: MetricsLog | None = None

    # ------------------------------------------------------------------ build / resume
    def resume_point(self) -> CheckpointRef | None:
        """Rank 0's latest valid checkpoint, the same on every rank: ranks that looked on their own could
        disagree when a storage error makes one of them skip a checkpoint that the others take."""
        return broadcast_object(latest_checkpoint(self.job.run) if self.rank == 0 else None)

    def new_model(self) -> GPT:
        torch.manual_seed(self.schedule.seed)
        return GPT(self.model_cfg)

    def build(
        self,
        model: GPT,
        *,
        grad_accum: int,
        resume: CheckpointRef | None,
        before_wrap: Callable[[GPT], None] | None = None,
    ) -> None:
        """Warm-start `model` from `--init` unless the run resumes from `resume`, let `before_wrap` change
        it (freezing), then wrap it in DeepSpeed. The stage then calls `restore(resume)`."""
        from genpt_dist.train.deepspeed import build_ds_config, build_engine, build_optimizer, resolve_precision

        if resume is None and self.job.init:
            ref = resolve(self.job.init)
            model.load_state_dict(load_state_dict(ref), strict=False)
            log.info("rank %d: weights from %s (step %d)", self.rank, ref.url, ref.step)
        if before_wrap is not None:
            before_wrap(model)
        self.grad_accum = grad_accum
        self.flops_per_token = model.flops_per_token(self.job.seq_len)  # before ZeRO-3 partitions it
        # Rank 0 decides (`auto` measures, and a loaded machine could answer differently on each rank): every
        # rank must build the same DeepSpeed config.
        mine = resolve_precision(self.cfg.deepspeed, self.cfg.scaling.use_gpu) if self.rank == 0 else None
        self.precision = broadcast_object(mine)
        ds_config = build_ds_config(
            self.cfg.deepspeed,
            micro_batch_size=self.schedule.micro_batch_size,
            grad_accum=grad_accum,
            grad_clip=self.optim.grad_clip,
            precision=self.precision,
            use_gpu=self.cfg.scaling.use_gpu,
        )
        opt, sched = build_optimizer(model, self.optim, self.schedule.steps)
        self.engine = build_engine(model, ds_config, opt, sched)
        self.device = self.engine.device

    def restore(self, ref: CheckpointRef) -> None:
        """Step, counters, engines, RNG, loader position and parts from a checkpoint. One written by another
        number of workers is re-partitioned, optimizer state included (see `train.elastic`)."""
        from genpt_dist.train import elastic

        meta = ref.meta
        assert isinstance(meta, CheckpointMeta), f"{ref.url} is an export, not a checkpoint"
        self.step, self.tokens_seen = meta.step, meta.tokens_seen
        self.metrics = dict(meta.metrics)
        engines = [self.engine, *(e for part in self.parts for e in part.engines())]
        with tempfile.TemporaryDirectory(prefix=f"genpt-restore-r{self.rank}-") as tmp:
            same_world = meta.world_size == self.world  # else every partition is re-partitioned
            download(ref, tmp, only_rank=self.rank if same_world else None)
            with elastic.resharded(Path(tmp), meta.world_size, self.world, engines, rank=self.rank):
                self.engine.load_checkpoint(
                    str(Path(tmp) / DS_DIR), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
                rng = Path(tmp) / "rng" / f"rank_{self.rank}.pt"
                if rng.exists():
                    torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
                for part in self.parts:
                    part.load(Path(tmp), meta)
        self.source.load_state_dict(elastic.loader_state_for(meta, self.source.batch_size, self.world))
        log.info(
            "rank %d: resumed %s at step %d (written by %d workers)", self.rank, ref.url, self.step, meta.world_size
        )

    # ------------------------------------------------------------------ run-time pieces
    def open_metrics_log(self) -> MetricsLog:
        """`<run>/metrics.jsonl`, TensorBoard and MLflow (rank 0), kept up to the resumed step."""
        self.mlog = MetricsLog(self.job.run, self.step, enabled=self.rank == 0, stage=self.job.stage, config=self.cfg)
        return self.mlog

    def log_metrics(self, keys: Iterable[str]) -> None:
        """One metrics record of this step with these keys of `self.metrics`."""
        assert self.mlog is not None, "open_metrics_log first"
        self.mlog.add({"step": self.step, **{k: self.metrics[k] for k in keys if k in self.metrics}})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss (nats/token), perplexity and bits per byte over every rank's eval batches ({} when the
        source has none)."""
        self.engine.eval()
        sums = LossSums()
        for batch in self.source.eval_batches():
            sums += batch_loss_sums(
                lambda idx: self.engine(idx)[0],
                batch.idx.to(self.device),
                batch.targets.to(self.device),
                self.byte_table,
            )
        self.engine.train()
        total = LossSums.from_list(all_reduce_sum(sums.tolist()))
        if total.targets == 0:  # no val data (an RL stage on a prompt file alone)
            return {}
        result = total.metrics()
        self.metrics.update(result)
        return result

    def train_micro_batch(self, batch: Batch) -> float:
        """Forward, backward and (at the accumulation boundary) the optimizer step of one micro batch."""
        _, loss = self.engine(batch.idx.to(self.device), batch.targets.to(self.device))
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self, files: dict[str, int]) -> CheckpointMeta:
        part_fields: dict[str, Any] = {}
        for part in self.parts:
            part_fields.update(part.meta_fields())
        return CheckpointMeta(
            stage=self.job.stage,
            step=self.step,
            tokens_seen=self.tokens_seen,
            world_size=self.world,
            zero_stage=self.cfg.deepspeed.zero_stage,
            precision=self.precision,
            model=self.model_cfg,
            config=self.job.config,
            tokenizer_sha256=self.tok.sha256,
            data_url=self.job.data,
            data_fingerprint=self.source.data_fingerprint,
            init=self.job.init,
            loader=self.source.state_dict(),
            metrics=dict(self.metrics),
            files=files,
            micro_batch_size=self.source.batch_size,
            saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **part_fields,
        )

    def save_and_report(self) -> None:
        """Every rank writes its shard and parts, rank 0 meta.json; then all ranks report (a collective)."""
        if self.mlog is not None:
            self.mlog.flush()
        tmp = Path(tempfile.mkdtemp(prefix=f"genpt-ckpt-r{self.rank}-"))
        try:
            self.engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG)
            (tmp / "rng").mkdir()
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank_{self.rank}.pt")
            for part in self.parts:
                part.save(tmp, self.rank)
            if self.rank == 0:
                (tmp / TOKENIZER).write_text(self.tok.to_json())
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
            gathered = all_gather_objects(files, self.world)
            if self.rank == 0:
                meta = self.checkpoint_meta({k: v for part in gathered for k, v in part.items()})
                (tmp / META).write_text(meta.to_json())
            self.reporter(dict(self.metrics), tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def stop_for_user_error(self, message: str) -> None:
        """End the run early on the user's error (a reward function that fails): rank 0 records it in
        `<run>/stopped.json`, which the driver turns into a one-line error (Ray Train hands the driver only
        the metrics of checkpoints). Earlier checkpoints stay as they are."""
        if self.rank == 0:
            storage.write_text(storage.join(self.job.run, STOPPED), json.dumps({"step": self.step, "error": message}))
        if self.mlog is not None:
            self.mlog.close(failed=True)

    def finish(self, start_step: int) -> None:
        """End of a loop: a run that had nothing left to do reports its finished state once."""
        if self.step == start_step:
            self.reporter(dict(self.metrics), None)
        if self.mlog is not None:
            self.mlog.close()
