"""`finetune`: supervised fine-tuning of any checkpoint or export on a downstream task.

The same engine and MLE loop as pretraining (`train.engine.Engine`, `train.loop.run_mle`) with
three changes:
the data source is a task (prompt/completion with the prompt masked, or plain text); parameters can
be held fixed (embeddings, the first N blocks, or all but the last N blocks) and their exact fp32
values are stored beside the ZeRO state (`frozen.safetensors`) so they stay bit-identical even when
the engine computes in bf16; every evaluation saves a checkpoint and training stops early after
`patience` evaluations without a better val loss (`loop.EarlyStop`). The best checkpoint (lowest val
loss) is the stage's output. The frozen values and the early-stop counters are one `CheckpointPart`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from genpt_dist import storage
from genpt_dist.checkpoint import FROZEN, CheckpointRef, list_checkpoints, load_tokenizer, resolve
from genpt_dist.config import Config, FinetuneConfig
from genpt_dist.data.task import ExampleLoader, collate, load_task
from genpt_dist.errors import UserError
from genpt_dist.meta import CheckpointMeta, FinetuneState
from genpt_dist.model.gpt import GPT
from genpt_dist.train.engine import Engine, Job, Reporter
from genpt_dist.train.loop import EarlyStop, train_mle
from genpt_dist.train.sources import Batch, DataSource, ShardSource

log = logging.getLogger(__name__)


def frozen_parameter_names(model: GPT, ft: FinetuneConfig) -> list[str]:
    """Names of the parameters the config holds fixed (the tied lm_head follows wte)."""
    n = len(model.transformer.h)
    frozen_blocks = set(range(min(ft.freeze_first_blocks, n)))
    if ft.train_last_blocks is not None:
        frozen_blocks |= set(range(max(n - ft.train_last_blocks, 0)))
    freeze_emb = ft.freeze_embeddings or ft.train_last_blocks is not None
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if (
            freeze_emb
            and parts[:2] in (["transformer", "wte"], ["transformer", "wpe"])
            or parts[:2] == ["transformer", "h"]
            and int(parts[2]) in frozen_blocks
        ):
            names.append(name)
    return names


class TaskSource:
    """Task examples for the loop: shuffled train batches, fixed val batches."""

    def __init__(self, job: Job, ft: FinetuneConfig, rank: int, world: int):
        assert job.init is not None  # finetune_job sets it
        ref = resolve(job.init)
        self.tokenizer = load_tokenizer(ref)
        self.data_fingerprint = job.extra["task_sha256"]
        self.task = load_task(job.data, self.tokenizer, ft, job.model["block_size"])
        self.batch_size = ft.train.micro_batch_size
        kw = dict(batch_size=self.batch_size, rank=rank, world_size=world, seed=ft.train.seed)
        self.train = ExampleLoader(self.task.train, shuffle=True, **kw)
        self.val = ExampleLoader(
            self.task.val,
            shuffle=False,
            **{**kw, "world_size": min(world, len(self.task.val)), "rank": min(rank, len(self.task.val) - 1)},
        )
        self.eval_batches_n = ft.train.eval_batches

    def _batch(self, examples) -> Batch:
        idx, targets = collate(examples, self.tokenizer.pad_id)
        return Batch(idx=idx, targets=targets)

    def train_batches(self) -> Iterator[Batch]:
        return (self._batch(b) for b in self.train)

    def eval_batches(self) -> Iterable[Batch]:
        self.val.load_state_dict({"epoch": 0, "batch": 0})
        batches = list(self.val.iter_epoch())[: self.eval_batches_n]
        return [self._batch(b) for b in batches]

    def state_dict(self) -> dict[str, Any]:
        return self.train.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state)


class FinetunePart:
    """Fine-tuning's checkpoint part: the exact fp32 values of the frozen parameters and the early stop."""

    def __init__(self, frozen: dict[str, torch.Tensor], early_stop: EarlyStop):
        self.frozen, self.early_stop = frozen, early_stop

    def engines(self) -> list[Any]:
        return []

    def save(self, folder: Path, rank: int) -> None:
        if rank == 0 and self.frozen:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.frozen.items()}, str(folder / FROZEN))

    def load(self, folder: Path, meta: CheckpointMeta) -> None:
        if meta.finetune is not None:
            st = meta.finetune
            self.early_stop.best_val, self.early_stop.bad_evals, self.early_stop.stopped = (
                st.best_val,
                st.bad_evals,
                st.stopped,
            )
        if (folder / FROZEN).exists():  # the exact values, not the engine's (possibly bf16) copies
            from safetensors.torch import load_file

            self.frozen.update(load_file(str(folder / FROZEN)))

    def meta_fields(self) -> dict[str, Any]:
        es = self.early_stop
        return {
            "finetune": FinetuneState(
                best_val=es.best_val, bad_evals=es.bad_evals, stopped=es.stopped, frozen=sorted(self.frozen)
            )
        }


