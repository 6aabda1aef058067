"""`finetune`: supervised fine-tuning of any checkpoint or export on a downstream task.

The same per-worker loop and engine code as pretraining (`train.loop.Trainer`) with three changes:
the data source is a task (prompt/completion with the prompt masked, or plain text); parameters can
be held fixed (embeddings, the first N blocks, or all but the last N blocks) and their exact fp32
values are stored beside the ZeRO state (`frozen.safetensors`) so they stay bit-identical even when
the engine computes in bf16; every evaluation saves a checkpoint and training stops early after
`patience` evaluations without a better val loss. The best checkpoint (lowest val loss) is the
stage's output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from genpt_dist import storage
from genpt_dist.checkpoint import FROZEN, CheckpointRef, list_checkpoints, load_tokenizer, resolve
from genpt_dist.config import Config, FinetuneConfig
from genpt_dist.data.task import ExampleLoader, collate, load_task
from genpt_dist.errors import UserError
from genpt_dist.model.gpt import GPT
from genpt_dist.train.loop import Batch, Job, Trainer, run_worker
from genpt_dist.train.pretrain import ShardSource

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
        if freeze_emb and parts[:2] in (["transformer", "wte"], ["transformer", "wpe"]):
            names.append(name)
        elif parts[:2] == ["transformer", "h"] and int(parts[2]) in frozen_blocks:
            names.append(name)
    return names


class TaskSource:
    """Task examples for the loop: shuffled train batches, fixed val batches."""

    def __init__(self, job: Job, cfg: Config, rank: int, world: int):
        ref = resolve(job.init)
        self.tokenizer = load_tokenizer(ref)
        self.data_fingerprint = job.extra["task_sha256"]
        ft = cfg.finetune
        self.task = load_task(job.data, self.tokenizer, ft, cfg.block_size)
        kw = dict(batch_size=ft.micro_batch_size, rank=rank, world_size=world, seed=cfg.train.seed)
        self.train = ExampleLoader(self.task.train, shuffle=True, **kw)
        self.val = ExampleLoader(self.task.val, shuffle=False, **{**kw, "world_size": min(world, len(self.task.val)),
                                                                  "rank": min(rank, len(self.task.val) - 1)})
        self.eval_batches_n = ft.eval_batches

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


class FinetuneTrainer(Trainer):
    """Freezing before the engine, best/patience bookkeeping after each evaluation."""

    def __init__(self, job: Job, make_source):
        super().__init__(job, make_source)
        self.best_val, self.bad_evals, self.stopped = float("inf"), 0, False
        self.frozen: dict[str, torch.Tensor] = {}

    def before_engine(self, model: GPT) -> None:
        names = set(frozen_parameter_names(model, self.cfg.finetune))
        for name, p in model.named_parameters():
            if name in names:
                p.requires_grad_(False)
                self.frozen[name] = p.detach().float().clone()
        if names and self.rank == 0:
            log.info("finetune: %d parameter tensors held fixed", len(names))

    def on_eval(self) -> None:
        val = self.metrics["val_loss"]
        if val < self.best_val - 1e-6:
            self.best_val, self.bad_evals = val, 0
        else:
            self.bad_evals += 1
        patience = self.cfg.finetune.patience
        self.stopped = patience > 0 and self.bad_evals >= patience
        self.metrics.update(best_val_loss=self.best_val, stopped_early=self.stopped)

    def should_stop(self) -> bool:
        return self.stopped

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["finetune"] = {"best_val": self.best_val, "bad_evals": self.bad_evals, "stopped": self.stopped,
                            "frozen": sorted(self.frozen)}
        return meta

    def save_extra(self, folder: Path) -> None:
        if self.rank == 0 and self.frozen:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.frozen.items()}, str(folder / FROZEN))

    def restore_extra(self, folder: Path, meta: dict[str, Any]) -> None:
        ft = meta["finetune"]
        self.best_val, self.bad_evals, self.stopped = ft["best_val"], ft["bad_evals"], ft["stopped"]
        if (folder / FROZEN).exists():  # the exact values, not the engine's (possibly bf16) copies
            from safetensors.torch import load_file

            self.frozen = load_file(str(folder / FROZEN))


def best_checkpoint(run: str) -> CheckpointRef | None:
    """The kept checkpoint with the lowest val loss."""
    refs = [r for r in list_checkpoints(run) if "val_loss" in r.meta.get("metrics", {})]
    return min(refs, key=lambda r: (r.meta["metrics"]["val_loss"], -r.step)) if refs else None


def finetune(task: str, init: str, run: str, cfg: Config, address: str | None = None) -> dict[str, Any]:
    """Driver: validate the task and the init checkpoint at the edge, then train on Ray Train."""
    import hashlib

    from genpt_dist.train.launcher import fit, stage_config

    ref = resolve(init)
    if ref.meta.get("model") is None:
        raise UserError(f"--init {init} is not a generator checkpoint")
    tok = load_tokenizer(ref)
    task = storage.normalize(task)
    model_cfg = ref.model_config
    ft = cfg.finetune
    if ft.train_last_blocks is not None and ft.train_last_blocks > model_cfg.n_layer:
        raise UserError(f"finetune.train_last_blocks={ft.train_last_blocks} but the model has "
                        f"{model_cfg.n_layer} blocks")
    manifest = _prepared_dataset(task)
    if manifest is not None:  # domain adaptation on a prepared dataset: its shards, its tokenizer
        if manifest.tokenizer_sha256 != tok.sha256:
            raise UserError(f"the task at {task} was tokenised with a different tokenizer than --init {ref.url}")
        make_source, n_examples, truncated = ShardSource, manifest.num_samples("train"), 0
        task_sha = manifest.sha256
    else:
        data = load_task(task, tok, ft, model_cfg.block_size)  # fails here, before any worker, on bad input
        log.info("task %s: %d train / %d val %s examples (%d cut to fit)", task, len(data.train), len(data.val),
                 data.kind, data.truncated)
        make_source, n_examples, truncated = TaskSource, len(data.train) + len(data.val), data.truncated
        task_sha = hashlib.sha256(storage.read_bytes(task)).hexdigest()
    stage_cfg = stage_config(cfg, model_cfg, seq_len=model_cfg.block_size,
                             train={"steps": ft.steps, "micro_batch_size": ft.micro_batch_size,
                                    "eval_every": ft.eval_every, "checkpoint_every": ft.eval_every,
                                    "eval_batches": ft.eval_batches, "log_every": ft.log_every},
                             optim={"lr": ft.lr, "warmup_steps": ft.warmup_steps})
    run = storage.normalize(run)
    job = Job(stage="finetune", config=stage_cfg.model_dump(mode="json"), data=task, run=run, init=ref.url,
              extra={"task_sha256": task_sha})
    metrics = fit(job, stage_cfg, run_worker, address=address, make_source=make_source, trainer_cls=FinetuneTrainer)
    best = best_checkpoint(run)
    keys = ("step", "train_loss", "val_loss", "val_ppl", "val_bpb", "best_val_loss", "stopped_early")
    return {"command": "finetune", "run": run, "init": ref.url, "examples": n_examples, "truncated": truncated,
            **{k: metrics.get(k) for k in keys}, "checkpoint": best.url if best else metrics.get("checkpoint")}


def _prepared_dataset(task: str):
    """The manifest if `task` is a folder written by `prepare`, else None."""
    from genpt_dist.data.manifest import MANIFEST, load_manifest

    return load_manifest(task) if storage.exists(storage.join(task, MANIFEST)) else None
