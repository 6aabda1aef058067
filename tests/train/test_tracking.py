"""MLflow tracking (genpt_dist/tracking.py through train/metrics.py's MetricsLog), read back with MLflow's own
client from a file store in tmp_path: a real one-process pretrain and its resume, tracking off, a missing
MLflow (refused by the drivers before any worker starts), a store that fails mid-run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from helpers import ONE_WORKER, local_pretrain

from genpt_dist import storage
from genpt_dist.checkpoint import latest_checkpoint
from genpt_dist.cli import main
from genpt_dist.config import load_config
from genpt_dist.data.prepare import prepare
from genpt_dist.errors import UserError
from genpt_dist.tracking import (
    INSTALL_HINT,
    MAX_PARAM_VALUE,
    RUN_FILE,
    check_tracking,
    default_run_name,
    flatten_params,
)
from genpt_dist.train.collective import init_single_process_group
from genpt_dist.train.metrics import MetricsLog

MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
ONE = ONE_WORKER


@pytest.fixture(autouse=True)
def _file_store_allowed(monkeypatch):
    """What tracking.py sets for a file:// URI, undone after each test."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.fixture(scope="module")
def data(tiny_corpus, tmp_path_factory) -> str:
    init_single_process_group()
    out = str(tmp_path_factory.mktemp("tracking") / "data")
    prepare([str(tiny_corpus)], out, load_config(TINY).data)
    return out


def _uri(tmp_path: Path) -> str:
    return (tmp_path / "mlruns").as_uri()


def _pretrain(data: str, run: str, uri: str, *overrides: str) -> None:
    local_pretrain(data, run, load_config(TINY, [*ONE, f"tracking.mlflow_uri={uri}", *overrides]))


def _run_id(run: str) -> str:
    return storage.read_json(storage.join(run, RUN_FILE))["run_id"]


def test_a_stage_logs_params_metrics_and_its_checkpoint_and_a_resume_reattaches(data, tmp_path):
    uri, run = _uri(tmp_path), str(tmp_path / "tiny")
    _pretrain(data, run, uri, "train.steps=2")
    client = MlflowClient(tracking_uri=uri)
    run_id = _run_id(run)
    first = client.get_run(run_id)
    assert first.info.status == "FINISHED"
    assert first.info.run_name == "tiny-pretrain"
    assert client.get_experiment(first.info.experiment_id).name == "genpt-dist"
    assert first.data.params["train.steps"] == "2" and first.data.params["tracking.experiment"] == "genpt-dist"
    assert first.data.params["data.tokenizer"] == "byte" and first.data.params["model.n_layer"] == "1"
    assert first.data.tags["genpt.stage"] == "pretrain" and first.data.tags["genpt.run"] == run
    assert first.data.tags["checkpoint"] == latest_checkpoint(run).url and first.data.tags["checkpoint_step"] == "2"

    _pretrain(data, run, uri, "train.steps=4")  # the same command with more steps resumes at 2, into the same run
    assert _run_id(run) == run_id
    assert [r.info.run_id for r in client.search_runs([first.info.experiment_id])] == [run_id]
    again = client.get_run(run_id)
    assert again.info.status == "FINISHED"
    assert again.data.params["train.steps"] == "2", "a param keeps its first value"
    ref = latest_checkpoint(run)
    assert ref.step == 4 and again.data.tags["checkpoint"] == ref.url and again.data.tags["checkpoint_step"] == "4"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [2, 4]
    assert {"lr", "tokens_per_s", "mfu", "tokens_seen", "val_ppl", "val_bpb"} <= set(again.data.metrics)


def _config(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"tracking.mlflow_uri={_uri(tmp_path)}", *overrides])


def test_metrics_log_batches_each_record_and_a_stopped_stage_fails_its_run(tmp_path):
    run = str(tmp_path / "pipe" / "adversarial")
    mlog = MetricsLog(run, 0, enabled=True, stage="adversarial", config=_config(tmp_path, "tracking.experiment=exp"))
    mlog.add({"step": 1, "loss": 2.5, "reward/python:r.py:f/mean": 0.25, "note": "text", "done": True})
    mlog.add({"step": 3, "loss": 2.0})
    mlog.close(failed=True)
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    got = client.get_run(_run_id(run))
    assert got.info.status == "FAILED" and got.info.run_name == "pipe-adversarial"
    assert client.get_experiment(got.info.experiment_id).name == "exp"
    assert [(m.step, m.value) for m in client.get_metric_history(got.info.run_id, "loss")] == [(1, 2.5), (3, 2.0)]
    assert got.data.metrics["reward/python_r.py_f/mean"] == 0.25 and got.data.metrics["done"] == 1.0
    assert "note" not in got.data.metrics and "checkpoint" not in got.data.tags  # no checkpoint in this run


