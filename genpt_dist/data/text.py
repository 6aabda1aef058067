"""Reading a text corpus: source files -> normalised documents, and the document-level train/val split.

Normalisation (`normalise`), the same for `prepare`, `evaluate` on a raw file and `finetune` tasks:
1. A file with a NUL byte in its first 8 KiB is binary and skipped (as is one in which not a single
   character decodes).
2. Decode UTF-8, replacing each invalid byte sequence with U+FFFD; the replacements are counted so
   `prepare` can report them rather than fail on one bad byte in a large corpus.
3. Strip a leading BOM; CRLF and lone CR become LF, so the same text gives the same tokens whatever
   platform wrote it.

Documents (`iter_document_batches`, `read_documents`), by the file's name:
- `.parquet`: one document per row of the `text_field` column, read one row group at a time (and at most
  BATCH_ROWS rows of it at once), so memory follows a row group, not the file. On S3 the file is read
  through `storage.read_bytes` byte ranges (`_RangeFile`): the footer, then each row group's column chunk.
- `.arrow`: an Arrow IPC file, as Hugging Face `datasets`' `save_to_disk` writes them (a folder holding
  `state.json` and `dataset_info.json`; `datasets_files` lists its arrow files in order), read record
  batch by record batch with pyarrow; the `datasets` package itself is not needed.
- A `.gz` file is gunzipped first, a `.zst` file zstandard-decompressed (streaming, so frames without a
  stored size work too; needs the optional `zstandard` package); then a `.jsonl` file holds one document
  per line in its `text_field`, and any other file is one document.
A column value is taken as stored, like a JSONL field (the file-level normalisation is for raw bytes; a
null counts as blank). Blank documents are dropped (counted).

Split (`doc_in_val`): a document goes to val when the first 8 bytes of the sha256 of its text, read
as a fraction of 2**64, fall below `val_fraction`: deterministic, order-free, and duplicates never
straddle the split.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from genpt_dist import storage
from genpt_dist.errors import UserError

COMPRESSED = (".gz", ".zst")  # decompressed before reading; `name.jsonl.gz` is a JSONL file
COLUMNAR = (".parquet", ".arrow")  # read a batch of rows at a time
BATCH_ROWS = 1024  # rows turned into Python strings at once
RANGE_BUFFER = 1 << 20  # an S3 columnar file is read in byte ranges of at least this size
DATASETS_STATE, DATASETS_INFO = "state.json", "dataset_info.json"  # what marks a `save_to_disk` folder
DATASETS_DICT = "dataset_dict.json"  # a DatasetDict's folder: one `save_to_disk` folder per split


@dataclass
class ReadStats:
    """Counts over the files read, reported by `prepare` and stored in its manifest."""

    files: int = 0  # source files opened
    binary_skipped: int = 0  # files skipped as binary
    replacement_chars: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    documents: int = 0  # non-empty documents kept
    empty_skipped: int = 0  # blank documents dropped

    def add(self, other: ReadStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _count_replacements(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):  # registered for decoding only
        raise exc
    _count_replacements.n += 1  # type: ignore[attr-defined]
    return "\ufffd", exc.end


_count_replacements.n = 0  # type: ignore[attr-defined]
codecs.register_error("genpt_count_replace", _count_replacements)


def normalise(data: bytes, head: bytes | None = None) -> tuple[str | None, int]:
    """bytes -> (text, replaced) or (None, 0) for a binary file (a NUL early on, or no valid UTF-8 at all).
    `head`: the file's first bytes when `data` is a range of it; binary is then decided by them alone."""
    if b"\x00" in (data if head is None else head)[:8192]:
        return None, 0
    before = _count_replacements.n  # type: ignore[attr-defined]
    text = data.decode("utf-8", errors="genpt_count_replace")
    replaced = _count_replacements.n - before  # type: ignore[attr-defined]
    if head is None and replaced and not text.replace("\ufffd", "").strip():  # not one valid character
        return None, 0
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return text, replaced


# ---------------------------------------------------------------- whole files


