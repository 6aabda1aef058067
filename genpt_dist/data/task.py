"""Downstream task data for `finetune`: prompt/completion JSONL, or plain text / JSONL `text`.

An example becomes <bos> prompt completion <eos> with the loss on the completion and <eos> only
(the prompt is masked), or <bos> text <eos> with the loss everywhere; text longer than the context is
cut into context-sized pieces. A prompt/completion example longer than the context is truncated
from the left of the prompt (counted) or refused, per `finetune.too_long`.
Examples are split into train/val by the hash of their text; batches are padded to the longest row.
Every rank gets the same number of batches per epoch (N // world examples each), like the shard loader.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genpt_dist import storage
from genpt_dist.config import FinetuneConfig
from genpt_dist.data.text import normalise
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class Example:
    tokens: list[int]  # <bos> ... <eos>
    loss_from: int  # first target position (in tokens[1:]) that carries loss


@dataclass
class TaskData:
    train: list[Example]
    val: list[Example]
    kind: str  # "prompt-completion" | "text"
    truncated: int  # examples cut to fit the context


def _records(url: str) -> list[tuple[int, Any]]:
    """(line number, record) pairs; a .txt file is one text record."""
    data = storage.read_bytes(url)
    text, _ = normalise(data)
    if text is None:
        raise UserError(f"task {url} is a binary file")
    if not url.removesuffix(".gz").endswith(".jsonl"):
        return [(1, {"text": text})] if text.strip() else []
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError:
                raise UserError(f"task {url}:{lineno}: not valid JSON") from None
    return out


def _in_val(tokens: list[int], fraction: float) -> bool:
    h = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def load_task(url: str, tok: Tokenizer, cfg: FinetuneConfig, block_size: int) -> TaskData:
    """Parse, validate and tokenise a task file (local or s3://)."""
    if not storage.exists(url):
        raise UserError(f"task file {url} does not exist")
    records = _records(url)
    if not records:
        raise UserError(f"task {url} holds no examples")
    first = records[0][1]
    pc = isinstance(first, dict) and cfg.prompt_field in first
    examples: list[Example] = []
    truncated = 0
    limit = block_size + 1
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"task {url}:{lineno}: expected a JSON object")
        if pc:
            prompt, completion = rec.get(cfg.prompt_field), rec.get(cfg.completion_field)
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise UserError(
                    f"task {url}:{lineno}: needs string fields {cfg.prompt_field!r} and {cfg.completion_field!r}"
                )
            if not completion.strip():
                raise UserError(f"task {url}:{lineno}: empty {cfg.completion_field!r}")
            p, c = tok.encode(prompt), tok.encode(completion) + [tok.eos_id]
            if 1 + len(p) + len(c) > limit:
                if cfg.too_long == "refuse" or 1 + len(c) >= limit:
                    raise UserError(
                        f"task {url}:{lineno}: {1 + len(p) + len(c)} tokens do not fit the "
                        f"{block_size}-token context (finetune.too_long={cfg.too_long})"
                    )
                p = p[len(p) - (limit - 1 - len(c)) :]
                truncated += 1
            examples.append(Example([tok.bos_id, *p, *c], loss_from=len(p)))
        else:
            text = rec.get(cfg.text_field)
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"task {url}:{lineno}: needs a non-empty string field {cfg.text_field!r}")
            ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
            if len(ids) > limit:
                if cfg.too_long == "refuse":
                    raise UserError(
                        f"task {url}:{lineno}: {len(ids)} tokens do not fit the {block_size}-token "
                        f"context (finetune.too_long=refuse)"
                    )
                truncated += 1
            for i in range(0, max(len(ids) - 1, 1), block_size):
                examples.append(Example(ids[i : i + limit], loss_from=0))
    val = [e for e in examples if _in_val(e.tokens, cfg.val_fraction)]
    train = [e for e in examples if not _in_val(e.tokens, cfg.val_fraction)]
    if not val and len(train) > 1:  # tiny tasks: hold back at least one example
        val = [train.pop()]
    if not train:
        raise UserError(f"task {url}: too few examples for a train/val split ({len(examples)})")
    return TaskData(train=train, val=val, kind="prompt-completion" if pc else "text", truncated=truncated)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples -> (idx (B, L), targets (B, L)) padded to the longest; masked targets are -100."""
    width = max(len(e.tokens) for e in examples) - 1
    idx = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        t = torch.tensor(e.tokens, dtype=torch.long)
        n = len(t) - 1
        idx[row, :n] = t[:-1]
        targets[row, e.loss_from : n] = t[1 + e.loss_from :]
    return idx, targets


class ExampleLoader:
    """Equal batch counts on every rank; resumable by (epoch, batch)."""

    def __init__(
        self, examples: list[Example], *, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool
    ):
        self.examples, self.batch_size, self.rank, self.world = examples, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = len(examples) // world_size
        if self.per_rank == 0:
            raise UserError(f"{len(examples)} task examples are fewer than the {world_size} workers")
        self.batches_per_epoch = -(-self.per_rank // batch_size)
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def iter_epoch(self) -> Iterator[list[Example]]:
        mine = self._order(self.epoch)[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        while self.batch < self.batches_per_epoch:
            lo = self.batch * self.batch_size
            self.batch += 1
            yield [self.examples[i] for i in mine[lo : lo + self.batch_size]]
        self.epoch, self.batch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[list[Example]]:
        while True:
            yield from self.iter_epoch()
