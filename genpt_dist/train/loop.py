"""The per-worker maximum-likelihood loop shared by `pretrain` and `finetune`.

Runs inside each Ray Train worker. It receives a `Job` (plain data) and a data-source factory,
builds the model and its DeepSpeed engine, resumes from the run's newest complete checkpoint (same
step, LR schedule, optimizer state and loader position) or warm-starts from `--init`, then runs a
fixed number of optimizer steps. Every `eval_every` steps it measures val loss, perplexity and
bits-per-byte (bytes counted from the text the target tokens stand for, so figures compare across
tokenizers); every `checkpoint_every` steps and at the end every rank saves its ZeRO shard into its
own temporary folder and all ranks call `ray.train.report` with it, Ray Train merging them into one
checkpoint folder in the run's storage; rank 0 adds meta.json listing every rank's files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from genpt_dist.checkpoint import (CHECKPOINT_FORMAT, DS_DIR, DS_TAG, META, TOKENIZER, CheckpointRef, download,
                                   latest_checkpoint, load_state_dict, resolve)
from genpt_dist.config import Config
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro batch on its way into the model."""

    idx: torch.Tensor  # (B, T) input token ids
    targets: torch.Tensor  # (B, T) next-token ids, -100 where no loss is taken (pad, masked prompt)


@dataclass
class Job:
    """Everything a worker needs, as plain data (it crosses the Ray boundary)."""

    stage: str  # "pretrain" | "finetune"
    config: dict[str, Any]  # Config.model_dump()
    data: str  # dataset or task URL
    run: str  # the stage's run URL
    init: str | None = None  # checkpoint to warm-start from when the run has none
    env: dict[str, str] = field(default_factory=dict)  # non-secret settings for the worker
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific settings