def uncompressed_name(url: str) -> str:
    """`a.jsonl.gz` -> `a.jsonl`, `a.txt.zst` -> `a.txt`: the name that says what the content is."""
    for suffix in COMPRESSED:
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def read_file_bytes(url: str) -> bytes:
    """A whole file's bytes, decompressed when its name ends in `.gz` or `.zst`."""
    if url.endswith(".zst"):
        return _read_zstd(url)
    data = storage.read_bytes(url)
    if url.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            raise UserError(f"{url} is not a valid gzip file") from None
    return data


def _read_zstd(url: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise UserError(f"reading {url} needs the zstandard package (pip install zstandard)") from None
    with contextlib.closing(storage.open_stream(url)) as raw:
        # A streaming reader, not ZstdDecompressor.decompress: that one refuses frames that do not store
        # their decompressed size (what `zstd` writes from a pipe), and reads one frame only.
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        try:
            return reader.read()
        except zstandard.ZstdError as exc:
            raise UserError(f"{url} is not a valid zstandard file ({exc})") from None


# ---------------------------------------------------------------- columnar files


class _RangeFile(io.RawIOBase):
    """A read-only, seekable S3 object that fetches only the byte ranges asked for (through the storage
    seam's `read_bytes(url, start, end)`). pyarrow's own S3 filesystem would stream too, but it is a second
    S3 client beside storage's; this keeps one, and a parquet file is still read footer first, then one
    row group's column chunks at a time, never downloaded whole into memory."""

    def __init__(self, url: str):
        super().__init__()
        self.url, self._size, self._pos = url, storage.size(url), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        data = storage.read_bytes(self.url, self._pos, self._pos + n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _random_access(url: str) -> Any:
    """What pyarrow opens: a local path as a memory map, an S3 object as ranged reads (RANGE_BUFFER)."""
    import pyarrow as pa

    if storage.is_s3(url):
        return io.BufferedReader(_RangeFile(url), buffer_size=RANGE_BUFFER)
    return pa.memory_map(url)


class ColumnarFile:
    """A parquet or Arrow IPC file, read a batch of rows at a time: check `columns` (or `require`), then
    iterate `batches(names)`. Unreadable content is a one-line UserError naming the file."""

    def __init__(self, url: str):
        import pyarrow as pa

        self.url = url
        self.parquet = url.endswith(".parquet")
        try:
            if self.parquet:
                import pyarrow.parquet as pq

                self._pf = pq.ParquetFile(_random_access(url))
                schema = self._pf.schema_arrow
            else:
                source = _random_access(url)
                head = source.read(6)
                source.seek(0)
                if head == b"ARROW1":  # the IPC file format (random access)
                    reader = pa.ipc.open_file(source)
                    schema = reader.schema
                    self._ipc = (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:  # the IPC stream format, which `datasets` writes
                    stream = pa.ipc.open_stream(source)
                    schema, self._ipc = stream.schema, iter(stream)
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(exc) from None
        self.columns: list[str] = list(schema.names)
        self._types = {f.name: f.type for f in schema}

    def _unreadable(self, exc: Exception) -> UserError:
        kind = "parquet" if self.parquet else "Arrow"
        reason = str(exc).strip().split("\n", 1)[0]
        return UserError(f"{self.url} is not a readable {kind} file ({reason})")

    def label(self) -> str:
        """How a message names the data: the file, or for a `datasets` arrow file, its folder."""
        if not self.parquet:
            folder = self.url.rsplit("/", 1)[0]
            if storage.exists(storage.join(folder, DATASETS_STATE)):
                return f"datasets folder {folder}"
        return self.url

    def require(self, names: list[str], label: str, hint: str = "") -> None:
        """Every one of `names` is a string column, else a UserError naming `label` and the columns."""
        import pyarrow as pa

        for name in names:
            if name not in self._types:
                raise UserError(f"{label} has no column {name!r} (its columns: {', '.join(self.columns)}){hint}")
            t = self._types[name]
            is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)):
                raise UserError(f"{label}: column {name!r} holds {t}, not text{hint}")

    def batches(self, names: list[str]) -> Iterator[dict[str, list[Any]]]:
        """{column: values} for at most BATCH_ROWS rows at a time, in file order (parquet: row group by
        row group; a batch never spans two)."""
        import pyarrow as pa

        try:
            if self.parquet:
                for group in range(self._pf.num_row_groups):
                    for batch in self._pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=names):
                        yield _values(batch, names)
            else:
                for batch in self._ipc:
                    for lo in range(0, batch.num_rows, BATCH_ROWS):
                        yield _values(batch.slice(lo, BATCH_ROWS), names)
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(exc) from None


