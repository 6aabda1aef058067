"""Elastic resume: a checkpoint written by N workers, resumed by M, with its optimizer state.

ZeRO stages 1-3 write one optimizer shard per rank (`[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`):
that rank's slice of the flat fp32 master weights and of every Adam moment, cut for the world size of
the run that wrote it, and DeepSpeed refuses to load a shard set of another size. When Ray Train
restarts a run with another number of workers (an elastic `num_workers: [min, max]` after a node
loss or gain, or a run resumed with another `scaling.num_workers`), the resume re-partitions
instead of starting a fresh optimizer:

1. `resharded` converts every DeepSpeed checkpoint folder of the rank's local copy (the policy's
   `ds/` and any other engine's, such as the adversarial stage's discriminator) with DeepSpeed's
   `ds_to_universal` into the universal layout: per parameter, the full fp32 weights, the full Adam
   moments and the step (`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`), tied to no world size.
2. While the resume runs inside `resharded`, the trainer's engines load with DeepSpeed's
   `checkpoint.load_universal` setting: each rank cuts its own partition out of the full tensors;
   module weights, LR scheduler and step counters come from the model-states file as usual.
ZeRO 0 keeps the whole optimizer state in the model-states file (nothing to re-partition), so such
checkpoints load as they are. Every rank converts its own downloaded copy: no shared filesystem is
needed, at the price of each rank doing the (model-size proportional, seconds for small models) work.

Two more things depend on the world size, and are kept:
* the global batch (micro_batch_size x grad_accum x workers): `grad_accum_for` keeps the
  checkpoint's global batch by scaling grad_accum when it divides evenly, so the LR schedule and the
  Adam moments keep meaning what they meant; a fresh elastic run starts with the global batch of its
  largest size. Only for the MLE loop (`train.loop.run_mle`); the RL stage sizes its batches
  itself (prompts_per_step is already global).
* the loader position, counted in this rank's batches: `loader_state_for` rescales it so that the
  same share of the epoch counts as consumed.
Not kept: the exact sample order (each rank reads a contiguous slice of the epoch, and the slices
move with the world size) and RNG streams of ranks that did not exist before (they keep their seed).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from genpt_dist.meta import CheckpointMeta

log = logging.getLogger(__name__)

_SHARD = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def zero_shard_folders(root: Path) -> list[Path]:
    """DeepSpeed checkpoint tag folders under `root` that hold per-rank ZeRO optimizer shards."""
    return sorted({p.parent for p in root.rglob("*_optim_states.pt") if _SHARD.match(p.name)})


def to_universal(tag_folder: Path) -> None:
    """Replace a sharded DeepSpeed tag folder by its universal form, in place (same path and tag)."""
    from genpt_dist.train.deepspeed import load_deepspeed

    load_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    sharded = tag_folder.with_name(tag_folder.name + ".sharded")
    tag_folder.rename(sharded)
    args = argparse.Namespace(
        input_folder=str(sharded),
        output_folder=str(tag_folder),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    # ds_to_universal prints its progress to stdout, which belongs to the command's JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        ds_to_universal.main(args)


@contextlib.contextmanager
def resharded(folder: Path, saved_world: int, world: int, engines: Iterable[Any], rank: int = 0) -> Iterator[None]:
    """Inside this block, `engine.load_checkpoint` of the local checkpoint copy `folder` works for
    this world size: when it differs from the one that wrote the checkpoint, the ZeRO shards are
    converted to the universal layout and the engines load that layout."""
    folders = zero_shard_folders(folder) if saved_world != world else []
    if not folders:
        yield
        return
    if rank == 0:
        log.warning(
            "checkpoint written by %d workers, resumed by %d: re-partitioning the optimizer state of %s",
            saved_world,
            world,
            ", ".join(str(f.relative_to(folder)) for f in folders),
        )
    for tag_folder in folders:
        to_universal(tag_folder)
    # DeepSpeed reads `checkpoint.load_universal` only while loading, through this private attribute
    # (checked against deepspeed 0.19.8); it has no public setter, and a stage's other engines (the
    # discriminator's) are built from configs of their own.
    engines = list(engines)
    saved = [e._config.load_universal_checkpoint for e in engines]
    for e in engines:
        e._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        for e, value in zip(engines, saved):
            e._config.load_universal_checkpoint = value


def checkpoint_global_batch(meta: CheckpointMeta, seq_len: int) -> int | None:
    """Samples per optimizer step the checkpointed run trained with (None when it cannot tell)."""
    if meta.step <= 0 or meta.tokens_seen <= 0 or seq_len <= 0:
        return None
    return round(meta.tokens_seen / (meta.step * seq_len))


def grad_accum_for(
    accum: int, micro: int, worker_range: tuple[int, int], seq_len: int, world: int, meta: CheckpointMeta | None
) -> int:
    """grad_accum that keeps the run's global batch at this world size (see the module docstring):
    `accum` and `micro` are the recipe's, `worker_range` its (min, max) workers."""
    _, hi = worker_range
    target = checkpoint_global_batch(meta, seq_len) if meta is not None else micro * accum * hi
    if target is None or target == micro * accum * world:
        return accum
    if target % (micro * world):
        log.warning(
            "global batch %d is not a multiple of %d workers x micro batch %d: keeping grad_accum=%d (global batch %d)",
            target,
            world,
            micro,
            accum,
            micro * accum * world,
        )
        return accum
    log.info(
        "%d workers: grad_accum %d -> %d keeps the global batch of %d samples",
        world,
        accum,
        target // (micro * world),
        target,
    )
    return target // (micro * world)


def loader_state_for(meta: CheckpointMeta, micro_batch: int, world: int) -> dict[str, Any]:
    """The checkpoint's loader state for this world size: the same share of the epoch consumed."""
    state = dict(meta.loader)
    saved_micro = meta.micro_batch_size or micro_batch
    if (meta.world_size, saved_micro) == (world, micro_batch) or not isinstance(state.get("batch"), int):
        return state
    state["batch"] = state["batch"] * saved_micro * meta.world_size // (micro_batch * world)
    return state
