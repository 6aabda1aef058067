"""What this machine's matmuls can do, measured: which float type `precision: auto` takes on a CPU, and
the peak FLOP/s that MFU divides by. No Ray or DeepSpeed here: a worker, a bench and a test all call it.

Every figure is the best of several short timed samples (one sample: a few square matmuls, about
10 ms), so a neighbour that takes the CPU away for part of the measurement lowers some samples but
not the best one. A figure is cached for the process and on disk (`GENPT_CACHE_DIR`, default
`~/.cache/genpt_dist`, in `hardware/`), keyed by what it depends on: the device (CPU model or GPU
name), torch's version, torch's thread count, the dtype and the matrix size. Each cached figure says
the conditions it was measured under (`Conditions`: load average, the share of its threads' wall
time the process got on a CPU, time of day), so a figure taken on a busy machine can be told apart.

- `auto_precision`: on a GPU bf16 where supported, else fp16; on a CPU bf16 only where a 256 x 256
  matmul on one thread measures faster in bf16 than in fp32 (CPUs with AVX512-BF16 or AMX: ~2-3x;
  AVX2-only CPUs emulate bf16 at ~1/50 of fp32), else fp32. About 0.1 s, once per machine and torch
  version (the disk cache); why one thread: `cpu_throughput`.
- `peak_flops`: the MFU denominator at the precision in use. On a GPU with a nominal dense
  tensor-core figure in `NOMINAL_PEAK` that figure; else the measured best of an n x n matmul
  (1024 on a CPU, 8192 on a GPU) with the process's threads, never below the figure cached on disk
  for the same key (a busy start cannot lower it).
- `MFUMeter`: MFU from achieved FLOP/s, never above 1.0. A first reading above 1.0 means the peak
  was measured under load: it is re-measured once, a warning is logged once, and the value clamped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) bf16/fp16 tensor-core peaks, by a substring of torch.cuda.get_device_name(); the
# first match wins, so the more specific names come first. Vendor data sheets.
NOMINAL_PEAK: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)

PRECISION_N = 256  # the matmul that decides `auto` on a CPU: small enough to stay ~0.1 s where bf16 is slow
PRECISION_SAMPLES = 5
PRECISION_THREADS = 1  # see cpu_throughput


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What a measurement depends on (`key`) and what it was measured under (the rest)."""

    device: str  # "cpu: <model>" or "cuda: <name>"
    torch_version: str
    threads: int  # torch.get_num_threads() during the measurement
    dtype: str
    n: int
    samples: int
    load_avg_1m: float  # os.getloadavg()[0] just before (-1 where unknown)
    cpus: int  # os.cpu_count()
    cpu_share: float  # CPU time / (threads x wall) of the best sample (CPU only; ~1 idle, less when loaded)
    measured_at: str  # UTC, ISO 8601
    seconds: float  # how long the measurement took

    def key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("device", "torch_version", "threads", "dtype", "n")}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A matmul throughput and the conditions it was measured under."""

    flops: float  # FLOP/s
    conditions: Conditions
    source: str = "measured"  # or "cache" (read from disk) or "nominal" (NOMINAL_PEAK)


_PROCESS_CACHE: dict[str, Measurement] = {}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: {cpu_model()}"


def cache_dir() -> Path:
    """Where measurements persist between processes: `$GENPT_CACHE_DIR/hardware`."""
    root = os.environ.get("GENPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "genpt_dist"
    )
    return Path(root) / "hardware"


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _load_avg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0


def _conditions(
    dev: torch.device, dtype: torch.dtype, n: int, samples: int, load: float, share: float, seconds: float, threads: int
) -> Conditions:
    return Conditions(
        device=device_name(dev),
        torch_version=torch.__version__,
        threads=threads,
        dtype=str(dtype).removeprefix("torch."),
        n=n,
        samples=samples,
        load_avg_1m=round(load, 2),
        cpus=os.cpu_count() or 1,
        cpu_share=round(min(share, 1.0), 3),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(seconds, 3),
    )


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclasses.dataclass
class _Run:
    a: torch.Tensor
    b: torch.Tensor
    out: torch.Tensor
    iters: int  # matmuls per sample
    best: float = 0.0  # FLOP/s of the best sample
    share: float = 0.0  # its CPU time / (threads x wall)


def measure_matmuls(
    dtypes: Sequence[torch.dtype],
    n: int | None = None,
    device: str | torch.device = "cpu",
    samples: int = 7,
    sample_s: float = 0.01,
    threads: int | None = None,
) -> list[Measurement]:
    """Best-of-`samples` FLOP/s of an n x n matmul in each of `dtypes` on `device`, the dtypes' samples
    interleaved (a burst of load lowers a sample of each alike). One sample times enough back-to-back
    matmuls to take ~`sample_s`; n defaults to 1024 on a CPU and 8192 on a GPU, where smaller matmuls
    do not fill the device. On a CPU with torch's current threads, or `threads` for the measurement
    (restored after). A matmul slower than 0.1 s (bf16 emulated on an AVX2 CPU) caps the samples at 2."""
    dev = torch.device(device)
    n = n or (1024 if dev.type == "cpu" else 8192)
    saved = torch.get_num_threads()
    if threads is not None and dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        used, load, t_start = torch.get_num_threads(), _load_avg(), time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        runs = []
        for dtype in dtypes:
            a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
            b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
            out = torch.empty(n, n, device=dev, dtype=dtype)
            torch.mm(a, b, out=out)  # warm-up: kernel selection, first touch of `out`
            _sync(dev)
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(dev)
            one = max(time.perf_counter() - t0, 1e-9)
            runs.append(_Run(a, b, out, max(1, round(sample_s / one))))
            if one > 0.1:
                samples = min(samples, 2)
        for _ in range(samples):
            for run in runs:
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(run.iters):
                    torch.mm(run.a, run.b, out=run.out)
                _sync(dev)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                flops = 2 * n**3 * run.iters / max(wall, 1e-12)
                if flops > run.best:
                    run.best, run.share = flops, cpu / (used * wall) if dev.type == "cpu" else 1.0
        seconds = time.perf_counter() - t_start
        return [
            Measurement(run.best, _conditions(dev, dtype, n, samples, load, run.share, seconds, used))
            for dtype, run in zip(dtypes, runs)
        ]
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


def measure_matmul(
    dtype: torch.dtype = torch.bfloat16,
    n: int | None = None,
    device: str | torch.device = "cpu",
    samples: int = 7,
    sample_s: float = 0.01,
) -> Measurement:
    """`measure_matmuls` of one dtype with torch's current threads: the peak MFU divides by."""
    return measure_matmuls([dtype], n, device, samples, sample_s)[0]


