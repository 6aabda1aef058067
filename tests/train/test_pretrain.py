"""Pretraining on Ray Train x DeepSpeed ZeRO: learning, checkpoints in S3, resume, worker failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import random_export

from genpt_dist import storage
from genpt_dist.checkpoint import list_checkpoints
from genpt_dist.config import load_config
from genpt_dist.data.prepare import prepare
from genpt_dist.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tiny_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare([str(tiny_corpus)], out, load_config(TINY).data)
    return out


def _metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]


def _pretrain(data: str, run: str, *overrides: str) -> dict:
    from genpt_dist.train.pretrain import pretrain

    return pretrain(data, run, load_config(TINY, list(overrides)))


# Plain ZeRO-2 and ZeRO-3 run in most other tests (configs/tiny.yaml, the trained_run fixture); here 2 and
# 3 also move the optimizer (and 3 the parameters) to the CPU, ZeRO-Offload.
@pytest.mark.parametrize(
    "stage, offload",
    [
        (1, []),
        (2, ["deepspeed.offload_optimizer=true"]),
        (3, ["deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"]),
    ],
)
def test_zero_stages_learn_and_checkpoint_to_s3(stage, offload, ray_session, make_bucket, tiny_data):
    run = f"{make_bucket()}/runs/zero{stage}"
    out = _pretrain(
        tiny_data,
        run,
        f"deepspeed.zero_stage={stage}",
        *offload,
        "train.steps=24",
        "train.log_every=4",
        "train.checkpoint_every=12",
        "train.eval_every=12",
    )
    assert out["step"] == 24
    losses = [m["train_loss"] for m in _metrics(run) if "train_loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses
    refs = list_checkpoints(run)
    assert [r.step for r in refs] == [12, 24]
    assert all(r.url.startswith("s3://") and r.meta.world_size == 2 for r in refs)
    assert refs[-1].meta.zero_stage == stage
    ds = refs[-1].meta.config["deepspeed"]
    assert (ds["offload_optimizer"], ds["offload_params"]) == (stage >= 2, stage == 3)
    names = set(refs[-1].meta.files)
    assert {"meta.json", "tokenizer.json"} - names == {"meta.json"}  # meta.json lists the others
    assert any("zero_pp_rank_1" in n for n in names) and any("zero_pp_rank_0" in n for n in names)
    assert out["checkpoint"] == refs[-1].url and out["val_bpb"] > 0


FAIL_RUN = ("train.steps=20", "train.checkpoint_every=8", "train.eval_every=10", "train.log_every=5")


def test_killed_worker_and_resumed_run_match_an_uninterrupted_one(ray_session, tiny_data, tmp_path, monkeypatch):
    """A worker dies at step 13 (after the step-8 checkpoint) with no failures allowed: the run stops, and the
    same command again resumes it to an uninterrupted run's end. (Ray Train restarting the group by itself,
    max_failures > 0, is test_faults' soak: a killed worker under S3 faults ends at the clean run's losses.)"""
    straight = _pretrain(tiny_data, str(tmp_path / "straight"), *FAIL_RUN)
    monkeypatch.setenv("GENPT_TEST_CRASH_AT_STEP", "13")
    monkeypatch.setenv("GENPT_TEST_CRASH_MARKER", str(tmp_path / "crashed"))
    stopped = str(tmp_path / "stopped")
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's failure type is its own, and version-specific
        _pretrain(tiny_data, stopped, *FAIL_RUN, "scaling.max_failures=0")
    assert [r.step for r in list_checkpoints(stopped)] == [8]
    monkeypatch.delenv("GENPT_TEST_CRASH_AT_STEP")
    resumed = _pretrain(tiny_data, stopped, *FAIL_RUN, "scaling.max_failures=0")
    assert resumed["step"] == 20
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-3)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-3)
    steps = [m["step"] for m in _metrics(stopped) if "train_loss" in m]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after resume"


def test_init_with_another_tokenizer_is_refused(tiny_corpus, tmp_path):
    run = random_export(tmp_path / "src")  # the byte tokenizer
    bpe = str(tmp_path / "bpe")
    prepare([str(tiny_corpus)], bpe, load_config(TINY, ["data.tokenizer=bpe", "data.vocab_size=300"]).data)
    from genpt_dist.train.pretrain import pretrain

    with pytest.raises(UserError, match="different tokenizer"):
        pretrain(bpe, str(tmp_path / "dst"), load_config(TINY, ["train.steps=2"]), init=run)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.parametrize("case", ["no-manifest", "heads", "too-many-workers"])
def test_pretrain_bad_input(case, tiny_data, tmp_path):
    args = ["pretrain", "--data", tiny_data, "--run", str(tmp_path / "run"), "--config", str(TINY)]
    expect = {
        "no-manifest": "manifest.json is missing",
        "heads": "n_head=3 does not divide d_model=64",
        "too-many-workers": "need 64 CPUs",
    }[case]
    if case == "no-manifest":
        args[2] = str(tmp_path)
    elif case == "heads":
        args += ["--set", "model.n_head=3"]
    else:
        args += ["--set", "scaling.num_workers=64"]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:") and expect in last, last
    assert "Traceback" not in proc.stderr
    assert not list_checkpoints(str(tmp_path / "run"))
