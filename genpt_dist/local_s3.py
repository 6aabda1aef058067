"""A real S3 endpoint on this machine, for benches and tests: `moto_server` (from `moto[server]`) as a
subprocess, bound to the loopback interface only (127.0.0.1, a free port). Nothing else is served.

Benches and tests talk to it over HTTP exactly as they would to AWS, MinIO or R2; nothing is
patched in-process. It is stopped (process group and all) by `stop()` or by leaving the `with` block.
Importing this module starts nothing, and moto is only looked for when a server starts (it is a
test/bench dependency, not a runtime one).

    with MotoS3Server() as server:
        os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint

`enforce_auth=True` starts a server that checks signatures and rejects unknown access keys
(moto's `INITIAL_NO_AUTH_ACTION_COUNT=0`), for testing the wrong-credentials path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"


def moto_server_executable() -> str:
    """The `moto_server` console script beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return str(beside)
    import shutil

    found = shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: pip install 'moto[server]'")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MotoS3Server:
    """One `moto_server` process on 127.0.0.1:<free port>; `.endpoint` is its http:// URL."""

    def __init__(self, *, enforce_auth: bool = False, start_timeout_s: float = 30.0):
        self.enforce_auth = enforce_auth
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{HOST}:{self.port}"

    def start(self) -> MotoS3Server:
        last_error = ""
        for _ in range(3):  # a free port can be taken between probing and binding: try another
            if self._start_once():
                return self
            last_error = self.log_tail()
            self.stop()
        raise RuntimeError(f"moto_server did not start; its log ends with:\n{last_error}")

    def _start_once(self) -> bool:
        env = dict(os.environ)
        if self.enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        else:
            env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        self.port = _free_port()
        # Open for the server's whole life (closed in stop()), so not a `with` block.
        self._log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [moto_server_executable(), "-H", HOST, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop() takes any children with it
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(0.05)
        return False

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return True  # it answered, even if not with 200
        except OSError:
            return False

    def log_tail(self, chars: int = 2000) -> str:
        if self._log is None:
            return ""
        try:
            return Path(self._log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_s3_server(*, enforce_auth: bool = False) -> MotoS3Server:
    """Start a server and return it (call `.stop()`, or use `MotoS3Server()` as a context manager)."""
    return MotoS3Server(enforce_auth=enforce_auth).start()
