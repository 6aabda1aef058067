"""Joining Ray, and making sure the cluster can hold a job before Ray Train asks for it.

Local (no address): a single-node Ray on this machine whose every server (GCS, raylet, workers,
dashboard head) listens on 127.0.0.1 only (`start_local_ray`).

Joining a cluster (`--address auto | host:port | ray://host:port`, or RAY_ADDRESS):
* The address is probed first (TCP, `CONNECT_TIMEOUT_S`): one that does not answer is a one-line
  error within seconds, where `ray.init` would retry for minutes.
* Code: the driver's own `genpt_dist` package travels in the job's runtime env (`py_modules`), so
  every worker runs the driver's code whatever version the cluster's image holds. Third-party
  dependencies (torch, deepspeed, ray, ...) come from the cluster's image or setup commands
  (cluster/*.yaml install this package), not from a per-job `pip` runtime env, which would install
  them on every node at job start. A job that already ships code (`ray job submit --working-dir .`,
  or its own `py_modules`) gets nothing added.
* Worker output (Ray's log_to_driver) is shown on the driver's stderr, stdout and stderr alike: the
  driver's stdout carries only the command's final JSON line.
* Token authentication (Ray >= 2.52): a cluster started with RAY_AUTH_MODE=token accepts only
  clients that present its token, so a client needs RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN,
  RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); processes on the cluster's nodes inherit both from
  `ray start`. A refused client is a one-line error. Token mode is not switched on by itself when a
  token file exists: a client in token mode joins a cluster without authentication but its actors
  never start there (Ray 2.60).

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
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from genpt_dist.errors import UserError

log = logging.getLogger(__name__)

# Settings (never secrets) that workers need; they travel in the job, not through Ray's runtime env,
# so they also reach workers of a Ray instance started before this process set them.
LOCAL_MIN_CPUS = 4
WORKER_ENV_KEYS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
)
CONNECT_TIMEOUT_S = 10.0  # for the TCP probe of a cluster address
RESOURCES_TIMEOUT_S = 1200.0  # default wait for an autoscaler to add nodes
POLL_S = 2.0  # between looks at the cluster while waiting
PROGRESS_EVERY_S = 10.0  # between progress lines while waiting
PACKAGE_DIR = Path(__file__).resolve().parent


def worker_env() -> dict[str, str]:
    """Environment forwarded to Ray workers: S3 endpoint/region/retries and GENPT_* settings."""
    env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("GENPT_")})
    return env


# ------------------------------------------------------------------------------------- joining


def job_runtime_env() -> dict[str, Any] | None:
    """The runtime env a joined cluster's workers need from this driver (None: nothing to add)."""
    # Ray-private env var, checked against Ray 2.60.0
    submitted = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by `ray job submit` for the entrypoint
    if submitted:
        job_env = json.loads(submitted).get("runtime_env") or {}
        if job_env.get("working_dir") or job_env.get("py_modules"):
            return None
    return {"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__", "*.pyc"]}


