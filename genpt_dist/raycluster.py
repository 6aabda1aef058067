"""Joining Ray: local single-node by default, or an existing cluster (`--address auto|ray://...`)."""

from __future__ import annotations

import logging
import os

from genpt_dist.errors import UserError

log = logging.getLogger(__name__)

# Settings (never secrets) that workers need; they travel in the job, not through Ray's runtime env,
# so they also reach workers of a Ray instance started before this process set them.
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
            ray.init(include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    except (ConnectionError, TimeoutError) as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}".splitlines()[0]) from None
    log.info("Ray: %s", ray.cluster_resources())


def check_fits(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Refuse a job the cluster can never hold, instead of waiting forever for it."""
    import ray

    total = ray.cluster_resources()
    need_cpu = num_workers * cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise UserError(f"{num_workers} workers x {cpus_per_worker} CPUs need {need_cpu:g} CPUs; "
                        f"the Ray cluster has {total.get('CPU', 0):g} (lower scaling.num_workers)")
    if use_gpu and total.get("GPU", 0) < num_workers:
        raise UserError(f"{num_workers} GPU workers need {num_workers} GPUs; the cluster has {total.get('GPU', 0):g}")