def _values(batch: Any, names: list[str]) -> dict[str, list[Any]]:
    return {n: batch.column(batch.schema.get_field_index(n)).to_pylist() for n in names}


def datasets_files(folder: str) -> list[str] | None:
    """The arrow files of a folder written by Hugging Face `datasets`' `save_to_disk` (it holds
    `state.json` and `dataset_info.json`), in the dataset's order; None if `folder` is not one."""
    state_url = storage.join(folder, DATASETS_STATE)
    if not (storage.exists(state_url) and storage.exists(storage.join(folder, DATASETS_INFO))):
        return None
    try:
        names = [f["filename"] for f in storage.read_json(state_url)["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{state_url} is not a datasets state file (no _data_files list)") from None
    files = [storage.join(folder, n) for n in names]
    for f in files:
        if not storage.exists(f):
            raise UserError(f"datasets folder {folder}: {storage.name(f)}, listed in {DATASETS_STATE}, is missing")
    return files


# ---------------------------------------------------------------- documents


def iter_document_batches(url: str, text_field: str, stats: ReadStats) -> Iterator[list[str]]:
    """One source file -> its documents (normalised, non-empty), a batch at a time (a columnar file: up to
    BATCH_ROWS rows; any other file: all of it); `stats` counts what was read and skipped."""
    if url.endswith(COLUMNAR):
        stats.files += 1
        table = ColumnarFile(url)
        table.require([text_field], table.label(), " (set data.text_field)")
        for batch in table.batches([text_field]):
            values = batch[text_field]
            kept = [v for v in values if v is not None and v.strip()]
            stats.empty_skipped += len(values) - len(kept)
            stats.documents += len(kept)
            yield kept
        return
    data = read_file_bytes(url)
    stats.files += 1
    text, replaced = normalise(data)
    if text is None:
        stats.binary_skipped += 1
        return
    stats.replacement_chars += replaced
    if uncompressed_name(url).endswith(".jsonl"):
        docs = jsonl_documents(text, url, text_field)
    else:
        docs = [text]
    kept = [d for d in docs if d.strip()]
    stats.empty_skipped += len(docs) - len(kept)
    stats.documents += len(kept)
    yield kept


def jsonl_documents(text: str, url: str, text_field: str, start: int = 0) -> list[str]:
    """The `text_field` of each non-blank line of a JSONL text that begins at byte `start` of `url`."""
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{url}:{_line_number(url, start, lineno)}: not valid JSON") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            where = _line_number(url, start, lineno)
            raise UserError(f"{url}:{where}: no string field {text_field!r} (set data.text_field)")
        docs.append(value)
    return docs


def _line_number(url: str, start: int, lineno: int) -> int:
    """The file's line number of line `lineno` of a range that begins at byte `start` (read on error only)."""
    return lineno + (storage.read_bytes(url, 0, start).count(b"\n") if start else 0)


def read_documents(url: str, text_field: str, stats: ReadStats) -> list[str]:
    """One source file -> all its documents (normalised, non-empty); `stats` counts what was read and skipped."""
    return [doc for batch in iter_document_batches(url, text_field, stats) for doc in batch]


def doc_in_val(text: str, val_fraction: float) -> bool:
    """Deterministic document-level split by the hash of the text."""
    return key_in_val(hashlib.sha256(text.encode("utf-8")).digest(), val_fraction)


def key_in_val(digest: bytes, val_fraction: float) -> bool:
    """A document whose sha256 is `digest` goes to val when its first 8 bytes, as a fraction of 2**64, fall below."""
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
