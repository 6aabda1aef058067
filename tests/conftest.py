"""Shared fixtures: a real S3 endpoint (moto_server over HTTP), fresh buckets, one Ray session, corpora.

Layout: `tests/<folder>/test_<module>.py` holds the tests of `genpt_dist/<folder>/<module>.py` (data/,
model/, train/, rl/, rl/rewards/, bench/); the top level holds those of the top-level modules (config,
storage, checkpoint, evaluate, export, generate, pipeline) and the cross-cutting ones: the bad-input
matrix (test_bad_inputs), injected faults (test_faults), secrets and listening sockets (test_secrets),
clusters and autoscaling (test_cluster), the wheel (test_packaging), the import graph (test_imports).
The test folders are not packages (pytest imports each file by its name), so no two test files share
a name. `fixtures/v1/` holds a dataset and a checkpoint written by the code before the typed records.
Tests that start Ray Train, DeepSpeed workers or a subprocess cluster are marked `slow`;
`pytest -m "not slow"` is the fast subset.

The S3 settings are put into `os.environ` for the whole session, before Ray starts, so that Ray
workers, DataLoader workers and `python launch.py` subprocesses all see the same endpoint and keys.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The package is used from the checkout (CI runs in a fresh clone): make it importable here, in Ray
# workers and in subprocesses alike.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

# Under pytest-xdist (`make test`: two workers) each worker is a process with its own session fixtures:
# its own moto server, its own local Ray, and a Ray temp dir of its own, so neither worker's Ray files,
# sockets or `ray_current_cluster` are the other's. Short, for Ray's ~107-character socket paths.
_WORKER_RAY_TMPDIR: str | None = None
if os.environ.get("PYTEST_XDIST_WORKER") and "RAY_TMPDIR" not in os.environ:
    _WORKER_RAY_TMPDIR = tempfile.mkdtemp(prefix=f"gpt-ray-{os.environ['PYTEST_XDIST_WORKER']}-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = _WORKER_RAY_TMPDIR


def pytest_unconfigure(config):
    """The worker's Ray temp dir goes with the worker (its Ray stopped at the end of the session)."""
    if _WORKER_RAY_TMPDIR is not None:
        shutil.rmtree(_WORKER_RAY_TMPDIR, ignore_errors=True)


# Session or module fixtures too costly to build on both workers: every test that uses one runs on the worker
# that built it (`--dist loadgroup`). Cheaper ones (a prepared tiny dataset, the RL base) are built per worker.
SHARED_BUILDS = {
    "trained_run": "trained_run",  # a 2-worker ZeRO-3 pretrain, shared by export, generate and evaluate
    "quick": "bench_rl_quick",  # tests/bench/test_bench_rl.py: the whole quick race
    "base_run": "finetune_base",  # tests/train/test_finetune.py: its pretrained base
    "repartitioned": "repartitioned",  # tests/train/test_elastic.py: ZeRO checkpoints of 2, 1, 2 ranks
    "straight_run": "faults_straight",  # tests/test_faults.py: an uninterrupted CLI pretrain
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns a test's xdist_group into its node id
def pytest_collection_modifyitems(config, items):
    """Markers that say what a test needs, from the fixtures it uses: `ray` (a local Ray session), `bench`
    (tests/bench/); `slow` and `cluster` are set by the tests themselves. And the xdist groups above."""
    for item in items:
        names = set(item.fixturenames)
        if "ray_session" in names:
            item.add_marker(pytest.mark.ray)
        if "tests/bench/" in item.nodeid or item.nodeid.startswith("bench/"):
            item.add_marker(pytest.mark.bench)
        for fixture, group in SHARED_BUILDS.items():
            if fixture in names:
                item.add_marker(pytest.mark.xdist_group(group))
                break


def pytest_collection_finish(session):
    """Refuse to run when `--dist loadgroup` did not take: xdist marks a grouped test by appending
    `@group` to its node id, which a pytest it does not know may ignore (pyproject pins the pair)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and getattr(session.config.option, "loadgroup", False):
        lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(f"xdist groups did not take ({len(lost)} tests, e.g. {lost[0]}): see pyproject")


def _forget_s3_clients() -> None:
    from genpt_dist import storage

    storage.reset_clients()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; its endpoint and test keys are set process-wide."""
    from genpt_dist.local_s3 import MotoS3Server

    saved = {k: os.environ.get(k) for k in (*S3_TEST_ENV, "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    with MotoS3Server() as server:
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(S3_TEST_ENV, AWS_ENDPOINT_URL_S3=server.endpoint)
        _forget_s3_clients()
        yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _forget_s3_clients()


@pytest.fixture(scope="session")
def s3_auth_server(s3_server):
    """A second moto server that checks credentials: the session's test keys are unknown to it."""
    from genpt_dist.local_s3 import MotoS3Server

    with MotoS3Server(enforce_auth=True) as server:
        yield server


@pytest.fixture(scope="session")
def make_bucket(s3_server):
    """A factory: each call creates a fresh, empty bucket and returns `s3://<name>` (for wider scopes)."""
    from genpt_dist import storage

    def make() -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        storage.s3_client().create_bucket(Bucket=name)
        return f"s3://{name}"

    return make


@pytest.fixture
def bucket(make_bucket) -> str:
    """A fresh, empty bucket on the session's server, as `s3://<name>`."""
    return make_bucket()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the session (4 logical CPUs), started after the S3 env is set."""
    import ray

    from genpt_dist.raycluster import start_local_ray

    # Ray 2.60 turns token authentication on for new local clusters and writes the token itself;
    # nothing is needed for a local start. Keep whatever the caller set.
    start_local_ray(4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """tinyshakespeare.txt (1.1 MB) from the shared data folder beside the checkout."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the shared/ data folder must sit beside the checkout")
    return path


@pytest.fixture(scope="session")
def tiny_corpus(shakespeare, tmp_path_factory) -> Path:
    """The first 64 KiB of tinyshakespeare (cut at a line end): a corpus that prepares in well under a second."""
    data = shakespeare.read_bytes()[: 64 << 10]
    data = data[: data.rfind(b"\n") + 1]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_bytes(data)
    return path


@pytest.fixture
def short_tmp():
    """A short private folder: Ray's socket paths under a RAY_TMPDIR in it must stay under ~107 characters."""
    path = Path(tempfile.mkdtemp(prefix="gpt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(ray_session, tmp_path_factory, tiny_corpus):
    """A 6-step ZeRO-3 pretrain on 2 workers, once per session (tests/helpers.py: `get_trained_run`)."""
    from helpers import get_trained_run

    return get_trained_run(tmp_path_factory, tiny_corpus)
