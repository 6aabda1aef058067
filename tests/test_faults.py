"""S3 faults (through `testing.faultproxy`) and process faults: results equal a clean run's.

The proxy sits between every client (boto3 in the driver, Ray Train workers and DataLoader workers,
pyarrow in Ray Train's checkpoint upload) and the local moto server, and injects 500s, 503 SlowDown,
connection resets, slow responses and truncated bodies on a seeded schedule. A killed worker is
covered by test_pretrain.py, a killed rollout actor by test_adversarial.py; here: a killed driver,
a truncated newest checkpoint, and an output interrupted while it is published.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genpt_dist import storage
from genpt_dist.checkpoint import CHECKPOINTS_DIR, list_checkpoints, load_state_dict, resolve
from genpt_dist.config import load_config
from genpt_dist.data.loader import ShardLoader
from genpt_dist.data.manifest import load_manifest
from genpt_dist.data.prepare import prepare
from genpt_dist.testing.faultproxy import KINDS, FaultProxy
from test_bad_inputs import fake_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _epoch(manifest_url: str) -> list[np.ndarray]:
    loader = ShardLoader(load_manifest(manifest_url), "train", batch_size=8, seed=3, shuffle=True)
    return [b.numpy() for b in loader.iter_epoch()]


def _objects(prefix: str) -> dict[str, bytes]:
    root = prefix.rstrip("/") + "/"
    return {u[len(root):]: storage.read_bytes(u) for u in storage.list_files(prefix)}


def test_prepare_loader_checkpoint_and_export_survive_s3_faults(s3_server, bucket, tiny_corpus, tmp_path,
                                                                monkeypatch):
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

    clean, faulty = (load_manifest(f"{bucket}/{name}").raw for name in ("clean", "faulty"))
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
def test_pretrain_through_s3_faults_and_a_worker_kill(ray_session, bucket, tiny_corpus, tmp_path, monkeypatch,
                                                      s3_server):
    """Soak: pretrain with periodic S3 faults (boto3 and pyarrow) and one killed worker; then every checkpoint
    left in storage restores, and the losses equal a clean, uninterrupted run's."""
    from genpt_dist.train.pretrain import pretrain

    data = f"{bucket}/data"
    prepare([str(tiny_corpus)], data, load_config(TINY).data)
    overrides = ["train.steps=12", "train.checkpoint_every=4", "train.eval_every=6", "train.log_every=4",
                 "train.keep_checkpoints=2"]
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
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "export", "--model", str(run), "--output",
                           str(tmp_path / "export")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["source"].endswith("checkpoint_000000")
    assert "checkpoint_000001 is incomplete or corrupt; skipping it" in proc.stderr
