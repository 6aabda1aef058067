"""S3 faults (through `testing.faultproxy`) and process faults: results equal a clean run's.

The proxy sits between every client (boto3 in the driver, Ray Train workers and DataLoader workers,
pyarrow in Ray Train's checkpoint upload) and the local moto server, and injects 500s, 503 SlowDown,
connection resets, slow responses and truncated bodies on a seeded schedule. A killed worker is
covered by train/test_pretrain.py, a killed rollout actor by rl/test_adversarial.py; here: a killed driver,
a truncated newest checkpoint, and an output interrupted while it is published.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_inputs import fake_checkpoint

from genpt_dist import storage
from genpt_dist.checkpoint import (
    CHECKPOINTS_DIR,
    RAY_TRAIN_SNAPSHOT,
    list_checkpoints,
    load_state_dict,
    remove_incomplete,
    resolve,
)
from genpt_dist.config import load_config
from genpt_dist.data.loader import ShardLoader
from genpt_dist.data.manifest import load_manifest
from genpt_dist.data.prepare import prepare
from genpt_dist.testing.faultproxy import KINDS, FaultProxy

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _epoch(manifest_url: str) -> list[np.ndarray]:
    loader = ShardLoader(load_manifest(manifest_url), "train", batch_size=8, seed=3, shuffle=True)
    return [b.numpy() for b in loader.iter_epoch()]


def _objects(prefix: str) -> dict[str, bytes]:
    root = prefix.rstrip("/") + "/"
    return {u[len(root) :]: storage.read_bytes(u) for u in storage.list_files(prefix)}


def test_prepare_loader_checkpoint_and_export_survive_s3_faults(s3_server, bucket, tiny_corpus, tmp_path, monkeypatch):
    from safetensors.torch import load as load_safetensors

    from genpt_dist.export import export

    cfg = load_config(TINY).data
    ckpt_run = tmp_path / "run"
    fake_checkpoint(ckpt_run / CHECKPOINTS_DIR / "checkpoint_000000")
    want_state = load_state_dict(resolve(str(ckpt_run)))

    # The clean run, straight to the server.
    prepare([str(tiny_corpus)], f"{bucket}/clean", cfg)
    clean_batches = _epoch(f"{bucket}/clean")
    export(str(ckpt_run), f"{bucket}/clean-export")
    clean_export = _objects(f"{bucket}/clean-export")

    with FaultProxy(s3_server.endpoint, seed=7, rate=0.4, slow_s=0.3, consecutive=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        prepare([str(tiny_corpus)], f"{bucket}/faulty", cfg)
        faulty_batches = _epoch(f"{bucket}/faulty")
        uploaded = storage.upload_dir(ckpt_run, f"{bucket}/run")
        got_state = load_state_dict(resolve(f"{bucket}/run"))
        export(f"{bucket}/run", f"{bucket}/faulty-export")
        counts = dict(proxy.counts)
    monkeypatch.undo()
    storage.reset_clients()

    clean, faulty = (load_manifest(f"{bucket}/{name}").to_json() for name in ("clean", "faulty"))
    assert faulty["fingerprint"] == clean["fingerprint"]
    assert faulty["splits"] == clean["splits"]  # every shard's name, size and sha256
    assert len(faulty_batches) == len(clean_batches)
    assert all(np.array_equal(a, b) for a, b in zip(faulty_batches, clean_batches))
    local = {p.relative_to(ckpt_run).as_posix(): p.read_bytes() for p in ckpt_run.rglob("*") if p.is_file()}
    assert len(uploaded) == len(local) and _objects(f"{bucket}/run") == local  # same checkpoint bytes
    assert got_state.keys() == want_state.keys() and all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    faulty_export = _objects(f"{bucket}/faulty-export")
    # safetensors writes its header from a Rust HashMap (key order varies by process): compare the tensors
    got_w, want_w = (load_safetensors(e["model.safetensors"]) for e in (faulty_export, clean_export))
    assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w)
    assert faulty_export["config.json"] == clean_export["config.json"]
    assert faulty_export.keys() == clean_export.keys()
    assert counts["faults"] >= 30 and all(counts[k] > 0 for k in KINDS), counts
    print(f"\nS3 faults injected and survived: {counts}")


@pytest.mark.slow
def test_pretrain_through_s3_faults_and_a_worker_kill(
    ray_session, bucket, tiny_corpus, tmp_path, monkeypatch, s3_server
):
    """Soak: pretrain with periodic S3 faults (boto3 and pyarrow) and one killed worker; then every checkpoint
    left in storage restores, and the losses equal a clean, uninterrupted run's."""
    from genpt_dist.train.pretrain import pretrain

    data = f"{bucket}/data"
    prepare([str(tiny_corpus)], data, load_config(TINY).data)
    overrides = [
        "train.steps=12",
        "train.checkpoint_every=4",
        "train.eval_every=6",
        "train.log_every=4",
        "train.keep_checkpoints=2",
    ]
    straight = pretrain(data, f"{bucket}/straight", load_config(TINY, overrides))

    monkeypatch.setenv("GENPT_TEST_CRASH_AT_STEP", "6")
    monkeypatch.setenv("GENPT_TEST_CRASH_MARKER", str(tmp_path / "crashed"))
    monkeypatch.setenv("GENPT_TEST_CRASH_RANK", "0")
    with FaultProxy(s3_server.endpoint, seed=11, rate=0.08, slow_s=0.2, consecutive=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        faulty = pretrain(data, f"{bucket}/faulty", load_config(TINY, overrides))
        counts = dict(proxy.counts)
    monkeypatch.undo()
    storage.reset_clients()

    assert (tmp_path / "crashed").exists()
    assert faulty["step"] == 12
    assert faulty["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-3)
    assert faulty["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-3)
    refs = list_checkpoints(f"{bucket}/faulty")
    # a delete Ray Train attempts while the proxy faults it may leave an old checkpoint behind: more may remain
    assert [r.step for r in refs][-2:] == [8, 12]
    for ref in refs:  # every checkpoint in storage restores
        state = load_state_dict(ref)
        assert state and all(torch.isfinite(v).all() for v in state.values())
    final = load_state_dict(refs[-1])
    clean = load_state_dict(list_checkpoints(f"{bucket}/straight")[-1])
    assert all(torch.allclose(final[k], clean[k], atol=1e-3) for k in clean)
    assert counts["faults"] > 0, counts
    print(f"\nS3 faults injected and survived in pretrain: {counts}")


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """A run whose newest checkpoint lost half a shard: commands take the previous one, with a warning."""
    run = tmp_path / "run"
    fake_checkpoint(run / CHECKPOINTS_DIR / "checkpoint_000000", seed=0, step=4)
    newest = fake_checkpoint(run / CHECKPOINTS_DIR / "checkpoint_000001", seed=1, step=8)
    shard = newest / "ds" / "state" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "export", "--model", str(run), "--output", str(tmp_path / "export")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["source"].endswith("checkpoint_000000")
    assert "checkpoint_000001 is incomplete or corrupt; skipping it" in proc.stderr


# ------------------------------------------------------------------------------ killed processes
# Commands run as `python launch.py ...` in a process group of their own. A pretrain driver starts its
# own local Ray (no RAY_ADDRESS; a private RAY_TMPDIR), never the session's: every process of that Ray
# carries OWNER in its environment, so a kill takes exactly those (Ray's workers sit in groups of their own).

OWNER = "FAULTS_TEST_OWNER"  # not GENPT_*: those travel in the job to the workers


@pytest.fixture(scope="module")
def tiny_data(tiny_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare([str(tiny_corpus)], out, load_config(TINY).data)
    return out


class Command:
    """`python launch.py <args>` in its own session, output to files; `kill()` takes it and its Ray down."""

    def __init__(self, root: Path, *args: str, **env: str):
        self.root, self.args = root, args
        self.owner = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({OWNER: self.owner, "RAY_TMPDIR": str(root / "ray"), **env})
        self.out, self.err = root / f"{self.owner}.out", root / f"{self.owner}.err"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Command:
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "launch.py"), *self.args],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        return self

    def wait_for(self, ready, what: str, timeout_s: float = 300) -> None:
        """Poll `ready()` until it holds; fail if the command ends first or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                self.kill()
                pytest.fail(f"{self.args[0]} ended (rc {self.proc.returncode}) before {what}: {self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout_s:g} s: {self.stderr[-3000:]}")
            time.sleep(0.1)

    def finish(self, timeout_s: float = 600) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()
        return subprocess.CompletedProcess(self.args, self.proc.returncode, self.out.read_text(), self.stderr)

    def run(self, timeout_s: float = 600) -> subprocess.CompletedProcess:
        return self.start().finish(timeout_s)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        """SIGKILL the command's group, then every process left that carries its OWNER mark (its Ray)."""
        import psutil

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while left := self._left(psutil):
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            assert time.monotonic() < deadline, f"processes survive the kill: {left}"
            time.sleep(0.5)

    def _left(self, psutil) -> list:
        left = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get(OWNER) == self.owner:
                    left.append(p)
        return left


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _one_line_error(proc: subprocess.CompletedProcess, expect: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:") and expect in last, last
    assert "Traceback" not in proc.stderr
    return last


def _resumed_steps(stderr: str) -> set[int]:
    """The steps the workers said they resumed at (the loop logs one line per rank)."""
    return {int(m) for m in re.findall(r"resumed \S+ at step (\d+)", stderr)}


def _metric_steps(run: str) -> list[int]:
    lines = storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()
    return [r["step"] for r in map(json.loads, lines) if "train_loss" in r]


KILL_RUN = (
    "train.steps=40",
    "train.checkpoint_every=5",
    "train.eval_every=20",
    "train.log_every=5",
    "train.keep_checkpoints=3",
)


def _pretrain_command(root: Path, data: str, run: Path, *overrides: str) -> Command:
    return Command(
        root, "pretrain", "--data", data, "--run", str(run), "--config", str(TINY), "--set", *KILL_RUN, *overrides
    )


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted `launch.py pretrain` of KILL_RUN (its run folder and summary): the killed driver's
    reference, then the run whose newest checkpoint the truncation test damages (its summary is kept here)."""
    root = Path(tempfile.mkdtemp(prefix="gpt-", dir="/tmp"))  # short: Ray's socket paths live under it
    run = tmp_path_factory.mktemp("straight") / "run"
    yield run, _summary(_pretrain_command(root, tiny_data, run).run())
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_end(tiny_data, straight_run, tmp_path, short_tmp):
    """SIGKILL to `launch.py pretrain` (and its local Ray) after the first checkpoint; the same command
    again resumes from the newest checkpoint and ends where an uninterrupted run ends."""

    def pretrain(run: Path) -> Command:
        return _pretrain_command(short_tmp, tiny_data, run)

    straight = straight_run[1]

    run = tmp_path / "killed"
    driver = pretrain(run).start()
    driver.wait_for(lambda: list_checkpoints(str(run)), "a first checkpoint")
    driver.kill()
    at_kill = [r.step for r in list_checkpoints(str(run))]
    assert at_kill and at_kill[-1] < 40, at_kill

    again = pretrain(run).run()
    resumed = _summary(again)
    assert _resumed_steps(again.stderr) == {at_kill[-1]}, again.stderr[-3000:]
    assert resumed["step"] == 40
    # The checkpoint holds the loader position, RNG and optimizer: the same losses as without the kill.
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-3)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-3)
    steps = _metric_steps(str(run))
    assert steps == sorted(set(steps)) and steps[-1] == 40, steps
    print(f"\ndriver killed with checkpoints at {at_kill}; resumed at step {at_kill[-1]}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoints_an_interrupted_upload_left_are_removed(where, tmp_path, s3_server, bucket):
    """Folders Ray Train never reported (no meta.json, or a file missing) go; complete and reported ones stay."""
    local = tmp_path / "run" / CHECKPOINTS_DIR
    fake_checkpoint(local / "checkpoint_000000", step=4)
    for name, step in [("checkpoint_000001", 8), ("checkpoint_000002", 12)]:  # both lose their model states
        folder = fake_checkpoint(local / name, step=step)
        (folder / "ds" / "state" / "mp_rank_00_model_states.pt").unlink()
    headless = fake_checkpoint(local / "checkpoint_000003", step=16)  # killed before meta.json was uploaded
    (headless / "meta.json").unlink()
    snapshot = {
        "ray_version": "2.60.0",
        "checkpoint_results": [
            {"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in ("checkpoint_000000", "checkpoint_000001")
        ],
    }
    (local / RAY_TRAIN_SNAPSHOT).write_text(json.dumps(snapshot))
    run = str(tmp_path / "run")
    if where == "s3":
        run = f"{bucket}/run"
        storage.upload_dir(tmp_path / "run", run)
    root = storage.join(run, CHECKPOINTS_DIR)

    removed = remove_incomplete(run)

    assert [storage.name(f) for f in removed] == ["checkpoint_000002", "checkpoint_000003"]
    left = {f[len(root) + 1 :].split("/")[0] for f in storage.list_files(root)}
    assert left == {"checkpoint_000000", "checkpoint_000001", RAY_TRAIN_SNAPSHOT}  # 000001: Ray Train's to rotate
    assert [r.step for r in list_checkpoints(run)] == [4]
    assert remove_incomplete(run) == []


@pytest.mark.slow
def test_resume_skips_a_truncated_newest_checkpoint(tiny_data, straight_run, short_tmp):
    """Through Ray Train: the newest checkpoint lost half a ZeRO shard; the same command with more steps
    warns, resumes from the previous checkpoint (never loads the truncated one) and finishes."""
    run, first = straight_run
    refs = list_checkpoints(str(run))
    assert [r.step for r in refs] == [30, 35, 40] and first["checkpoint"] == refs[-1].url
    previous, newest = refs[-2], refs[-1]
    shards = sorted((Path(newest.url) / "ds").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO optimizer shard per rank
    shards[1].write_bytes(shards[1].read_bytes()[: shards[1].stat().st_size // 2])
    stray = fake_checkpoint(run / CHECKPOINTS_DIR / "checkpoint_9999-12-31_00-00-00.000000", step=99)
    (stray / "meta.json").unlink()  # an upload killed before its meta.json: Ray Train never reported it

    again = _pretrain_command(short_tmp, tiny_data, run, "train.steps=45").run()
    out = _summary(again)
    assert f"checkpoint {newest.url} is incomplete or corrupt; skipping it" in again.stderr
    assert f"removing {stray}: an interrupted upload left it incomplete" in again.stderr and not stray.exists()
    assert _resumed_steps(again.stderr) == {35}, again.stderr[-3000:]
    assert re.findall(r"resumed (\S+) at step", again.stderr) == [previous.url] * 2  # both ranks, same one
    assert out["step"] == 45
    refs = list_checkpoints(str(run))
    assert refs[-1].step == 45 and out["checkpoint"] == refs[-1].url
    assert newest.url not in [r.url for r in refs]
    steps = _metric_steps(str(run))
    assert steps == sorted(set(steps)) and steps[-1] == 45, steps


@pytest.mark.slow
def test_interrupted_prepare_and_export_are_never_taken_for_complete(
    s3_server, bucket, tiny_corpus, tiny_data, tmp_path
):
    """SIGKILL to `prepare` and `export` while they write to S3 (every PUT answered late through the proxy,
    so the kill lands between the first file and the marker): the half-written dataset and export are
    refused in one line by the commands that read them, and running the command again completes it."""
    data, export_url = f"{bucket}/data", f"{bucket}/export"
    run = tmp_path / "run"
    fake_checkpoint(run / CHECKPOINTS_DIR / "checkpoint_000000")

    def cli(*args: str, endpoint: str | None = None) -> Command:
        return Command(tmp_path, *args, **({"AWS_ENDPOINT_URL_S3": endpoint} if endpoint else {}))

    with FaultProxy(
        s3_server.endpoint, rate=1.0, kinds=("slow",), slow_s=0.5, only=r"^PUT ", consecutive=1 << 30
    ) as slow:
        prep = cli(
            "prepare", "--input", str(tiny_corpus), "--output", data, "--config", str(TINY), endpoint=slow.endpoint
        ).start()
        prep.wait_for(lambda: storage.exists(f"{data}/train-000000.tar"), "a first shard")
        prep.kill()
        exp = cli("export", "--model", str(run), "--output", export_url, endpoint=slow.endpoint).start()
        exp.wait_for(lambda: storage.exists(f"{export_url}/model.safetensors"), "the exported weights")
        exp.kill()

    assert not storage.exists(f"{data}/manifest.json") and not storage.exists(f"{export_url}/meta.json")
    proc = cli("pretrain", "--data", data, "--run", str(tmp_path / "pretrain"), "--config", str(TINY)).run()
    _one_line_error(proc, f"no dataset at {data}: manifest.json is missing")
    assert not list_checkpoints(str(tmp_path / "pretrain"))
    for args in (
        ("generate", "--model", export_url, "--prompt", "To be"),
        ("evaluate", "--model", export_url, "--data", tiny_data),
    ):
        _one_line_error(cli(*args).run(), f"no checkpoint at {export_url}")

    # The same commands again complete what was interrupted: the same dataset as a clean prepare's.
    _summary(cli("prepare", "--input", str(tiny_corpus), "--output", data, "--config", str(TINY)).run())
    prepare([str(tiny_corpus)], f"{bucket}/clean", load_config(TINY).data)
    got, want = (load_manifest(u).to_json() for u in (data, f"{bucket}/clean"))
    assert got["fingerprint"] == want["fingerprint"] and got["splits"] == want["splits"]
    _summary(cli("export", "--model", str(run), "--output", export_url).run())  # replaces the unfinished one
    out = _summary(
        cli("generate", "--model", export_url, "--prompt", "To be", "--max-new-tokens", "4", "--seed", "0").run()
    )
    assert out["model"] == export_url and out["step"] == 4
