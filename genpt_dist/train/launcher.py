"""Stage drivers hand their per-worker function to `fit`, which owns the Ray Train set-up.

A stage's worker function is `run_stage(job, rank, world, reporter)`: plain code over the `Engine`
that knows nothing of Ray Train. What a stage needs besides the plain `Job` (the RL stage's inputs
and rollout pool) is bound to it with `functools.partial`: Ray Train ships the function to every
worker through the object store, object refs and actor handles included. `ray_train_worker` is the
adapter Ray Train calls on each worker (environment, threads, rank and world size from Ray Train's
context, `ray.train.report` as reporter).

`TorchTrainer` with `ScalingConfig` (workers, CPUs/GPUs each), `TorchConfig` (gloo on CPU, nccl on GPU,
timeout), `RunConfig(storage_path=<run URL>, name="checkpoints")` with the storage seam's pyarrow
filesystem for s3://, `CheckpointConfig(num_to_keep)` and `FailureConfig(max_failures)`.

Elastic runs (`scaling.num_workers: [min, max]`) get Ray Train's elastic `ScalingConfig(num_workers=
(min, max))`: it starts with as many workers as the cluster holds (at least min) and restarts the group
with another size when nodes go or come; each restart resumes from the latest checkpoint, re-partitioned
for the new size (`train.elastic`). Before Ray Train asks for workers, `room_for` (`check_fits`) refuses what the
cluster can never hold and, with an autoscaler, waits for the minimum to be there.

Ray Train's controller polls the worker group every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` (2 s by default),
and a finished run waits for a few such rounds before `fit` returns: 6.5 s of a 36 s tiny pretrain.
`fit` sets it to `HEALTH_CHECK_INTERVAL_S` unless the user set it (Ray Train forwards the driver's value
to the controller); a poll is a remote call per worker, and a poll left hanging only carries over to the
next round (a worker is declared dead after `RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S`, 10 minutes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from genpt_dist import storage
from genpt_dist.capacity import room_for
from genpt_dist.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, remove_incomplete
from genpt_dist.config import Config
from genpt_dist.errors import UserError
from genpt_dist.raycluster import init_ray, worker_env
from genpt_dist.tracking import check_tracking
from genpt_dist.train.engine import STOPPED, Job, Reporter

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = "0.5"  # Ray Train's controller's polling interval (its default is 2 s)
# Ray Train v2's variable, checked against Ray 2.60.0 (ray.train.v2._internal.constants)
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

StageFn = Callable[[Job, int, int, Reporter], None]  # (job, rank, world, reporter): one worker's stage


def init_worker(job: Job) -> Config:
    """A worker's environment and threads, before any engine is built."""
    os.environ.update(job.env)
    cfg = job.cfg
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cfg


def ray_train_worker(job_dict: dict[str, Any], run_stage: StageFn) -> dict[str, Any]:
    """Ray Train's `train_loop_per_worker`; returns this rank's last reported metrics (rank 0's become
    `Result.return_value`)."""
    import ray.train

    from genpt_dist.train.engine import RayTrainReporter

    ctx = ray.train.get_context()
    job = Job(**job_dict)
    init_worker(job)
    reporter = RayTrainReporter()
    run_stage(job, ctx.get_world_rank(), ctx.get_world_size(), reporter)
    return reporter.last


def fit(
    job: Job,
    cfg: Config,
    run_stage: StageFn,
    address: str | None = None,
    *,
    also_needs: tuple[float, float, str] = (0.0, 0.0, ""),
) -> dict[str, Any]:
    """Run `run_stage` on N Ray Train workers; returns the final metrics and the latest checkpoint.

    `also_needs` = (CPUs, GPUs, what) the stage holds besides the workers (e.g. rollout actors)."""
    check_tracking(cfg.tracking)  # a missing MLflow: one line and exit 2 now, not a failed rank 0 later
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(address)
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)
    schedule, _ = cfg.stage_schedule(job.stage)
    lo, hi = cfg.scaling.worker_range
    extra_cpus, extra_gpus, extra_what = also_needs
    with room_for(
        lo,
        cfg.scaling.cpus_per_worker,
        cfg.scaling.use_gpu,
        extra_cpus=extra_cpus,
        extra_gpus=extra_gpus,
        extra_what=extra_what,
    ):  # Ray Train's own requests take over
        job = dataclasses.replace(job, run=storage.normalize(job.run), env={**worker_env(), **job.env})
        remove_incomplete(job.run)  # what a killed upload left: never loadable, never rotated by Ray Train
        stopped = storage.join(job.run, STOPPED)
        if storage.exists(stopped):  # an earlier attempt's user error: this one starts afresh
            storage.delete(stopped)
        fs, path = storage.pyarrow_filesystem(job.run)
        resources = {"CPU": cfg.scaling.cpus_per_worker}
        if cfg.scaling.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            functools.partial(ray_train_worker, run_stage=run_stage),
            train_loop_config=dataclasses.asdict(job),
            scaling_config=ray.train.ScalingConfig(
                num_workers=hi if lo == hi else (lo, hi), use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
            ),
            torch_config=TorchConfig(
                backend="nccl" if cfg.scaling.use_gpu else "gloo", timeout_s=cfg.scaling.timeout_s
            ),
            run_config=ray.train.RunConfig(
                name=CHECKPOINTS_DIR,
                storage_path=path,
                storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=schedule.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            ),
        )
        result = trainer.fit()
    if storage.exists(stopped):  # a worker stopped the run on the user's error: one line, exit 2
        record = storage.read_json(stopped)
        storage.delete(stopped)
        raise UserError(record["error"])
    if result.error is not None:
        raise result.error
    metrics = dict(result.return_value or result.metrics or {})  # see engine.RayTrainReporter
    ref = latest_checkpoint(job.run)
    metrics["checkpoint"] = ref.url if ref else None
    return metrics
