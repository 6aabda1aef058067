"""`report RUN`: PNG plots and a report.md for a pipeline run (or a single stage's run folder).

Reads each stage's metrics.jsonl (`<run>/pretrain`, `<run>/adversarial`, `<run>/finetune`, or the run
folder itself), plots train/val loss, tokens/s, reward, KL, discriminator accuracy and fine-tune loss
with matplotlib's headless Agg backend, and writes report.md embedding them with a summary table and
a few sample generations from the final model. Plots and report go next to the metrics (local or S3).
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from genpt_dist import storage
from genpt_dist.errors import UserError

log = logging.getLogger(__name__)
STAGES = ("pretrain", "adversarial", "finetune")

# (file name, title, [(stage, metric, label)], y label)
PLOTS = [
    (
        "loss.png",
        "Pre-training loss",
        [("pretrain", "train_loss", "train"), ("pretrain", "val_loss", "val")],
        "nats/token",
    ),
    (
        "throughput.png",
        "Training throughput",
        [("pretrain", "tokens_per_s", "pretrain"), ("finetune", "tokens_per_s", "finetune")],
        "tokens/s",
    ),
    ("reward.png", "Adversarial reward", [("adversarial", "reward_mean", "mean D reward")], "reward"),
    ("kl.png", "KL to the pretrained model", [("adversarial", "kl", "KL")], "nats/token"),
    (
        "discriminator.png",
        "Discriminator accuracy",
        [("adversarial", "d_acc_real", "on real"), ("adversarial", "d_acc_fake", "on generated")],
        "accuracy",
    ),
    (
        "finetune.png",
        "Fine-tuning loss",
        [("finetune", "train_loss", "train"), ("finetune", "val_loss", "val")],
        "nats/token",
    ),
]


def read_metrics(folder: str) -> list[dict[str, Any]]:
    url = storage.join(folder, "metrics.jsonl")
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]


def stage_metrics(run: str) -> dict[str, list[dict[str, Any]]]:
    """{stage: records}; a single stage's run folder reports as that stage (its checkpoints say which)."""
    found = {s: read_metrics(storage.join(run, s)) for s in STAGES}
    found = {s: r for s, r in found.items() if r}
    if not found:
        own = read_metrics(run)
        if own:
            from genpt_dist.checkpoint import latest_checkpoint

            ref = latest_checkpoint(run)
            found[(ref.meta.stage if ref else None) or "pretrain"] = own
    return found


def _plot(records: dict[str, list[dict]], series, title: str, ylabel: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [(label, [(r["step"], r[key]) for r in records.get(stage, []) if key in r]) for stage, key, label in series]
    lines = [(label, pts) for label, pts in lines if pts]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, pts in lines:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summary_rows(records: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per stage: last val loss / bits-per-byte, D accuracy, reward, wall time.

    Pretraining and the adversarial stage evaluate on the same rows of the dataset's val split; fine-tuning
    on the task's held-out examples (`val_set` says which)."""
    rows = []
    for stage, recs in records.items():
        last = {}
        for r in recs:
            last.update(r)
        times = [r["time"] for r in recs if "time" in r]
        rows.append(
            {
                "stage": stage,
                "steps": last.get("step"),
                "val_set": "task" if stage == "finetune" else "data",
                "val_loss": last.get("val_loss"),
                "val_bpb": last.get("val_bpb"),
                "reward": last.get("reward_mean"),
                "d_acc": (last["d_acc_real"] + last["d_acc_fake"]) / 2 if "d_acc_real" in last else None,
                "minutes": (max(times) - min(times)) / 60 if len(times) > 1 else None,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["stage", "steps", "val_set", "val_loss", "val_bpb", "reward", "d_acc", "minutes"]

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_report(run: str, samples: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the PNGs and report.md under `run`; returns what was written."""
    run = storage.normalize(run)
    records = stage_metrics(run)
    if not records:
        raise UserError(f"no metrics.jsonl at {run} or under its stages ({', '.join(STAGES)}): not a run")
    pngs = []
    for name, title, series, ylabel in PLOTS:
        png = _plot(records, series, title, ylabel)
        if png:
            storage.write_bytes(storage.join(run, "report", name), png)
            pngs.append(name)
    rows = summary_rows(records)
    md = [f"# genpt-dist run report\n\nRun: `{run}`\n", "## Summary\n", format_table(rows), ""]
    if extra:
        md += ["```json", json.dumps(extra, indent=2, default=str), "```", ""]
    md += ["## Plots\n"] + [f"![{p}](report/{p})\n" for p in pngs]
    if samples:
        md += ["## Samples (top-k) from the final model\n"] + [f"```\n{s}\n```\n" for s in samples]
    storage.write_text(storage.join(run, "report.md"), "\n".join(md))
    return {
        "report": storage.join(run, "report.md"),
        "plots": [storage.join(run, "report", p) for p in pngs],
        "stages": rows,
    }
