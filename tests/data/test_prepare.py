"""`prepare` end to end: corpus -> tokenizer + WebDataset shards + manifest in S3 (moto over HTTP).

Shards are read back with plain `webdataset` (the `s3://` opener is registered by importing the
loader module), and the expected rows are rebuilt here from the documents with the saved Hugging Face
tokenizer and a straightforward windowing, independent of the library's packing code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

import genpt_dist.data.loader  # noqa: F401  (registers the s3:// opener with webdataset)
from genpt_dist import storage
from genpt_dist.config import load_config
from genpt_dist.data.manifest import FORMAT, MANIFEST, load_manifest
from genpt_dist.data.prepare import prepare
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import Tokenizer

PAD, BOS, EOS = 0, 1, 2


def data_cfg(*overrides: str):
    return load_config(None, ["data.tokenizer=byte", "data.split=tail", *overrides]).data


def read_split(url: str, split: str) -> tuple[list[str], np.ndarray]:
    """(keys, rows) of a split, in shard and tar order, read with plain webdataset."""
    manifest = load_manifest(url)
    urls = [manifest.shard_url(s) for s in manifest.shards(split)]
    if not urls:
        return [], np.zeros((0, manifest.seq_len + 1), dtype=np.int64)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    keys, rows = [], []
    for sample in ds:
        keys.append(sample["__key__"])
        rows.append(sample["tokens.npy"].astype(np.int64))
    return keys, np.stack(rows)


def windows(stream: list[int], seq_len: int) -> list[tuple[int, ...]]:
    """Samples of seq_len + 1 tokens with stride seq_len; the last right-padded with <pad>."""
    out = []
    for start in range(0, max(len(stream) - 1, 0), seq_len):
        row = stream[start : start + seq_len + 1]
        out.append(tuple(row + [PAD] * (seq_len + 1 - len(row))))
    return out


def unwindow(rows: np.ndarray) -> list[int]:
    """Rows in stream order -> the token stream (trailing pad removed)."""
    if len(rows) == 0:
        return []
    stream = [*rows[:, :-1].reshape(-1).tolist(), int(rows[-1, -1])]
    while stream and stream[-1] == PAD:
        stream.pop()
    return stream


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """A folder of small documents that exercise every normalisation rule, and the texts they must become."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")  # BOM + CRLF
    (root / "b.txt").write_bytes(b"old mac\rline\r")  # lone CR
    (root / "c.txt").write_bytes(b"bad \xff\xfe bytes\n")  # two invalid UTF-8 bytes
    (root / "d.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 4)  # binary, skipped
    records = [{"text": "first json doc"}, {"text": "  "}, {"text": "second \u00e9t\u00e9 doc"}]
    (root / "e.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (root / "f.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": "gzipped doc"}).encode() + b"\n"))
    (root / "g.md.gz").write_bytes(gzip.compress(b"# zipped markdown\r\n"))
    (root / "ignored.csv").write_text("not,a,document\n")
    expected = [
        "line one\nline two\n",
        "old mac\nline\n",
        "bad \ufffd\ufffd bytes\n",
        "first json doc",
        "second \u00e9t\u00e9 doc",
        "gzipped doc",
        "# zipped markdown\n",
    ]
    return root, expected


def test_normalised_documents_in_s3_read_back_with_plain_webdataset(mixed_corpus, bucket):
    root, docs = mixed_corpus
    out = storage.join(bucket, "mixed")
    cfg = data_cfg("data.seq_len=8", "data.shard_samples=4", "data.val_fraction=0.25")
    summary = prepare([str(root)], out, cfg)

    assert summary["documents"] == len(docs)
    assert summary["binary_skipped"] == 1
    assert summary["replacement_chars"] == 2
    manifest = load_manifest(out)
    assert manifest.stats.empty_skipped == 1
    assert [s.url.rsplit("/", 1)[-1] for s in manifest.sources] == [
        "a.txt",
        "b.txt",
        "c.txt",
        "d.txt",
        "e.jsonl",
        "f.jsonl.gz",
        "g.md.gz",
    ]

    tok = Tokenizer.load(storage.join(out, "tokenizer.json"))
    stream: list[int] = []
    for doc in docs:  # every document is <bos> ... <eos>, in source order
        stream += [BOS, *tok.hf.encode(doc, add_special_tokens=False).ids, EOS]
    cut = len(stream) - int(len(stream) * 0.25)  # tail split: the last 25% of tokens are val

    train_keys, train = read_split(out, "train")
    val_keys, val = read_split(out, "val")
    assert train.shape[1] == val.shape[1] == 9  # seq_len + 1
    assert len(set(train_keys)) == len(train_keys) and len(set(val_keys)) == len(val_keys)
    assert len(manifest.shards("train")) == -(-len(train) // 4)
    # train rows are shuffled across shards: compare as multisets; val keeps stream order
    assert Counter(map(tuple, train.tolist())) == Counter(windows(stream[:cut], 8))
    assert [tuple(r) for r in val.tolist()] == windows(stream[cut:], 8)
    assert unwindow(val) == stream[cut:]
    assert summary["train_tokens"] == cut and summary["val_tokens"] == len(stream) - cut


def test_documents_are_wrapped_in_bos_eos(tmp_path, bucket):
    texts = [f"document number {i}: " + "word " * (i % 7 + 1) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    out = storage.join(bucket, "docs")
    prepare(
        [str(tmp_path / "docs.jsonl")],
        out,
        data_cfg("data.seq_len=16", "data.val_fraction=0.5", "data.text_field=body"),
    )
    tok = load_manifest(out).load_tokenizer()
    _, val = read_split(out, "val")
    stream = unwindow(val)
    # split the ordered val stream at <bos>: every complete piece is one document, closed by <eos>
    starts = [i for i, t in enumerate(stream) if t == BOS]
    assert len(starts) >= 15
    for a, b in zip(starts, starts[1:] + [len(stream)]):
        piece = stream[a:b]
        assert piece[-1] == EOS and EOS not in piece[:-1] and BOS not in piece[1:]
        assert tok.decode(piece) in texts
    if starts[0] > 0:  # the split cut a document: its tail ends the partial piece before the first <bos>
        assert stream[starts[0] - 1] == EOS
    # across all train rows the markers pair up too: <bos> only ever follows <eos>
    _, train = read_split(out, "train")
    for row in train.tolist():
        for i, t in enumerate(row):
            if t == BOS and i > 0:
                assert row[i - 1] == EOS


def test_tail_split_of_tinyshakespeare_and_reuse(shakespeare, bucket):
    out = storage.join(bucket, "ts")
    cfg = data_cfg("data.seq_len=64", "data.shard_samples=512", "data.val_fraction=0.1")
    first = prepare([str(shakespeare)], out, cfg)
    text = shakespeare.read_bytes()
    total = len(text) + 2  # <bos> + one token per byte + <eos>
    assert first["val_tokens"] == int(total * 0.1)
    assert first["train_tokens"] + first["val_tokens"] == total
    assert first["train_samples"] == -(-(first["train_tokens"] - 1) // 64)

    tok = load_manifest(out).load_tokenizer()
    _, val = read_split(out, "val")
    val_stream = unwindow(val)
    assert val_stream[-1] == EOS
    assert tok.decode(val_stream).encode() == text[-(first["val_tokens"] - 1) :]  # the last 10% of the text
    _, train = read_split(out, "train")
    assert len(train) == first["train_samples"]
    assert (train != PAD).any(axis=1).all()

    manifest_before = storage.read_bytes(storage.join(out, MANIFEST))
    assert json.loads(manifest_before)["format"] == FORMAT == "genpt-dist/shards-v2"
    t0 = time.monotonic()
    second = prepare([str(shakespeare)], out, cfg)
    assert second["reused"] is True and first["reused"] is False
    assert time.monotonic() - t0 < 5
    assert storage.read_bytes(storage.join(out, MANIFEST)) == manifest_before
    assert {
        k: v for k, v in second.items() if k not in ("reused", "seconds", "mb_per_s", "tokenizer_seconds", "nodes")
    } == {k: v for k, v in first.items() if k not in ("reused", "seconds", "mb_per_s", "tokenizer_seconds", "nodes")}


def test_hash_split_keeps_documents_whole_and_is_deterministic(tmp_path, bucket):
    texts = [f"doc {i} " + "lorem ipsum " * (i % 5 + 1) for i in range(120)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = storage.join(bucket, "hash")
    summary = prepare(
        [str(tmp_path / "a.jsonl")], out, data_cfg("data.split=hash", "data.val_fraction=0.3", "data.seq_len=32")
    )

    def in_val(t: str) -> bool:  # the documented rule: the first 8 bytes of sha256(text) below the fraction
        return int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2**64 < 0.3

    expected_val = [t for t in texts if in_val(t)]
    manifest = load_manifest(out)
    assert manifest.splits["val"].documents == len(expected_val)
    assert manifest.splits["train"].documents == len(texts) - len(expected_val)
    assert 15 < len(expected_val) < 60
    tok = manifest.load_tokenizer()
    _, val = read_split(out, "val")
    stream = unwindow(val)
    bos = [i for i, t in enumerate(stream) if t == BOS]
    val_docs = [tok.decode(stream[a:b]) for a, b in zip(bos, bos[1:] + [len(stream)])]
    assert val_docs == expected_val  # whole documents, in source order

    # the same documents in another order land in the same splits
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts)))
    out2 = storage.join(bucket, "hash2")
    prepare([str(tmp_path / "b.jsonl")], out2, data_cfg("data.split=hash", "data.val_fraction=0.3", "data.seq_len=32"))
    assert load_manifest(out2).splits["val"].documents == len(expected_val)
    assert summary["val_samples"] > 0


def test_bpe_respects_vocab_size(tiny_corpus, bucket):
    out = storage.join(bucket, "bpe")
    cfg = load_config(
        None,
        ["data.tokenizer=bpe", "data.vocab_size=400", "data.seq_len=32", "data.split=tail", "data.val_fraction=0.1"],
    ).data
    summary = prepare([str(tiny_corpus)], out, cfg)
    assert summary["vocab_size"] == 400
    manifest = load_manifest(out)
    tok = manifest.load_tokenizer()
    assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    _, train = read_split(out, "train")
    _, val = read_split(out, "val")
    assert train.max() < 400 and val.max() < 400
    assert summary["train_tokens"] < 0.8 * tiny_corpus.stat().st_size  # merges compress the text
    corpus = tiny_corpus.read_text()
    assert tok.decode(unwindow(val)) == corpus[-len(tok.decode(unwindow(val))) :]


def test_bpe_encoding_in_pieces_matches_whole_documents(shakespeare):
    import re

    from genpt_dist.tokenizer import byte_tokenizer, train_bpe

    text = shakespeare.read_text()[:400_000]
    bpe = train_bpe([text[:100_000]], 600)
    assert bpe.encode_arrays([text])[0].tolist() == bpe.encode(text)
    with pytest.MonkeyPatch.context() as mp:  # several encode calls, a document's pieces across two of them
        mp.setattr("genpt_dist.tokenizer.ENCODE_BATCH_CHARS", 150_000)
        docs = [text, text[:1000], "", text[5000:300_000]]
        assert [a.tolist() for a in bpe.encode_arrays(docs)] == [bpe.encode(d) for d in docs]
    # training on a long document (counted in pieces) = training on its lines, cut where a pre-token
    # always ends: after a newline between a visible character and a letter
    lines = re.split(r"(?<=[!-~]\n)(?=[A-Za-z])", text)
    assert len(lines) > 1000
    assert train_bpe([text], 700).to_json() == train_bpe(lines, 700).to_json()
    byte = byte_tokenizer()
    odd = "tab\there \u00e9\U0001f600 <eos> \x00\r\n" * 50
    assert byte.encode_arrays([odd, ""])[0].tolist() == byte.encode(odd)
    assert byte.encode_arrays([""])[0].tolist() == []


def test_inputs_from_an_s3_prefix(tmp_path, bucket):
    storage.write_text(storage.join(bucket, "corpus/part-1.txt"), "from s3, part one\n" * 20)
    storage.write_bytes(storage.join(bucket, "corpus/part-2.txt.gz"), gzip.compress(b"part two\n" * 20))
    storage.write_text(storage.join(bucket, "corpus/skip.bin"), "not a text extension")
    out = str(tmp_path / "from-s3")
    summary = prepare([storage.join(bucket, "corpus")], out, data_cfg("data.seq_len=16"))
    assert summary["documents"] == 2
    assert [s.url for s in load_manifest(out).sources] == [
        storage.join(bucket, "corpus/part-1.txt"),
        storage.join(bucket, "corpus/part-2.txt.gz"),
    ]


def test_unrelated_files_in_the_output_folder_survive(tmp_path, tiny_corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    prepare([str(tiny_corpus)], str(out), data_cfg("data.seq_len=64"))
    prepare([str(tiny_corpus)], str(out), data_cfg("data.seq_len=32"), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert load_manifest(str(out)).seq_len == 32
    names = {p.name for p in out.iterdir()}
    assert names == {
        "notes.txt",
        "manifest.json",
        "tokenizer.json",
        *(s.name for split in ("train", "val") for s in load_manifest(str(out)).shards(split)),
    }


def test_jsonl_without_the_text_field_is_refused(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: no string field 'text'"):
        prepare([str(tmp_path / "x.jsonl")], str(tmp_path / "out"), data_cfg())
    assert not (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.slow
def test_ray_tasks_tokenise_s3_inputs_like_the_driver(ray_session, bucket, shakespeare):
    """Above data.parallel_min_bytes the files are tokenised by Ray tasks (which must inherit the S3
    settings); the dataset is byte-for-byte the one the driver alone would write."""
    from genpt_dist.raycluster import core_count, one_core_options

    text = shakespeare.read_text()[:200_000]
    for i in range(6):
        storage.write_text(storage.join(bucket, f"corpus/part-{i}.txt"), text[i * 30_000 : (i + 1) * 30_000 + 5000])
    src = storage.join(bucket, "corpus")
    cfg = "data.seq_len=32", "data.val_fraction=0.2", "data.split=hash"
    in_driver = prepare([src], storage.join(bucket, "driver"), data_cfg(*cfg))
    in_ray = prepare([src], storage.join(bucket, "ray"), data_cfg(*cfg, "data.parallel_min_bytes=0"))
    assert ray_session.is_initialized()
    # one tokenising task per core: the local Ray has more CPUs than a small machine has cores
    assert core_count() == os.cpu_count() and one_core_options() == {"num_cpus": 1, "resources": {"core": 1}}
    a, b = load_manifest(storage.join(bucket, "driver")), load_manifest(storage.join(bucket, "ray"))
    assert [s.sha256 for s in a.shards("train") + a.shards("val")] == [
        s.sha256 for s in b.shards("train") + b.shards("val")
    ]
    assert in_driver["documents"] == in_ray["documents"] == 6

    storage.write_text(storage.join(bucket, "corpus/part-9.jsonl"), '{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"part-9\.jsonl:2: not valid JSON") as info:
        prepare([src], storage.join(bucket, "bad"), data_cfg(*cfg, "data.parallel_min_bytes=0"))
    assert "\n" not in str(info.value)  # the task's traceback stays out of the one-line message
