"""Inputs beyond text and JSONL, for `prepare` and `finetune --task`: parquet (read a row group at a time,
locally and from S3 by byte ranges), Hugging Face `datasets` folders, `.gz` and `.zst`; the defaults on a
small corpus or task (a position split); and the one-line errors for bad columnar input.

Every input is a real file written here with pyarrow, `datasets`, zstandard or gzip, and each must give
the very documents (and the very shards) the same texts give as JSONL.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from genpt_dist import cli, storage
from genpt_dist.config import FinetuneConfig, load_config
from genpt_dist.data import text as text_module
from genpt_dist.data.manifest import MANIFEST, load_manifest
from genpt_dist.data.prepare import SMALL_CORPUS_DOCUMENTS, prepare
from genpt_dist.data.task import SMALL_TASK_EXAMPLES, load_task
from genpt_dist.data.text import ReadStats, iter_document_batches, read_documents
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
TEXTS = [
    f"document {i}: caf\u00e9 na\u00efve\nsecond line of {i}, and some more words to tokenise\n" for i in range(30)
]


def small_cfg(*overrides: str):
    """The tiny recipe with prepare's default split (hash), 16-token samples."""
    return load_config(TINY, ["data.split=hash", "data.seq_len=16", *overrides]).data


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def save_dataset(path: Path, columns: dict[str, list], shards: int = 3) -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(columns).save_to_disk(str(path), num_shards=shards)
    return path


def zst(data: bytes) -> bytes:
    """Two zstandard frames written by a streaming compressor (no stored content size)."""
    c = zstandard.ZstdCompressor()
    half = len(data) // 2
    frames = b""
    for part in (data[:half], data[half:]):
        obj = c.compressobj()
        frames += obj.compress(part) + obj.flush()
    return frames


def shard_hashes(out: str) -> dict[str, list[str]]:
    manifest = load_manifest(out)
    return {s: [x.sha256 for x in manifest.shards(s)] for s in ("train", "val")}


