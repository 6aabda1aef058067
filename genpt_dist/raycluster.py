"""Joining Ray: local single-node by default, or an existing cluster (`--address auto|ray://...`)."""

from __future__ import annotations

import logging
import os

from genpt_dist.errors import UserError

log = logging.getLogger(__name__)

# Settings (never secrets) that workers need; they travel in the job, not through Ray's runtime env,
# so they also reach workers of a Ray instance started before this process set them.
LOCAL_MIN_CPUS = 4
WORKER_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                   "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")


def worker_env() -> dict[str, str]:
    """Environment forwarded to Ray workers: S3 endpoint/region/retries and GENPT_* settings."""
    env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("GENPT_")})
    return env


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), or start a local single-node Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # At least 4 logical CPUs so 2 trainers + 2 rollout actors fit on a 2-core laptop: they take
            # turns (on-policy RL alternates sampling and training); torch threads are set per process.
            ray.init(num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=True, _node_ip_address="127.0.0.1")
    except (ConnectionError, TimeoutError) as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}".splitlines()[0]) from None
    log.info("Ray: %s", ray.cluster_resources())


def check_fits(num_workers: int, cpus_per_worker: float, use_gpu: bool, *, extra_cpus: float = 0.0,
               extra_gpus: float = 0.0, extra_what: str = "") -> None:
    """Refuse a job the cluster can never hold, instead of waiting forever for it."""
    import ray

    total = ray.cluster_resources()
    need_cpu = num_workers * cpus_per_worker + extra_cpus
    need_gpu = (num_workers if use_gpu else 0) + extra_gpus
    also = f" + {extra_what}" if extra_what else ""
    if total.get("CPU", 0) < need_cpu:
        raise UserError(f"{num_workers} workers x {cpus_per_worker:g} CPUs{also} need {need_cpu:g} CPUs; "
                        f"the Ray cluster has {total.get('CPU', 0):g} (lower scaling.num_workers)")
    if total.get("GPU", 0) < need_gpu:
        raise UserError(f"{num_workers} workers{also} need {need_gpu:g} GPUs; the cluster has {total.get('GPU', 0):g}")
