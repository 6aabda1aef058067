"""Data benchmarks on tinyshakespeare, in S3 served by a moto server the bench starts on 127.0.0.1.

- `loader`: tokens per second one training process receives from `ShardLoader` (in-process and with
  2 DataLoader workers), against the peer: a plain WebDataset pipeline over the same shards
  (`WebDataset(urls, shardshuffle).shuffle(1000).decode().to_tuple("tokens.npy").batched(B).repeat()`, in
  the same DataLoader set-up). Both deliver (B, seq_len + 1) int64 batches endlessly through one
  DataLoader; timed from the first request over at least two epochs (quick: one), so worker
  start-up counts.
(`bench prepare`, the command at scale, is in `bench/prepare.py`.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from genpt_dist import storage
from genpt_dist.errors import UserError

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
BATCH = 32


def corpus_path() -> Path:
    if not CORPUS.is_file():
        raise UserError(f"the bench corpus {CORPUS} is missing (the shared/ data folder sits beside the checkout)")
    return CORPUS


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """A moto S3 server for the bench; its endpoint and test keys are in os.environ meanwhile. Yields a bucket."""
    from genpt_dist.local_s3 import MotoS3Server

    keys = {
        "AWS_ENDPOINT_URL_S3": None,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
    }
    saved = {k: os.environ.get(k) for k in keys}
    with MotoS3Server() as server:
        try:
            for k, v in {**keys, "AWS_ENDPOINT_URL_S3": server.endpoint}.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage.reset_clients()
            storage.s3_client().create_bucket(Bucket="bench")
            yield "s3://bench"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage.reset_clients()


def _data_cfg(*overrides: str):
    from genpt_dist.config import load_config

    return load_config(None, ["data.tokenizer=byte", "data.split=tail", "data.val_fraction=0.05", *overrides]).data


def _rate(batches: Iterator, min_tokens: int, min_seconds: float) -> float:
    """Tokens per second taken from an endless batch iterator (start-up included) until both minimums."""
    tokens = 0
    t0 = time.perf_counter()
    for batch in batches:
        tokens += batch.numel()
        elapsed = time.perf_counter() - t0
        if tokens >= min_tokens and elapsed >= min_seconds:
            return tokens / elapsed
    raise RuntimeError("the batch stream ended")


def _collate(samples: list) -> Any:
    import torch

    return torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.int64))  # (B, T+1)


def _webdataset_batches(urls: list[str], workers: int) -> Iterator:
    import webdataset as wds
    from torch.utils.data import DataLoader

    import genpt_dist.data.loader  # noqa: F401  (registers the s3:// opener)

    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
        .shuffle(1000)
        .decode()
        .to_tuple("tokens.npy")
        .batched(BATCH, collation_fn=_collate)
        .repeat()  # epoch after epoch in the same worker processes, like ours
    )
    return iter(DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4) if workers else ds)


def bench_loader(quick: bool = False) -> dict[str, Any]:
    from genpt_dist.data.loader import ShardLoader
    from genpt_dist.data.manifest import load_manifest
    from genpt_dist.data.prepare import prepare

    text = corpus_path().read_bytes()
    min_seconds, min_epochs = (0.2, 1) if quick else (3.0, 2)
    rows = []
    with local_s3() as bucket, tempfile.TemporaryDirectory(prefix="genpt-bench-") as tmp:
        src = Path(tmp) / "corpus.txt"
        src.write_bytes(text[: 256 << 10] if quick else text)
        for seq_len in (64, 256):
            url = storage.join(bucket, f"ts-{seq_len}")
            prepare([str(src)], url, _data_cfg(f"data.seq_len={seq_len}", "data.shard_samples=1024"))
            manifest = load_manifest(url)
            urls = [manifest.shard_url(s) for s in manifest.shards("train")]
            epoch_tokens = manifest.num_samples("train") * (seq_len + 1)
            for workers in (0, 2):
                loader = ShardLoader(manifest, "train", batch_size=BATCH, num_workers=workers)
                ours = _rate(iter(loader), min_epochs * epoch_tokens, min_seconds)
                peer = _rate(_webdataset_batches(urls, workers), min_epochs * epoch_tokens, min_seconds)
                rows.append(
                    {
                        "seq_len": seq_len,
                        "workers": workers,
                        "shards": len(urls),
                        "ours_tok_s": round(ours),
                        "webdataset_tok_s": round(peer),
                        "speedup": f"{ours / peer:.1f}x",
                    }
                )
    return {
        "what": "tokens/s delivered to one training process, batch 32, byte tokenizer, tinyshakespeare in moto S3",
        "rows": rows,
        **{f"ours_tok_s_seq{r['seq_len']}_w{r['workers']}": r["ours_tok_s"] for r in rows},
        **{f"webdataset_tok_s_seq{r['seq_len']}_w{r['workers']}": r["webdataset_tok_s"] for r in rows},
    }
