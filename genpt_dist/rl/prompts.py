"""The prompt source of the `reinforce` stage: a prompt file, a held-out split, and a resumable loader.

Formats
-------
A prompt file is JSONL (``.jsonl``, or gzipped ``.jsonl.gz``) or parquet (``.parquet``, read with
pyarrow), at a local path or an ``s3://`` URL, read whole through ``storage``. As in TRL, each row has a
``prompt`` field (the name is configurable) holding a string; the row's other fields travel with the
prompt, unchanged, as ``Prompt.columns`` and reach the user's reward functions (a reference answer, a
test case, a label). JSONL: one JSON object per line, blank lines skipped, UTF-8 (a BOM is allowed).
Parquet: every column is read; ``columns`` holds the values as pyarrow's ``to_pylist`` gives them.
``Prompt.index`` is the row's place in the file, 0-based: the line number minus one for JSONL (blank
lines count, so error messages can name ``line index + 1``), the row number for parquet. Anything wrong
with the file is a one-line ``UserError`` that names it.

Held-out split
--------------
``split_held_out`` sends a prompt to the held-out side when the first 8 bytes of sha256(text), read as
a fraction of 2**64, fall below ``fraction``. The split depends on the text alone: the same on every run,
machine and rank, stable when rows are added or reordered, and duplicates of a prompt land on one side
(no train/held-out leak).

The shuffle
-----------
``PromptLoader`` yields global batches of ``batch_size`` prompts. Epoch e visits the prompts in
``numpy.random.default_rng(SeedSequence((seed, e))).permutation(n)``: a fresh order per epoch, derived
from the run's seed and the epoch alone, never from process state. An epoch holds ``n // batch_size``
batches; the ``n % batch_size`` prompts at the end of its permutation are dropped for that epoch (a
partial batch would make ranks uneven); other epochs' permutations reach them.

Split by rank
-------------
Every rank builds the same loader from the same file and seed, so all ranks see the same global batch at
every step; ``rank_slice(batch, rank, world)`` gives rank r the contiguous slice
``batch[r * k:(r + 1) * k]`` with ``k = len(batch) // world`` (the batch must divide evenly). Nothing
is sent between ranks, and the slices of one global batch partition it.

Resume
------
The loader's position is ``{"epoch": e, "batch": b}``: the next batch to give is batch b of epoch e.
Since an epoch's order is a function of (seed, e), ``load_state_dict`` on a loader built from the same
prompts, batch size and seed continues with exactly the batches an uninterrupted loader gives. (With a
different prompt file or batch size the position still loads if it is in range, but the order differs.)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from genpt_dist import storage
from genpt_dist.errors import UserError

EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class Prompt:
    """One row of a prompt file."""

    index: int  # row in the file (0-based; JSONL: line - 1), stable across epochs
    text: str  # the prompt
    columns: dict[str, Any]  # the row's other fields (JSON values), passed to reward functions


# ---------------------------------------------------------------- reading


def load_prompts(src: str, prompt_field: str = "prompt") -> list[Prompt]:
    """JSONL (`.jsonl`, `.jsonl.gz`) or parquet (`.parquet`, read with pyarrow) from a local path or s3:// URL."""
    return parse_prompts(src, read_prompt_file(src), prompt_field)


def read_prompt_file(src: str) -> bytes:
    """The bytes of a prompt file of a known type; a one-line UserError for another type or a missing file."""
    if not src.lower().endswith(EXTENSIONS):
        raise UserError(f"{src}: unknown prompt file type (accepted: {', '.join(EXTENSIONS)})")
    try:
        return storage.read_bytes(src)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{src}: prompt file does not exist") from None


def parse_prompts(src: str, data: bytes, prompt_field: str) -> list[Prompt]:
    """The prompts in the bytes of file `src` (its name picks the format and names it in errors)."""
    lower = src.lower()
    if lower.endswith(".parquet"):
        prompts = _parse_parquet(src, data, prompt_field)
    else:
        if lower.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as exc:
                raise UserError(f"{src}: not a valid gzip file ({_one_line(exc)})") from None
        prompts = _parse_jsonl(src, data, prompt_field)
    if not prompts:
        raise UserError(f"{src}: no prompts (the file has no rows)")
    return prompts


def _parse_jsonl(src: str, data: bytes, field: str) -> list[Prompt]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{src}: line {lineno} is not valid UTF-8") from None
    prompts = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{src}: line {i + 1} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{src}: line {i + 1} is a JSON {_json_type(row)}, not an object")
        prompts.append(_prompt(src, f"line {i + 1}", i, row, field))
    return prompts


