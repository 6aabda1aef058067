"""Validation loss, perplexity and bits-per-byte: the one implementation every caller uses.

Per batch of inputs `idx` (B, T) and next-token `targets` (B, T), -100 where no loss is taken:
summed nats of the model's cross-entropy (float32, `model.cross_entropy`), the number of targets and
the UTF-8 bytes those targets stand for (`data.packing.token_byte_lengths`; <eos> and other specials
count their nats and no bytes). Sums add across batches and ranks (`LossSums.tolist` /
`from_list` around an all-reduce), and only the totals become metrics:
    loss = nats / targets,  ppl = exp(loss),  bpb = nats / ln 2 / bytes.
So a figure does not depend on how the rows were cut into batches or ranks, and bits-per-byte
compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from genpt_dist.model.cross_entropy import cross_entropy


@dataclass
class LossSums:
    """Running totals over evaluated targets."""

    nats: float = 0.0  # summed cross-entropy, natural log
    targets: float = 0.0  # number of target tokens
    bytes: float = 0.0  # UTF-8 bytes the targets stand for

    def __iadd__(self, other: LossSums) -> LossSums:
        self.nats, self.targets, self.bytes = (
            self.nats + other.nats,
            self.targets + other.targets,
            self.bytes + other.bytes,
        )
        return self

    def tolist(self) -> list[float]:
        return [self.nats, self.targets, self.bytes]

    @classmethod
    def from_list(cls, values: list[float]) -> LossSums:
        nats, targets, n_bytes = values
        return cls(nats=nats, targets=targets, bytes=n_bytes)

    @property
    def loss(self) -> float:
        return self.nats / max(self.targets, 1)

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        """`{prefix}loss` (nats/target), `{prefix}ppl` and `{prefix}bpb`."""
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}ppl": math.exp(min(self.loss, 700.0)),
            f"{prefix}bpb": self.nats / math.log(2) / max(self.bytes, 1),
        }


@torch.no_grad()
def batch_loss_sums(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    targets: torch.Tensor,
    byte_table: torch.Tensor,
    temperature: float = 1.0,
) -> LossSums:
    """Totals of one batch. `logits_of(idx)` gives (B, T, V) logits (a bare model, a DeepSpeed engine);
    `byte_table` (V,) holds each token's UTF-8 byte count; logits are divided by `temperature`."""
    logits = logits_of(idx)  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    ce = cross_entropy(logits, targets)  # (B, T), 0 where targets == -100
    valid = targets != -100  # (B, T)
    picked = targets[valid]  # (n,)
    return LossSums(
        nats=float(ce.double().sum()),
        targets=float(valid.sum()),
        bytes=float(byte_table.to(picked.device)[picked].sum()),
    )
