"""Benchmarks: `genpt-dist bench NAME`. Each measures ours against a peer in the same run.

A benchmark is a function `(quick: bool) -> dict` that returns its measurements, with a `rows` list
(one dict per measured setting, printed as a table on stderr) and headline figures. `run_bench`
writes the whole result to `<output>/<name>.json` and returns the headline figures, which the CLI
prints as its last JSON line. Adding one is one line in `BENCHES`: name -> "module:function".

`bench all` runs every benchmark but `oracle`, `rl`, `ttq` (they measure learning, and run minutes) and
`prepare` (a 1 GB corpus, tens of minutes), each in its own process (a fresh Ray, torch threads and process
group each, and a failure stays that bench's), within `SUITE_BUDGET_S` in all; it writes each
`<name>.json` plus `all.json` and prints one table of the
headline figures against their targets (`HEADLINES`).
"""

from __future__ import annotations

import importlib
import json
import operator
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genpt_dist import storage
from genpt_dist.device import pick_device
from genpt_dist.errors import UserError

BENCHES: dict[str, str] = {
    "loader": "genpt_dist.bench.data:bench_loader",
    "prepare": "genpt_dist.bench.prepare:bench_prepare",
    "generate": "genpt_dist.bench.generate:bench_generate",
    "oracle": "genpt_dist.bench.oracle:bench_oracle",
    "train": "genpt_dist.bench.train:bench_train",
    "sync": "genpt_dist.bench.sync:bench_sync",
    "checkpoint": "genpt_dist.bench.checkpoint:bench_checkpoint",
    "scaling": "genpt_dist.bench.scaling:bench_scaling",
    "rl": "genpt_dist.bench.rl:bench_rl",
    "ttq": "genpt_dist.bench.ttq:bench_ttq",
    "all": "genpt_dist.bench:bench_all",
}
ALL = "all"
ORACLE = "oracle"  # measures learning, not speed; its recipe takes --set overrides
ON_DEVICE = ("train", "generate")  # the rest measure CPU-side paths (data, object store, S3, gloo workers)
RL = "rl"  # a race of whole RL runs (minutes; BENCHMARKS.md): run on its own, as oracle is
PREPARE = "prepare"  # a 1 GB corpus three ways (tens of minutes): on its own too
TTQ = "ttq"  # a 15-minute pretraining run
NOT_IN_ALL = (ORACLE, RL, PREPARE, TTQ, ALL)
SUITE_BUDGET_S = 15 * 60  # `bench all`, full mode, on the 2-core machine

