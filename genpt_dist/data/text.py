"""Reading a text corpus: source files -> normalised documents, and the document-level train/val split.

Normalisation (`normalise`), the same for `prepare`, `evaluate` on a raw file and `finetune` tasks:
1. A file with a NUL byte in its first 8 KiB is binary and skipped (as is one in which not a single
   character decodes).
2. Decode UTF-8, replacing each invalid byte sequence with U+FFFD; the replacements are counted so
   `prepare` can report them rather than fail on one bad byte in a large corpus.
3. Strip a leading BOM; CRLF and lone CR become LF, so the same text gives the same tokens whatever
   platform wrote it.

Documents (`read_documents`): a `.gz` file is gunzipped first; a `.jsonl` file holds one document per
line in its `text_field`; any other file is one document; blank documents are dropped (counted).

Split (`doc_in_val`): a document goes to val when the first 8 bytes of the sha256 of its text, read
as a fraction of 2**64, fall below `val_fraction`: deterministic, order-free, and duplicates never
straddle the split.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from dataclasses import dataclass, fields

from genpt_dist import storage
from genpt_dist.errors import UserError


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


def normalise(data: bytes) -> tuple[str | None, int]:
    """bytes -> (text, replaced) or (None, 0) for a binary file (a NUL early on, or no valid UTF-8 at all)."""
    if b"\x00" in data[:8192]:
        return None, 0
    before = _count_replacements.n  # type: ignore[attr-defined]
    text = data.decode("utf-8", errors="genpt_count_replace")
    replaced = _count_replacements.n - before  # type: ignore[attr-defined]
    if replaced and not text.replace("\ufffd", "").strip():  # not one valid character: not text at all
        return None, 0
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return text, replaced


def read_documents(url: str, text_field: str, stats: ReadStats) -> list[str]:
    """One source file -> its documents (normalised, non-empty); `stats` counts what was read and skipped."""
    data = storage.read_bytes(url)
    if url.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            raise UserError(f"{url} is not a valid gzip file") from None
    stats.files += 1
    text, replaced = normalise(data)
    if text is None:
        stats.binary_skipped += 1
        return []
    stats.replacement_chars += replaced
    if url.removesuffix(".gz").endswith(".jsonl"):
        docs = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{url}:{lineno}: not valid JSON") from None
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise UserError(f"{url}:{lineno}: no string field {text_field!r} (set data.text_field)")
            docs.append(value)
    else:
        docs = [text]
    kept = [d for d in docs if d.strip()]
    stats.empty_skipped += len(docs) - len(kept)
    stats.documents += len(kept)
    return kept


def doc_in_val(text: str, val_fraction: float) -> bool:
    """Deterministic document-level split by the hash of the text."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction
