"""Progress, metrics.jsonl, TensorBoard, MLflow (`tracking:`) and a sustained matmul throughput, on rank 0."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

from genpt_dist import storage
from genpt_dist.device import synchronize

if TYPE_CHECKING:
    from genpt_dist.config import Config
    from genpt_dist.tracking import MlflowTracker

log = logging.getLogger(__name__)


def measure_matmul_flops(
    dtype: torch.dtype = torch.bfloat16, n: int | None = None, seconds: float = 0.5, device: str = "cpu"
) -> float:
    """Sustained FLOP/s of an n x n matmul in `dtype` on `device` (this process's threads on a CPU), over
    `seconds` (`bench scaling`). n defaults to 1024 on a CPU and 8192 on a GPU, where smaller matmuls do
    not fill the device. Not the MFU denominator: one sustained run reads low on a loaded machine; that is
    `hardware.peak_flops`, the best of several short samples, cached with its conditions."""
    n = n or (1024 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


class MetricsLog:
    """Appends records to `<run>/metrics.jsonl` (rewritten whole: S3 has no append) and TensorBoard, and,
    with `config.tracking.mlflow_uri` set, to the stage's MLflow run (`genpt_dist.tracking`)."""

    def __init__(self, run_url: str, resume_step: int, enabled: bool, *, stage: str = "", config: Config | None = None):
        self.enabled = enabled
        self.run_url = run_url
        self._tracker: MlflowTracker | None = None
        self.url = storage.join(run_url, "metrics.jsonl")
        self.tb_url = storage.join(run_url, "tensorboard")
        self.records: list[dict[str, Any]] = []
        self._tb = None
        self._tb_dir = None
        if not enabled:
            return
        if storage.exists(self.url):
            lines = storage.read_text(self.url).splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r.get("step", 0) <= resume_step]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_dir = tempfile.mkdtemp(prefix="genpt-tb-")
            self._tb = SummaryWriter(self._tb_dir)
        except ImportError:  # tensorboard is optional
            self._tb = None
        if config is not None and config.tracking.mlflow_uri:
            from genpt_dist.tracking import MlflowTracker

            self._tracker = MlflowTracker.open(
                config.tracking, run_url, stage or storage.name(run_url), config.model_dump(mode="json")
            )

    def add(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
        if self._tracker is not None:
            self._tracker.log(record)

    def flush(self) -> None:
        if not self.enabled:
            return
        storage.write_text(self.url, "".join(json.dumps(r) + "\n" for r in self.records))
        if self._tb is not None:
            self._tb.flush()
            assert self._tb_dir is not None  # set with _tb
            storage.upload_dir(self._tb_dir, self.tb_url)

    def close(self, failed: bool = False) -> None:
        """The last flush; the MLflow run ends FINISHED, or FAILED when the stage stopped on an error."""
        self.flush()
        if self._tb is not None:
            self._tb.close()
            assert self._tb_dir is not None  # set with _tb
            shutil.rmtree(self._tb_dir, ignore_errors=True)
            self._tb = None
        if self._tracker is not None:
            self._tracker.finish(self.run_url, status="FAILED" if failed else "FINISHED")
            self._tracker = None


def progress_line(
    stage: str, step: int, total: int, loss: float, tokens_per_s: float, mfu: float, elapsed: float, done_before: int
) -> None:
    rate = (step - done_before) / max(elapsed, 1e-9)
    eta = (total - step) / rate if rate > 0 else float("inf")
    # Through logging, not print: Ray Train tees a worker's sys.stderr, so a print reached the driver twice.
    log.info(
        "[%s] step %d/%d loss %.4f tok/s %s mfu %.1f%% eta %.1f min",
        stage,
        step,
        total,
        loss,
        f"{tokens_per_s:,.0f}",
        100 * mfu,
        eta / 60,
    )