# bench -> (figure, how to read it from the bench's JSON, comparison, target or None)
HEADLINES: dict[str, list[tuple[str, Callable[[dict], Any], str, float | None]]] = {
    "sync": [
        ("100M params to 2 actors, s", lambda r: r.get("sync_s_100M"), "<=", 0.5),
        ("10M params to 2 actors, s", lambda r: r.get("sync_s_10M"), "<=", None),
        ("sync vs one memcpy (largest), x", lambda r: r.get("ratio_vs_memcpy"), "<=", None),
    ],
    "checkpoint": [
        ("upload vs boto3, x", lambda r: r.get("ratio_upload"), ">=", 0.5),
        ("restore vs boto3, x", lambda r: r.get("ratio_restore"), ">=", 0.5),
    ],
    "loader": [
        ("tok/s seq 64 in-process", lambda r: r.get("ours_tok_s_seq64_w0"), ">=", 2e6),
        (
            "vs webdataset seq 64 in-process, x",
            lambda r: r["ours_tok_s_seq64_w0"] / r["webdataset_tok_s_seq64_w0"],
            ">=",
            None,
        ),
    ],
    "prepare": [
        ("1 GB in files vs HF encode_batch alone, x", lambda r: r.get("vs_floor_files"), ">=", 0.7),
        ("1 GB one file vs HF encode_batch alone, x", lambda r: r.get("vs_floor_one_file"), ">=", 0.7),
        ("peak PSS 1 GB vs 100 MB, x", lambda r: r.get("pss_full_vs_tenth"), "<=", 1.5),
        ("peak RSS 1 GB vs 100 MB, x", lambda r: r.get("rss_full_vs_tenth"), "<=", None),
        ("prepare MB/s without BPE training", lambda r: r.get("ours_mb_s_files"), ">=", None),
    ],
    "generate": [
        ("vs HF generate fp32, x", lambda r: r.get("speedup_fp32"), ">=", 2.0),
        (
            "ours of its own fp32 matmuls (oneDNN packed) alone",
            lambda r: r.get("ours_of_matmuls_fp32", {}).get("packed"),
            ">=",
            None,
        ),
        ("KV cache vs none, x", lambda r: r.get("kv_cache_speedup"), ">=", None),
    ],
    "train": [
        ("ZeRO-2 vs HF GPT-2, x", lambda r: r["ratios"]["zero2_vs_hf"], ">=", 1.25),
        ("ZeRO-2 vs HF GPT-2 with our activation, x", lambda r: r["ratios"]["zero2_vs_hf_gelu"], ">=", None),
        ("matmul peak drift, larger / smaller of before, after", lambda r: r["matmul_gflops"]["drift"], "<=", 1.3),
        ("ZeRO-2 vs plain loop, x", lambda r: r["ratios"]["zero2_vs_plain"], ">=", 0.9),
        ("ZeRO-2 MFU of the measured bf16 matmul", lambda r: r["mfu_zero2"], ">=", 0.5),
        ("ZeRO-2 vs HF if all but matmuls were free, x", lambda r: r["zero2_vs_hf_ceiling"], ">=", None),
    ],
    "scaling": [("2 workers x 1 thread vs 1 x 2, x", lambda r: r.get("ratio_2x1_vs_1x2"), ">=", 0.9)],
    "ttq": [
        ("tinyshakespeare val bpb within 15 min", lambda r: r.get("best_bpb_in_budget"), "<=", 2.15),
        ("seconds to 2.15 val bpb", lambda r: r.get("seconds_to_target"), "<=", 900.0),
    ],
    "rl": [  # means over the seeds (bench/rl_stats.py)
        ("ours time to TRL's final accuracy vs TRL's, x, seed mean", lambda r: r.get("time_ratio_vs_trl"), "<=", 0.5),
        (
            "ours - TRL final held-out accuracy, points, seed mean",
            lambda r: r.get("final_accuracy_diff_points"),
            ">=",
            0.0,
        ),
        ("RL lift of held-out accuracy, points, seed mean", lambda r: r.get("rl_lift_points"), ">=", 30.0),
        (
            "best of ours - TRL final accuracy, points, seed mean",
            lambda r: r.get("best_of_ours_final_accuracy_diff_points"),
            ">=",
            None,
        ),
    ],
}
# Figures read from two benches' JSON: (figure, benches, how to read it, comparison, target)
CROSS_HEADLINES: list[tuple[str, tuple[str, ...], Callable[..., Any], str, float]] = [
    (
        "loader vs training consumption (seq 256), x",
        ("loader", "train"),
        lambda loader, train: loader["ours_tok_s_seq256_w0"] / train["tokens_per_s_zero2"],
        ">=",
        20.0,
    )
]
_OPS = {">=": operator.ge, "<=": operator.le}


