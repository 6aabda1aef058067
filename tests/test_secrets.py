"""Secrets and trust: credentials never leave the process environment, servers bind loopback, exports are
pickle-free and weights load with `weights_only=True` where torch allows it.

The leak test runs the pipeline as a user would (`python launch.py` subprocesses against the local S3
server) with a recognisable fake secret key and session token, then greps for them everywhere the run
wrote: every object in the bucket, the local folders, Ray's session logs and the captured output.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from genpt_dist import storage

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SECRET = "genptFAKEsecretKEY0123456789leakcheckXYZ"
TOKEN = "genptFAKEsessionTOKENleakcheck9876543210"
NEEDLES = (SECRET, TOKEN)
LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")  # how ss shows a loopback listener


def _hits(data: bytes) -> list[str]:
    return [n for n in NEEDLES if n.encode() in data]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, env=env, capture_output=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return proc


@pytest.mark.slow
def test_credentials_never_leak(s3_server, bucket, tiny_corpus, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="gs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN, "RAY_TMPDIR": str(ray_tmp)}
    data, run, exp = f"{bucket}/data", f"{bucket}/run", f"{bucket}/export"
    steps = ["train.steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=2"]
    procs = [
        _run(["prepare", "--input", str(tiny_corpus), "--output", data, "--config", TINY], env, tmp_path),
        _run(["pretrain", "--data", data, "--run", run, "--config", TINY, "--set", *steps], env, tmp_path),
        _run(["export", "--model", run, "--output", exp], env, tmp_path),
        _run(["report", run], env, tmp_path),
    ]
    try:
        leaks: dict[str, list[str]] = {}
        objects = storage.list_files(bucket)
        assert any(o.endswith("/meta.json") for o in objects) and any(o.endswith("report.md") for o in objects)
        for url in objects:
            if found := _hits(storage.read_bytes(url)):
                leaks[url] = found
        local = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
        for path in local:
            try:
                if found := _hits(path.read_bytes()):
                    leaks[str(path)] = found
            except OSError:
                continue
        for proc in procs:
            for stream in ("stdout", "stderr"):
                if found := _hits(getattr(proc, stream)):
                    leaks[f"{proc.args[2]} {stream}"] = found
        assert len(objects) > 10 and len(local) > 10
        assert leaks == {}, f"credentials found in: {json.dumps(leaks, indent=1)}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_export_folders_hold_no_pickles(tmp_path):
    from helpers import random_export

    for fmt in ("safetensors", "hf"):
        folder = Path(random_export(tmp_path / fmt, fmt=fmt))
        names = sorted(p.name for p in folder.iterdir())
        assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"))], names
        assert "model.safetensors" in names
        for path in folder.iterdir():  # no pickle stream anywhere (protocol 2+ opens with \x80)
            assert not path.read_bytes().startswith(b"\x80"), path


def _torch_load_calls() -> list[tuple[str, int, str | None]]:
    """(file, line, weights_only value as source) of every torch.load call in the package."""
    out = []
    for path in sorted((REPO / "genpt_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                out.append((str(path.relative_to(REPO)), node.lineno, kw.get("weights_only")))
    return out


# DeepSpeed's own checkpoint files hold Python objects (its config, enums, optimizer state): loading them
# needs the full unpickler, as deepspeed itself does. Only checkpoints you wrote are loaded (see checkpoint.py).
PICKLE_ALLOWED = {"genpt_dist/checkpoint.py"}


def test_torch_load_uses_weights_only_where_torch_allows():
    calls = _torch_load_calls()
    assert calls, "no torch.load calls found: the check is looking in the wrong place"
    for path, line, weights_only in calls:
        assert weights_only is not None, f"{path}:{line}: torch.load without weights_only"
        if weights_only != "True":
            assert path in PICKLE_ALLOWED, f"{path}:{line}: torch.load(weights_only={weights_only})"


def test_our_servers_bind_loopback(s3_server):
    from genpt_dist.testing.faultproxy import FaultProxy

    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    with FaultProxy(s3_server.endpoint) as proxy:
        assert proxy.endpoint.startswith("http://127.0.0.1:")


def _listening(pids: set[int]) -> list[str]:
    import re

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [
        line.split()[3] for line in out.splitlines() if (m := re.search(r"pid=(\d+)", line)) and int(m.group(1)) in pids
    ]


def _ray_pids() -> set[int]:
    import psutil
    import ray

    node = ray._private.worker._global_node
    servers = {info.process.pid for infos in node.all_processes.values() for info in infos}
    workers = {c.pid for pid in servers for c in psutil.Process(pid).children(recursive=True)}  # raylet's workers
    return servers | workers


def test_local_ray_dashboard_is_loopback_only(ray_session):
    """include_dashboard=False still runs the dashboard head (minimal mode, for the state API): on 127.0.0.1."""
    import ray

    node = ray._private.worker._global_node
    for name, infos in node.all_processes.items():
        if "dashboard" not in name.lower():
            continue
        for info in infos:
            cmdline = Path(f"/proc/{info.process.pid}/cmdline").read_bytes().split(b"\0")
            assert b"--host=127.0.0.1" in cmdline, cmdline
            if shutil.which("ss"):
                assert all(a.startswith("127.0.0.1:") for a in _listening({info.process.pid}))


def test_local_ray_listens_on_loopback_only(ray_session):
    """The GCS, raylets and workers of a local Ray (raycluster.start_local_ray) listen on 127.0.0.1 only."""
    if shutil.which("ss") is None:
        pytest.skip("no ss here to list listening sockets")
    ray = ray_session
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # at least one worker process is up
    addresses = _listening(_ray_pids())
    assert addresses and all(a.startswith(LOOPBACK) for a in addresses), addresses


@pytest.mark.slow
def test_prepare_on_ray_listens_on_loopback_only(tmp_path, short_tmp):
    """A standalone `prepare` of a corpus above data.parallel_min_bytes, in more than one work unit,
    tokenises in Ray tasks on a Ray it starts itself (raycluster.init_ray): its GCS, raylet and workers
    listen on 127.0.0.1 only."""
    import psutil

    if shutil.which("ss") is None:
        pytest.skip("no ss here to list listening sockets")
    text = (REPO / "README.md").read_text()
    for i in range(3):  # three work units (data.unit_bytes): one would tokenise in the driver
        (tmp_path / f"part-{i}.txt").write_text(f"part {i}\n{text}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(short_tmp)
    args = [
        "prepare",
        "--input",
        str(tmp_path / "part-*.txt"),
        "--output",
        str(tmp_path / "data"),
        "--set",
        "data.tokenizer=byte",
        "data.seq_len=64",
        "data.split=tail",
        "data.parallel_min_bytes=0",
        "data.unit_bytes=4096",
    ]
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), *args], cwd=tmp_path, env=env, stdout=out, stderr=err
        )
        names: set[str] = set()
        addresses: set[str] = set()
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # look while Ray is up: it stops with prepare
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
                names.update(c.name() for c in children)
            except psutil.NoSuchProcess:
                continue
            addresses.update(_listening({proc.pid} | {c.pid for c in children}))
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr.read_text()[-3000:]
    assert json.loads(stdout.read_text())["command"] == "prepare"
    assert {"gcs_server", "raylet"} <= names, names  # prepare did start a Ray
    assert addresses and all(a.startswith(LOOPBACK) for a in addresses), addresses


def test_every_ray_start_goes_through_raycluster():
    """`ray.init` is called in raycluster.py only, where a local start binds 127.0.0.1 (start_local_ray)."""
    calls = []
    for path in sorted((REPO / "genpt_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "init"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "ray"
            ):
                calls.append(str(path.relative_to(REPO)))
    assert calls and set(calls) == {"genpt_dist/raycluster.py"}, calls
