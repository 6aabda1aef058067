"""Benchmarks: `genpt-dist bench NAME`. Each measures ours against a peer in the same run.

A benchmark is a function `(quick: bool) -> dict` that returns its measurements, with a `rows` list
(one dict per measured setting, printed as a table on stderr) and headline figures. `run_bench`
writes the whole result to `<output>/<name>.json` and returns the headline figures, which the CLI
prints as its last JSON line. Adding one is one line in `BENCHES`: name -> "module:function".
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

from genpt_dist import storage
from genpt_dist.errors import UserError

BENCHES: dict[str, str] = {
    "loader": "genpt_dist.bench.data:bench_loader",
    "prepare": "genpt_dist.bench.data:bench_prepare",
    "generate": "genpt_dist.bench.generate:bench_generate",
    "oracle": "genpt_dist.bench.oracle:bench_oracle",
    "train": "genpt_dist.bench.train:bench_train",
}


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


def run_bench(name: str, output: str, quick: bool = False) -> dict[str, Any]:
    """Run benchmark `name`, write `<output>/<name>.json`, return its summary."""
    if name not in BENCHES:
        raise UserError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHES))}")
    module, _, fn = BENCHES[name].partition(":")
    t0 = time.time()
    result = getattr(importlib.import_module(module), fn)(quick=quick)
    result = {"bench": name, "quick": quick, "seconds": round(time.time() - t0, 2), **result}
    print_table(f"bench {name}" + (" (quick)" if quick else ""), result.get("rows", []))
    url = storage.join(storage.normalize(output), f"{name}.json")
    storage.write_json(url, result)
    headline = {k: v for k, v in result.items() if k != "rows"}
    return {"command": "bench", **headline, "results": url}