def read_cached(key: dict[str, Any]) -> Measurement | None:
    """The measurement stored on disk for `key`, if any (and readable)."""
    path = cache_dir() / f"matmul-{_key_id(key)}.json"
    try:
        record = json.loads(path.read_text())
        if record["key"] != key:
            return None
        return Measurement(float(record["flops"]), Conditions(**record["conditions"]), source="cache")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(key: dict[str, Any], m: Measurement) -> None:
    """Store `m` on disk under `key` (atomically; a read-only home is not an error)."""
    record = {"key": key, "flops": m.flops, "conditions": dataclasses.asdict(m.conditions)}
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".matmul-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, folder / f"matmul-{_key_id(key)}.json")
    except OSError as e:
        log.debug("hardware cache not written: %s", e)


def _key_for(dtype: torch.dtype, n: int, device: str | torch.device, threads: int | None = None) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
    }


def cpu_throughput(
    measure: Callable[..., list[Measurement]] = measure_matmuls, use_disk: bool = True
) -> dict[str, Measurement]:
    """fp32 and bf16 matmul FLOP/s on this CPU at PRECISION_N, one thread, from the process cache, else
    the disk cache, else `measure` (then cached in both).

    One thread, not the process's: a matmul's bf16/fp32 ratio is the instruction set's (AVX512-BF16 or
    AMX, or neither), the same at any thread count, while a multi-threaded matmul on a loaded machine
    waits at every barrier for its slowest thread, so its fp32 and bf16 readings each spread over more
    than the gap between them and the winner would be chance."""
    names = ("fp32", "bf16")
    keys = [_key_for(DTYPES[name], PRECISION_N, "cpu", threads=PRECISION_THREADS) for name in names]
    kids = ["throughput-" + _key_id(key) for key in keys]
    if not all(kid in _PROCESS_CACHE for kid in kids):
        cached = [read_cached(key) if use_disk else None for key in keys]
        if any(c is None for c in cached):
            fresh = measure(
                [DTYPES[name] for name in names],
                n=PRECISION_N,
                device="cpu",
                samples=PRECISION_SAMPLES,
                threads=PRECISION_THREADS,
            )
            if use_disk:
                for key, m in zip(keys, fresh):
                    write_cached(key, m)
            cached = list(fresh)
        for kid, c in zip(kids, cached):
            assert c is not None
            _PROCESS_CACHE[kid] = c
    return {name: _PROCESS_CACHE[kid] for name, kid in zip(names, kids)}


