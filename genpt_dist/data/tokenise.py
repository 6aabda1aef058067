"""Tokenising a corpus in bounded memory: source files -> work units -> a token spill file on local disk.

Algorithm:
1. `plan_units`: the source files, in order, become work units of about `data.unit_bytes`: consecutive
   files together, and an uncompressed text or JSONL file of `data.range_min_bytes` or more alone in units of one
   byte range each (`Part`). A range ends at the first cut point at or after its nominal end (`snap`)
   and the next range starts there, so every byte is read exactly once. In a JSONL file a cut point
   follows any newline. A text file is one document; its cut points follow a newline between a visible
   ASCII character and a letter or digit, where the byte-level pre-tokenizer always splits
   (`tokenizer._PIECE_START`), so the ids are those of the whole document. Cut points are ASCII, so no
   UTF-8 sequence and no CRLF pair is ever cut. The split key of a document read in ranges is the
   file's sha256 (not its normalised text's, which no range sees whole); whether the file is binary is
   decided by its first 8 KiB in every range.
2. `tokenise_unit` (a Ray task, spread over the nodes, one per core with the tokenizer on one thread:
   `tokenise_unit_one_thread`; or in the driver for a small corpus): read, normalise, tokenise. It
   returns one token array holding each document wrapped in <bos> ... <eos> (a ranged document: <bos>
   in its first range, <eos> in its last), each fragment's length and split.
3. `tokenise_to_spill` (the driver) takes the units' results in source order, at most `in_flight` of them
   outstanding, and appends the tokens to `TokenSpill`'s file with a table of documents (length, in
   val): memory follows the units in flight, not the corpus. `TokenSpill.write_splits` then writes
   train.bin and val.bin from it, by document or by position, counting each split's bytes.
"""

from __future__ import annotations

import os
import re
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from genpt_dist import storage
from genpt_dist.config import DataConfig
from genpt_dist.data.manifest import SourceInfo
from genpt_dist.data.text import (
    COLUMNAR,
    COMPRESSED,
    ReadStats,
    doc_in_val,
    iter_document_batches,
    jsonl_documents,
    key_in_val,
    normalise,
    uncompressed_name,
)
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import Tokenizer

SNAP_WINDOW = 1 << 16  # bytes read at a time while looking for a cut point
COPY_TOKENS = 1 << 21  # tokens copied at once while writing the splits (an int64 lookup of each: 16 MB)
_TEXT_CUT = re.compile(rb"(?<=[!-~])\n(?=[A-Za-z0-9])")  # tokenizer._PIECE_START, on bytes
_LINE_CUT = re.compile(rb"\n")


@dataclass(frozen=True)
class Part:
    """A whole source file (`end` None) or the nominal byte range [start, end) of a large one; `key` is a
    ranged text file's sha256 (its document's split key), `size` the file's size."""

    url: str
    start: int = 0
    end: int | None = None
    size: int = 0
    key: str = ""

    @property
    def ranged(self) -> bool:
        return self.end is not None

    @property
    def nbytes(self) -> int:
        return (self.size if self.end is None else self.end) - self.start

    @property
    def jsonl(self) -> bool:
        return uncompressed_name(self.url).endswith(".jsonl")


def _rangeable(url: str) -> bool:
    return not url.endswith(COMPRESSED) and not url.endswith(COLUMNAR)


def plan_units(sources: list[SourceInfo], unit_bytes: int, range_min: int) -> list[list[Part]]:
    """Sources (in order) -> work units of about `unit_bytes` (files of `range_min` or more: ranges)."""
    units: list[list[Part]] = []
    current: list[Part] = []
    current_bytes = 0
    for src in sources:
        if src.bytes >= range_min and _rangeable(src.url):
            if current:
                units.append(current)
                current, current_bytes = [], 0
            for start in range(0, src.bytes, unit_bytes):
                end = min(start + unit_bytes, src.bytes)
                units.append([Part(src.url, start, end, src.bytes, src.sha256)])
            continue
        current.append(Part(src.url, size=src.bytes))
        current_bytes += src.bytes
        if current_bytes >= unit_bytes:
            units.append(current)
            current, current_bytes = [], 0
    if current:
        units.append(current)
    return units


