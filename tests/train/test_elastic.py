"""Elastic training: a checkpoint written by N workers resumes on M with its optimizer state.

* DeepSpeed level (`test_repartition_keeps_adam_state`): real ZeRO engines on real gloo process groups
  (forked processes in a subprocess, no Ray) train with 2 ranks and save; 1 rank re-partitions and
  loads that checkpoint, saves; 2 ranks load the 1-rank checkpoint, save. The consolidated fp32
  weights and Adam moments (exp_avg, exp_avg_sq, step) of all three checkpoints are equal, and so is
  the loss of a fixed batch after each load.
* Ray Train level (`test_resume_on_another_world_size_continues_the_run`): the step-10 checkpoint of
  a 2-worker run resumes with 1 worker, and the 1-worker step-15 checkpoint with 2 workers; the
  losses follow the run that never changed size, the global batch and the Adam step count carry on.

Run as a script (`python tests/train/test_elastic.py repartition DIR 2,3`) this file is the subprocess of
the first test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the script mode has no conftest
    sys.path.insert(0, str(REPO))

from genpt_dist import storage  # noqa: E402
from genpt_dist.config import load_config  # noqa: E402
from genpt_dist.errors import UserError  # noqa: E402
from genpt_dist.meta import CheckpointMeta  # noqa: E402
from genpt_dist.model.gpt import GPTConfig  # noqa: E402
from genpt_dist.train import elastic  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"


# ----------------------------------------------------------------------------------- pure functions


def test_num_workers_range_in_config():
    assert load_config(TINY, ["scaling.num_workers=[1, 3]"]).scaling.worker_range == (1, 3)
    assert load_config(TINY, ["scaling.num_workers=2"]).scaling.worker_range == (2, 2)
    with pytest.raises(UserError, match=r"^config error at scaling\.num_workers: min 3 > max 2$"):
        load_config(TINY, ["scaling.num_workers=[3, 2]"])
    with pytest.raises(UserError, match=r"^config error at scaling\.num_workers: must be >= 1, got 0$"):
        load_config(TINY, ["scaling.num_workers=[0, 2]"])


def _meta(step: int, world: int, global_batch: int, batch: int, micro: int = 8, seq_len: int = 64) -> CheckpointMeta:
    return CheckpointMeta(
        stage="pretrain",
        step=step,
        tokens_seen=step * global_batch * seq_len,
        world_size=world,
        zero_stage=2,
        precision="bf16",
        model=GPTConfig(vocab_size=259, block_size=seq_len, n_layer=1, n_head=1, d_model=8),
        config={},
        tokenizer_sha256="",
        data_url=None,
        data_fingerprint=None,
        init=None,
        loader={"epoch": 1, "batch": batch},
        metrics={},
        micro_batch_size=micro,
    )


def _accum(cfg, world: int, meta: CheckpointMeta | None) -> int:
    return elastic.grad_accum_for(
        cfg.deepspeed.grad_accum, cfg.train.micro_batch_size, cfg.scaling.worker_range, cfg.data.seq_len, world, meta
    )


def test_global_batch_is_kept_across_world_sizes():
    cfg = load_config(TINY, ["scaling.num_workers=[1, 2]"])  # micro 8, grad_accum 1, seq_len 64
    assert _accum(cfg, 2, None) == 1  # a fresh run at its largest size
    assert _accum(cfg, 1, None) == 2  # a fresh run below it: the largest size's batch
    assert _accum(cfg, 1, _meta(10, 2, 16, 10)) == 2  # 2 -> 1 worker
    assert _accum(cfg, 2, _meta(10, 1, 16, 20)) == 1  # 1 -> 2 workers
    assert _accum(cfg, 4, _meta(10, 2, 16, 10)) == 1  # 16 / (4 x 8) does not divide: kept
    fixed = load_config(TINY, ["scaling.num_workers=2", "deepspeed.grad_accum=3"])
    assert _accum(fixed, 2, None) == 3 and _accum(fixed, 2, _meta(5, 2, 48, 15)) == 3


def test_loader_position_keeps_the_share_of_the_epoch():
    assert elastic.loader_state_for(_meta(10, 2, 16, 10), 8, 1) == {"epoch": 1, "batch": 20}
    assert elastic.loader_state_for(_meta(10, 1, 16, 20), 8, 2) == {"epoch": 1, "batch": 10}
    assert elastic.loader_state_for(_meta(10, 2, 16, 10), 8, 2) == {"epoch": 1, "batch": 10}


# ----------------------------------------------------------------------------- DeepSpeed level


def consolidated_state(ds_dir: Path) -> tuple[dict[str, dict[str, object]], float]:
    """Per parameter the full fp32 weights, exp_avg and exp_avg_sq (and, under ZeRO 1-2, step) of a
    DeepSpeed checkpoint of any world size (its universal form, converted on a copy); and Adam's step."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "ds"
        shutil.copytree(ds_dir, copy)
        for folder in elastic.zero_shard_folders(copy):
            elastic.to_universal(folder)
        zero = copy / "state" / "zero"
        out: dict[str, dict[str, object]] = {}
        for param in sorted(p for p in zero.iterdir() if p.is_dir()):
            out[param.name] = {}
            for f in sorted(param.glob("*.pt")):
                value = torch.load(f, weights_only=False)
                out[param.name][f.stem] = value["param"] if isinstance(value, dict) else value
        steps = {float(t["step"]) for t in out.values() if "step" in t}
        if not steps:  # ZeRO-3 keeps the step with the common optimizer state
            common = torch.load(zero / "optimizer_state.pt", weights_only=False)["optimizer_state_dict"]["state"]
            steps = {float(s["step"]) for s in common.values()}
        assert len(steps) == 1, steps
        return out, steps.pop()


