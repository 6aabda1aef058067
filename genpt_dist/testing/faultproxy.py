"""An HTTP proxy in front of a local S3 endpoint that injects faults on a seeded schedule (tests only).

    with MotoS3Server() as s3, FaultProxy(s3.endpoint, seed=0, rate=0.2) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint   # clients talk to the proxy
        ...
        proxy.counts   # {"requests": 812, "503": 31, "reset": 27, ...}

It binds 127.0.0.1 only and forwards each request, headers and body unchanged (Host included, so a
signature stays valid), to the upstream endpoint. A request is faulted with probability `rate`, the
kind drawn from `kinds`, by one `random.Random(seed)` in request order (the same sequential workload
gets the same faults):

* ``500``: InternalError; ``503``: SlowDown, both with S3's XML error body (the request never reaches
  the upstream, so nothing changes there);
* ``reset``: the connection is reset (RST) after the request is read, with no response; the request
  is not forwarded either;
* ``slow``: the response is forwarded after `slow_s` seconds;
* ``truncate``: the upstream's response goes out with its full Content-Length but only part of the
  body, then the connection is reset (only for responses with at least 2 bytes of body).

`max_faults` caps the faults injected (then it forwards cleanly); `only` (a regex on "METHOD path")
restricts which requests may be faulted; `consecutive` caps faults in a row (clients retry a bounded
number of times). `deny` (a regex on "METHOD path") answers 403 AccessDenied to every match, always:
a bucket this client may not read. `pause()`/`resume()` switch injection off and on.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOST = "127.0.0.1"
KINDS = ("500", "503", "reset", "slow", "truncate")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
}
_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
}


def _error_body(status: int, path: str) -> bytes:
    code, message = _ERRORS[status]
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<Resource>{path}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()


class FaultProxy:
    """A fault-injecting reverse proxy on 127.0.0.1:<free port>; `.endpoint` is its http:// URL."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        rate: float = 0.1,
        kinds: tuple[str, ...] = KINDS,
        slow_s: float = 0.5,
        max_faults: int | None = None,
        only: str | None = None,
        consecutive: int = 2,
        deny: str | None = None,
    ):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)} (known: {', '.join(KINDS)})")
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or HOST, parts.port or 80
        self.rate, self.kinds, self.slow_s, self.max_faults = rate, tuple(kinds), slow_s, max_faults
        self.only = re.compile(only) if only else None
        self.deny = re.compile(deny) if deny else None
        self.consecutive = consecutive
        self.counts: dict[str, int] = {"requests": 0, "faults": 0, **{k: 0 for k in KINDS}, "denied": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._paused = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return f"http://{HOST}:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    @property
    def faults(self) -> int:
        return self.counts["faults"]

    # ------------------------------------------------------------------ the schedule
    def decide(self, method: str, path: str) -> str | None:
        """The fault for this request (None: forward it cleanly), drawn in request order."""
        what = f"{method} {path}"
        with self._lock:
            self.counts["requests"] += 1
            if self.deny is not None and self.deny.search(what):
                self.counts["denied"] += 1
                return "deny"
            draw, kind = self._rng.random(), self._rng.choice(self.kinds)  # always both: a fixed sequence
            if (
                self._paused
                or draw >= self.rate
                or (self.only is not None and not self.only.search(what))
                or (self.max_faults is not None and self.counts["faults"] >= self.max_faults)
                or self._in_a_row >= self.consecutive
            ):
                self._in_a_row = 0
                return None
            self._in_a_row += 1
            return kind

    def record(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.counts["faults"] += 1


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Abortive close: the client sees a connection reset."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, length: int | None = None) -> None:
        self.send_response_only(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.wfile.flush()

    def _handle(self) -> None:
        body = self._read_body()
        owner = self.owner
        kind = owner.decide(self.command, self.path)
        if kind == "deny":
            self._send(
                403,
                [("Content-Type", "application/xml")],
                b"" if self.command == "HEAD" else _error_body(403, self.path),
            )
            return
        if kind in ("500", "503"):
            owner.record(kind)
            status = int(kind)
            self._send(
                status,
                [("Content-Type", "application/xml")],
                b"" if self.command == "HEAD" else _error_body(status, self.path),
            )
            return
        if kind == "reset":
            owner.record(kind)
            self._reset()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers={**headers, "Content-Length": str(len(body))})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            upstream_length = resp.getheader("Content-Length")
        finally:
            conn.close()
        if kind == "slow":
            owner.record(kind)
            time.sleep(owner.slow_s)
        if self.command == "HEAD":  # no body; keep the object's size
            self._send(status, out_headers, b"", length=int(upstream_length or 0))
            return
        if kind == "truncate" and len(data) >= 2:
            owner.record(kind)
            self.send_response_only(status)
            for key, value in out_headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data[: len(data) // 2])
            except OSError:
                pass
            self._reset()
            return
        self._send(status, out_headers, data)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError, BrokenPipeError):
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815
