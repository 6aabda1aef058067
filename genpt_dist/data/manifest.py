"""The dataset manifest: the one file that says a prepared dataset is complete and what it holds.

`prepare` writes it last; the loader, `pretrain` and `evaluate` refuse a dataset URL without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from genpt_dist import storage
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "genpt-dist/shards-v1"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name under the dataset URL, e.g. "train-000003.tar"
    samples: int  # samples (rows of seq_len + 1 tokens) in the shard
    bytes: int  # tar size
    sha256: str  # tar content hash


@dataclass(frozen=True)
class Manifest:
    url: str  # the dataset folder
    raw: dict[str, Any]  # the whole manifest.json

    @property
    def seq_len(self) -> int:
        return int(self.raw["seq_len"])

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(self.raw["token_dtype"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.raw["tokenizer"]["sha256"]

    @property
    def sha256(self) -> str:
        return self.raw["fingerprint"]

    def shards(self, split: str) -> list[ShardInfo]:
        return [ShardInfo(**s) for s in self.raw["splits"][split]["shards"]]

    def shard_url(self, shard: ShardInfo) -> str:
        return storage.join(self.url, shard.name)

    def num_samples(self, split: str) -> int:
        return int(self.raw["splits"][split]["samples"])

    def load_tokenizer(self) -> Tokenizer:
        tok = Tokenizer.load(storage.join(self.url, self.raw["tokenizer"]["file"]))
        if tok.sha256 != self.tokenizer_sha256:
            raise UserError(f"{self.url}: tokenizer.json does not match the hash in {MANIFEST}")
        return tok


def load_manifest(url: str) -> Manifest:
    """Read `<url>/manifest.json`; a folder without one is not a dataset (yet)."""
    url = storage.normalize(url)
    murl = storage.join(url, MANIFEST)
    if not storage.exists(murl):
        raise UserError(f"no dataset at {url}: {MANIFEST} is missing (run `prepare` first, or it did not finish)")
    raw = storage.read_json(murl)
    if raw.get("format") != FORMAT:
        raise UserError(f"{murl} is not a genpt-dist dataset manifest (format {raw.get('format')!r})")
    return Manifest(url=url, raw=raw)