def _parse_parquet(src: str, data: bytes, field: str) -> list[Prompt]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as exc:
        raise UserError(f"{src}: not a valid parquet file ({_one_line(exc)})") from None
    if field not in table.column_names:
        raise UserError(f"{src}: no column {field!r} (columns: {', '.join(table.column_names) or 'none'})")
    return [_prompt(src, f"row {i} (0-based)", i, row, field) for i, row in enumerate(table.to_pylist())]


def _prompt(src: str, where: str, index: int, row: dict[str, Any], field: str) -> Prompt:
    if field not in row:
        has = ", ".join(repr(k) for k in row) or "none"
        raise UserError(f"{src}: {where} has no {field!r} field (fields: {has})")
    text = row[field]
    if not isinstance(text, str):
        raise UserError(f"{src}: {where}: {field!r} must be a string, not a JSON {_json_type(text)}")
    return Prompt(index=index, text=text, columns={k: v for k, v in row.items() if k != field})


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------- checks and the held-out split


def check_prompt_lengths(
    prompts: list[Prompt], encode: Callable[[str], list[int]], max_new_tokens: int, context: int, src: str
) -> None:
    """<bos> + tokens + max_new_tokens must fit the model's context: UserError naming the first prompt that does not
    (its row number, 1-based line for JSONL, its token count, and the limit)."""
    limit = context - 1 - max_new_tokens
    if limit < 0:
        raise UserError(f"{src}: max_new_tokens {max_new_tokens} + <bos> exceed the model's context of {context}")
    parquet = src.lower().endswith(".parquet")
    for p in prompts:
        n = len(encode(p.text))
        if n > limit:
            where = f"row {p.index} (0-based)" if parquet else f"line {p.index + 1}"
            raise UserError(
                f"{src}: the prompt at {where} has {n} tokens; at most {limit} fit "
                f"(context {context} = <bos> + prompt + max_new_tokens {max_new_tokens})"
            )


def _unit_hash(text: str) -> float:
    """A number in [0, 1) from the text alone (sha256: the same in every process, unlike `hash`)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(prompts: list[Prompt], fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic train / held-out split by a hash of the prompt text (same split on every run and machine);
    fraction 0 -> no held-out prompts. Raise UserError if fraction > 0 leaves either side empty."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(prompts), []
    train: list[Prompt] = []
    held_out: list[Prompt] = []
    for p in prompts:
        (held_out if _unit_hash(p.text) < fraction else train).append(p)
    if not train or not held_out:
        empty = "train" if not train else "held-out"
        raise UserError(
            f"held-out fraction {fraction} of {len(prompts)} prompts leaves the {empty} side empty "
            f"({len(train)} train, {len(held_out)} held-out)"
        )
    return train, held_out


# ---------------------------------------------------------------- the loader


def rank_slice(batch: list[Prompt], rank: int, world: int) -> list[Prompt]:
    """Rank `rank`'s contiguous share of a global batch: `batch[rank * k:(rank + 1) * k]`, k = len // world."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if len(batch) % world:
        raise UserError(f"a batch of {len(batch)} prompts does not split evenly over {world} ranks")
    k = len(batch) // world
    return batch[rank * k : (rank + 1) * k]


class PromptLoader:
    """Global batches of `batch_size` prompts: epoch e visits the prompts in a permutation seeded by (seed, e)
    (torch.Generator or numpy default_rng seeded with a value derived from both); a partial last batch of an epoch is
    dropped (it would make ranks uneven); every rank builds the same loader and takes its own contiguous slice
    of each global batch (`rank_slice(batch, rank, world)`). Resumable exactly."""

    def __init__(self, prompts: list[Prompt], *, batch_size: int, seed: int):
        if batch_size < 1:
            raise UserError(f"prompt batch size must be at least 1, got {batch_size}")
        if batch_size > len(prompts):
            raise UserError(f"prompt batch size {batch_size} is larger than the {len(prompts)} prompts")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(self.prompts) // batch_size
        self.epoch = 0  # the next batch to give is batch `batch` of epoch `epoch`
        self.batch = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), cached

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            # SeedSequence takes non-negative entropy; seed % 2**64 maps any int seed there.
            rng = np.random.default_rng(np.random.SeedSequence((self.seed % 2**64, epoch)))
            self._order = (epoch, rng.permutation(len(self.prompts)))
        return self._order[1]

    def next_batch(self) -> list[Prompt]:
        order = self._permutation(self.epoch)
        start = self.batch * self.batch_size
        out = [self.prompts[i] for i in order[start : start + self.batch_size]]
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"prompt loader state {state!r} is not {{'epoch': int, 'batch': int}}") from None
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise UserError(
                f"prompt loader state {state!r} does not fit {len(self.prompts)} prompts in batches of "
                f"{self.batch_size} ({self.batches_per_epoch} batches an epoch)"
            )
        self.epoch, self.batch = epoch, batch
