"""Which torch device a command runs on (`--device` of generate, evaluate and bench), and waiting for it.

`auto` (or None) takes the GPU when this process sees one, else the CPU; `cpu`, `cuda` and `cuda:N`
are taken as given, and a CUDA device without a visible GPU is a user error. GPU kernels run
asynchronously to the Python that launches them, so a timing waits for the device (`synchronize`)
before reading the clock.
"""

from __future__ import annotations

import torch

from genpt_dist.errors import UserError


def pick_device(device: str | None) -> torch.device:
    """`auto` | None | `cpu` | `cuda` | `cuda:N` -> the torch device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"bad --device {device!r} (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here")
    return dev


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    """What figures were measured on, for a benchmark's JSON."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} threads"