def _bootstrap_host_port(address: str) -> tuple[str, int]:
    """host and port a client first connects to for an address (auto resolved as Ray does)."""
    if address.startswith("ray://"):
        hostport = address.removeprefix("ray://")
    elif address == "auto":
        # Ray-private API, checked against Ray 2.60.0
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            hostport = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise UserError(f"--address auto: {exc}".splitlines()[0]) from None
    else:
        hostport = address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"bad Ray address {address!r}: expected auto, host:port or ray://host:port")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, in one line and within `timeout_s`, an address where nothing answers."""
    host, port = _bootstrap_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise UserError(
            f"no Ray cluster answers at {address} ({host}:{port}: {reason} within {timeout_s:g} s)"
        ) from None


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), or start a local single-node Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        address = None
    try:
        if address:
            probe(address)
            ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env())
        else:
            # At least 4 logical CPUs so 2 trainers + 2 rollout actors fit on a 2-core laptop: they take
            # turns (on-policy RL alternates sampling and training); torch threads are set per process.
            start_local_ray(max(LOCAL_MIN_CPUS, os.cpu_count() or 1))
    except Exception as exc:  # noqa: BLE001 - Ray wraps a refused token in a ConnectionError or RuntimeError
        if _is_auth_error(exc):
            raise UserError(
                f"the Ray cluster at {address} refused this client's token: set RAY_AUTH_MODE=token "
                "and the cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
            ) from None
        if isinstance(exc, (ConnectionError, TimeoutError)):
            raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}".splitlines()[0]) from None
        raise
    _worker_output_to_stderr()
    log.info("Ray: %s", ray.cluster_resources())


# Ray Train loggers whose lines are noise in a local run: every report dumped per rank (a logger named
# by its file path), and, as a local Ray has no dashboard and so no state API, a placement-group
# watchdog's warning every second that it cannot look up the controller. A moved module only brings
# the lines back.
# Ray Train v2 private module paths, checked against Ray 2.60.0
_NOISY_RAY_MODULES = (
    "train/v2/_internal/execution/context.py",
    "train/v2/_internal/execution/controller/placement_group_cleaner.py",
)


def start_local_ray(num_cpus: int, *, log_to_driver: bool = True) -> None:
    """Start a single-node Ray whose servers listen on the loopback interface only.

    Ray turns a 127.0.0.1 node address into the machine's routable one (`resolve_ip_for_localhost`)
    and then binds the GCS, raylet and worker gRPC servers on all interfaces, unless its "cluster
    mode" is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the macOS / Windows default): then the node
    address is 127.0.0.1 and every server binds it. The variable is read when `ray` is imported, so
    the driver's copy is set too; the processes Ray spawns inherit the environment.
    """
    import ray
    from ray._private import ray_constants  # Ray-private, checked against Ray 2.60.0

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        runtime_env={"worker_process_setup_hook": _quiet_ray_logs_hook()},
    )


def _quiet_ray_logs_hook() -> Callable[[], None]:
    """A worker-process setup hook for the local Ray that sets the noisy Ray Train loggers to errors only.
    Nested, so Ray ships it by value: a worker need not be able to import genpt_dist to run it."""
    modules = _NOISY_RAY_MODULES

    def quiet_ray_logs() -> None:
        import logging
        from pathlib import Path

        import ray

        root = Path(ray.__file__).parent
        for rel in modules:
            module = "ray." + rel.removesuffix(".py").replace("/", ".")
            for name in (module, str(root / rel)):  # loggers named by module or by file path
                logging.getLogger(name).setLevel(logging.ERROR)

    return quiet_ray_logs


def _worker_output_to_stderr() -> None:
    """Ray shows what workers print to stdout on the driver's stdout, which carries only the command's
    final JSON line (a contract); route all worker output to the driver's stderr instead."""
    try:
        # Ray-private API, checked against Ray 2.60.0
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray layout: leave Ray's behaviour
        return
    for name, handler in list(dispatcher.handlers):
        if name == "ray_print_logs":
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, lambda data, show=handler: show({**data, "is_err": True}))


def _is_auth_error(exc: BaseException | None) -> bool:
    from ray.exceptions import AuthenticationError

    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ------------------------------------------------------------------------------- fitting a job


def _autoscaler_state() -> dict[str, Any] | None:
    """What the cluster's autoscaler says, or None when the cluster has no autoscaler.

    {"kind": "v2" | "v1" | "config", "infeasible": [(count, bundle), ...] cluster resource requests the
     v2 autoscaler cannot satisfy,
     "pending": nodes being launched, "node_types": [resources of one node] from the cluster config
     GCS holds (when the autoscaler reported one), "max": {resource: amount} over all node types}"""
    import ray
    from ray._private import ray_constants  # Ray-private, checked against Ray 2.60.0
    from ray._private.state import state as global_state  # Ray-private, checked against Ray 2.60.0

    out: dict[str, Any] = {"kind": None, "infeasible": [], "pending": 0, "node_types": [], "max": None}
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
            out["kind"] = "v2"
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
    t0 = last_line = time.monotonic()
    log.info("waiting for the autoscaler (%s) to add nodes for %s: has %s", scaler["kind"], what, _progress(need))
    try:
        while not _fits_now(bundles):
            if time.monotonic() - t0 > timeout_s:
                raise UserError(
                    f"the autoscaler did not provide {what} within {timeout_s:g} s "
                    f"(has {_progress(need)}); raise GENPT_RESOURCES_TIMEOUT_S or check the cluster"
                )
            time.sleep(POLL_S)
            scaler = _autoscaler_state() or scaler
            _refuse_impossible(what, bundles, scaler, asked=True)
            if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                last_line = time.monotonic()
                log.info(
                    "waiting for the autoscaler: has %s, %d node(s) pending; %.0f s of %g s",
                    _progress(need),
                    scaler["pending"],
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
