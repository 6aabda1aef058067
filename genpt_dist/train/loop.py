"""The maximum-likelihood loop of `pretrain` and `finetune`, over the `Engine`.

Per optimizer step: `grad_accum` micro batches (forward, backward; DeepSpeed steps the optimizer at
the accumulation boundary), so the global batch is micro_batch_size x grad_accum x workers; on a
resume at another world size `grad_accum` is rescaled to keep the checkpoint's global batch
(`train.elastic.grad_accum_for`). Every `log_every` steps the train loss (mean over the window and the
ranks), tokens/s and MFU are logged; every `eval_every` steps val loss, perplexity and bits-per-byte;
every `checkpoint_every` steps, and at the end, a checkpoint. An optional `EarlyStop` (fine-tuning)
ends the run after `patience` evaluations without a better val loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from genpt_dist import faults
from genpt_dist.meta import CheckpointMeta
from genpt_dist.model.gpt import GPT
from genpt_dist.train.collective import all_reduce_sum
from genpt_dist.train.engine import Engine

log = logging.getLogger(__name__)

TRAIN_KEYS = ("train_loss", "tokens_per_s", "mfu", "lr", "tokens_seen")
VAL_KEYS = ("val_loss", "val_ppl", "val_bpb")


@dataclass
class EarlyStop:
    """Best val loss so far and the evaluations since it improved; `stopped` once `patience` ran out."""

    patience: int  # evaluations without improvement before stopping (0 = never)
    best_val: float = float("inf")
    bad_evals: int = 0
    stopped: bool = False

    def update(self, val_loss: float) -> None:
        if val_loss < self.best_val - 1e-6:
            self.best_val, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        self.stopped = self.patience > 0 and self.bad_evals >= self.patience


def run_mle(engine: Engine, early_stop: EarlyStop | None = None) -> None:
    """Train `engine` (built and restored) from its step to the schedule's last."""
    from genpt_dist.hardware import MFUMeter
    from genpt_dist.train.metrics import progress_line

    schedule, accum, world = engine.schedule, engine.grad_accum, engine.world
    # The peak at the precision in use, with this worker's threads (a GPU's nominal one where known); MFU <= 1.
    mfu_of = MFUMeter(engine.precision, engine.device if engine.cfg.scaling.use_gpu else "cpu")
    engine.open_metrics_log()
    batches = engine.source.train_batches()
    start_step, t_start = engine.step, time.time()
    window_loss, window_tokens, window_steps, t_window = 0.0, 0, 0, time.time()
    while engine.step < schedule.steps and not (early_stop and early_stop.stopped):
        for _ in range(accum):
            batch = next(batches)
            window_loss += engine.train_micro_batch(batch) / accum
            window_tokens += batch.idx.numel()
        engine.step += 1
        window_steps += 1
        faults.maybe_crash(engine.step, engine.rank)
        step, cadence = engine.step, engine.cadence
        if cadence.log(step) or cadence.checkpoint(step):  # the same steps on every rank
            loss_sum, tokens = all_reduce_sum([window_loss / window_steps, window_tokens])
            mean_loss, dt = loss_sum / world, time.time() - t_window
            engine.tokens_seen += int(tokens)
            tok_s = tokens / dt
            mfu = mfu_of(engine.flops_per_token * tok_s / world)
            engine.metrics.update(
                step=step,
                train_loss=mean_loss,
                tokens_per_s=tok_s,
                mfu=mfu,
                lr=engine.engine.get_lr()[0],
                tokens_seen=engine.tokens_seen,
            )
            if engine.rank == 0 and cadence.log(step):
                progress_line(
                    engine.job.stage, step, schedule.steps, mean_loss, tok_s, mfu, time.time() - t_start, start_step
                )
            engine.log_metrics(TRAIN_KEYS)
            window_loss, window_tokens, window_steps, t_window = 0.0, 0, 0, time.time()
        if cadence.evaluate(step) and (val := engine.evaluate()):  # a dataset without a val split: none
            engine.log_metrics(VAL_KEYS)
            if engine.rank == 0:
                log.info(
                    "[%s] step %d val_loss %.4f val_bpb %.4f", engine.job.stage, step, val["val_loss"], val["val_bpb"]
                )
            if early_stop is not None:
                early_stop.update(val["val_loss"])
                engine.metrics.update(best_val_loss=early_stop.best_val, stopped_early=early_stop.stopped)
        if cadence.checkpoint(step):
            engine.save_and_report()
    engine.finish(start_step)


def train_mle(
    engine: Engine, *, before_wrap: Callable[[GPT], None] | None = None, early_stop: EarlyStop | None = None
) -> None:
    """A whole MLE worker over its engine (stage parts registered): the resume point, the grad_accum that
    keeps the checkpoint's global batch at this world size, build (`before_wrap` may change the model),
    restore, then `run_mle`."""
    from genpt_dist.train import elastic

    cfg, micro = engine.cfg, engine.schedule.micro_batch_size
    resume = engine.resume_point()
    meta = resume.meta if resume else None
    assert meta is None or isinstance(meta, CheckpointMeta)  # list_checkpoints: never an export
    accum = elastic.grad_accum_for(
        cfg.deepspeed.grad_accum, micro, cfg.scaling.worker_range, engine.job.seq_len, engine.world, meta
    )
    engine.build(engine.new_model(), grad_accum=accum, resume=resume, before_wrap=before_wrap)
    if resume is not None:
        engine.restore(resume)
    run_mle(engine, early_stop)
