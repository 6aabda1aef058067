"""`bench ttq`: time to quality on tinyshakespeare, the recipe `configs/shakespeare.yaml`.

The two commands a user runs, in this process: `prepare` of tinyshakespeare (nanoGPT's split: the last
10% of the text is val, `split: tail`), then `pretrain` with the recipe (2 workers x 1 CPU). The clock
starts when `pretrain` is called, so Ray, the workers and the engines count; prepare is timed apart.
Each eval the run logs (`train.eval_every`) is a point of the curve: seconds since the start against
val bits-per-byte (the UTF-8 bytes its target tokens stand for, so it compares across tokenizers and
with nanoGPT's character-level figures). Written: `ttq.json` (the curve) and `ttq.png`.
Targets: val bits-per-byte <= TARGET_BPB within BUDGET_S of the start. Quick: a 128 KiB slice, a tiny
model and 12 steps, for the mechanics only.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from genpt_dist import storage
from genpt_dist.bench.data import corpus_path

RECIPE = "shakespeare"
TARGET_BPB = 2.15
BUDGET_S = 15 * 60
QUICK = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "data.vocab_size=300",
    "data.seq_len=64",
    "train.steps=12",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.checkpoint_every=12",
    "train.log_every=4",
    "optim.warmup_steps=2",
]


def curve_from_metrics(rows: list[dict[str, Any]], start: float) -> list[dict[str, Any]]:
    """The eval records of a run's metrics.jsonl -> [{seconds, step, val_bpb}] in step order."""
    points = [
        {"seconds": round(r["time"] - start, 2), "step": r["step"], "val_bpb": round(r["val_bpb"], 4)}
        for r in rows
        if "val_bpb" in r
    ]
    return sorted(points, key=lambda p: p["step"])


def first_reaching(curve: list[dict[str, Any]], bpb: float) -> float | None:
    return next((p["seconds"] for p in curve if p["val_bpb"] <= bpb), None)


def plot(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([p["seconds"] / 60 for p in curve], [p["val_bpb"] for p in curve], marker="o", ms=3, label="ours")
    ax.axhline(TARGET_BPB, color="grey", ls=":", lw=1, label=f"target {TARGET_BPB}")
    ax.axvline(BUDGET_S / 60, color="grey", ls="--", lw=1, label=f"{BUDGET_S // 60} minutes")
    ax.set_xlabel("minutes since `pretrain` was called")
    ax.set_ylabel("val bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_ttq(quick: bool = False, output: str = ".") -> dict[str, Any]:
    from genpt_dist.config import load_recipe
    from genpt_dist.data.prepare import prepare
    from genpt_dist.train.pretrain import pretrain

    cfg = load_recipe(RECIPE, QUICK if quick else [])
    with tempfile.TemporaryDirectory(prefix="genpt-bench-ttq-") as tmp:
        src = corpus_path()
        if quick:
            text = src.read_bytes()[: 128 << 10]
            src = Path(tmp) / "slice.txt"
            src.write_bytes(text[: text.rfind(b"\n") + 1])
        t0 = time.time()
        prepared = prepare([str(src)], f"{tmp}/data", cfg.data)
        prepare_s = time.time() - t0
        start = time.time()
        result = pretrain(f"{tmp}/data", f"{tmp}/run", cfg)
        total_s = time.time() - start
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    curve = curve_from_metrics(rows, start)
    in_budget = [p["val_bpb"] for p in curve if p["seconds"] <= BUDGET_S]
    rate = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    summary = {
        "what": f"tinyshakespeare val bits-per-byte against wall-clock, configs/{RECIPE}.yaml, "
        f"{cfg.scaling.num_workers} worker(s) x {cfg.scaling.cpus_per_worker} CPU",
        "rows": curve,
        "best_bpb_in_budget": min(in_budget) if in_budget else None,
        "seconds_to_target": first_reaching(curve, TARGET_BPB),
        "final_bpb": curve[-1]["val_bpb"] if curve else None,
        "final_step": result.get("step"),
        "pretrain_s": round(total_s, 2),
        "first_eval_s": curve[0]["seconds"] if curve else None,
        "prepare_s": round(prepare_s, 1),
        "tokens_per_s": round(sum(rate) / len(rate)) if rate else None,
        "train_tokens": prepared["train_tokens"],
        "recipe": cfg.model_dump(include={"data", "model", "optim", "train"}),
    }
    out = Path(storage.normalize(output))
    if not storage.is_s3(str(out)):
        out.mkdir(parents=True, exist_ok=True)
        plot(curve, out / "ttq.png", f"bench ttq: tinyshakespeare, configs/{RECIPE}.yaml")
        summary["plot"] = str(out / "ttq.png")
    return summary