def print_table(title: str, rows: list[dict[str, Any]], file=sys.stderr) -> None:
    """A plain fixed-width table of `rows` (same keys in each) on stderr."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}", file=file)
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)), file=file)
    print(file=file, flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "" if value is None else str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).replace("x", "").isdigit()


def run_bench(
    name: str,
    output: str,
    quick: bool = False,
    only: list[str] | None = None,
    device: str = "auto",
    overrides: list[str] | None = None,
    seeds: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Run benchmark `name`, write `<output>/<name>.json`, return its summary. `only` picks the benches
    that `all` runs; `device` (auto | cpu | cuda | cuda:N) is where the device-bound benches (`ON_DEVICE`) measure;
    `overrides` (KEY=VALUE) change the oracle bench's recipe; `seeds` are the rl bench's (default: its spec's)."""
    if name not in BENCHES:
        raise UserError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHES))}")
    if only is not None and name != ALL:
        raise UserError(f"--only goes with `bench {ALL}`, not `bench {name}`")
    if overrides and name != ORACLE:
        raise UserError(f"--set goes with `bench {ORACLE}` (its recipe), not `bench {name}`")
    if seeds is not None and name != RL:
        raise UserError(f"--seeds goes with `bench {RL}`, not `bench {name}`")
    unknown = sorted(set(only or []) - (set(BENCHES) - set(NOT_IN_ALL)))
    if unknown:
        raise UserError(
            f"--only: {', '.join(unknown)} not among the benches of `all` "
            f"({', '.join(n for n in BENCHES if n not in NOT_IN_ALL)})"
        )
    pick_device(device)  # a bad or unavailable --device is refused before anything runs
    module, _, fn = BENCHES[name].partition(":")
    t0 = time.time()
    kwargs: dict[str, Any] = {"output": output, "only": only} if name == ALL else {}
    if name in (RL, TTQ):
        kwargs["output"] = output  # it writes its plot, <name>.png, beside <name>.json
    if name in (*ON_DEVICE, ALL):
        kwargs["device"] = device
    if name == ORACLE:
        kwargs["overrides"] = list(overrides or [])
    if name == RL and seeds is not None:
        kwargs["seeds"] = seeds
    result = getattr(importlib.import_module(module), fn)(quick=quick, **kwargs)
    result = {"bench": name, "quick": quick, "seconds": round(time.time() - t0, 2), **result}
    print_table(f"bench {name}" + (" (quick)" if quick else ""), result.get("rows", []))
    url = storage.join(storage.normalize(output), f"{name}.json")
    storage.write_json(url, result)
    headline = {k: v for k, v in result.items() if k != "rows"}
    return {"command": "bench", **headline, "results": url}


def _run_child(
    name: str, output: str, quick: bool, timeout_s: float, device: str
) -> tuple[int | str, dict[str, Any] | None]:
    """`bench NAME` in a process of its own (its output on our stderr); (exit code or why not, its summary)."""
    cmd = [
        sys.executable,
        "-c",
        "from genpt_dist.cli import main; raise SystemExit(main())",
        "bench",
        name,
        "--output",
        output,
        "--device",
        device,
        *(["--quick"] if quick else []),
    ]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=env, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its Ray and DataLoader processes too
        proc.communicate()
        return "timed out", None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def bench_all(
    quick: bool = False, output: str = "bench-results", only: list[str] | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Every benchmark but oracle (or those in `only`), one process each; headline figures against their
    targets."""
    names = [n for n in BENCHES if n not in NOT_IN_ALL and (only is None or n in only)]
    deadline = time.time() + SUITE_BUDGET_S
    rows: list[dict[str, Any]] = []
    benches: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.time()
        rc, summary = _run_child(name, output, quick, deadline - t0, device)
        benches[name] = {
            "rc": rc,
            "seconds": round(time.time() - t0, 1),
            "results": summary.get("results") if summary else None,
        }
        result = storage.read_json(summary["results"]) if summary else None
        for figure, read, op, target in HEADLINES.get(name, []):
            value = _read(read, result) if result else None
            met = None if value is None or target is None else bool(_OPS[op](value, target))
            rows.append(
                {
                    "bench": name,
                    "figure": figure,
                    "value": value if result else f"failed ({rc})",
                    "target": f"{op} {target:g}" if target is not None else "",
                    "met": "" if met is None else ("met" if met else "NOT MET"),
                }
            )
    for figure, needs, read, op, target in CROSS_HEADLINES:
        if all(n in benches for n in needs):
            results = [storage.read_json(benches[n]["results"]) if benches[n]["results"] else None for n in needs]
            value = _read(read, *results) if all(results) else None
            met = None if value is None else bool(_OPS[op](value, target))
            rows.append(
                {
                    "bench": "+".join(needs),
                    "figure": figure,
                    "value": value if value is not None else "failed",
                    "target": f"{op} {target:g}",
                    "met": "" if met is None else ("met" if met else "NOT MET"),
                }
            )
    checked = [r for r in rows if r["target"]]
    return {
        "rows": rows,
        "benches": benches,
        "targets_met": sum(r["met"] == "met" for r in checked),
        "targets": len(checked),
        "failed": [n for n, b in benches.items() if b["rc"] != 0],
    }


def _read(read: Callable[..., Any], *results: Any) -> Any:
    try:
        value = read(*results)
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return round(value, 3) if isinstance(value, float) else value
