"""`genpt_dist.hardware`: precision `auto` follows a matmul measurement, the MFU peak survives a loaded
machine, MFU is never reported above 1.0, and the cache says what it was measured under."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time

import pytest
import torch

from genpt_dist import hardware
from genpt_dist.config import DeepSpeedConfig
from genpt_dist.train.deepspeed import resolve_precision


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    """A fresh process cache and a disk cache under tmp_path for every test."""
    monkeypatch.setenv("GENPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_PROCESS_CACHE", {})


def _fake(flops: float, dtype: str = "float32", threads: int = 1, n: int = 256) -> hardware.Measurement:
    cond = hardware.Conditions(
        device=hardware.device_name("cpu"),
        torch_version=torch.__version__,
        threads=threads,
        dtype=dtype,
        n=n,
        samples=1,
        load_avg_1m=0.0,
        cpus=1,
        cpu_share=1.0,
        measured_at="2025-01-01T00:00:00+00:00",
        seconds=0.0,
    )
    return hardware.Measurement(flops, cond)


@pytest.mark.parametrize("fp32, bf16, expected", [(52e9, 1.05e9, "fp32"), (100e9, 340e9, "bf16")])
def test_auto_on_a_cpu_follows_the_measurement(fp32, bf16, expected):
    calls = []

    def measure(dtypes, **kw):
        calls.append(kw)
        by_dtype = {torch.float32: fp32, torch.bfloat16: bf16}
        return [_fake(by_dtype[d], str(d).removeprefix("torch.")) for d in dtypes]

    t = hardware.cpu_throughput(measure=measure)
    assert {k: v.flops for k, v in t.items()} == {"fp32": fp32, "bf16": bf16}
    assert hardware.auto_precision(False, throughput=lambda: t) == expected
    # resolve_precision's `auto` reads the same, from the process cache (a real measurement could differ)
    assert resolve_precision(DeepSpeedConfig(precision="auto"), use_gpu=False) == expected
    assert len(calls) == 1 and calls[0]["n"] == hardware.PRECISION_N


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_explicit_precisions_are_returned_unchanged(monkeypatch, precision, use_gpu):
    monkeypatch.setattr(hardware, "auto_precision", lambda *a, **k: pytest.fail("measured"))
    assert resolve_precision(DeepSpeedConfig(precision=precision), use_gpu=use_gpu) == precision


def test_the_real_measurement_is_short_and_decides(capsys):
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    t = hardware.cpu_throughput(use_disk=False)
    took = time.perf_counter() - t0
    choice = hardware.auto_precision(False, throughput=lambda: t)
    with capsys.disabled():
        print(
            f"\n  auto -> {choice}: fp32 {t['fp32'].flops / 1e9:.1f} GFLOP/s, bf16 {t['bf16'].flops / 1e9:.1f} "
            f"GFLOP/s ({t['fp32'].conditions.n}^2, {t['fp32'].conditions.threads} thread, {took:.2f} s)"
        )
    assert choice == ("bf16" if t["bf16"].flops > t["fp32"].flops else "fp32")
    assert all(m.conditions.threads == 1 for m in t.values())
    assert took < 3  # ~0.1 s; torch's first matmul in a process adds its one-time set-up
    assert torch.get_num_threads() == threads  # measured on one thread, then restored


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(10_000):
            pass


def test_peak_measured_under_load_never_gives_mfu_above_one(caplog):
    ctx = mp.get_context("fork")  # the spinners import nothing: pure Python busy loops
    stop = ctx.Event()
    spinners = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(2)]
    for p in spinners:
        p.start()
    try:
        time.sleep(0.2)
        meter = hardware.MFUMeter("fp32", "cpu")  # the peak, measured robustly under load
    finally:
        stop.set()
        for p in spinners:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    loaded = meter.peak
    assert loaded.source == "measured" and loaded.flops > 0
    assert 0 < loaded.conditions.cpu_share <= 1 and loaded.conditions.threads == torch.get_num_threads()

    unloaded = hardware.measure_matmul(torch.float32)  # a genuinely measured throughput, spinners gone
    with caplog.at_level(logging.WARNING, logger="genpt_dist.hardware"):
        mfu = meter(unloaded.flops)
        assert 0 < mfu <= 1.0
        if unloaded.flops > loaded.flops:  # the load read the peak low: re-measured once, never lowered
            assert meter.remeasured and meter.peak.flops >= loaded.flops
        # more than the peak can do (a peak read under load): still at most 1.0, re-measured only once
        remeasured = meter.remeasured
        assert meter(10 * meter.peak.flops) == 1.0
        assert meter(100 * meter.peak.flops) == 1.0
        assert meter(0.5 * meter.peak.flops) == pytest.approx(0.5)
    assert meter.remeasured and meter.clamped >= 2
    warnings = [r for r in caplog.records if "measured under load" in r.getMessage()]
    assert len(warnings) == 1, "one warning, from the one re-measure"
    print(
        f"peak under load {loaded.flops / 1e9:.1f} GFLOP/s (cpu share {loaded.conditions.cpu_share}), unloaded "
        f"{unloaded.flops / 1e9:.1f}, after re-measure {meter.peak.flops / 1e9:.1f}; first reading re-measured: "
        f"{remeasured}"
    )


def test_meter_remeasures_once_and_keeps_the_higher_peak(caplog):
    peaks = iter([_fake(10e9), _fake(40e9), _fake(99e9)])
    calls = []

    def peak(precision, device, fresh=False):
        calls.append(fresh)
        return next(peaks)

    meter = hardware.MFUMeter("fp32", "cpu", peak=peak)
    assert meter(5e9) == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING, logger="genpt_dist.hardware"):
        assert meter(133e9) == 1.0  # 1330% against the loaded peak; 40e9 after the re-measure: clamped
        assert meter.peak.flops == 40e9
        assert meter(20e9) == pytest.approx(0.5)
        assert meter(400e9) == 1.0
    assert calls == [False, True]  # measured at the start, re-measured once
    assert sum("measured under load" in r.getMessage() for r in caplog.records) == 1


def test_the_cache_records_its_conditions(tmp_path):
    m = hardware.peak_flops("fp32")
    files = list((tmp_path / "cache" / "hardware").glob("matmul-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    cond = record["conditions"]
    assert record["flops"] == m.flops
    assert record["key"] == {
        "device": f"cpu: {hardware.cpu_model()}",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "n": 1024,
    }
    assert {k: cond[k] for k in record["key"]} == record["key"]
    for field in ("load_avg_1m", "cpus", "cpu_share", "measured_at", "samples", "seconds"):
        assert field in cond
    assert cond["samples"] >= 2 and cond["measured_at"].endswith("+00:00")

    # A later process: a lower (loaded) measurement does not lower the peak; a higher one replaces it.
    hardware._PROCESS_CACHE.clear()
    low = hardware.peak_flops("fp32", measure=lambda *a, **k: _fake(m.flops / 10, n=1024))
    assert low.flops == m.flops and low.source == "cache" and low.conditions == hardware.Conditions(**cond)
    high = hardware.peak_flops("fp32", fresh=True, measure=lambda *a, **k: _fake(m.flops * 2, n=1024))
    assert high.flops == 2 * m.flops
    assert json.loads(files[0].read_text())["flops"] == 2 * m.flops

    # The precision measurement is cached on disk too, one thread, with its conditions.
    t = hardware.cpu_throughput()
    hardware._PROCESS_CACHE.clear()
    again = hardware.cpu_throughput(measure=lambda *a, **k: pytest.fail("re-measured despite the disk cache"))
    assert {k: v.flops for k, v in again.items()} == {k: v.flops for k, v in t.items()}
    assert all(v.source == "cache" and v.conditions.threads == 1 for v in again.values())


def test_known_gpus_use_their_nominal_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert hardware.nominal_peak("bf16", "cuda:0") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert hardware.nominal_peak("fp16", "cuda:0") == 312e12
    assert hardware.nominal_peak("fp32", "cuda:0") is None  # measured instead
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA L4")
    assert hardware.nominal_peak("bf16", "cuda:0") is None
    assert hardware.nominal_peak("bf16", "cpu") is None
