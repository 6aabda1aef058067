"""MLflow experiment tracking of a stage, on rank 0 (the `mlflow` extra; `tracking:` in the YAML).

`MetricsLog` (every stage's metrics.jsonl) opens an `MlflowTracker` when `tracking.mlflow_uri` is set:
* open: a new MLflow run in `tracking.experiment` (created when missing), or, when the stage's run
  folder holds `mlflow_run.json` (written by an earlier attempt through the storage seam, so on S3 as
  well), the same run again: a resumed stage logs into the run it started. The flattened config goes
  in as params (`train.steps`, `deepspeed.zero_stage`, ...), the stage and run URL as tags;
* each metrics record: its numeric values as metrics at the record's step, in one `log_batch` call;
* close: the run's latest checkpoint URL as the `checkpoint` tag (a tag, not a param: a resumed stage
  ends with another one), and the run's status, FINISHED (FAILED for a stage stopped by a user error).
Everything goes through an `MlflowClient` with an explicit tracking URI, never MLflow's global state,
so several stages or tests in one process do not share a run. A tracking server that fails is not
the training's failure: the first error is logged once as a warning and the stage goes on untracked.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import posixpath
import re
import time
from typing import TYPE_CHECKING, Any

from genpt_dist import storage
from genpt_dist.errors import UserError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from genpt_dist.config import TrackingConfig

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # <run>/mlflow_run.json: the MLflow run a resumed stage reattaches to
INSTALL_HINT = "pip install 'genpt-dist[mlflow]'"
# MLflow's limits (mlflow.utils.validation): a param value's length, a key's length, per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def check_tracking(tracking: TrackingConfig) -> None:
    """With `tracking.mlflow_uri` set, a one-line `UserError` naming the extra when MLflow cannot be imported.
    Each stage's driver calls it before any worker starts; it is no config validator, because a config
    validates the same on every machine that reads it. Looks the module up without importing it (an import
    costs seconds)."""
    if tracking.mlflow_uri is None:
        return
    try:
        found = importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(f"tracking.mlflow_uri is set but MLflow is not installed: {INSTALL_HINT}")


def _client(uri: str) -> MlflowClient:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(f"tracking.mlflow_uri is set but MLflow is not installed: {INSTALL_HINT}") from None
    if uri.startswith("file:"):
        # MLflow 3.x refuses its file store (maintenance mode) unless told otherwise; the recipe asked for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train.steps": "200", ...}: leaves as text (JSON for anything but a string), cut to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[_key(name)] = text[:MAX_PARAM_VALUE]
    return out


def _key(name: str) -> str:
    """A valid MLflow param/metric key: slashes, alphanumerics, _ - . and spaces; not a path that resolves
    to another name."""
    key = re.sub(r"[^/\w.\- ]", "_", name)[:MAX_KEY]
    if not key or posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_") or "_"
    return key


def default_run_name(run_url: str, stage: str) -> str:
    """`<run>-<stage>`: a pipeline's stage folders are named after their stage (`<run>/pretrain`), so the
    pipeline's name is taken then."""
    last = storage.name(run_url)
    if last == stage:
        last = storage.name(run_url.rstrip("/")[: -len(last)]) or last
    return f"{last}-{stage}"


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MlflowTracker:
    """One stage's MLflow run (see the module docstring). Build it with `open`."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str):
        self.client: MlflowClient | None = client
        self.run_id = run_id
        self.uri = uri

    @classmethod
    def open(cls, tracking: TrackingConfig, run_url: str, stage: str, config: dict[str, Any]) -> MlflowTracker | None:
        """Start (or reattach to) the stage's run; None, after one warning, when the tracking store fails."""
        uri = tracking.mlflow_uri
        assert uri is not None, "tracking is off"
        client = _client(uri)  # a missing MLflow is the user's to fix: UserError, not a warning
        try:
            run_id, resumed = cls._run_id(client, tracking, run_url, stage)
            tracker = cls(client, run_id, uri)
            tracker._log_params(flatten_params(config), resumed)
        except Exception as exc:  # a store that fails must not stop training
            log.warning(
                "MLflow tracking at %s failed to start (%s: %s): the stage goes on untracked",
                uri,
                type(exc).__name__,
                exc,
            )
            return None
        log.info("MLflow: %s run %s at %s", "resumed" if resumed else "started", run_id, uri)
        return tracker

    @staticmethod
    def _run_id(client: MlflowClient, tracking: TrackingConfig, run_url: str, stage: str) -> tuple[str, bool]:
        from mlflow.exceptions import MlflowException

        url = storage.join(run_url, RUN_FILE)
        if storage.exists(url):
            saved = storage.read_json(url)
            if saved.get("tracking_uri") == tracking.mlflow_uri:
                try:
                    run = client.get_run(saved["run_id"])
                except MlflowException:  # deleted, or another store at the same URI: a new run
                    run = None
                if run is not None and run.info.lifecycle_stage == "active":
                    client.update_run(run.info.run_id, status="RUNNING")
                    return run.info.run_id, True
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(tracking.experiment)
            except MlflowException:  # another stage created it meanwhile
                experiment = client.get_experiment_by_name(tracking.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        name = tracking.run_name or default_run_name(run_url, stage)
        run = client.create_run(experiment_id, run_name=name, tags={"genpt.stage": stage, "genpt.run": run_url})
        record = {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": tracking.mlflow_uri}
        storage.write_text(url, json.dumps(record))
        return run.info.run_id, False

    def _log_params(self, params: dict[str, str], resumed: bool) -> None:
        from mlflow.entities import Param

        assert self.client is not None
        if resumed:  # MLflow refuses to change a param: log the new ones, name the changed ones
            have = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
            if changed:
                log.warning("MLflow run %s keeps its first values of %s (params do not change)", self.run_id, changed)
            params = {k: v for k, v in params.items() if k not in have}
        for chunk in _chunks([Param(k, v) for k, v in params.items()], MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def _failed(self, exc: Exception) -> None:
        log.warning(
            "MLflow tracking at %s failed (%s: %s): tracking stops, training goes on", self.uri, type(exc).__name__, exc
        )
        self.client = None

    def log(self, record: dict[str, Any]) -> None:
        """A metrics record's numeric values at its step, in one call."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        step = int(record.get("step", 0))
        stamp = int(1000 * record.get("time", time.time()))
        metrics = [
            Metric(_key(k), float(v), stamp, step)
            for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float))
        ]
        try:
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=chunk)
        except Exception as exc:
            self._failed(exc)

    def finish(self, run_url: str, status: str = "FINISHED") -> None:
        """Tag the run's latest checkpoint and end the run with `status` (FINISHED, FAILED or KILLED)."""
        if self.client is None:
            return
        from genpt_dist.checkpoint import latest_checkpoint

        try:
            ref = latest_checkpoint(run_url)
            if ref is not None:
                self.client.set_tag(self.run_id, "checkpoint", ref.url)
                self.client.set_tag(self.run_id, "checkpoint_step", str(ref.step))
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            self._failed(exc)
        self.client = None
