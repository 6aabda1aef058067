"""The whole pipeline under one run URL: every stage, the export, the report, and a re-run that skips."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genpt_dist import storage
from genpt_dist.checkpoint import list_checkpoints, resolve
from genpt_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SMALL = [
    "train.steps=6",
    "train.checkpoint_every=6",
    "train.eval_every=6",
    "adversarial.train.steps=2",
    "adversarial.discriminator.pretrain_steps=1",
    "adversarial.train.checkpoint_every=2",
    "finetune.train.steps=4",
    "finetune.train.eval_every=2",
    "pipeline.report_samples=2",
]


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(ray_session, tiny_corpus, make_bucket, tmp_path):
    from genpt_dist.pipeline import pipeline

    task = tmp_path / "task.jsonl"
    task.write_text(
        "".join(
            json.dumps({"prompt": f"{a} {b} ->", "completion": f" {b} {a}"}) + "\n"
            for a, b in itertools.product(range(10), range(10))
        )
    )
    run = f"{make_bucket()}/runs/p"
    cfg = load_config(TINY, SMALL)
    out = pipeline([str(tiny_corpus)], run, cfg, task=str(task))
    for stage, steps in (("pretrain", 6), ("adversarial", 2), ("finetune", 4)):
        refs = list_checkpoints(storage.join(run, stage))
        assert refs and refs[-1].step == steps, stage
    assert out["model"] == storage.join(run, "export")
    assert storage.exists(storage.join(run, "data", "manifest.json"))
    assert resolve(storage.join(run, "export")).meta.source.stage == "finetune"
    assert {r["stage"] for r in out["stages"]} == {"pretrain", "adversarial", "finetune"}
    assert len(out["samples"]) == 4  # 2 from the corpus model, 2 task completions

    # The report: non-empty PNGs referenced from report.md.
    report = storage.read_text(out["report"])
    pngs = [u for u in storage.list_files(storage.join(run, "report")) if u.endswith(".png")]
    assert len(pngs) >= 5
    assert all(storage.read_bytes(u)[:8] == b"\x89PNG\r\n\x1a\n" and storage.size(u) > 2000 for u in pngs)
    assert all(f"report/{storage.name(u)}" in report for u in pngs)

    # Again: every stage is finished, so nothing trains and no checkpoint is added.
    before = {s: len(list_checkpoints(storage.join(run, s))) for s in ("pretrain", "adversarial", "finetune")}
    t0 = time.time()
    again = pipeline([str(tiny_corpus)], run, cfg, task=str(task))
    assert time.time() - t0 < 60
    assert again["model"] == out["model"]
    assert {s: len(list_checkpoints(storage.join(run, s))) for s in before} == before


def test_report_command_on_a_stage_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": s, "train_loss": 5.0 - 0.1 * s, "tokens_per_s": 1000.0 + s, "time": 1000.0 + s} for s in range(1, 11)
    ] + [{"step": 10, "val_loss": 4.2, "val_ppl": 66.7, "val_bpb": 2.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "report", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["command"] == "report" and len(out["plots"]) == 2  # loss and throughput
    for png in out["plots"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG" and Path(png).stat().st_size > 2000
    assert "| pretrain | 10 | data | 4.200 | 2.500 |" in (run / "report.md").read_text()
