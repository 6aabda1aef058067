"""ShardLoader over S3 (moto over HTTP): rank/worker split, exact resume, bad shards, refusal.

Samples are identified by their content (a multiset of rows, so repeated text cannot hide a loss or
a duplicate); the reference rows are read with plain `webdataset`, not through the loader.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import genpt_dist.data.loader  # noqa: F401  (registers the s3:// opener with webdataset)
from genpt_dist import storage
from genpt_dist.config import load_config
from genpt_dist.data.loader import ShardLoader
from genpt_dist.data.manifest import FORMAT, READ_FORMATS, load_manifest, publish_manifest
from genpt_dist.data.prepare import prepare
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import byte_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

SEQ_LEN, SHARD_SAMPLES, BATCH = 16, 64, 8
N_TRAIN = 600  # chosen so that world sizes 1, 2, 3 divide it and 7 does not


@pytest.fixture(scope="module")
def dataset(make_bucket, shakespeare, tmp_path_factory) -> str:
    """600 train samples of 17 tokens in 10 shards (the last one short), in S3."""
    corpus = tmp_path_factory.mktemp("loader") / "corpus.txt"
    corpus.write_bytes(shakespeare.read_bytes()[: N_TRAIN * SEQ_LEN - 1])  # + <bos> + <eos> = 600*16 + 1 tokens
    out = storage.join(make_bucket(), "ds")
    cfg = load_config(
        None,
        [
            "data.tokenizer=byte",
            "data.split=tail",
            "data.val_fraction=0",
            f"data.seq_len={SEQ_LEN}",
            f"data.shard_samples={SHARD_SAMPLES}",
        ],
    ).data
    summary = prepare([str(corpus)], out, cfg)
    assert summary["train_samples"] == N_TRAIN
    return out


@pytest.fixture(scope="module")
def all_rows(dataset) -> Counter:
    manifest = load_manifest(dataset)
    urls = [manifest.shard_url(s) for s in manifest.shards("train")]
    rows = [tuple(s["tokens.npy"].tolist()) for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert len(rows) == N_TRAIN
    return Counter(rows)


def rows_of(batches) -> Counter:
    return Counter(tuple(r) for b in batches for r in b.tolist())


def epoch_batches(manifest, rank, world, workers, epoch=0, **kw) -> list[torch.Tensor]:
    loader = ShardLoader(manifest, "train", batch_size=BATCH, rank=rank, world_size=world, num_workers=workers, **kw)
    loader.load_state_dict({"epoch": epoch, "batch": 0})
    return list(loader.iter_epoch())


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(dataset, all_rows):
    manifest = load_manifest(dataset)
    for epoch in (0, 1):
        per_rank = [epoch_batches(manifest, rank, 2, workers=2, epoch=epoch) for rank in (0, 1)]
        assert [len(b) for b in per_rank] == [38, 38]  # 300 samples per rank: 37 full batches + one of 4
        for a, b in zip(*per_rank):  # same shapes step by step on both ranks (collectives stay in lockstep)
            assert a.shape == b.shape and a.dtype == b.dtype == torch.int64
        assert all(b.shape == (BATCH, SEQ_LEN + 1) for b in per_rank[0][:-1])
        assert per_rank[0][-1].shape == (4, SEQ_LEN + 1)
        assert rows_of(per_rank[0]) + rows_of(per_rank[1]) == all_rows
    # the shuffle differs between epochs
    e0 = epoch_batches(manifest, 0, 2, workers=0, epoch=0)
    e1 = epoch_batches(manifest, 0, 2, workers=0, epoch=1)
    assert not torch.equal(e0[0], e1[0])


def test_workers_do_not_change_the_batches(dataset):
    manifest = load_manifest(dataset)
    inline = epoch_batches(manifest, 1, 2, workers=0)
    for workers in (1, 2, 3):
        got = epoch_batches(manifest, 1, 2, workers=workers)
        # the set of batches is the same; the order is the round-robin of the workers' runs
        assert sorted(map(lambda b: b.numpy().tobytes(), got)) == sorted(map(lambda b: b.numpy().tobytes(), inline))


def test_world_size_not_dividing_the_samples(dataset, all_rows):
    """N % world_size samples (5 of 600 for 7 ranks) wait for a later epoch; ranks stay equal."""
    manifest = load_manifest(dataset)
    seen_over_epochs: Counter = Counter()
    for epoch in (0, 1):
        per_rank = [epoch_batches(manifest, r, 7, workers=0, epoch=epoch) for r in range(7)]
        assert len({len(b) for b in per_rank}) == 1
        assert all(sum(len(b) for b in batches) == N_TRAIN // 7 for batches in per_rank)
        seen = sum((rows_of(b) for b in per_rank), Counter())
        assert sum(seen.values()) == N_TRAIN - N_TRAIN % 7
        assert not seen - all_rows  # nothing invented, nothing twice
        seen_over_epochs |= seen
    assert sum((all_rows - seen_over_epochs).values()) < N_TRAIN % 7  # the left-out few change each epoch


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_and_across_the_epoch_boundary(dataset, workers):
    manifest = load_manifest(dataset)

    def make() -> ShardLoader:
        return ShardLoader(manifest, "train", batch_size=BATCH, rank=1, world_size=2, num_workers=workers, seed=3)

    per_epoch = make().batches_per_epoch  # 38: with 3 workers the runs are 13, 13, 12 batches
    reference = list(islice(iter(make()), per_epoch + 6))  # one DataLoader across the epoch boundary
    by_epoch = make()
    assert all(torch.equal(a, b) for a, b in zip([*by_epoch.iter_epoch(), *by_epoch.iter_epoch()], reference))
    for stop in (5, per_epoch - 2, per_epoch, per_epoch + 3):
        first = make()
        taken = list(islice(iter(first), stop))
        state = first.state_dict()
        assert state == ({"epoch": 0, "batch": stop} if stop <= per_epoch else {"epoch": 1, "batch": stop - per_epoch})
        resumed = make()
        resumed.load_state_dict(state)
        rest = list(islice(iter(resumed), len(reference) - stop))
        assert len(taken + rest) == len(reference)
        assert all(torch.equal(a, b) for a, b in zip(taken + rest, reference)), f"resume after {stop} batches"


def _copy(src: str, dst: str) -> None:
    for url in storage.list_files(src):
        storage.write_bytes(storage.join(dst, url[len(src) + 1 :]), storage.read_bytes(url))


def test_corrupt_shard_becomes_pad_rows_with_one_warning(dataset, bucket, caplog):
    broken = storage.join(bucket, "broken")
    _copy(dataset, broken)
    manifest = load_manifest(broken)
    victim = manifest.shards("train")[3]
    url = manifest.shard_url(victim)
    storage.write_bytes(url, storage.read_bytes(url)[: victim.bytes // 2])  # truncated upload

    loader = ShardLoader(manifest, "train", batch_size=BATCH, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="genpt_dist.data.loader"):
        batches = list(loader.iter_epoch())
        batches += list(loader.iter_epoch())  # the second epoch meets it again: counted once
    assert len(batches) == 2 * loader.batches_per_epoch
    pad_rows = sum(int((b == 0).all(dim=1).sum()) for b in batches)
    assert pad_rows == 2 * victim.samples
    assert loader.bad_shards == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and victim.name in warnings[0].getMessage()


def test_flipped_bytes_are_caught_by_the_checksum(dataset, bucket):
    broken = storage.join(bucket, "flipped")
    _copy(dataset, broken)
    manifest = load_manifest(broken)
    victim = manifest.shards("train")[0]
    data = bytearray(storage.read_bytes(manifest.shard_url(victim)))
    data[len(data) // 2] ^= 0x01  # one token changes; the tar still parses
    storage.write_bytes(manifest.shard_url(victim), bytes(data))
    loader = ShardLoader(manifest, "train", batch_size=BATCH, shuffle=False)
    first = list(islice(loader.iter_epoch(), 1))[0]
    assert (first == 0).all() and loader.bad_shards == 1


def test_too_many_bad_shards_is_a_user_error(dataset, bucket):
    broken = storage.join(bucket, "many")
    _copy(dataset, broken)
    manifest = load_manifest(broken)
    for shard in manifest.shards("train")[:2]:  # 2 of 10 > 10%
        storage.delete(manifest.shard_url(shard))
    loader = ShardLoader(manifest, "train", batch_size=BATCH, max_bad_shard_fraction=0.1, shuffle=False)
    with pytest.raises(UserError, match=r"2 of 10 train shards .* unreadable .*max_bad_shard_fraction=0\.1"):
        list(loader.iter_epoch())


def test_a_dataset_without_manifest_is_refused(dataset, bucket):
    partial = storage.join(bucket, "partial")
    _copy(dataset, partial)
    storage.delete(storage.join(partial, "manifest.json"))  # as if prepare died before publishing
    with pytest.raises(UserError, match=r"no dataset at s3://.*/partial: manifest\.json is missing"):
        load_manifest(partial)


def test_fewer_samples_than_ranks_is_refused(dataset):
    manifest = load_manifest(dataset)
    with pytest.raises(UserError, match="600 samples, fewer than 601 workers"):
        ShardLoader(manifest, "train", batch_size=BATCH, world_size=601)


def test_unshuffled_epoch_reads_the_stored_order(dataset):
    manifest = load_manifest(dataset)
    urls = [manifest.shard_url(s) for s in manifest.shards("train")]
    stored = [s["tokens.npy"] for s in islice(wds.WebDataset(urls, shardshuffle=False).decode(), 2 * BATCH)]
    loader = ShardLoader(manifest, "train", batch_size=BATCH, shuffle=False)
    batches = list(islice(iter(loader), 2))
    assert all(b.dtype == torch.int64 and b.shape == (BATCH, SEQ_LEN + 1) for b in batches)
    assert np.array_equal(torch.cat(batches).numpy(), np.stack(stored))


# ------------------------------------------------------------- a dataset written by an earlier version

V1_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "v1" / "data"
V1_TEXT_BYTES = 10_000  # the fixture is the first 10,000 bytes of tinyshakespeare, configs/tiny.yaml,
#                         --set data.tokenizer=byte data.shard_samples=8, prepared by the shards-v1 code


def test_a_v1_dataset_still_loads(shakespeare):
    manifest = load_manifest(str(V1_DATA))
    assert manifest.format == "genpt-dist/shards-v1" and manifest.format in READ_FORMATS
    assert (manifest.seq_len, manifest.sample_tokens, manifest.dtype) == (64, 65, np.dtype(np.uint16))
    assert (manifest.tokenizer.kind, manifest.tokenizer.vocab_size, manifest.tokenizer.pad_id) == ("byte", 259, 0)
    assert (manifest.num_samples("train"), manifest.num_samples("val")) == (141, 16)
    assert len(manifest.shards("train")) == 18 and manifest.shards("val")[0].name == "val-000000.tar"
    assert manifest.splits["val"].tokens == 1000 and manifest.splits["train"].documents is None  # split: tail
    assert manifest.documents == 1 and manifest.stats.files == 1 and manifest.config["seq_len"] == 64

    tok = manifest.load_tokenizer()  # checks the file against the manifest's hash
    assert tok.sha256 == manifest.tokenizer_sha256 == byte_tokenizer().sha256

    train = list(ShardLoader(manifest, "train", batch_size=BATCH, shuffle=False).iter_epoch())
    assert sum(len(b) for b in train) == 141 and all(b.shape[1] == 65 for b in train)
    val = torch.cat(list(ShardLoader(manifest, "val", batch_size=BATCH, shuffle=False).iter_epoch()))
    stream = torch.cat([val[:, :-1].flatten(), val[-1, -1:]]).tolist()  # undo the stride-64 windows
    stream = [t for t in stream if t != tok.pad_id]
    assert stream[-1] == tok.eos_id  # val is the stream's tail: the text's last 999 bytes, then <eos>
    want = shakespeare.read_bytes()[:V1_TEXT_BYTES][-999:].decode()
    assert tok.decode(stream[:-1]) == want


def test_a_v1_manifest_is_rewritten_as_v2_unchanged(tmp_path):
    _copy(str(V1_DATA), str(tmp_path))
    v1 = load_manifest(str(tmp_path))
    publish_manifest(v1)
    v2 = load_manifest(str(tmp_path))
    assert v2.format == FORMAT == "genpt-dist/shards-v2"
    assert dataclasses.replace(v2, format=v1.format) == v1


def test_an_unknown_manifest_format_is_one_line(tmp_path):
    _copy(str(V1_DATA), str(tmp_path))
    murl = tmp_path / "manifest.json"
    raw = json.loads(murl.read_text())
    murl.write_text(json.dumps({**raw, "format": "genpt-dist/shards-v9"}))
    with pytest.raises(UserError) as err:
        load_manifest(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert "'genpt-dist/shards-v9'" in message and all(f in message for f in READ_FORMATS), message
    murl.write_text(json.dumps({k: v for k, v in raw.items() if k != "tokenizer"}))
    with pytest.raises(UserError, match=r"not a complete genpt-dist/shards-v1 manifest \(KeyError: 'tokenizer'\)$"):
        load_manifest(str(tmp_path))
