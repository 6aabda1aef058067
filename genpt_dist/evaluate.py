"""`evaluate`: loss (nats/token), perplexity and bits-per-byte of a checkpoint or export.

On a prepared dataset (a URL holding manifest.json) the split (default val) is read in order through
`ShardLoader`; the dataset must have been tokenised with the model's tokenizer (same sha256). On a raw
text file (local or s3://; .gz, .jsonl and normalisation as in `prepare`) every document is
tokenised with the model's tokenizer and wrapped in <bos> ... <eos>, the documents are concatenated
and cut into windows of block_size + 1 tokens with stride block_size (`data.packing.pack`), so every token
after the first is a prediction target exactly once, with as much context as the window gives.

Pad targets are ignored. The figures are training's val figures, computed by the same code
(`val_loss`): `loss` is the mean cross-entropy over the targets; `bpb` is total nats / ln 2 / the
UTF-8 bytes the target tokens stand for (<eos> counts its nats and no bytes), so it compares across
tokenizers. Computed in fp32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from genpt_dist import storage
from genpt_dist.checkpoint import load_model
from genpt_dist.data.manifest import MANIFEST, load_manifest
from genpt_dist.data.packing import pack, token_byte_lengths
from genpt_dist.data.text import ReadStats, read_documents
from genpt_dist.errors import UserError
from genpt_dist.model.gpt import GPT
from genpt_dist.tokenizer import Tokenizer
from genpt_dist.train.sources import to_batch
from genpt_dist.val_loss import LossSums, batch_loss_sums


def _dataset_batches(url: str, split: str, tok: Tokenizer, block: int, batch_size: int) -> Iterator[torch.Tensor]:
    from genpt_dist.data.loader import ShardLoader

    manifest = load_manifest(url)
    if manifest.tokenizer_sha256 != tok.sha256:
        raise UserError(
            f"the data at {url} was tokenised with a different tokenizer than the model "
            f"(sha256 {manifest.tokenizer_sha256[:12]} vs {tok.sha256[:12]})"
        )
    if manifest.seq_len > block:
        raise UserError(f"the data has {manifest.seq_len}-token samples, the model's context is {block}")
    if not manifest.has_split(split) or manifest.num_samples(split) == 0:
        raise UserError(f"the dataset at {url} has no {split} samples")
    loader = ShardLoader(manifest, split, batch_size=batch_size, shuffle=False)
    yield from loader.iter_epoch()


def _text_batches(url: str, tok: Tokenizer, block: int, batch_size: int) -> Iterator[torch.Tensor]:
    docs = read_documents(url, "text", ReadStats())
    if not docs:
        raise UserError(f"{url} holds no text")
    bos, eos = np.array([tok.bos_id]), np.array([tok.eos_id])
    stream = np.concatenate([np.concatenate([bos, ids, eos]) for ids in tok.encode_arrays(docs, np.int64)])
    samples = pack(stream, block, tok.pad_id)  # (n, block + 1)
    for lo in range(0, len(samples), batch_size):
        yield torch.from_numpy(samples[lo : lo + batch_size])


def score(
    model: GPT,
    batches: Iterator[torch.Tensor],
    pad_id: int | None,
    byte_lengths: np.ndarray,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss, perplexity and bits-per-byte over (B, T + 1) token batches (pad targets carry no loss)."""
    table = torch.from_numpy(byte_lengths).to(device)
    sums = LossSums()
    with torch.inference_mode():
        for tokens in batches:
            batch = to_batch(tokens.to(device), pad_id)
            sums += batch_loss_sums(lambda idx: model(idx)[0], batch.idx, batch.targets, table)
    if sums.targets == 0:
        raise UserError("nothing to evaluate: no target tokens")
    m = sums.metrics(prefix="")
    return {
        "loss": m["loss"],
        "perplexity": m["ppl"],
        "bpb": m["bpb"],
        "tokens": int(sums.targets),
        "bytes": int(sums.bytes),
    }


def evaluate(
    model: str, data: str, *, split: str = "val", batch_size: int = 8, device: str | None = None
) -> dict[str, Any]:
    """Run the whole `evaluate` command; returns the JSON summary."""
    from genpt_dist.device import pick_device

    t0 = time.time()
    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    dev = pick_device(device)
    data = storage.normalize(data)
    is_dataset = storage.exists(storage.join(data, MANIFEST))
    if not is_dataset and not storage.exists(data):
        raise UserError(f"--data {data} is neither a prepared dataset ({MANIFEST} missing) nor a text file")
    net, tok, ref = load_model(model, device=dev)
    block = net.config.block_size
    if is_dataset:
        batches = _dataset_batches(data, split, tok, block, batch_size)
    else:
        batches = _text_batches(data, tok, block, batch_size)
    metrics = score(net, batches, tok.loss_pad_id, token_byte_lengths(tok), dev)
    return {
        "command": "evaluate",
        **metrics,
        "model": ref.url,
        "step": ref.step,
        "data": data,
        "kind": "dataset" if is_dataset else "text",
        "split": split if is_dataset else None,
        "seconds": round(time.time() - t0, 2),
    }