def freeze(model: GPT, ft: FinetuneConfig, rank: int) -> dict[str, torch.Tensor]:
    """Hold the configured parameters fixed; returns their exact fp32 values by name."""
    names = set(frozen_parameter_names(model, ft))
    frozen = {}
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
            frozen[name] = p.detach().float().clone()
    if names and rank == 0:
        log.info("finetune: %d parameter tensors held fixed", len(names))
    return frozen


def finetune_worker(job: Job, rank: int, world: int, reporter: Reporter) -> None:
    """One fine-tuning worker: task (or prepared shards) source, freezing, the engine, the MLE loop with
    early stopping."""
    cfg = job.cfg
    ft = cfg.finetune
    source: DataSource
    if job.extra["prepared"]:
        source = ShardSource(
            job.data,
            batch_size=ft.train.micro_batch_size,
            eval_batches=ft.train.eval_batches,
            loader=cfg.loader,
            rank=rank,
            world=world,
        )
    else:
        source = TaskSource(job, ft, rank, world)
    engine = Engine(job, source, rank=rank, world=world, reporter=reporter)
    early_stop = EarlyStop(patience=ft.patience)
    part = FinetunePart({}, early_stop)
    engine.parts.append(part)
    # Freezing after the --init weights are in (their exact values are kept), before DeepSpeed wraps the model.
    train_mle(engine, before_wrap=lambda model: part.frozen.update(freeze(model, ft, rank)), early_stop=early_stop)


def best_checkpoint(run: str) -> CheckpointRef | None:
    """The kept checkpoint with the lowest val loss."""
    refs = [r for r in list_checkpoints(run) if "val_loss" in r.meta.metrics]
    return min(refs, key=lambda r: (r.meta.metrics["val_loss"], -r.step)) if refs else None


def _task_sha256(task: str) -> str:
    """The task's fingerprint: its bytes, or for a folder (a `datasets` save_to_disk) every file's name and bytes."""
    import hashlib

    files = [task] if not storage.exists(storage.join(task, "state.json")) else sorted(storage.list_files(task))
    digest = hashlib.sha256()
    for url in files:
        if len(files) > 1:
            digest.update(url[len(task) :].encode())
        digest.update(storage.read_bytes(url))
    return digest.hexdigest()


def finetune_job(task: str, init: str, run: str, cfg: Config) -> tuple[Job, dict[str, Any]]:
    """Validate the task and the init checkpoint at the edge (before any worker); the job, and what the
    summary reports of the task."""

    ref = resolve(init)
    model_cfg = ref.model_config
    tok = load_tokenizer(ref)
    task = storage.normalize(task)
    ft = cfg.finetune
    if ft.train_last_blocks is not None and ft.train_last_blocks > model_cfg.n_layer:
        raise UserError(
            f"finetune.train_last_blocks={ft.train_last_blocks} but the model has {model_cfg.n_layer} blocks"
        )
    manifest = _prepared_dataset(task)
    if manifest is not None:  # domain adaptation on a prepared dataset: its shards, its tokenizer
        if manifest.tokenizer_sha256 != tok.sha256:
            raise UserError(f"the task at {task} was tokenised with a different tokenizer than --init {ref.url}")
        info = {"examples": manifest.num_samples("train"), "truncated": 0}
        task_sha, seq_len = manifest.sha256, manifest.seq_len
    else:
        data = load_task(task, tok, ft, model_cfg.block_size)  # fails here, before any worker, on bad input
        log.info(
            "task %s: %d train / %d val %s examples (%d cut to fit)",
            task,
            len(data.train),
            len(data.val),
            data.kind,
            data.truncated,
        )
        info = {"examples": len(data.train) + len(data.val), "truncated": data.truncated, "split": data.split}
        task_sha, seq_len = _task_sha256(task), model_cfg.block_size
    job = Job(
        stage="finetune",
        config=cfg.model_dump(mode="json"),
        model=dataclasses.asdict(model_cfg),
        seq_len=seq_len,
        data=task,
        run=storage.normalize(run),
        init=ref.url,
        extra={"task_sha256": task_sha, "prepared": manifest is not None},
    )
    return job, info


def finetune(task: str, init: str, run: str, cfg: Config, address: str | None = None) -> dict[str, Any]:
    """Driver: validate at the edge, train on Ray Train, report the best checkpoint."""
    from genpt_dist.train.launcher import fit

    job, info = finetune_job(task, init, run, cfg)
    metrics = fit(job, cfg, finetune_worker, address=address)
    best = best_checkpoint(job.run)
    keys = ("step", "train_loss", "val_loss", "val_ppl", "val_bpb", "best_val_loss", "stopped_early")
    return {
        "command": "finetune",
        "run": job.run,
        "init": job.init,
        **info,
        **{k: metrics.get(k) for k in keys},
        "checkpoint": best.url if best else metrics.get("checkpoint"),
    }


def _prepared_dataset(task: str):
    """The manifest if `task` is a folder written by `prepare`, else None."""
    from genpt_dist.data.manifest import MANIFEST, load_manifest

    return load_manifest(task) if storage.exists(storage.join(task, MANIFEST)) else None
