"""Making sure the cluster can hold a job before Ray Train (or the rollout pool) asks for it.

Fitting a job (`check_fits`): without an autoscaler a job the cluster cannot hold now is refused (it
would wait forever). With one (autoscaler v2 reporting its state, v1 its status), only what no node
type can ever provide is refused: what the autoscaler reports infeasible, or more than the cluster
config's node types add up to. Otherwise the driver asks the autoscaler for the minimum (Ray's
`request_resources`) and waits, with a progress line every `PROGRESS_EVERY_S`, until the nodes are
up or `GENPT_RESOURCES_TIMEOUT_S` (default `RESOURCES_TIMEOUT_S`) has passed. Ray Train's own requests
take over once it runs; `release_resources` drops ours when the job ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

from genpt_dist.errors import UserError

log = logging.getLogger(__name__)

RESOURCES_TIMEOUT_S = 1200.0  # default wait for an autoscaler to add nodes
POLL_S = 2.0  # between looks at the cluster while waiting
PROGRESS_EVERY_S = 10.0  # between progress lines while waiting
SILENT_AFTER_S = 60.0  # an autoscaler v2 whose report counter stands still this long is said to be silent


def _autoscaler_state() -> dict[str, Any] | None:
    """What the cluster's autoscaler says, or None when the cluster has no autoscaler.

    {"kind": "v2" | "v1" | "config", "infeasible": [(count, bundle), ...] cluster resource requests the
     v2 autoscaler cannot satisfy,
     "pending": nodes being launched, "node_types": [resources of one node] from the cluster config
     GCS holds (when the autoscaler reported one), "max": {resource: amount} over all node types,
     "version": the cluster state the v2 autoscaler last read (None for v1): it moves on every round of its loop}"""
    import ray
    from ray._private import ray_constants  # Ray-private, checked against Ray 2.60.0
    from ray._private.state import state as global_state  # Ray-private, checked against Ray 2.60.0

    out: dict[str, Any] = {"kind": None, "infeasible": [], "pending": 0, "node_types": [], "max": None, "version": None}
    try:
        config = global_state.get_cluster_config()
        if config is not None and config.node_group_configs:
            out["node_types"] = [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]
            out["max"] = global_state.get_max_resources_from_cluster_config()
            out["kind"] = "config"
    except Exception as exc:  # noqa: BLE001 - a GCS without a cluster config
        log.debug("no cluster config: %s", exc)
    try:
        # Ray-private API, checked against Ray 2.60.0
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
        scaler = reply.autoscaling_state
        if scaler.autoscaler_state_version > 0:
            out["kind"], out["version"] = "v2", int(scaler.last_seen_cluster_resource_state_version)
            out["pending"] = sum(r.count for r in scaler.pending_instance_requests) + len(scaler.pending_instances)
            out["infeasible"] = [
                (int(c.count), dict(c.request.resources_bundle))
                for constraint in scaler.infeasible_cluster_resource_constraints
                for c in constraint.resource_requests
            ]
    except Exception as exc:  # noqa: BLE001 - no autoscaler v2 state in this GCS
        log.debug("no autoscaler v2 state: %s", exc)
    if out["kind"] is None:  # v1: its monitor's status; a local Ray's read-only monitor names types node_<id>
        # Ray-private API, checked against Ray 2.60.0
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        types = (report.get("node_type_mapping") or {}).values()
        if any(not t.startswith("node_") for t in types):
            out["kind"] = "v1"
            out["pending"] = sum((report.get("pending_launches") or {}).values()) + len(
                report.get("pending_nodes") or []
            )
    return out if out["kind"] else None


def _need(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _fits_now(bundles: list[dict[str, float]]) -> bool:
    """The cluster's live nodes hold every bundle now (first fit, largest bundles first)."""
    import ray

    free = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in bundle.items())), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] -= v
    return True


def _bundles(
    num_workers: int, cpus_per_worker: float, use_gpu: bool, extra_cpus: float, extra_gpus: float
) -> list[dict[str, float]]:
    """One bundle per worker, and the extras (actors of a stage) as 1-CPU / 1-GPU bundles."""
    worker = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    extras = [{"CPU": 1.0}] * math.ceil(extra_cpus) + [{"GPU": 1.0}] * math.ceil(extra_gpus)
    return [worker] * num_workers + extras


def _describe(num_workers: int, cpus_per_worker: float, use_gpu: bool, extra_what: str) -> str:
    each = f"{cpus_per_worker:g} CPUs" + (" + 1 GPU" if use_gpu else "")
    return f"{num_workers} workers x {each}" + (f" + {extra_what}" if extra_what else "")


