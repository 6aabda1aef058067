"""Per-token cross-entropy over the vocabulary, computed in float32 a few rows at a time.

``F.cross_entropy(logits.float(), ...)`` writes a float32 copy of the whole (N, V) logits, then a
float32 log-softmax of it, and on the way back a float32 gradient that is cast to the logits' dtype:
four full passes over N x V values, which stream through memory: on a CPU a noticeable share of a
small model's training step (BENCHMARKS.md, "bench train"); on a GPU the float32 copies of GPT-2's
50,304-wide logits take gigabytes.

Algorithm (exact, float32 arithmetic; the result equals ``F.cross_entropy(logits.float(), targets,
ignore_index=-100, reduction="none")`` up to rounding):

    forward, for each chunk of rows r:   z = logits[r].float()
                                         lse[r] = logsumexp(z)          (N,) kept for backward
                                         loss[r] = lse[r] - z[target]   0 where target == -100
    backward, for each chunk of rows r:  grad[r] = (exp(z - lse[r]) - onehot(target)) * dloss[r]

written straight into a gradient of the logits' dtype. A chunk holds about ``chunk_elements`` values:
~2 MB of float32 on a CPU, so it stays in cache; 64 M values on a GPU, which bounds the extra memory
while keeping kernel launches few.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
CPU_CHUNK_ELEMENTS = 1 << 19  # 2 MiB of float32: a chunk stays in a core's L2 cache
GPU_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, rows: int) -> Tensor:
        N = logits.shape[0]
        valid = targets != IGNORE_INDEX  # (N,)
        safe = torch.where(valid, targets, 0)  # (N,)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)  # (N,)
        picked = torch.empty(N, dtype=torch.float32, device=logits.device)  # (N,)
        for s in range(0, N, rows):
            z = logits[s : s + rows].float()  # (r, V)
            lse[s : s + rows] = torch.logsumexp(z, dim=-1)
            picked[s : s + rows] = z.gather(1, safe[s : s + rows, None]).squeeze(1)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.rows = rows
        return torch.where(valid, lse - picked, 0.0)  # (N,)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        rows = ctx.rows
        scale = torch.where(valid, grad_loss.float(), 0.0)  # (N,)
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype
        minus_one = torch.full((min(rows, logits.shape[0]), 1), -1.0, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            p = (logits[s : s + rows].float() - lse[s : s + rows, None]).exp_()  # (r, V) softmax
            p.scatter_add_(1, safe[s : s + rows, None], minus_one[: p.shape[0]])  # - onehot(target)
            grad[s : s + rows] = p.mul_(scale[s : s + rows, None])
        return grad, None, None


def cross_entropy(logits: Tensor, targets: Tensor, chunk_elements: int | None = None) -> Tensor:
    """Per-token cross-entropy (float32, shape of ``targets``) of ``logits`` (..., V); -100 targets give 0.

    ``chunk_elements`` (default: by device, see the module docstring) sets how many logits are
    converted to float32 at a time."""
    V = logits.shape[-1]
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else GPU_CHUNK_ELEMENTS
    rows = max(1, chunk_elements // V)
    flat = _ChunkedCrossEntropy.apply(logits.reshape(-1, V), targets.reshape(-1), rows)
    return flat.view(targets.shape)