def test_run_name_from_the_config(tmp_path):
    run = str(tmp_path / "r")
    MetricsLog(run, 0, enabled=True, stage="finetune", config=_config(tmp_path, "tracking.run_name=mine")).close()
    assert MlflowClient(tracking_uri=_uri(tmp_path)).get_run(_run_id(run)).info.run_name == "mine"
    assert default_run_name("s3://b/runs/r7", "finetune") == "r7-finetune"
    assert default_run_name("s3://b/runs/r7/finetune", "finetune") == "r7-finetune"


def test_params_are_flattened_and_cut_to_mlflow_limits():
    params = flatten_params({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "s": "x" * 10_000, "k:y": True})
    assert params == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "a.d": "null",
        "a.e": "{}",
        "s": "x" * MAX_PARAM_VALUE,
        "k_y": "true",
    }


def test_tracking_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlruns
    run = str(tmp_path / "run")
    mlog = MetricsLog(run, 0, enabled=True, stage="pretrain", config=load_config(TINY))
    mlog.add({"step": 1, "loss": 1.0})
    mlog.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not storage.exists(storage.join(run, RUN_FILE))
    # Another rank than 0 tracks nothing either.
    MetricsLog(str(tmp_path / "rank1"), 0, enabled=False, stage="pretrain", config=_config(tmp_path)).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_missing_mlflow_is_one_line_naming_the_extra(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a module that cannot be imported
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    cfg = _config(tmp_path)  # validation reads the config alone: the drivers check the machine
    with pytest.raises(UserError, match=r"pip install 'genpt-dist\[mlflow\]'"):
        check_tracking(cfg.tracking)
    check_tracking(load_config(TINY).tracking)  # tracking off: nothing to check
    with pytest.raises(UserError, match=r"pip install 'genpt-dist\[mlflow\]'"):
        MetricsLog(str(tmp_path / "run"), 0, enabled=True, stage="pretrain", config=cfg)
    uri = f"tracking.mlflow_uri={_uri(tmp_path)}"
    # Every Ray Train stage (pretrain, finetune, reinforce, adversarial) goes through `fit`, which checks
    # before Ray starts; the pipeline checks before it prepares the data.
    for argv in (
        ["pretrain", "--data", data, "--run", str(tmp_path / "run")],
        ["pipeline", "--input", str(tmp_path / "none"), "--run", str(tmp_path / "pipe")],
    ):
        assert main([*argv, "--config", str(TINY), "--set", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["genpt-dist: error: tracking.mlflow_uri is set but MLflow is not installed: " + INSTALL_HINT]
    assert INSTALL_HINT == "pip install 'genpt-dist[mlflow]'" and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "pipe").exists()


def test_a_uri_must_be_a_uri():
    with pytest.raises(UserError, match="config error at tracking.mlflow_uri: 'mlruns' is not a URI"):
        load_config(TINY, ["tracking.mlflow_uri=mlruns"])
    assert load_config(TINY, ["tracking.mlflow_uri=databricks"]).tracking.mlflow_uri == "databricks"


def test_a_store_that_fails_mid_run_warns_once_and_training_goes_on(tmp_path, caplog):
    run = str(tmp_path / "run")
    mlog = MetricsLog(run, 0, enabled=True, stage="pretrain", config=_config(tmp_path))
    tracker = mlog._tracker
    assert tracker is not None and tracker.client is not None
    calls = []

    def down(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("tracking server gone")

    tracker.client.log_batch = down  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="genpt_dist.tracking"):
        for step in (1, 2, 3):
            mlog.add({"step": step, "loss": 1.0})
        mlog.close()
    warnings = [r for r in caplog.records if r.name == "genpt_dist.tracking"]
    assert len(warnings) == 1 and "tracking server gone" in warnings[0].getMessage() and len(calls) == 1
    assert len(storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()) == 3  # metrics.jsonl has them


def test_a_store_that_fails_at_start_leaves_the_stage_untracked(tmp_path, caplog, monkeypatch):
    from genpt_dist import tracking

    def refuse(*args, **kwargs):
        raise ConnectionError("no server")

    monkeypatch.setattr(tracking.MlflowTracker, "_run_id", staticmethod(refuse))
    with caplog.at_level(logging.WARNING, logger="genpt_dist.tracking"):
        mlog = MetricsLog(str(tmp_path / "run"), 0, enabled=True, stage="pretrain", config=_config(tmp_path))
    assert mlog._tracker is None and "no server" in caplog.text
    mlog.add({"step": 1, "loss": 1.0})
    mlog.close()
