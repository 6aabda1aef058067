"""The dataset manifest: the one file that says a prepared dataset is complete and what it holds.

`prepare` builds a `Manifest` and writes it last (`publish_manifest`, after checking that the tokenizer
and every shard it names exist); the loader, `pretrain`, `finetune` and `evaluate` read it
(`load_manifest`) and refuse a dataset URL without one. This module is the only one that knows the
JSON layout.

Formats: `prepare` writes FORMAT (genpt-dist/shards-v2). READ_FORMATS are the ones that load: v2, and
v1, what `prepare` wrote before the manifest was typed (the same keys: it parses as it is). Any other
format is a one-line UserError naming the format found and the supported ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from genpt_dist import storage
from genpt_dist.data.text import ReadStats
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "genpt-dist/shards-v2"
READ_FORMATS = (FORMAT, "genpt-dist/shards-v1")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name under the dataset URL, e.g. "train-000003.tar"
    samples: int  # samples (rows of seq_len + 1 tokens) in the shard
    bytes: int  # tar size
    sha256: str  # tar content hash


@dataclass(frozen=True)
class SplitInfo:
    shards: list[ShardInfo]  # in sample order
    samples: int  # rows of seq_len + 1 tokens over all shards
    documents: int | None  # documents in the split (None for a tail or position split, which cuts the stream)
    tokens: int  # tokens in the split's stream, <bos>/<eos> included, padding not
    targets: int  # prediction targets: tokens - 1
    bytes: int  # UTF-8 bytes the stream's tokens stand for (the bits-per-byte denominator)


@dataclass(frozen=True)
class TokenizerInfo:
    file: str  # tokenizer.json, relative to the dataset URL
    sha256: str  # Tokenizer.sha256 of that file: what checkpoints are matched against
    kind: str  # data.tokenizer: "bpe" | "byte", or "given" (`prepare --tokenizer`)
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    source: str | None = None  # `prepare --tokenizer SRC`: where it came from (None: made by prepare)


@dataclass(frozen=True)
class SourceInfo:
    url: str  # a resolved input file
    bytes: int  # its size as read (before gunzip)
    sha256: str  # its content hash (part of the fingerprint)


@dataclass(frozen=True)
class Manifest:
    url: str  # the dataset folder (not written: the manifest is wherever it is read from)
    fingerprint: str  # sha256 of (sources, data config): the dataset's identity
    seq_len: int  # tokens a model sees per sample
    sample_tokens: int  # tokens stored per sample: seq_len + 1
    token_dtype: str  # numpy dtype name of the stored ids: "uint16" | "uint32"
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]  # "train", "val"
    documents: int  # non-empty documents read
    sources: list[SourceInfo]  # sorted by URL
    stats: ReadStats  # files read, binary files skipped, replacement characters, ...
    config: dict[str, Any]  # the DataConfig prepare ran with, as dumped (kept untyped: old manifests must
    #                         load after DataConfig changes)
    created: str  # UTC time written, ISO 8601
    split: str = "hash"  # the rule that made the val split: "hash", "tail", or "position (N documents < M)",
    #                      a small corpus's hash split done by position (manifests before it: config's split)
    format: str = FORMAT  # the format it was read as (written: always FORMAT)

    # -------------------------------------------------------------- reading

    @property
    def sha256(self) -> str:
        """The dataset fingerprint (what checkpoints record as their data)."""
        return self.fingerprint

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer.sha256

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.token_dtype)

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def shards(self, split: str) -> list[ShardInfo]:
        return self.splits[split].shards

    def shard_url(self, shard: ShardInfo) -> str:
        return storage.join(self.url, shard.name)

    def num_samples(self, split: str) -> int:
        """Samples in `split`; 0 for a split the dataset does not have."""
        return self.splits[split].samples if split in self.splits else 0

    def load_tokenizer(self) -> Tokenizer:
        tok = Tokenizer.load(storage.join(self.url, self.tokenizer.file))
        if tok.sha256 != self.tokenizer_sha256:
            raise UserError(f"{self.url}: {self.tokenizer.file} does not match the hash in {MANIFEST}")
        return tok

    # -------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        """The manifest.json content, always in FORMAT (a v1 manifest read here is written as v2)."""
        out = asdict(self)
        del out["url"]
        out["format"] = FORMAT
        return out

    @classmethod
    def from_json(cls, url: str, raw: dict[str, Any]) -> Manifest:
        """Parse a manifest.json of one of READ_FORMATS (raises KeyError/TypeError on a malformed one)."""
        splits = {
            name: SplitInfo(**{**s, "shards": [ShardInfo(**x) for x in s["shards"]]})
            for name, s in raw["splits"].items()
        }
        return cls(
            url=url,
            format=raw["format"],
            fingerprint=raw["fingerprint"],
            seq_len=int(raw["seq_len"]),
            sample_tokens=int(raw["sample_tokens"]),
            token_dtype=raw["token_dtype"],
            tokenizer=TokenizerInfo(**raw["tokenizer"]),
            splits=splits,
            documents=int(raw["documents"]),
            sources=[SourceInfo(**s) for s in raw["sources"]],
            stats=ReadStats(**raw["stats"]),
            config=dict(raw["config"]),
            created=raw["created"],
            split=str(raw.get("split") or raw["config"].get("split", "hash")),
        )


def publish_manifest(manifest: Manifest) -> str:
    """Write `<manifest.url>/manifest.json` last, once the tokenizer and every shard it names exist."""
    required = [manifest.tokenizer.file] + [s.name for split in manifest.splits.values() for s in split.shards]
    content = (json.dumps(manifest.to_json(), indent=2) + "\n").encode()
    return storage.publish(manifest.url, MANIFEST, content, required)


def load_manifest(url: str) -> Manifest:
    """Read `<url>/manifest.json`; a folder without one is not a dataset (yet)."""
    url = storage.normalize(url)
    murl = storage.join(url, MANIFEST)
    if not storage.exists(murl):
        raise UserError(f"no dataset at {url}: {MANIFEST} is missing (run `prepare` first, or it did not finish)")
    try:
        raw = storage.read_json(murl)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{murl} is not valid JSON") from None
    found = raw.get("format") if isinstance(raw, dict) else None
    if found not in READ_FORMATS:
        raise UserError(
            f"{murl} has format {found!r}; this version reads {', '.join(READ_FORMATS)}"
            " (prepare the data again with this version)"
        )
    try:
        return Manifest.from_json(url, raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{murl} is not a complete {found} manifest ({type(exc).__name__}: {exc})") from None