def snap(url: str, offset: int, size: int, pattern: re.Pattern[bytes]) -> int:
    """The first cut point at or after `offset` (the position just after a matching newline), else `size`."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    lo, window = max(offset - 2, 0), SNAP_WINDOW
    while True:
        hi = min(offset + window, size)
        data = storage.read_bytes(url, lo, hi)
        for match in pattern.finditer(data):
            if lo + match.end() >= offset:
                return lo + match.end()
        if hi == size:
            return size
        window *= 2  # a match whose lookahead fell past the window is found in the wider one


def _range_text(part: Part, stats: ReadStats) -> tuple[str | None, int]:
    """A ranged part's normalised text (None: the file is binary) and the byte it starts at; the file's
    counts go to its first range."""
    assert part.end is not None
    pattern = _LINE_CUT if part.jsonl else _TEXT_CUT
    lo, hi = snap(part.url, part.start, part.size, pattern), snap(part.url, part.end, part.size, pattern)
    head = storage.read_bytes(part.url, 0, min(8192, part.size))
    text, replaced = normalise(storage.read_bytes(part.url, lo, hi) if hi > lo else b"", head=head)
    first = part.start == 0
    if first:
        stats.files += 1
    if text is None:
        stats.binary_skipped += first
        return None, lo
    stats.replacement_chars += replaced
    return text, lo


def iter_part_documents(part: Part, text_field: str, stats: ReadStats) -> Iterator[list[str]]:
    """A part's documents (a ranged text file: its range's text, a fragment of one document), in batches."""
    if not part.ranged:
        yield from iter_document_batches(part.url, text_field, stats)
        return
    text, start = _range_text(part, stats)
    if text is None:
        return
    if part.jsonl:
        docs = jsonl_documents(text, part.url, text_field, start=start)
        kept = [d for d in docs if d.strip()]
        stats.empty_skipped += len(docs) - len(kept)
        stats.documents += len(kept)
        yield kept
    else:
        stats.documents += part.start == 0  # one document, counted once
        yield [text]


@dataclass
class UnitTokens:
    """One unit's tokens and its fragments: each a whole document, except a ranged text file's range,
    which `continues` the document of the unit before it when it is not the file's first."""

    tokens: np.ndarray
    lengths: list[int] = field(default_factory=list)
    in_val: list[bool] = field(default_factory=list)
    continues: bool = False
    stats: ReadStats = field(default_factory=ReadStats)
    node: str = ""


def tokenise_unit(parts: list[Part], tokenizer_json: str, cfg: dict[str, Any]) -> UnitTokens:
    """Read, normalise and tokenise one unit (in the driver or in a Ray task)."""
    data_cfg = DataConfig.model_validate(cfg)
    tok = Tokenizer.from_json(tokenizer_json)
    from genpt_dist.data.packing import token_dtype

    dtype = token_dtype(tok.vocab_size)
    bos, eos = np.array([tok.bos_id], dtype=dtype), np.array([tok.eos_id], dtype=dtype)
    by_hash = data_cfg.split == "hash"
    pieces: list[np.ndarray] = []
    out = UnitTokens(tokens=np.zeros(0, dtype))
    for part in parts:
        fragment_of_one = part.ranged and not part.jsonl
        for docs in iter_part_documents(part, data_cfg.text_field, out.stats):
            for text, ids in zip(docs, tok.encode_arrays(docs, dtype)):
                if fragment_of_one:
                    wrapped = [bos] * (part.start == 0) + [ids] + [eos] * (part.end == part.size)
                    out.continues = part.start > 0
                    in_val = by_hash and key_in_val(bytes.fromhex(part.key), data_cfg.val_fraction)
                else:
                    wrapped = [bos, ids, eos]
                    in_val = by_hash and doc_in_val(text, data_cfg.val_fraction)
                pieces.extend(wrapped)
                out.lengths.append(sum(len(w) for w in wrapped))
                out.in_val.append(in_val)
    out.tokens = np.concatenate(pieces) if pieces else out.tokens
    out.node = _node_id()
    return out


