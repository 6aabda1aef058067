"""Published weights: state dicts packed into numpy arrays for the Ray object store.

The reading side maps the arrays from the object store without a copy; tied weights are stored
once and bfloat16 is kept as its raw bits.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class PackedState:
    """A state dict ready for the object store."""

    arrays: dict[str, np.ndarray]  # name -> host array (bfloat16 stored as its int16 bits)
    aliases: dict[str, str] = field(default_factory=dict)  # name -> name it shares storage with (tied weights)
    bf16: list[str] = field(default_factory=list)  # names whose arrays hold bfloat16 bits


def pack_state(state: Mapping[str, Tensor | np.ndarray] | PackedState) -> PackedState:
    """Host numpy arrays of a state dict; entries that share storage (tied weights) are stored once."""
    if isinstance(state, PackedState):
        return state
    arrays: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    bf16: list[str] = []
    seen: dict[tuple, str] = {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
            continue
        t = value.detach()
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.data_ptr() != 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
            bf16.append(name)
        arrays[name] = t.numpy()
    return PackedState(arrays=arrays, aliases=aliases, bf16=bf16)


def unpack_state(state: Mapping[str, Tensor | np.ndarray] | PackedState) -> dict[str, Tensor]:
    """Tensors of a packed (or plain) state dict; arrays from the object store are shared, not copied."""
    if not isinstance(state, PackedState):
        state = pack_state(state)
    out: dict[str, Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only object-store arrays; only read here
        for name, arr in state.arrays.items():
            t = torch.from_numpy(arr)
            out[name] = t.view(torch.bfloat16) if name in state.bf16 else t
    for name, src in state.aliases.items():
        out[name] = out[src]
    return out
