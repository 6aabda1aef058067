"""`genpt-dist submit`: run a genpt-dist command as a Ray job, through a cluster's dashboard.

`submit --address http://HOST:8265 -- pretrain --data s3://... --run s3://...` is `ray job submit
--working-dir . -- python launch.py pretrain ...` with the pieces a new user trips over named in one line:
* Ray's job client (`ray.job_submission`) needs `ray[default]` (requests, aiohttp), which the `ray`
  runtime dependency does not bring: the `cluster` extra does (`pip install 'genpt-dist[cluster]'`).
* The address is the head's dashboard (http://HOST:8265): `--address`, else RAY_ADDRESS, else
  http://127.0.0.1:8265 (a `ray dashboard` tunnel or a port-forward). It is probed first (TCP,
  raycluster.CONNECT_TIMEOUT_S): one where nothing answers is refused in one line.
* Token authentication (Ray >= 2.52, on in cluster/*): Ray's client presents the token itself when
  RAY_AUTH_MODE=token, from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; a cluster that
  refuses the client is a one-line error naming those variables.

What travels: the working dir (default: this checkout, or the current folder where the package is
installed rather than checked out) without .venv, runs/, .git and caches (Ray also skips what
.gitignore names). The job runs `python launch.py ARGS` in it on the head; the stages inside join the
cluster through the RAY_ADDRESS Ray sets for a job, and their workers get the same working dir.

Unless --no-wait, the job's output is streamed to stderr while it runs, and the command exits with
the job's outcome: 0 and one JSON line on stdout (job id, status and the job's own final JSON line as
`result`) when it succeeded; the job's last error line and exit 1 when it failed or was stopped.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from genpt_dist.errors import UserError
from genpt_dist.raycluster import CONNECT_TIMEOUT_S, PACKAGE_DIR, is_auth_error, unreachable

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_DIR = PACKAGE_DIR.parent
# What never travels with the working dir (gitignore-style, as Ray reads `excludes`).
EXCLUDES = [
    ".venv/",
    "venv/",
    "runs/",
    "bench-results/",
    ".git/",
    "**/__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".ruff_cache/",
    ".pytest_cache/",
    "*.egg-info/",
    "build/",
    "dist/",
]
NEEDS_RAY_DEFAULT = (
    "submit needs ray[default] (Ray's job client and the dashboard's dependencies: aiohttp, requests): "
    "pip install 'genpt-dist[cluster]'"
)
AUTH_HINT = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
# The job server reads these; the address given here must win over them (JobSubmissionClient lets them override it).
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Inline stand-in for launch.py when the working dir is not a checkout (the package ships as py_modules).
_MAIN = "import sys; from genpt_dist.cli import main; sys.exit(main())"
# The CLI's parser, passed in by `cli` (this module never imports `cli`, which imports it: the command line
# sits above every command, submit among them). It raises a UserError for a bad command line.
ParseCommand = Callable[[list[str]], Any]


def dashboard_address(address: str | None) -> str:
    """The dashboard URL to submit to: `address`, else RAY_ADDRESS, else http://127.0.0.1:8265."""
    source = "--address"
    if not address:
        address, source = os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"
    if not address:
        return DEFAULT_ADDRESS
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(
            f"submit needs the Ray dashboard's HTTP address, http://HOST:8265 (got {address!r} from {source})"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UserError(f"bad dashboard address {address!r} (from {source}): its port is not a number") from None
    return address.rstrip("/")


def probe_dashboard(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, in one line and within `timeout_s`, a dashboard address where nothing answers."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    why = unreachable(host, port, timeout_s)
    if why is not None:
        raise UserError(
            f"no Ray dashboard answers at {url} ({why}); a head started with ray[default] serves it on port 8265"
        )


def job_client_class() -> Any:
    """Ray's JobSubmissionClient, or the one-line error that names ray[default]."""
    try:
        from ray.job_submission import JobSubmissionClient

        for module in ("requests", "aiohttp"):  # the sdk imports them softly and fails later without them
            importlib.import_module(module)
    except ImportError:
        raise UserError(NEEDS_RAY_DEFAULT) from None
    return JobSubmissionClient


def job_spec(
    args: list[str], working_dir: str | Path | None = None, runtime_env: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime env of a job running `genpt-dist ARGS` from `working_dir`."""
    if working_dir is None:
        wd = PROJECT_DIR if (PROJECT_DIR / "launch.py").is_file() else Path.cwd()
    else:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise UserError(f"--working-dir {working_dir} is not a folder")
    env: dict[str, Any] = dict(runtime_env or {})
    env["excludes"] = EXCLUDES + [e for e in env.get("excludes") or [] if e not in EXCLUDES]
    env["working_dir"] = str(wd)
    if (wd / "launch.py").is_file() and (wd / "genpt_dist").is_dir():
        entrypoint = shlex.join(["python", "launch.py", *args])
    else:  # the package travels beside the working dir, as raycluster.job_runtime_env would send it
        if not (wd / "genpt_dist").is_dir():
            env["py_modules"] = [*(env.get("py_modules") or []), str(PACKAGE_DIR)]
        entrypoint = shlex.join(["python", "-c", _MAIN, *args])
    return entrypoint, env


def read_runtime_env(path: str) -> dict[str, Any]:
    """A runtime env YAML (cluster/runtime_env.yaml): env_vars, excludes and other Ray runtime env keys."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --runtime-env {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--runtime-env {path} is not YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--runtime-env {path} must hold a mapping (env_vars:, excludes:, ...)")
    return data


def check_command(args: list[str], parse: ParseCommand | None = None) -> list[str]:
    """The job's genpt-dist command line, checked here so a typo is refused before anything uploads:
    by `parse` (the CLI's parser, which raises a UserError naming the problem, as the job would say it)
    when given, else only for being empty or `submit` itself."""
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise UserError("submit: name the command to run after --, e.g. submit -- pretrain --data ... --run ...")
    if args[0] == "submit":
        raise UserError("submit: the job's command cannot be submit itself")
    if parse is not None and not {"-h", "--help"} & set(args):
        parse(args)
    return args


# Ray's client loggers whose lines say nothing to act on: a line per .gitignore it honours, a warning per
# folder it now skips by default (.git, .venv: excluded here anyway), "WebSocket closed" at the end.
# Ray module paths, checked against Ray 2.60.0; a moved module only brings the lines back.
_NOISY_CLIENT_LOGGERS = {
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
    "ray.dashboard.modules.job.sdk": logging.WARNING,
}


def _quiet_ray_client_logs() -> None:
    for name, level in _NOISY_CLIENT_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def _dashboard_errors(url: str, doing: str) -> Iterator[None]:
    """Ray's client errors as one line naming the missing piece."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - requests', aiohttp's and Ray's errors alike
        status = getattr(exc, "status", None)  # aiohttp's refused websocket handshake
        if is_auth_error(exc) or status in (401, 403):
            denied = status == 403 or "Authentication failed" in str(exc)  # 401: no token presented
            refused = "refused this client's token" if denied else "requires a token"
            raise UserError(f"the Ray cluster at {url} {refused}: {AUTH_HINT}") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, RuntimeError) and "returned 404" in first:
            raise UserError(f"{url} is not a Ray dashboard (no /api/version): pass http://HOST:8265") from None
        if isinstance(exc, (OSError, RuntimeError, ValueError)) or type(exc).__module__.startswith("aiohttp"):
            raise UserError(f"{doing} at {url}: {first}") from None
        raise


async def _follow(client: Any, job_id: str, out: TextIO, seen: list[str]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        seen.append(chunk)


def _wait_terminal(client: Any, job_id: str, poll_s: float = 1.0) -> Any:
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info
        time.sleep(poll_s)


def _job_result(logs: str) -> dict[str, Any] | None:
    """The job's own final JSON line (a genpt-dist command's last stdout line)."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _error_line(logs: str, info: Any) -> str:
    """What the failed job said last: its `genpt-dist: error:` line, else its last line, else Ray's message."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("genpt-dist: error:"):
            return line.removeprefix("genpt-dist: error:").strip()
    if lines:
        return lines[-1]
    message = (getattr(info, "message", None) or "").strip().splitlines()
    return message[0] if message else str(info.status)


def submit(
    args: list[str],
    *,
    address: str | None = None,
    working_dir: str | Path | None = None,
    wait: bool = True,
    runtime_env: dict[str, Any] | None = None,
    out: TextIO | None = None,
    parse: ParseCommand | None = None,
) -> dict[str, Any]:
    """Submit `genpt-dist ARGS` as a Ray job; unless not `wait`, stream its output to `out` (stderr) and
    return its outcome. A summary dict either way: command, job_id, address, status; when it has
    ended also exit_code, and `result` (the job's JSON line) or `error` (its last error line).
    `parse` checks ARGS first (`check_command`)."""
    out = out or sys.stderr
    args = check_command(args, parse)
    client_class = job_client_class()
    _quiet_ray_client_logs()
    url = dashboard_address(address)
    entrypoint, env = job_spec(args, working_dir, runtime_env)
    probe_dashboard(url)
    with _dashboard_errors(url, "cannot reach the Ray dashboard"), _address_env_cleared():
        client = client_class(url)
    with _dashboard_errors(url, "the Ray dashboard refused the job"):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
    summary: dict[str, Any] = {"command": "submit", "job_id": job_id, "address": url, "entrypoint": entrypoint}
    print(
        f"genpt-dist submit: job {job_id} submitted to {url} (follow: ray job logs --address {url} -f {job_id}; "
        f"stop: ray job stop --address {url} {job_id})",
        file=out,
        flush=True,
    )
    if not wait:
        return {**summary, "status": "PENDING"}
    seen: list[str] = []
    try:
        streamed = True
        try:
            asyncio.run(_follow(client, job_id, out, seen))
        except Exception as exc:  # noqa: BLE001 - the stream broke; the job's status still tells the outcome
            streamed = False
            print(f"genpt-dist submit: the log stream ended ({exc}); waiting for the job to end", file=out)
        with _dashboard_errors(url, f"lost the Ray dashboard while waiting for job {job_id}"):
            info = _wait_terminal(client, job_id)
            logs = "".join(seen)
            if not streamed or not logs:  # the stored logs, past what was shown
                stored = client.get_job_logs(job_id) or ""
                out.write(stored[len(logs) :])
                logs = stored
    except KeyboardInterrupt:
        print(f"genpt-dist submit: job {job_id} keeps running; stop it with ray job stop {job_id}", file=out)
        raise
    status = str(info.status)
    summary.update(status=status, exit_code=getattr(info, "driver_exit_code", None))
    if status == "SUCCEEDED":
        summary["result"] = _job_result(logs)
    else:
        summary["error"] = "stopped" if status == "STOPPED" else _error_line(logs, info)
    return summary


def run_cli(args: Any, parse: ParseCommand) -> dict[str, Any]:
    """`genpt-dist submit`: the summary of a job that succeeded (or was only submitted); for one that
    failed or was stopped, its last error line on stderr and exit 1. `parse` is the CLI's parser."""
    runtime_env = read_runtime_env(args.runtime_env) if args.runtime_env else None
    summary = submit(
        args.job,
        address=args.address,
        working_dir=args.working_dir,
        wait=not args.no_wait,
        runtime_env=runtime_env,
        parse=parse,
    )
    if summary["status"] in ("SUCCEEDED", "PENDING"):
        return summary
    code = f", exit code {summary['exit_code']}" if summary.get("exit_code") is not None else ""
    print(
        f"genpt-dist: error: job {summary['job_id']} {summary['status'].lower()}{code}: {summary['error']}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(1)