# ---------------------------------------------------------------- every input kind, the same documents


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    """The same 30 documents as JSONL and as every other multi-document input kind."""
    raw = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    (tmp_path / "gz").mkdir()
    (tmp_path / "zst").mkdir()
    (tmp_path / "gz" / "docs.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "zst" / "docs.jsonl.zst").write_bytes(zst(raw))
    return {
        "jsonl": write_jsonl(tmp_path / "docs.jsonl", TEXTS),
        "parquet": write_parquet(tmp_path / "docs.parquet", {"text": TEXTS, "n": list(range(30))}, row_group_size=7),
        "datasets": save_dataset(tmp_path / "docs-ds", {"text": TEXTS, "n": list(range(30))}),
        "jsonl.gz": tmp_path / "gz" / "docs.jsonl.gz",
        "jsonl.zst": tmp_path / "zst" / "docs.jsonl.zst",
    }


@pytest.mark.parametrize("kind", ["parquet", "datasets", "jsonl.gz", "jsonl.zst"])
def test_each_input_kind_prepares_like_the_same_jsonl(inputs, kind, tmp_path):
    reference = prepare([str(inputs["jsonl"])], str(tmp_path / "ref"), small_cfg())
    # A datasets folder and the folders holding the compressed files are given as folders: the arrow
    # files are found through state.json, the compressed ones by their inner extension.
    src = inputs[kind] if kind in ("parquet", "datasets") else inputs[kind].parent
    summary = prepare([str(src)], str(tmp_path / kind), small_cfg())
    assert summary["documents"] == reference["documents"] == len(TEXTS)
    assert shard_hashes(str(tmp_path / kind)) == shard_hashes(str(tmp_path / "ref"))
    if kind == "datasets":
        sources = [storage.name(s.url) for s in load_manifest(str(tmp_path / kind)).sources]
        assert sources == [f"data-0000{i}-of-00003.arrow" for i in range(3)]  # not state.json, not the info


def test_compressed_text_files_are_one_document_each(tmp_path):
    body = "one whole document\nover two lines\n"
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(body.encode()))
    (tmp_path / "b.md.zst").write_bytes(zst(body.encode()))
    for name in ("a.txt.gz", "b.md.zst"):
        assert read_documents(str(tmp_path / name), "text", ReadStats()) == [body]


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    texts = [f"row {i}" for i in range(35)]
    path = write_parquet(tmp_path / "groups.parquet", {"text": texts}, row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 4
    batches = list(iter_document_batches(str(path), "text", ReadStats()))
    assert [len(b) for b in batches] == [10, 10, 10, 5]  # a batch never spans two row groups
    assert [d for b in batches for d in b] == texts  # every group, in order
    monkeypatch.setattr(text_module, "BATCH_ROWS", 4)  # and never more than BATCH_ROWS rows at once
    batches = list(iter_document_batches(str(path), "text", ReadStats()))
    assert [len(b) for b in batches] == [4, 4, 2] * 3 + [4, 1]
    assert [d for b in batches for d in b] == texts


def test_parquet_nulls_and_blanks_are_skipped_and_counted(tmp_path):
    path = write_parquet(tmp_path / "holes.parquet", {"text": ["a", None, "  ", "b"]})
    stats = ReadStats()
    assert read_documents(str(path), "text", stats) == ["a", "b"]
    assert (stats.files, stats.documents, stats.empty_skipped) == (1, 2, 2)


def test_parquet_and_datasets_from_s3_are_read_by_byte_ranges(tmp_path, bucket, monkeypatch):
    import random

    rng = random.Random(0)
    texts = ["".join(rng.choices("abcdefghij klmnop\n", k=20_000)) for _ in range(40)]
    local = write_parquet(tmp_path / "big.parquet", {"text": texts}, row_group_size=10)
    url = storage.join(bucket, "corpus/big.parquet")
    storage.write_bytes(url, local.read_bytes())
    save_dataset(tmp_path / "ds", {"text": texts[:5]}, shards=2)
    storage.upload_dir(tmp_path / "ds", storage.join(bucket, "ds"))

    reads: list[tuple[str, int | None, int | None]] = []
    real = storage.read_bytes

    def spy(u, start=None, end=None):
        reads.append((u, start, end))
        return real(u, start, end)

    monkeypatch.setattr(storage, "read_bytes", spy)
    monkeypatch.setattr(text_module, "RANGE_BUFFER", 64 << 10)  # below the file's 800 KB
    assert read_documents(url, "text", ReadStats()) == texts
    size = local.stat().st_size
    assert reads and all(start is not None and end is not None for _, start, end in reads)
    assert max(end - start for _, start, end in reads) < size / 2  # never the whole object at once

    summary = prepare([storage.join(bucket, "ds")], str(tmp_path / "out"), small_cfg())
    assert summary["documents"] == 5


# ---------------------------------------------------------------- small corpora with the defaults


def test_a_two_file_and_a_one_file_corpus_prepare_with_the_default_split(tiny_corpus, tmp_path):
    half = tiny_corpus.read_text().split("\n\n")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.txt").write_text("\n\n".join(half[: len(half) // 2]))
    (tmp_path / "two" / "b.txt").write_text("\n\n".join(half[len(half) // 2 :]))
    cfg = load_config(TINY, ["data.split=hash"]).data  # the recipe with prepare's default split
    assert load_config(None).data.split == "hash"

    two = prepare([str(tmp_path / "two")], str(tmp_path / "out2"), cfg)
    assert two["split"] == f"position (2 documents < {SMALL_CORPUS_DOCUMENTS})"
    assert two["train_samples"] > 0 and two["val_samples"] > 0
    total = two["train_tokens"] + two["val_tokens"]
    assert two["val_tokens"] == int(total * cfg.val_fraction)  # the last val_fraction of the tokens
    manifest = load_manifest(str(tmp_path / "out2"))
    assert manifest.split == two["split"] and manifest.splits["val"].documents is None

    again = prepare([str(tmp_path / "two")], str(tmp_path / "out2"), cfg)
    assert again["reused"] and again["split"] == two["split"]

    one = prepare([str(tiny_corpus)], str(tmp_path / "out1"), load_config(None).data)  # every default: BPE, 256
    assert one["split"] == f"position (1 documents < {SMALL_CORPUS_DOCUMENTS})"
    assert one["train_samples"] > 0 and one["val_samples"] > 0


def test_a_small_corpus_gets_at_least_one_whole_val_sample(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 400)  # 402 tokens: 1% is 4, under one 17-token sample
    summary = prepare([str(tmp_path / "short.txt")], str(tmp_path / "out"), small_cfg("data.val_fraction=0.01"))
    assert summary["val_tokens"] == 17 and summary["val_samples"] == 1


def test_enough_documents_keep_the_hash_split(tmp_path):
    texts = [f"document number {i} with its own words" for i in range(SMALL_CORPUS_DOCUMENTS + 10)]
    summary = prepare([str(write_jsonl(tmp_path / "d.jsonl", texts))], str(tmp_path / "out"), small_cfg())
    assert summary["split"] == "hash"
    manifest = load_manifest(str(tmp_path / "out"))
    assert manifest.splits["train"].documents + manifest.splits["val"].documents == len(texts)


# ---------------------------------------------------------------- finetune tasks


def _pc_rows(n: int) -> dict[str, list[str]]:
    return {
        "prompt": [f"{i % 10} {i // 10} ->" for i in range(n)],
        "completion": [f" {i // 10} {i % 10}" for i in range(n)],
    }


def _tokens(examples) -> list[tuple[int, ...]]:
    return [tuple(e.tokens) for e in examples]


def test_a_parquet_or_datasets_task_loads_like_the_same_jsonl(tmp_path):
    tok, cfg = byte_tokenizer(), FinetuneConfig()
    rows = _pc_rows(100)
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(rows["prompt"], rows["completion"]))
    )
    reference = load_task(str(tmp_path / "t.jsonl"), tok, cfg, block_size=64)
    assert reference.split == "hash"
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress((tmp_path / "t.jsonl").read_bytes()))
    pq_path = write_parquet(tmp_path / "t.parquet", {**rows, "extra": list(range(100))}, row_group_size=30)
    ds_path = save_dataset(tmp_path / "t-ds", rows)
    for src in (tmp_path / "t.jsonl.gz", pq_path, ds_path):
        data = load_task(str(src), tok, cfg, block_size=64)
        assert data.kind == "prompt-completion" and data.split == "hash"
        assert _tokens(data.train) == _tokens(reference.train) and _tokens(data.val) == _tokens(reference.val)

    text_task = write_parquet(tmp_path / "text.parquet", {"body": ["plain text one", "plain text two"]})
    data = load_task(str(text_task), tok, FinetuneConfig(text_field="body"), block_size=64)
    assert data.kind == "text" and len(data.train) + len(data.val) == 2


def test_a_small_task_holds_back_its_last_examples(tmp_path, caplog):
    tok, cfg = byte_tokenizer(), FinetuneConfig(val_fraction=0.1)
    n = 24
    path = write_parquet(tmp_path / "small.parquet", _pc_rows(n))
    with caplog.at_level(logging.INFO, logger="genpt_dist.data.task"):
        data = load_task(str(path), tok, cfg, block_size=64)
    assert data.split == f"position ({n} examples < {SMALL_TASK_EXAMPLES})"
    assert len(data.val) == 2 and len(data.train) == n - 2
    assert [tok.decode(e.tokens[1 : 1 + e.loss_from]) for e in data.val] == _pc_rows(n)["prompt"][-2:]
    assert "split by position" in caplog.text

    one_val = load_task(str(write_parquet(tmp_path / "three.parquet", _pc_rows(3))), tok, cfg, block_size=64)
    assert len(one_val.val) == 1 and len(one_val.train) == 2  # at least one, even when 10% rounds to none


# ---------------------------------------------------------------- bad input: one line each


def _one_line_error(fn) -> str:
    with pytest.raises(UserError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_parquet_without_the_text_column(tmp_path):
    path = write_parquet(tmp_path / "cols.parquet", {"body": ["a"], "id": [1]})
    msg = _one_line_error(lambda: prepare([str(path)], str(tmp_path / "out"), small_cfg()))
    assert str(path) in msg and "no column 'text'" in msg and "body, id" in msg and "data.text_field" in msg
    assert not (tmp_path / "out" / MANIFEST).exists()
    ints = write_parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    msg = _one_line_error(lambda: prepare([str(ints)], str(tmp_path / "out"), small_cfg()))
    assert str(ints) in msg and "not text" in msg


def test_corrupt_parquet_is_named(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", {"text": [f"row {i}" for i in range(100)]}, row_group_size=20)
    data = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])  # no footer
    (tmp_path / "noise.parquet").write_bytes(b"this is not parquet at all" * 10)
    # A sound footer, but the third row group's first page header overwritten: found while reading.
    chunk = pq.ParquetFile(good).metadata.row_group(2).column(0)
    at = chunk.dictionary_page_offset or chunk.data_page_offset
    (tmp_path / "garbled.parquet").write_bytes(data[:at] + b"\xff" * 16 + data[at + 16 :])
    assert pq.ParquetFile(tmp_path / "garbled.parquet").num_row_groups == 5
    for name in ("cut.parquet", "noise.parquet", "garbled.parquet"):
        path = tmp_path / name
        msg = _one_line_error(lambda p=path: prepare([str(p)], str(tmp_path / "out"), small_cfg()))
        assert str(path) in msg and "not a readable parquet file" in msg


def test_datasets_folder_without_the_column(tmp_path):
    folder = save_dataset(tmp_path / "ds", {"body": ["a", "b"], "n": [1, 2]}, shards=1)
    msg = _one_line_error(lambda: prepare([str(folder)], str(tmp_path / "out"), small_cfg()))
    assert f"datasets folder {folder}" in msg and "no column 'text'" in msg and "body, n" in msg


def test_bad_task_columns_and_folders(tmp_path):
    tok, cfg = byte_tokenizer(), FinetuneConfig()
    no_cols = write_parquet(tmp_path / "t.parquet", {"question": ["q"], "answer": ["a"]})
    msg = _one_line_error(lambda: load_task(str(no_cols), tok, cfg, block_size=64))
    assert str(no_cols) in msg and "no column 'text'" in msg and "question, answer" in msg and "'prompt'" in msg
    half = write_parquet(tmp_path / "half.parquet", {"prompt": ["q"]})
    assert "no column 'completion'" in _one_line_error(lambda: load_task(str(half), tok, cfg, block_size=64))
    nulls = write_parquet(tmp_path / "nulls.parquet", {"prompt": ["q", "r"], "completion": [" a", None]})
    assert "nulls.parquet row 2: needs string fields" in _one_line_error(
        lambda: load_task(str(nulls), tok, cfg, block_size=64)
    )
    import datasets

    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(_pc_rows(4))}).save_to_disk(str(tmp_path / "dd"))
    msg = _one_line_error(lambda: load_task(str(tmp_path / "dd"), tok, cfg, block_size=64))
    assert "DatasetDict" in msg and f"{tmp_path / 'dd'}/train" in msg
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    assert "not a valid zstandard file" in _one_line_error(
        lambda: load_task(str(tmp_path / "bad.jsonl.zst"), tok, cfg, block_size=64)
    )


def test_the_cli_exits_2_with_the_line(tmp_path, capsys):
    path = write_parquet(tmp_path / "cols.parquet", {"body": ["a"]})
    code = cli.main(["prepare", "--input", str(path), "--output", str(tmp_path / "out"), "--config", str(TINY)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("genpt-dist: error: ") and "no column 'text'" in err[-1]