@pytest.fixture(scope="module")
def repartitioned(tmp_path_factory) -> Path:
    """ZeRO-2 and ZeRO-3 checkpoints of 2, then 1, then 2 ranks (one subprocess: one torch import)."""
    root = tmp_path_factory.mktemp("repartition")
    proc = subprocess.run(
        [sys.executable, __file__, "repartition", str(root), "2,3"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_repartition_keeps_adam_state(stage, repartitioned):
    import torch

    tmp_path = repartitioned / f"zero{stage}"
    reports = {w: json.loads((tmp_path / f"{w}.json").read_text()) for w in ("w2", "w1", "w2b")}
    assert [reports[w]["world"] for w in ("w2", "w1", "w2b")] == [2, 1, 2]
    # Loading restored the weights the forward pass uses, the LR schedule and the step counter.
    for w in ("w1", "w2b"):
        assert reports[w]["loss"] == pytest.approx(reports["w2"]["loss"], abs=1e-6)
        assert reports[w]["lr"] == reports["w2"]["lr"] and reports[w]["global_steps"] == reports["w2"]["global_steps"]

    original, step = consolidated_state(tmp_path / "w2")
    assert {"fp32", "exp_avg", "exp_avg_sq"} <= set(original["transformer.h.0.attn.c_attn.weight"])
    assert step == 3
    for w in ("w1", "w2b"):
        state, step = consolidated_state(tmp_path / w)
        assert step == 3 and state.keys() == original.keys()
        for name, tensors in original.items():
            assert state[name].keys() == tensors.keys(), name
            for key, value in tensors.items():
                assert torch.equal(torch.as_tensor(state[name][key]), torch.as_tensor(value)), (w, name, key)


def _rank_main(rank: int, world: int, port: int, stage: int, root: str, phase: str) -> None:
    """One rank of a phase: `train` (2 ranks, 3 steps, save w2) or `resume:<src>:<dst>` (load, save)."""
    import torch
    import torch.distributed as dist

    from genpt_dist.model.gpt import GPT, GPTConfig
    from genpt_dist.train.deepspeed import build_ds_config, build_engine, build_optimizer

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(TINY, [f"deepspeed.zero_stage={stage}"])
    torch.manual_seed(rank + 1)  # a different init per phase and rank: the load must overwrite it
    model = GPT(GPTConfig(vocab_size=259, block_size=64, n_layer=2, n_head=2, d_model=64))
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.steps)
    ds_config = build_ds_config(
        cfg.deepspeed,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=1,
        grad_clip=cfg.optim.grad_clip,
        precision="bf16",
    )
    engine = build_engine(model, ds_config, opt, sched)
    out = Path(root)
    if phase == "train":
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(3):
            x = torch.randint(0, 259, (8, 65), generator=g)  # (B, T+1)
            _, loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
        dst = "w2"
    else:
        _, src, dst = phase.split(":")
        saved_world = json.loads((out / f"{src}.json").read_text())["world"]
        with tempfile.TemporaryDirectory() as tmp:  # each rank works on its own copy, as on separate nodes
            shutil.copytree(out / src, Path(tmp) / "ds")
            with elastic.resharded(Path(tmp), saved_world, world, [engine], rank=rank):
                engine.load_checkpoint(
                    str(Path(tmp) / "ds"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
                )
    engine.eval()
    with torch.no_grad():
        x = torch.randint(0, 259, (4, 65), generator=torch.Generator().manual_seed(0))
        _, fixed_loss = engine(x[:, :-1], x[:, 1:])
    engine.train()
    engine.save_checkpoint(str(out / dst), tag="state")
    if rank == 0:
        report = {"world": world, "loss": fixed_loss.item(), "lr": engine.get_lr(), "global_steps": engine.global_steps}
        (out / f"{dst}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def _repartition_script(root: str, stages: list[int]) -> None:
    """Forked ranks (torch and DeepSpeed imported once, here): train on 2, resume on 1, then on 2."""
    import socket

    import torch.multiprocessing as mp

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  - imported once, before forking

    for stage in stages:
        folder = Path(root) / f"zero{stage}"
        folder.mkdir()
        for world, phase in ((2, "train"), (1, "resume:w2:w1"), (2, "resume:w1:w2b")):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(
                _rank_main, args=(world, port, stage, str(folder), phase), nprocs=world, start_method="fork"
            )


# ----------------------------------------------------------------------------- Ray Train level


@pytest.fixture(scope="module")
def tiny_data(tiny_corpus, tmp_path_factory) -> str:
    from genpt_dist.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare([str(tiny_corpus)], out, load_config(TINY).data)
    return out


RUN = (
    "train.steps=20",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=4",
    "train.log_every=5",
    "train.eval_every=10",
)


def _pretrain(data: str, run: str, *overrides: str) -> dict:
    from genpt_dist.train.pretrain import pretrain

    return pretrain(data, run, load_config(TINY, [*RUN, *overrides]))


def _train_losses(run: str) -> dict[int, float]:
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    return {m["step"]: m["train_loss"] for m in rows if "train_loss" in m}


def _start_from(src_run: Path, step: int, dst_run: Path) -> None:
    """A run whose only checkpoint is `src_run`'s step-`step` one (as if it had stopped there)."""
    from genpt_dist.checkpoint import list_checkpoints

    ref = next(r for r in list_checkpoints(str(src_run)) if r.step == step)
    shutil.copytree(ref.url, dst_run / "checkpoints" / Path(ref.url).name)


def _last(run: Path):
    from genpt_dist.checkpoint import latest_checkpoint

    return latest_checkpoint(str(run))


@pytest.mark.slow
def test_resume_on_another_world_size_continues_the_run(ray_session, tiny_data, tmp_path):
    straight = _pretrain(tiny_data, str(tmp_path / "straight"))  # 2 workers throughout
    _start_from(tmp_path / "straight", 10, tmp_path / "down")
    down = _pretrain(tiny_data, str(tmp_path / "down"), "scaling.num_workers=1")  # 2 -> 1 at step 10
    _start_from(tmp_path / "down", 15, tmp_path / "up")
    up = _pretrain(tiny_data, str(tmp_path / "up"), "scaling.num_workers=2")  # 1 -> 2 at step 15

    assert straight["step"] == down["step"] == up["step"] == 20
    assert [_last(tmp_path / r).meta.world_size for r in ("straight", "down", "up")] == [2, 1, 2]
    # The same global batch at every size: the same tokens per step.
    assert straight["tokens_seen"] == down["tokens_seen"] == up["tokens_seen"]
    # The loss goes on from where it was (the samples differ: each rank reads another slice).
    ref = _train_losses(str(tmp_path / "straight"))
    got = {**_train_losses(str(tmp_path / "down")), **_train_losses(str(tmp_path / "up"))}
    assert sorted(got) == [15, 20]
    for step in (15, 20):
        assert abs(got[step] - ref[step]) < 0.2, (step, got, ref)
    assert abs(up["val_loss"] - straight["val_loss"]) < 0.1 and abs(down["val_loss"] - straight["val_loss"]) < 0.1
    # Adam carried on: 20 optimizer steps in its state, not 10 or 5 of a fresh optimizer.
    for run in ("straight", "down", "up"):
        ds = Path(_last(tmp_path / run).url) / "ds"
        assert consolidated_state(ds)[1] == 20, run


if __name__ == "__main__":
    if sys.argv[1:2] == ["repartition"]:
        _repartition_script(sys.argv[2], [int(x) for x in sys.argv[3].split(",")])
    else:
        sys.exit(f"usage: {sys.argv[0]} repartition DIR ZERO_STAGES (e.g. 2,3)")
