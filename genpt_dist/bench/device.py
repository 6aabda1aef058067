"""The device a benchmark measures on (`bench --device`): the same benches run on a CPU or a GPU.

`auto` takes the first CUDA GPU when this process sees one, else the CPU; `cuda` without a visible GPU
is a user error. On a GPU, timings wait for the device (`synchronize`) before reading the clock,
since kernels run asynchronously to the Python that launches them.
"""

from __future__ import annotations

import torch

from genpt_dist.errors import UserError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` -> the torch device the bench uses."""
    if name not in CHOICES:
        raise UserError(f"--device {name!r}: choose one of {', '.join(CHOICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this process sees no CUDA GPU (torch.cuda.is_available() is False)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    """What the figures were measured on, for the bench's JSON."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} threads"