def check_fits(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    *,
    extra_cpus: float = 0.0,
    extra_gpus: float = 0.0,
    extra_what: str = "",
    timeout_s: float | None = None,
) -> bool:
    """Refuse a job the cluster can never hold; with an autoscaler, wait (progress lines, timeout) for it
    to add the nodes. `num_workers` is the least the job can run with (an elastic run's minimum).

    Returns True when it asked the autoscaler for resources (`release_resources` drops the request)."""
    import ray

    bundles = _bundles(num_workers, cpus_per_worker, use_gpu, extra_cpus, extra_gpus)
    if _fits_now(bundles):
        return False
    what = _describe(num_workers, cpus_per_worker, use_gpu, extra_what)
    need, have = _need(bundles), ray.cluster_resources()
    scaler = _autoscaler_state()
    if scaler is None:
        for res in ("CPU", "GPU"):
            if have.get(res, 0.0) < need.get(res, 0.0):
                hint = (
                    f" (lower scaling.num_workers{' or the ' + extra_what if extra_what else ''})"
                    if res == "CPU"
                    else ""
                )
                raise UserError(f"{what} need {need[res]:g} {res}s; the Ray cluster has {have.get(res, 0.0):g}{hint}")
        biggest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
        raise UserError(
            f"{what}: no node of the Ray cluster has room for one worker ({cpus_per_worker:g} CPUs; "
            f"the largest node has {biggest:g})"
        )
    _refuse_impossible(what, bundles, scaler, asked=False)
    if timeout_s is None:
        timeout_s = float(os.environ.get("GENPT_RESOURCES_TIMEOUT_S", RESOURCES_TIMEOUT_S))
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    t0 = last_line = last_report = time.monotonic()
    log.info("waiting for the autoscaler (%s) to add nodes for %s: has %s", scaler["kind"], what, _progress(need))
    try:
        while not _fits_now(bundles):
            if time.monotonic() - t0 > timeout_s:
                infeasible = ", ".join(f"{n} x {_shape(b)}" for n, b in scaler["infeasible"]) or "nothing"
                silent = _silence(scaler, time.monotonic() - last_report)
                raise UserError(
                    f"the autoscaler did not provide {what} within {timeout_s:g} s (has {_progress(need)}; "
                    f"it last reported {scaler['pending']} node(s) pending, {infeasible} infeasible{silent}); "
                    "raise GENPT_RESOURCES_TIMEOUT_S or check the cluster"
                )
            time.sleep(POLL_S)
            version = scaler["version"]
            scaler = _autoscaler_state() or scaler
            if scaler["version"] != version:
                last_report = time.monotonic()
            _refuse_impossible(what, bundles, scaler, asked=True)
            if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                last_line = time.monotonic()
                log.info(
                    "waiting for the autoscaler: has %s, %d node(s) pending%s; %.0f s of %g s",
                    _progress(need),
                    scaler["pending"],
                    _silence(scaler, last_line - last_report),
                    last_line - t0,
                    timeout_s,
                )
    except BaseException:
        release_resources()
        raise
    log.info("the cluster has room for %s after %.0f s", what, time.monotonic() - t0)
    return True


@contextlib.contextmanager
def room_for(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    *,
    extra_cpus: float = 0.0,
    extra_gpus: float = 0.0,
    extra_what: str = "",
) -> Iterator[None]:
    """`check_fits` for the block, and the autoscaler request it made dropped when the block ends, however
    it ends (idle nodes may go again)."""
    asked = check_fits(
        num_workers, cpus_per_worker, use_gpu, extra_cpus=extra_cpus, extra_gpus=extra_gpus, extra_what=extra_what
    )
    try:
        yield
    finally:
        if asked:
            release_resources()


def _silence(scaler: dict[str, Any], quiet_s: float) -> str:
    """ "; it has not reported for N s (...)" once the v2 autoscaler's report counter has stood still for
    `SILENT_AFTER_S` (it reports every few seconds while its monitor runs), else ""."""
    if scaler["version"] is None or quiet_s < SILENT_AFTER_S:
        return ""
    return f"; it has not reported for {quiet_s:.0f} s: is its monitor running? (monitor.log on the head)"


def _progress(need: dict[str, float]) -> str:
    import ray

    have = ray.cluster_resources()
    return ", ".join(f"{have.get(k, 0.0):g}/{v:g} {k}s" for k, v in sorted(need.items()) if v)


def _refuse_impossible(what: str, bundles: list[dict[str, float]], scaler: dict[str, Any], asked: bool) -> None:
    """Refuse what no node type of the autoscaling cluster can ever provide: a bundle larger than every
    node type or more than all node types add up to (cluster config, when GCS has one), or, once we
    asked (`asked`), our request as the v2 autoscaler reports it infeasible (same shapes and counts:
    the report of another driver's request, which ours replaced, does not match)."""
    types = scaler["node_types"]
    for bundle in bundles:
        if types and not any(all(t.get(k, 0) >= v for k, v in bundle.items()) for t in types):
            raise UserError(f"{what}: no node type of the autoscaling cluster has {_shape(bundle)}")
    for res, amount in _need(bundles).items():
        if scaler["max"] and amount > scaler["max"].get(res, 0):
            raise UserError(
                f"{what} need {amount:g} {res}s; the autoscaling cluster can grow to "
                f"{scaler['max'].get(res, 0):g} at most"
            )
    counts: dict[str, int] = {}
    for bundle in bundles:
        counts[_shape(bundle)] = counts.get(_shape(bundle), 0) + 1
    ours = [(n, b) for n, b in scaler["infeasible"] if counts.get(_shape(b)) == n]
    if asked and ours:
        release_resources()
        shapes = ", ".join(f"{n} x {_shape(b)}" for n, b in ours)
        raise UserError(
            f"{what}: the autoscaling cluster can never provide {shapes} (the autoscaler reports "
            "the request infeasible: no node type has it, or too few nodes may be added)"
        )


def _shape(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def release_resources() -> None:
    """Drop this driver's standing request to the autoscaler (idle nodes may go again)."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception as exc:  # noqa: BLE001 - the cluster may be gone already
        log.debug("could not clear the resource request: %s", exc)
