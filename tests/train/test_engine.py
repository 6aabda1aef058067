"""The engine in one process, world size 1, no Ray: resume, gradient accumulation, early stopping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import ONE_WORKER, local_pretrain

from genpt_dist import storage
from genpt_dist.checkpoint import list_checkpoints, resolve
from genpt_dist.config import Config, load_config
from genpt_dist.data.prepare import prepare
from genpt_dist.train.collective import init_single_process_group
from genpt_dist.train.engine import Cadence, Job, LocalReporter
from genpt_dist.train.finetune import finetune_job, finetune_worker
from genpt_dist.train.loop import EarlyStop
from genpt_dist.train.pretrain import pretrain_job, pretrain_worker

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
ONE = [*ONE_WORKER, "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def data(tiny_corpus, tmp_path_factory) -> str:
    init_single_process_group()
    out = str(tmp_path_factory.mktemp("engine") / "data")
    prepare([str(tiny_corpus)], out, load_config(TINY).data)
    return out


def _pretrain(data: str, run: str, *overrides: str) -> LocalReporter:
    return local_pretrain(data, run, load_config(TINY, [*ONE, *overrides]))


def _train_losses(run: str) -> dict[int, float]:
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_cadence_includes_the_last_step():
    c = Cadence(load_config(TINY, ["train.steps=7", "train.eval_every=3", "train.log_every=5"]).train)
    assert [s for s in range(1, 8) if c.evaluate(s)] == [3, 6, 7]
    assert [s for s in range(1, 8) if c.log(s)] == [5, 7]


def test_a_worker_validates_its_config_once(data, tmp_path, monkeypatch):
    """The job's config crosses the Ray boundary as a dump; in a worker the stage function and the engine
    read one `job.cfg`, validated once."""
    run = str(tmp_path / "once")
    cfg = load_config(TINY, [*ONE, "train.steps=1"])
    job = Job(**dataclasses.asdict(pretrain_job(data, run, cfg)))  # as Ray Train hands it to a worker
    calls = []
    validate = Config.model_validate

    def counting(obj, *args, **kwargs):
        calls.append(obj)
        return validate(obj, *args, **kwargs)

    monkeypatch.setattr(Config, "model_validate", counting)
    pretrain_worker(job, 0, 1, LocalReporter(run, keep=1))
    assert len(calls) == 1 and job.cfg == cfg


def test_resume_continues_exactly_where_the_run_stopped(data, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    _pretrain(data, straight, "train.steps=6")
    _pretrain(data, split, "train.steps=4")
    assert max(_train_losses(split)) == 4
    reporter = _pretrain(data, split, "train.steps=6")  # the same command with more steps resumes at 4
    assert reporter.last["step"] == 6
    a, b = _train_losses(straight), _train_losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6], "metrics.jsonl holds each step once"
    for step in (5, 6):  # optimizer state, LR schedule, RNG and loader position all came back
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
    refs = list_checkpoints(split)
    assert [r.step for r in refs] == [2, 4, 6] and refs[-1].meta.stage == "pretrain"
    # Finished: the same command again trains nothing and reports the finished state once.
    again = _pretrain(data, split, "train.steps=6")
    assert again.last["step"] == 6 and [r.step for r in list_checkpoints(split)] == [2, 4, 6]


def test_gradient_accumulation_takes_grad_accum_micro_batches_per_step(data, tmp_path):
    run = str(tmp_path / "accum")
    _pretrain(data, run, "train.steps=2", "deepspeed.grad_accum=3")
    meta = resolve(run).meta
    assert meta.step == 2 and meta.loader["batch"] == 6, meta.loader
    assert meta.tokens_seen == 2 * 3 * meta.micro_batch_size * 64


def test_early_stop_counts_evaluations_without_improvement():
    stop = EarlyStop(patience=2)
    for val in (3.0, 2.0, 2.5, 2.1):
        stop.update(val)
    assert stop.stopped and stop.best_val == 2.0 and stop.bad_evals == 2
    assert not EarlyStop(patience=0).stopped


def test_finetune_stops_early_and_keeps_its_best_checkpoint(data, tmp_path):
    base = str(tmp_path / "base")
    _pretrain(data, base, "train.steps=2")
    task = tmp_path / "task.jsonl"
    task.write_text(
        "".join(
            json.dumps({"prompt": f"{a} {b} ->", "completion": f" {b} {a}"}) + "\n"
            for a in range(10)
            for b in range(10)
        )
    )
    run = str(tmp_path / "ft")
    cfg = load_config(
        TINY,
        [
            *ONE,
            "finetune.train.steps=40",
            "finetune.train.eval_every=1",
            "finetune.patience=1",
            "finetune.optim.lr=0.5",
            "finetune.optim.warmup_steps=0",
            "finetune.train.log_every=1",
        ],
    )
    job, _ = finetune_job(str(task), base, run, cfg)
    reporter = LocalReporter(run, keep=cfg.finetune.train.keep_checkpoints)
    finetune_worker(job, 0, 1, reporter)
    meta = resolve(run).meta
    assert meta.finetune is not None and meta.finetune.stopped and meta.step < 40, meta
    assert reporter.last["stopped_early"] is True


def test_the_recipe_dropouts_reach_the_model(data, tmp_path):
    cfg = load_config(TINY, [*ONE, "model.dropout=0.1", "model.attention_dropout=0"])
    job = pretrain_job(data, str(tmp_path / "run"), cfg)
    assert (job.model["dropout"], job.model["attention_dropout"]) == (0.1, 0.0)


DEEPSPEED_LOAD = """
import sys
import torch
from genpt_dist.config import DeepSpeedConfig
from genpt_dist.train.collective import init_single_process_group
from genpt_dist.train.deepspeed import SHM_COMM_OP, build_ds_config, build_engine, load_deepspeed

deepspeed = load_deepspeed()
from deepspeed.autotuning import autotuner
assert not autotuner.has_mlflow and "mlflow" not in sys.modules, "DeepSpeed imported MLflow"
init_single_process_group()
model = torch.nn.Linear(4, 4)
ds = build_ds_config(DeepSpeedConfig(zero_stage=3), micro_batch_size=1, grad_accum=1, grad_clip=1.0, precision="fp32")
engine = build_engine(model, ds, torch.optim.AdamW(model.parameters()), None)
import deepspeed.ops
assert deepspeed.ops.__compatible_ops__[SHM_COMM_OP] is False
import mlflow  # importable again once DeepSpeed is in
print("ok")
"""


def test_deepspeed_loads_without_mlflow_or_the_shm_op():
    """`load_deepspeed` / `build_engine` skip the import and the C++ op training never uses (each costs
    seconds of every worker's start), and leave MLflow importable after; in a process of its own, since
    DeepSpeed imports once per process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DEEPSPEED_LOAD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
