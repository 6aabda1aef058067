"""`genpt-dist submit` (genpt_dist/submit.py): a command as a Ray job, through a real head's dashboard.

The head is `ray start --head --block` with its dashboard (ray[default], the `cluster` extra), in a
process group of its own, with a private temp dir, every port chosen here and bound to 127.0.0.1
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, --dashboard-host=127.0.0.1), and token authentication with a
token file of its own. It is stopped by signalling its group (never `ray stop`, which stops every Ray
on the machine). Bad input is one line and exit 2 before anything is submitted; a job that fails is
its last error line and exit 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import random_export

from genpt_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
_RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RAY_ENV}
    env.update(extra)
    return env


class Head:
    """A one-CPU Ray head with its dashboard, loopback only, token authentication on."""

    def __init__(self, root: Path):
        self.root = root
        self.token = root / "auth_token"
        self.token.write_text(os.urandom(16).hex())
        self.dashboard_port = _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None

    def client_env(self, **extra: str) -> dict[str, str]:
        return _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), **extra)

    def start(self) -> None:
        ports = {
            name: _free_port()
            for name in (
                "port",
                "ray-client-server-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                "node-manager-port",
                "object-manager-port",
            )
        }
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            "--num-cpus=1",
            "--disable-usage-stats",
            f"--temp-dir={self.root / 'ray'}",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        env = self.client_env(
            RAY_TMPDIR=str(self.root / "ray"),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # 127.0.0.1 node address, every server bound to it
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # the job's python
        )
        self.log = open(self.root / "head.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        # A few seconds alone; beside two CPU burners and the other test worker's Ray runs it passed 90 s.
        deadline = time.monotonic() + 300
        while not self._dashboard_up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the head did not start: {(self.root / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def listening(self) -> list[str]:
        """The addresses the head's processes (its group) listen on, as `ss` shows them."""
        import re

        import psutil

        pids = set()
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.proc.pid:
                    pids.add(p.pid)
            except (psutil.Error, ProcessLookupError):
                pass
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        return [line.split()[3] for line in out.splitlines() if {int(x) for x in re.findall(r"pid=(\d+)", line)} & pids]

    def _dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/version", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:  # 401: the dashboard is up and asks for the token
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to `ray start` (it drains the node and stops its processes while the GCS still runs:
        a SIGTERM to the whole group first stops the GCS, and the drain then waits for it), then
        SIGKILL to what is left of the group."""
        if self.proc is None:
            return
        for kill, sig, wait in ((os.kill, signal.SIGTERM, 15.0), (os.killpg, signal.SIGKILL, 5.0)):
            try:
                kill(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                self.proc.poll()
                time.sleep(0.2)
        self.proc.wait(timeout=10)
        self.log.close()
        self.proc = None


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="gpt-sub-", dir="/tmp"))  # Ray's socket paths must stay short
    h = Head(root)
    try:
        h.start()
        yield h
    finally:
        h.stop()
        shutil.rmtree(root, ignore_errors=True)


def _submit(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "submit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def _last_error(stderr: str) -> str:
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:"), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return last


# --------------------------------------------------------------------------------- on a real head


@pytest.mark.slow
@pytest.mark.cluster
def test_submit_runs_the_command_as_a_job_and_returns_its_result(head, tmp_path):
    model = random_export(tmp_path / "export")
    # The dashboard from RAY_ADDRESS (no --address); the token from the client's RAY_AUTH_MODE + token file.
    proc = _submit(
        "--",
        "generate",
        "--model",
        model,
        "--prompt",
        "hello",
        "--seed",
        "1",
        "--format",
        "jsonl",
        "--device",
        "cpu",
        env=head.client_env(RAY_ADDRESS=head.url),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1  # stdout: our JSON line only; the job's output is streamed on stderr
    summary = json.loads(lines[0])
    assert summary["command"] == "submit" and summary["status"] == "SUCCEEDED" and summary["address"] == head.url
    assert summary["job_id"] in proc.stderr and summary["entrypoint"].startswith("python launch.py generate ")
    result = summary["result"]  # the job's own final JSON line
    assert result["command"] == "generate" and result["samples"] == 1 and result["seed"] == 1
    assert '"prompt": "hello"' in proc.stderr  # the job's sample, streamed while it ran
    assert "Ignoring upload to cluster" not in proc.stderr  # Ray's per-.gitignore lines are quieted
    if shutil.which("ss"):  # the head, its dashboard and agents serve loopback only
        addresses = head.listening()
        assert f"127.0.0.1:{head.dashboard_port}" in addresses
        assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")) for a in addresses), addresses


@pytest.mark.slow
@pytest.mark.cluster
def test_failed_job_exits_1_with_its_error_line(head):
    proc = _submit(
        "--address",
        head.url,
        "--",
        "pretrain",
        "--data",
        "/nonexistent/data",
        "--run",
        "/nonexistent/run",
        "--config",
        "/no/such/recipe.yaml",
        env=head.client_env(),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout == ""
    last = _last_error(proc.stderr)
    assert "job raysubmit_" in last and "failed, exit code 2" in last
    assert "cannot read config /no/such/recipe.yaml" in last


@pytest.mark.slow
@pytest.mark.cluster
def test_cluster_refusing_the_client_is_one_line_naming_the_token(head):
    proc = _submit("--address", head.url, "--", "generate", "--help", env=_env())  # no RAY_AUTH_MODE
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = _last_error(proc.stderr)
    assert f"the Ray cluster at {head.url} requires a token" in last
    assert "RAY_AUTH_MODE=token" in last and "RAY_AUTH_TOKEN" in last
    wrong = head.root / "wrong_token"
    wrong.write_text("not-the-token")
    wrong_env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong))
    proc = _submit("--address", head.url, "--", "generate", "--help", env=wrong_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refused this client's token" in _last_error(proc.stderr)


# ----------------------------------------------------------------------------------- bad input


def _main_error(capsys, *argv: str) -> str:
    from genpt_dist.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    return _last_error(err).removeprefix("genpt-dist: error: ")


def test_address_where_nothing_listens_is_one_line(capsys, monkeypatch):
    for key in _RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    assert _main_error(capsys, "submit", "--address", url, "--", "generate", "--help").startswith(
        f"no Ray dashboard answers at {url} "
    )
    assert time.monotonic() - t0 < 30
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address, as the stages' --address takes
    assert "(got '127.0.0.1:6379' from RAY_ADDRESS)" in _main_error(capsys, "submit", "--", "generate", "--help")
    assert "name the command" in _main_error(capsys, "submit", "--address", url)
    # The job's command line is checked before anything is submitted.
    assert "pretrain: the following arguments are required: --data" in _main_error(
        capsys, "submit", "--address", url, "--", "pretrain", "--run", "x"
    )


@pytest.mark.parametrize("module", ["ray.job_submission", "aiohttp"])
def test_missing_ray_default_is_one_line_naming_the_extra(module, capsys, monkeypatch):
    from genpt_dist.submit import submit

    monkeypatch.setitem(sys.modules, module, None)  # as where ray[default] is not installed
    with pytest.raises(UserError, match=r"needs ray\[default\].*pip install 'genpt-dist\[cluster\]'"):
        submit(["generate", "--help"], address="http://127.0.0.1:1")
    assert "genpt-dist[cluster]" in _main_error(capsys, "submit", "--", "generate", "--help")


# ------------------------------------------------------------------------------ what is submitted


def test_job_spec_ships_the_checkout_without_venv_runs_or_git(tmp_path):
    from genpt_dist.submit import job_spec

    entrypoint, env = job_spec(["pretrain", "--set", "a b"], runtime_env={"excludes": ["big/"], "env_vars": {"A": "1"}})
    assert entrypoint == "python launch.py pretrain --set 'a b'"
    assert env["working_dir"] == str(REPO) and env["env_vars"] == {"A": "1"} and "py_modules" not in env
    assert {".venv/", "runs/", ".git/", "big/"} <= set(env["excludes"])
    # A folder that is not a checkout: the package travels beside it and runs without launch.py.
    entrypoint, env = job_spec(["report", "r"], working_dir=tmp_path)
    assert entrypoint.startswith("python -c ") and entrypoint.endswith(" report r")
    assert env["working_dir"] == str(tmp_path) and env["py_modules"] == [str(REPO / "genpt_dist")]
    with pytest.raises(UserError, match="is not a folder"):
        job_spec(["report", "r"], working_dir=tmp_path / "missing")


def test_cluster_extra_brings_ray_default_at_the_runtime_ray_range():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_dep,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    (cluster,) = [d for d in project["optional-dependencies"]["cluster"] if d.startswith("ray[")]
    assert cluster.startswith("ray[default]") and cluster.split("]", 1)[1] == ray_dep.split("]", 1)[1]
