"""The few collectives the loops use, written so that they also run with no process group (one
process, world size 1: the in-process tests and single-worker runs)."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values: list[float], world: int) -> list[float]:
    """Element-wise mean of `values` over all `world` ranks."""
    return [v / world for v in all_reduce_sum(values)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    box = [obj]
    if _distributed():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _distributed():
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def init_single_process_group(device: torch.device | str = "cpu") -> None:
    """A one-rank process group on 127.0.0.1 (DeepSpeed needs one): gloo and DeepSpeed's cpu accelerator,
    or nccl and cuda on a GPU. A no-op where a group exists (inside Ray Train, or called before)."""
    if dist.is_initialized():
        return
    device = torch.device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK=str(device.index or 0),
        DS_ACCELERATOR=device.type,
    )  # DeepSpeed's device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
