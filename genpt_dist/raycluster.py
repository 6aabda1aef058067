"""Joining Ray: a loopback-only local Ray, or a cluster by address.

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
Whether the cluster can hold a job is `capacity`'s to say.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genpt_dist.errors import UserError

log = logging.getLogger(__name__)

# Settings (never secrets) that workers need; they travel in the job, not through Ray's runtime env,
# so they also reach workers of a Ray instance started before this process set them.
LOCAL_MIN_CPUS = 4
# A custom resource a local Ray declares, one per core of the machine: its CPU count is at least
# LOCAL_MIN_CPUS, so on a small machine CPU-bound one-thread tasks that each take 1 CPU would outnumber
# the cores. A cluster may declare it too (`ray start --resources '{"core": N}'`); where none does, the
# CPU count is taken as the cores.
CORE = "core"
WORKER_ENV_KEYS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
)
CONNECT_TIMEOUT_S = 10.0  # for the TCP probe of a cluster address
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


def unreachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why nothing accepts a TCP connection at host:port within `timeout_s` (None: something does)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        return f"{host}:{port}: {reason} within {timeout_s:g} s"


def probe(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, in one line and within `timeout_s`, an address where nothing answers."""
    why = unreachable(*_bootstrap_host_port(address), timeout_s)
    if why is not None:
        raise UserError(f"no Ray cluster answers at {address} ({why})")


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
        if is_auth_error(exc):
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
        resources={CORE: os.cpu_count() or 1},
        include_dashboard=False,
        log_to_driver=log_to_driver,
        runtime_env={"worker_process_setup_hook": _quiet_ray_logs_hook()},
    )


def one_core_options() -> dict[str, Any]:
    """Ray options for a CPU-bound task that runs one thread: one CPU, and one core where the cluster
    declares cores (a local Ray does), so such tasks never outnumber the machine's cores."""
    import ray

    return {"num_cpus": 1, "resources": {CORE: 1} if CORE in ray.cluster_resources() else {}}


def core_count() -> int:
    """The cores of the Ray this process is connected to: the declared `core` resource, else its CPUs."""
    import ray

    resources = ray.cluster_resources()
    return max(1, int(resources.get(CORE) or resources.get("CPU", 1)))


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


def is_auth_error(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception in its cause or context chain, is a Ray cluster refusing this client's
    token. Ray raises AuthenticationError, but wraps it (in a ConnectionError, a RuntimeError, the job
    client's own errors) or passes on only the GCS's "InvalidAuthToken" in a message, so the whole chain
    is read. `init_ray` and `submit` both turn a True into one line naming the token variables."""
    from ray.exceptions import AuthenticationError

    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