def tokenise_unit_one_thread(parts: list[Part], tokenizer_json: str, cfg: dict[str, Any]) -> UnitTokens:
    """`tokenise_unit` in a Ray task that holds one core: the tokenizers library's thread pool is off, so
    the tasks running side by side, one per core, do not share the cores with each other's threads."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return tokenise_unit(parts, tokenizer_json, cfg)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside a Ray worker: the driver's own process
        return ""


class TokenSpill:
    """The corpus's tokens in source order in `<dir>/stream.bin`, and its documents' lengths and splits."""

    def __init__(self, directory: str, dtype: np.dtype):
        self.dir, self.dtype = Path(directory), np.dtype(dtype)
        self.path = self.dir / "stream.bin"
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by `close`
        self.lengths = array("q")
        self.in_val = bytearray()
        self.stats = ReadStats()
        self.nodes: set[str] = set()

    def add(self, unit: UnitTokens) -> None:
        unit.tokens.astype(self.dtype, copy=False).tofile(self._file)
        for i, (n, v) in enumerate(zip(unit.lengths, unit.in_val)):
            if i == 0 and unit.continues and self.lengths:
                self.lengths[-1] += n
            else:
                self.lengths.append(n)
                self.in_val.append(v)
        self.stats.add(unit.stats)
        if unit.node:
            self.nodes.add(unit.node)

    def close(self) -> None:
        self._file.close()

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def documents_per_split(self) -> dict[str, int]:
        val = sum(self.in_val)
        return {"train": len(self.in_val) - val, "val": val}

    def write_splits(
        self, by_position: bool, val_fraction: float, seq_len: int, byte_len: np.ndarray
    ) -> dict[str, Split]:
        """train.bin / val.bin: by the documents' `in_val`, or (`by_position`) the last `val_fraction` of the
        tokens, at least one whole sample (seq_len + 1 tokens) where the stream holds two."""
        total = self.tokens
        if by_position:
            val = int(total * val_fraction)
            if val_fraction > 0 and val < seq_len + 1 <= total // 2:
                val = seq_len + 1
            runs = {"train": [(0, total - val)], "val": [(total - val, total)]}
        else:
            runs = {"train": [], "val": []}
            offset = 0
            for n, v in zip(self.lengths, self.in_val):
                spans = runs["val" if v else "train"]
                if spans and spans[-1][1] == offset:
                    spans[-1] = (spans[-1][0], offset + n)
                else:
                    spans.append((offset, offset + n))
                offset += n
        return {name: self._copy(name, spans, byte_len) for name, spans in runs.items()}

    def _copy(self, name: str, spans: list[tuple[int, int]], byte_len: np.ndarray) -> Split:
        path, size, nbytes = self.dir / f"{name}.bin", self.dtype.itemsize, 0
        with open(self.path, "rb") as src, open(path, "wb") as dst:
            for lo, hi in spans:
                src.seek(lo * size)
                for start in range(lo, hi, COPY_TOKENS):
                    chunk = np.fromfile(src, dtype=self.dtype, count=min(COPY_TOKENS, hi - start))
                    nbytes += int(byte_len[chunk].sum())
                    chunk.tofile(dst)
        return Split(str(path), sum(hi - lo for lo, hi in spans), nbytes, self.dtype)


@dataclass(frozen=True)
class Split:
    """One split's token stream on local disk."""

    path: str
    tokens: int
    bytes: int
    dtype: np.dtype

    def samples(self, rows: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
        """Samples `rows` of the packing (`packing.pack`: sample i = stream[i*T : i*T + T + 1], padded), read
        row by row in file order, a seek and a read each: memory is the rows', whatever the split's size
        (a memory map's resident pages grow with the split: BENCHMARKS.md, "bench prepare")."""
        out = np.full((len(rows), seq_len + 1), pad_id, dtype=self.dtype)
        if len(rows) == 0:
            return out
        size, n = self.dtype.itemsize, self.num_samples(seq_len)
        with open(self.path, "rb", buffering=0) as f:
            for i in np.argsort(rows, kind="stable"):
                if not 0 <= rows[i] < n:
                    raise IndexError(f"sample {rows[i]} is not among the {n} of {self.path}")
                start = int(rows[i]) * seq_len
                count = min(seq_len + 1, self.tokens - start)
                f.seek(start * size)
                if f.readinto(out[i, :count].data) != count * size:
                    raise OSError(f"{self.path} ended before token {start + count}")
        return out

    def num_samples(self, seq_len: int) -> int:
        return 0 if self.tokens < 2 else -(-(self.tokens - 1) // seq_len)


def tokenise_to_spill(
    units: list[list[Part]], tok: Tokenizer, cfg: DataConfig, parallel: bool, address: str | None, spill: TokenSpill
) -> None:
    """Tokenise every unit, in Ray tasks when `parallel`, appending the results to `spill` in unit order."""
    tok_json, cfg_dict = tok.to_json(), cfg.model_dump()
    unit_bytes = [sum(p.nbytes for p in unit) for unit in units]
    bar = tqdm(total=sum(unit_bytes), desc="tokenise", unit="B", unit_scale=True, leave=False, disable=None)
    if not parallel:
        for unit, nbytes in zip(units, unit_bytes):
            spill.add(tokenise_unit(unit, tok_json, cfg_dict))
            bar.update(nbytes)
        bar.close()
        return
    import ray

    from genpt_dist.raycluster import core_count, init_ray, one_core_options

    init_ray(address)  # never a bare ray.init: a local Ray must bind 127.0.0.1 only
    remote = ray.remote(tokenise_unit_one_thread).options(**one_core_options(), scheduling_strategy="SPREAD")
    tok_ref = ray.put(tok_json)
    in_flight = max(2, 2 * core_count())
    pending: deque = deque()

    def take() -> None:
        ref, nbytes = pending.popleft()
        try:
            spill.add(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:  # a bad input found in a task: still one line
            if isinstance(exc.cause, UserError):
                raise UserError(str(exc.cause)) from None
            raise
        bar.update(nbytes)

    for unit, nbytes in zip(units, unit_bytes):
        pending.append((remote.remote(unit, tok_ref, cfg_dict), nbytes))
        if len(pending) >= in_flight:
            take()
    while pending:
        take()
    bar.close()


def sample_texts(units: list[list[Part]], text_field: str, stats: ReadStats) -> Iterator[str]:
    """The corpus's documents (ranged files: range by range), for the tokenizer's training sample."""
    for unit in units:
        for part in unit:
            for docs in iter_part_documents(part, text_field, stats):
                yield from docs
