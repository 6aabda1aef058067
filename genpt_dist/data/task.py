"""Downstream task data for `finetune`: prompt/completion JSONL, or plain text / JSONL `text`.

Inputs: a `.jsonl` file (one example per line), a text file (one example), either of them `.gz` or
`.zst` compressed; a `.parquet` file, or a folder written by Hugging Face `datasets`' `save_to_disk`
(its arrow files), one example per row, read a batch of rows at a time (`data.text.ColumnarFile`).
A JSONL task is prompt/completion when its first record has `prompt_field`; a columnar one when it has
that column. Messages name a JSONL example by `file:line`, a columnar one by `file row N`.

An example becomes <bos> prompt completion <eos> with the loss on the completion and <eos> only
(the prompt is masked), or <bos> text <eos> with the loss everywhere; text longer than the context is
cut into context-sized pieces. A prompt/completion example longer than the context is truncated
from the left of the prompt (counted) or refused, per `finetune.too_long`.
Examples are split into train/val by the hash of their tokens; a task of fewer than SMALL_TASK_EXAMPLES
examples is split by position instead: the last `val_fraction` of them (at least one) are val, logged
and named in `TaskData.split`. Batches are padded to the longest row.
Every rank gets the same number of batches per epoch (N // world examples each), like the shard loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genpt_dist import storage
from genpt_dist.config import FinetuneConfig
from genpt_dist.data.text import (
    COLUMNAR,
    DATASETS_DICT,
    ColumnarFile,
    datasets_files,
    normalise,
    read_file_bytes,
    uncompressed_name,
)
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)
IGNORE = -100
# Fewer examples than this: the last val_fraction of them (at least one) are val, by position; a hash
# split of a handful of examples is as likely to hold back none, or half of them.
SMALL_TASK_EXAMPLES = 50


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
    split: str = "hash"  # how val was chosen: "hash", or "position (N examples < SMALL_TASK_EXAMPLES)"


def _records(url: str, text_field: str) -> list[tuple[str, Any]]:
    """(where, record) pairs of a JSONL or text file, where = `url:line`; a text file is one text record."""
    text, _ = normalise(read_file_bytes(url))
    if text is None:
        raise UserError(f"task {url} is a binary file")
    if not uncompressed_name(url).endswith(".jsonl"):
        return [(f"{url}:1", {text_field: text})] if text.strip() else []
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append((f"{url}:{lineno}", json.loads(line)))
            except json.JSONDecodeError:
                raise UserError(f"task {url}:{lineno}: not valid JSON") from None
    return out


def _columnar_records(label: str, files: list[str], cfg: FinetuneConfig) -> tuple[bool, Iterator[tuple[str, Any]]]:
    """(prompt/completion?, (where, record) pairs) of parquet / arrow files read a batch at a time, where =
    `label row N` counted over all of them; only the columns the task uses are read."""
    first = ColumnarFile(files[0])
    pc = cfg.prompt_field in first.columns
    names = [cfg.prompt_field, cfg.completion_field] if pc else [cfg.text_field]
    hint = "" if pc else f" (set finetune.text_field; prompt/completion examples need a {cfg.prompt_field!r} column)"

    def rows() -> Iterator[tuple[str, Any]]:
        row = 0
        for i, url in enumerate(files):
            table = first if i == 0 else ColumnarFile(url)
            table.require(names, f"task {label}", hint)
            for batch in table.batches(names):
                for j in range(len(batch[names[0]])):
                    row += 1
                    yield f"{label} row {row}", {n: batch[n][j] for n in names}

    return pc, rows()


def _task_files(url: str) -> list[str]:
    """[url] for a task file, the arrow files of a `datasets` folder; a one-line UserError otherwise."""
    if storage.exists(url):
        return [url]
    files = datasets_files(url)
    if files is not None:
        if not files:
            raise UserError(f"task {url} holds no examples")
        return files
    if storage.exists(storage.join(url, DATASETS_DICT)):
        raise UserError(f"task {url} is a datasets DatasetDict: pass one split's folder (e.g. {url}/train)")
    raise UserError(f"task file {url} does not exist")


def _in_val(tokens: list[int], fraction: float) -> bool:
    h = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def load_task(url: str, tok: Tokenizer, cfg: FinetuneConfig, block_size: int) -> TaskData:
    """Parse, validate and tokenise a task (a file or a `datasets` folder, local or s3://)."""
    files = _task_files(url)
    records: Iterable[tuple[str, Any]]
    if all(f.endswith(COLUMNAR) for f in files):
        pc, records = _columnar_records(url, files, cfg)
    else:
        records = _records(url, cfg.text_field)
        if not records:
            raise UserError(f"task {url} holds no examples")
        first = records[0][1]
        pc = isinstance(first, dict) and cfg.prompt_field in first
    examples: list[Example] = []
    truncated = 0
    limit = block_size + 1
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"task {where}: expected a JSON object")
        if pc:
            prompt, completion = rec.get(cfg.prompt_field), rec.get(cfg.completion_field)
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise UserError(f"task {where}: needs string fields {cfg.prompt_field!r} and {cfg.completion_field!r}")
            if not completion.strip():
                raise UserError(f"task {where}: empty {cfg.completion_field!r}")
            p, c = tok.encode(prompt), tok.encode(completion) + [tok.eos_id]
            if 1 + len(p) + len(c) > limit:
                if cfg.too_long == "refuse" or 1 + len(c) >= limit:
                    raise UserError(
                        f"task {where}: {1 + len(p) + len(c)} tokens do not fit the "
                        f"{block_size}-token context (finetune.too_long={cfg.too_long})"
                    )
                p = p[len(p) - (limit - 1 - len(c)) :]
                truncated += 1
            examples.append(Example([tok.bos_id, *p, *c], loss_from=len(p)))
        else:
            text = rec.get(cfg.text_field)
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"task {where}: needs a non-empty string field {cfg.text_field!r}")
            ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
            if len(ids) > limit:
                if cfg.too_long == "refuse":
                    raise UserError(
                        f"task {where}: {len(ids)} tokens do not fit the {block_size}-token "
                        f"context (finetune.too_long=refuse)"
                    )
                truncated += 1
            for i in range(0, max(len(ids) - 1, 1), block_size):
                examples.append(Example(ids[i : i + limit], loss_from=0))
    if not examples:
        raise UserError(f"task {url} holds no examples")
    train, val, split = split_examples(examples, cfg.val_fraction)
    if split != "hash":
        log.info(
            "task %s: %d examples, split by position: the last %d are val (%s)", url, len(examples), len(val), split
        )
    if not train:
        raise UserError(f"task {url}: too few examples for a train/val split ({len(examples)})")
    kind = "prompt-completion" if pc else "text"
    return TaskData(train=train, val=val, kind=kind, truncated=truncated, split=split)


def split_examples(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example], str]:
    """(train, val, rule): by the hash of each example's tokens, or below SMALL_TASK_EXAMPLES by position
    (the last `val_fraction` of them, at least one, while one is left to train on)."""
    n = len(examples)
    if n < SMALL_TASK_EXAMPLES:
        n_val = min(max(1, int(n * val_fraction)), n - 1)
        return examples[: n - n_val], examples[n - n_val :], f"position ({n} examples < {SMALL_TASK_EXAMPLES})"
    val = [e for e in examples if _in_val(e.tokens, val_fraction)]
    train = [e for e in examples if not _in_val(e.tokens, val_fraction)]
    if not val and len(train) > 1:  # hold back at least one example
        val = [train.pop()]
    return train, val, "hash"


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
