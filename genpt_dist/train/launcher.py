"""Stage drivers hand a worker function to `fit`, which owns the Ray Train set-up.

`TorchTrainer` with `ScalingConfig` (workers, CPUs/GPUs each), `TorchConfig` (gloo on CPU, nccl on GPU,
timeout), `RunConfig(storage_path=<run URL>, name="checkpoints")` with the storage seam's pyarrow
filesystem for s3://, `CheckpointConfig(num_to_keep)` and `FailureConfig(max_failures)`.

Elastic runs (`scaling.num_workers: [min, max]`) get Ray Train's elastic `ScalingConfig(num_workers=
(min, max))`: it starts with as many workers as the cluster holds (at least min) and restarts the group
with another size when nodes go or come; each restart resumes from the latest checkpoint, re-partitioned
for the new size (`train.elastic`). Before Ray Train asks for workers, `room_for` (`check_fits`) refuses what the
cluster can never hold and, with an autoscaler, waits for the minimum to be there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

from genpt_dist import storage
from genpt_dist.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, remove_incomplete
from genpt_dist.config import Config
from genpt_dist.model.gpt import GPTConfig
from genpt_dist.raycluster import init_ray, room_for, worker_env
from genpt_dist.train.loop import Job

log = logging.getLogger(__name__)


def fit(job: Job, cfg: Config, worker_fn: Callable[..., None], address: str | None = None, *,
        also_needs: tuple[float, float, str] = (0.0, 0.0, ""), **worker_kwargs: Any) -> dict[str, Any]:
    """Run `worker_fn(job_dict, **worker_kwargs)` on N Ray Train workers; returns the final metrics.

    `also_needs` = (CPUs, GPUs, what) the stage holds besides the workers (e.g. rollout actors)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(address)
    lo, hi = cfg.scaling.worker_range
    extra_cpus, extra_gpus, extra_what = also_needs
    with room_for(lo, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu, extra_cpus=extra_cpus,
                  extra_gpus=extra_gpus, extra_what=extra_what):  # Ray Train's own requests take over
        job = dataclasses.replace(job, run=storage.normalize(job.run), env={**worker_env(), **job.env})
        remove_incomplete(job.run)  # what a killed upload left: never loadable, never rotated by Ray Train
        fs, path = storage.pyarrow_filesystem(job.run)
        resources = {"CPU": cfg.scaling.cpus_per_worker}
        if cfg.scaling.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            functools.partial(worker_fn, **worker_kwargs),
            train_loop_config=dataclasses.asdict(job),
            scaling_config=ray.train.ScalingConfig(num_workers=hi if lo == hi else (lo, hi),
                                                   use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo",
                                     timeout_s=cfg.scaling.timeout_s),
            run_config=ray.train.RunConfig(
                name=CHECKPOINTS_DIR,
                storage_path=path,
                storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    ref = latest_checkpoint(job.run)
    metrics["checkpoint"] = ref.url if ref else None
    return metrics


def stage_config(cfg: Config, init: GPTConfig, *, seq_len: int, train: dict[str, Any], optim: dict[str, Any]) -> Config:
    """The config a stage that starts from a checkpoint runs with: the model shape of its `init`, the
    data's sample length, and the stage's own train (steps, batch, ...) and optim (LR, ...) settings."""
    shape = {"n_layer": init.n_layer, "n_head": init.n_head, "d_model": init.d_model, "block_size": init.block_size}
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update=shape),
        "data": cfg.data.model_copy(update={"seq_len": seq_len}),
        "train": cfg.train.model_copy(update=train),
        "optim": cfg.optim.model_copy(update=optim),
    })