class DataSource(Protocol):
    """What a stage hands the loop: batches for training, fixed batches for evaluation."""

    tokenizer: Tokenizer
    data_fingerprint: str

    def train_batches(self) -> Iterator[Batch]: ...
    def eval_batches(self) -> Iterable[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SourceFactory = Callable[[Job, Config, int, int], DataSource]


def token_byte_table(tok: Tokenizer) -> torch.Tensor:
    from genpt_dist.data.prepare import token_byte_lengths

    return torch.from_numpy(token_byte_lengths(tok))


def _maybe_crash(step: int, rank: int) -> None:
    """Test hook: GENPT_TEST_CRASH_AT_STEP=k kills rank GENPT_TEST_CRASH_RANK (default 1) once."""
    at, marker = os.environ.get("GENPT_TEST_CRASH_AT_STEP"), os.environ.get("GENPT_TEST_CRASH_MARKER")
    if at is None or marker is None or step != int(at):
        return
    if rank == int(os.environ.get("GENPT_TEST_CRASH_RANK", "1")) and not Path(marker).exists():
        Path(marker).write_text(str(step))
        log.warning("test hook: rank %d exits at step %d", rank, step)
        os._exit(1)


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class Trainer:
    """One worker's loop. Constructed inside the Ray Train worker."""

    def __init__(self, job: Job, make_source: SourceFactory):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.job = job
        self.cfg = Config.model_validate(job.config)
        self.source = make_source(job, self.cfg, self.rank, self.world)
        self.tok = self.source.tokenizer
        self.byte_table = token_byte_table(self.tok)
        m = self.cfg.model
        self.model_cfg = GPTConfig(vocab_size=self.tok.vocab_size, block_size=self.cfg.block_size,
                                   n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, dropout=m.dropout)
        self.step, self.tokens_seen = 0, 0
        self.metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ build / resume
    def build(self) -> None:
        from genpt_dist.train import elastic
        from genpt_dist.train.deepspeed import (build_ds_config, build_engine, build_optimizer,
                                                resolve_precision)

        torch.manual_seed(self.cfg.train.seed)
        model = GPT(self.model_cfg)
        resume = self._agreed_resume_point()
        if resume is None and self.job.init:
            self._load_weights(model, resolve(self.job.init))
        if self.job.stage in elastic.GRAD_ACCUM_STAGES:  # the same global batch at any world size
            self.cfg.deepspeed.grad_accum = elastic.grad_accum_for(self.cfg, self.world,
                                                                   resume.meta if resume else None)
        self.before_engine(model)
        self.flops_per_token = model.flops_per_token(self.cfg.data.seq_len)  # before ZeRO-3 partitions it
        self.precision = resolve_precision(self.cfg.deepspeed, self.cfg.scaling.use_gpu)
        ds_config = build_ds_config(self.cfg.deepspeed, self.cfg.train, self.cfg.optim, self.precision,
                                    use_gpu=self.cfg.scaling.use_gpu)
        opt, sched = build_optimizer(model, self.cfg.optim, self.cfg.train.steps)
        self.engine = build_engine(model, ds_config, opt, sched)
        self.device = self.engine.device
        self.build_extra()
        if resume is not None:
            self._restore(resume)

    def build_extra(self) -> None:
        """Hook for stages with more engines than the policy's (built before a resume restores them)."""

    def before_engine(self, model: GPT) -> None:
        """Hook for stages that change the model before DeepSpeed wraps it (e.g. freezing)."""

    def _load_weights(self, model: GPT, ref: CheckpointRef) -> None:
        state = load_state_dict(ref)
        model.load_state_dict(state, strict=False)
        log.info("rank %d: weights from %s (step %d)", self.rank, ref.url, ref.step)

    def _restore(self, ref: CheckpointRef) -> None:
        """Step, counters, engines, RNG and loader position from a checkpoint. One written by another
        number of workers is re-partitioned, optimizer state included (see `train.elastic`)."""
        from genpt_dist.train import elastic

        meta = ref.meta
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.metrics = dict(meta.get("metrics", {}))
        with tempfile.TemporaryDirectory(prefix=f"genpt-restore-r{self.rank}-") as tmp:
            same_world = int(meta["world_size"]) == self.world  # else every partition is re-partitioned
            download(ref, tmp, only_rank=self.rank if same_world else None)
            with elastic.resharded(Path(tmp), int(meta["world_size"]), self.world, elastic.deepspeed_engines(self),
                                   rank=self.rank):
                self.engine.load_checkpoint(str(Path(tmp) / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
                rng = Path(tmp) / "rng" / f"rank_{self.rank}.pt"
                if rng.exists():
                    torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
                self.restore_extra(Path(tmp), meta)
        self.source.load_state_dict(elastic.loader_state_for(meta, self.cfg.train.micro_batch_size, self.world))
        log.info("rank %d: resumed %s at step %d (written by %s workers)", self.rank, ref.url, self.step,
                 meta["world_size"])

    def _agreed_resume_point(self) -> CheckpointRef | None:
        """Rank 0's latest valid checkpoint, the same on every rank: ranks that looked on their own could
        disagree when a storage error makes one of them skip a checkpoint that the others take."""
        import torch.distributed as dist

        box = [latest_checkpoint(self.job.run) if self.rank == 0 else None]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def restore_extra(self, folder: Path, meta: dict[str, Any]) -> None:
        """Hook: stages with more state than the policy engine read it back from the local copy."""

    def save_extra(self, folder: Path) -> None:
        """Hook: stages with more state than the policy engine write it into this rank's folder."""

    # ------------------------------------------------------------------ steps
    def forward_loss(self, batch: Batch) -> torch.Tensor:
        _, loss = self.engine(batch.idx.to(self.device), batch.targets.to(self.device))
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss (nats/token), perplexity and bits per byte over every rank's eval batches."""
        self.engine.eval()
        loss_sum, n_targets, n_bytes = 0.0, 0.0, 0.0
        for batch in self.source.eval_batches():
            logits, _ = self.engine(batch.idx.to(self.device))
            targets = batch.targets.to(self.device)
            valid = targets != -100
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   ignore_index=-100, reduction="sum")
            loss_sum += ce.item()
            n_targets += valid.sum().item()
            n_bytes += self.byte_table[targets[valid].cpu()].sum().item()
        self.engine.train()
        loss_sum, n_targets, n_bytes = _all_reduce_sum([loss_sum, n_targets, n_bytes])
        loss = loss_sum / max(n_targets, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                "val_bpb": loss_sum / math.log(2) / max(n_bytes, 1)}

    def run(self) -> None:
        import ray.train

        from genpt_dist.train.metrics import MetricsLog, measure_matmul_flops, progress_line

        train_cfg, accum = self.cfg.train, self.cfg.deepspeed.grad_accum
        peak = measure_matmul_flops(torch.bfloat16 if self.precision != "fp32" else torch.float32,
                                    device="cuda" if self.cfg.scaling.use_gpu else "cpu")
        mlog = MetricsLog(self.job.run, self.step, enabled=self.rank == 0)
        batches = self.source.train_batches()
        start_step, t_start = self.step, time.time()
        window_loss, window_tokens, window_steps, t_window = 0.0, 0, 0, time.time()
        while self.step < train_cfg.steps and not self.should_stop():
            for _ in range(accum):
                batch = next(batches)
                loss = self.forward_loss(batch)
                self.engine.backward(loss)
                self.engine.step()
                window_loss += loss.item() / accum
                window_tokens += batch.idx.numel()
            self.step += 1
            window_steps += 1
            _maybe_crash(self.step, self.rank)
            last = self.step == train_cfg.steps
            log_now = self.step % train_cfg.log_every == 0 or last
            if log_now or self.step % train_cfg.checkpoint_every == 0:  # the same steps on every rank
                loss_sum, tokens = _all_reduce_sum([window_loss / window_steps, window_tokens])
                mean_loss, dt = loss_sum / self.world, time.time() - t_window
                self.tokens_seen += int(tokens)
                tok_s = tokens / dt
                mfu = self.flops_per_token * tok_s / self.world / peak
                self.metrics.update(step=self.step, train_loss=mean_loss, tokens_per_s=tok_s, mfu=mfu,
                                    lr=self.engine.get_lr()[0], tokens_seen=self.tokens_seen)
                if self.rank == 0 and log_now:
                    progress_line(self.job.stage, self.step, train_cfg.steps, mean_loss, tok_s, mfu,
                                  time.time() - t_start, start_step)
                mlog.add({k: self.metrics[k] for k in ("step", "train_loss", "tokens_per_s", "mfu", "lr",
                                                       "tokens_seen")})
                window_loss, window_tokens, window_steps, t_window = 0.0, 0, 0, time.time()
            if self.step % train_cfg.eval_every == 0 or last:
                self.metrics.update(self.evaluate())
                mlog.add({"step": self.step, **{k: self.metrics[k] for k in ("val_loss", "val_ppl", "val_bpb")}})
                if self.rank == 0:
                    log.info("[%s] step %d val_loss %.4f val_bpb %.4f", self.job.stage, self.step,
                             self.metrics["val_loss"], self.metrics["val_bpb"])
                self.on_eval()
            if self.step % train_cfg.checkpoint_every == 0 or last:
                mlog.flush()
                self.save_and_report()
        if self.step == start_step:  # nothing left to do: report the finished state once
            ray.train.report(dict(self.metrics))
        mlog.close()

    def on_eval(self) -> None:
        """Hook after each evaluation (finetune: early stopping bookkeeping)."""

    def should_stop(self) -> bool:
        return False

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "stage": self.job.stage,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "precision": self.precision,
            "model": dataclasses.asdict(self.model_cfg),
            "config": self.job.config,
            "tokenizer_sha256": self.tok.sha256,
            "data": {"url": self.job.data, "fingerprint": self.source.data_fingerprint},
            "init": self.job.init,
            "loader": self.source.state_dict(),
            "metrics": dict(self.metrics),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save_and_report(self) -> None:
        import ray.train
        import torch.distributed as dist

        tmp = Path(tempfile.mkdtemp(prefix=f"genpt-ckpt-r{self.rank}-"))
        try:
            self.engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG)
            (tmp / "rng").mkdir()
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank_{self.rank}.pt")
            self.save_extra(tmp)
            if self.rank == 0:
                (tmp / TOKENIZER).write_text(self.tok.to_json())
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
            gathered: list[dict[str, int]] = [{} for _ in range(self.world)]
            dist.all_gather_object(gathered, files)
            if self.rank == 0:
                meta = self.checkpoint_meta()
                meta["files"] = {k: v for part in gathered for k, v in part.items()}
                (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            ray.train.report(dict(self.metrics), checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def run_worker(job_dict: dict[str, Any], make_source: SourceFactory, trainer_cls: type[Trainer] = Trainer) -> None:
    """Ray Train's `train_loop_per_worker`: environment, threads, then the loop."""
    job = Job(**job_dict)
    os.environ.update(job.env)
    cfg = Config.model_validate(job.config)
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = trainer_cls(job, make_source)
    trainer.build()
    trainer.run()