def cpu_prefers_bf16(throughput: dict[str, Measurement]) -> bool:
    """Whether bf16 matmuls measured faster than fp32 ones."""
    return throughput["bf16"].flops > throughput["fp32"].flops


def auto_precision(use_gpu: bool, throughput: Callable[[], dict[str, Measurement]] | None = None) -> str:
    """What `precision: auto` means on this device: on a GPU bf16 if supported else fp16; on a CPU bf16
    where it measures faster than fp32 (`throughput`, default `cpu_throughput`), else fp32."""
    if use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    t = (throughput or cpu_throughput)()
    choice = "bf16" if cpu_prefers_bf16(t) else "fp32"
    log.info(
        "precision auto -> %s (matmul %d^2, %d thread(s), %s: fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s)",
        choice,
        t["fp32"].conditions.n,
        t["fp32"].conditions.threads,
        t["fp32"].conditions.measured_at,
        t["fp32"].flops / 1e9,
        t["bf16"].flops / 1e9,
    )
    return choice


def nominal_peak(precision: str, device: str | torch.device) -> float | None:
    """The data-sheet dense peak of a known GPU at bf16/fp16, else None."""
    dev = torch.device(device)
    if dev.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(dev)
    return next((flops for sub, flops in NOMINAL_PEAK if sub in name), None)


def peak_flops(
    precision: str,
    device: str | torch.device = "cpu",
    *,
    fresh: bool = False,
    measure: Callable[..., Measurement] = measure_matmul,
    use_disk: bool = True,
) -> Measurement:
    """The MFU denominator at `precision` on `device` (see the module docstring). `fresh` re-measures
    instead of answering from the process cache; the answer is never below the disk cache's figure for
    the same key, and a higher measurement replaces that figure."""
    dev = torch.device(device)
    dtype = DTYPES[precision]
    nominal = nominal_peak(precision, dev)
    if nominal is not None:
        cond = _conditions(dev, dtype, 0, 0, _load_avg(), 1.0, 0.0, torch.get_num_threads())
        return Measurement(nominal, cond, source="nominal")
    n = 1024 if dev.type == "cpu" else 8192
    key = _key_for(dtype, n, dev)
    kid = "peak-" + _key_id(key)
    if fresh or kid not in _PROCESS_CACHE:
        m = measure(dtype, n=n, device=dev)
        cached = read_cached(key) if use_disk else None
        if cached is not None and cached.flops >= m.flops:
            m = cached
        elif use_disk:
            write_cached(key, m)
        prev = _PROCESS_CACHE.get(kid)
        _PROCESS_CACHE[kid] = m if prev is None or m.flops > prev.flops else prev
    return _PROCESS_CACHE[kid]


class MFUMeter:
    """MFU = achieved FLOP/s / peak FLOP/s at `precision` on `device`, reported at most 1.0."""

    def __init__(
        self, precision: str, device: str | torch.device = "cpu", peak: Callable[..., Measurement] = peak_flops
    ):
        self.precision, self.device, self._peak_fn = precision, device, peak
        self.peak = peak(precision, device)
        self.remeasured = False
        self.clamped = 0  # readings above 1.0 that were clamped

    def __call__(self, achieved_flops: float) -> float:
        mfu = achieved_flops / self.peak.flops
        if mfu > 1.0 and not self.remeasured:
            self.remeasured = True
            before = self.peak
            again = self._peak_fn(self.precision, self.device, fresh=True)
            if again.flops > self.peak.flops:
                self.peak = again
            log.warning(
                "MFU read %.0f%%: the matmul peak (%.1f GFLOP/s; load average %.2f, CPU share %.2f, %s) was "
                "measured under load; re-measured %.1f GFLOP/s, now %.1f GFLOP/s; MFU is reported at most 100%%",
                100 * mfu,
                before.flops / 1e9,
                before.conditions.load_avg_1m,
                before.conditions.cpu_share,
                before.conditions.measured_at,
                again.flops / 1e9,
                self.peak.flops / 1e9,
            )
            mfu = achieved_flops / self.peak.flops
        if mfu > 1.0:
            self.clamped += 1
            return 1.0
        return mfu
