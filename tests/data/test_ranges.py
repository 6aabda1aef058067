"""Large files read in byte ranges (`data.tokenise`): the same dataset as reading them whole.

The unit and range sizes are lowered (`data.unit_bytes`, `data.range_min_bytes`), so tinyshakespeare-sized
files take the path a multi-GB file takes; every comparison is of shard hashes and summary counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genpt_dist.config import load_config
from genpt_dist.data import tokenise
from genpt_dist.data.manifest import SourceInfo, load_manifest
from genpt_dist.data.packing import pack
from genpt_dist.data.prepare import prepare
from genpt_dist.data.text import ReadStats

SMALL_RANGES = ("data.unit_bytes=40000", "data.range_min_bytes=100000")
COUNTS = ("train_samples", "val_samples", "train_tokens", "val_tokens", "documents", "split", "replacement_chars")


def _cfg(*overrides: str):
    return load_config(None, ["data.tokenizer=bpe", "data.vocab_size=400", "data.seq_len=64", *overrides]).data


def _shard_hashes(url: str) -> list[str]:
    manifest = load_manifest(url)
    return [s.sha256 for s in manifest.shards("train") + manifest.shards("val")]


@pytest.fixture
def awkward_text(shakespeare, tmp_path) -> Path:
    """tinyshakespeare with a BOM, CRLF and lone-CR line ends, multi-byte characters and invalid bytes."""
    data = shakespeare.read_bytes()[:400_000]
    third = len(data) // 3
    data = (
        b"\xef\xbb\xbf"
        + data[:third].replace(b"\n", b"\r\n")
        + data[third : 2 * third].replace(b"e", "\u00e9".encode()).replace(b"\n", b"\r", 50)
        + data[2 * third :].replace(b"the", b"th\xff")
    )
    path = tmp_path / "one.txt"
    path.write_bytes(data)
    return path


def test_ranges_cover_the_file_once_and_cut_only_where_the_pre_tokenizer_splits(awkward_text):
    size = awkward_text.stat().st_size
    units = tokenise.plan_units([SourceInfo(url=str(awkward_text), bytes=size, sha256="00" * 32)], 40_000, 100_000)
    assert len(units) == -(-size // 40_000) and all(len(u) == 1 and u[0].ranged for u in units)
    data = awkward_text.read_bytes()
    cuts = [tokenise.snap(str(awkward_text), u[0].start, size, tokenise._TEXT_CUT) for u in units] + [size]
    assert cuts[0] == 0 and cuts == sorted(cuts) and len(set(cuts)) > len(units) // 2
    for cut in cuts[1:-1]:  # after "<visible ASCII>\n", before a letter or digit: never inside CRLF or UTF-8
        assert data[cut - 1 : cut] == b"\n" and 0x21 <= data[cut - 2] <= 0x7E and chr(data[cut]).isalnum()
    stats = ReadStats()
    text = "".join(t for t in tokenise.sample_texts(units, "text", stats))
    whole = ReadStats()
    assert [[text]] == list(tokenise.iter_part_documents(tokenise.Part(str(awkward_text), size=size), "text", whole))
    assert (stats.files, stats.documents, stats.replacement_chars) == (1, 1, whole.replacement_chars)


def test_a_large_text_file_in_ranges_prepares_as_it_does_whole(awkward_text, tmp_path):
    whole = prepare([str(awkward_text)], str(tmp_path / "whole"), _cfg())
    ranged = prepare([str(awkward_text)], str(tmp_path / "ranged"), _cfg(*SMALL_RANGES))
    assert whole["split"].startswith("position") and whole["replacement_chars"] > 0
    assert {k: ranged[k] for k in COUNTS} == {k: whole[k] for k in COUNTS}
    assert _shard_hashes(str(tmp_path / "ranged")) == _shard_hashes(str(tmp_path / "whole"))
    assert (tmp_path / "ranged" / "tokenizer.json").read_text() == (tmp_path / "whole" / "tokenizer.json").read_text()


@pytest.mark.slow
def test_a_large_jsonl_file_in_ranges_in_ray_tasks_prepares_as_it_does_whole(ray_session, shakespeare, tmp_path):
    """Hash split (hundreds of documents), ranges cut at line ends, tokenised in Ray tasks."""
    lines = shakespeare.read_text()[:300_000].split("\n\n")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = "data.split=hash", "data.val_fraction=0.2"
    ranged = prepare([str(path)], str(tmp_path / "ranged"), _cfg(*cfg, *SMALL_RANGES, "data.parallel_min_bytes=0"))
    whole = prepare([str(path)], str(tmp_path / "whole"), _cfg(*cfg))
    assert whole["split"] == "hash" and whole["documents"] == len([t for t in lines if t.strip()])
    assert {k: ranged[k] for k in COUNTS} == {k: whole[k] for k in COUNTS}
    assert _shard_hashes(str(tmp_path / "ranged")) == _shard_hashes(str(tmp_path / "whole"))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_split_samples_read_row_by_row_equal_the_packing_rule(tmp_path, dtype):
    """`Split.samples` reads the rows it is asked for, in any order, as `packing.pack` cuts them; the last
    row of the stream is right-padded."""
    seq_len, pad = 8, 7
    stream = np.random.default_rng(0).integers(0, 1000, seq_len * 5 + 3, dtype=dtype)  # 6 samples, the last short
    path = tmp_path / "train.bin"
    stream.tofile(path)
    split = tokenise.Split(str(path), len(stream), 0, np.dtype(dtype))
    rows = np.array([5, 0, 3, 5, 1])
    assert split.num_samples(seq_len) == 6
    np.testing.assert_array_equal(split.samples(rows, seq_len, pad), pack(stream, seq_len, pad)[rows])
    assert split.samples(rows[:0], seq_len, pad).shape == (0, seq_len + 1)
    with pytest.raises(IndexError, match="sample 6 is not among the 6"):
        split.samples(np.array([6]), seq_len, pad)
