"""The reinforce stage's prompt source: formats, bad files, the held-out split, the shuffle, resume, ranks."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genpt_dist import storage
from genpt_dist.errors import UserError
from genpt_dist.rl.prompts import Prompt, PromptLoader, check_prompt_lengths, load_prompts, rank_slice, split_held_out

ROWS = [
    {"prompt": "What is 2 + 2?", "answer": "4", "tags": ["math"], "meta": {"level": 1}},
    {"prompt": "Name a colour.", "answer": None, "tags": [], "meta": {"level": 2}},
    {"prompt": "Say hi.", "answer": "hi", "tags": ["chat", "easy"], "meta": {"level": 1}},
]


def write_jsonl(path: Path, rows: list, *, blank_after: int | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def make_prompts(n: int) -> list[Prompt]:
    return [Prompt(index=i, text=f"prompt {i}", columns={"i": i}) for i in range(n)]


def texts(batch: list[Prompt]) -> list[str]:
    return [p.text for p in batch]


# ---------------------------------------------------------------- formats


def test_jsonl_keeps_columns_and_skips_blank_lines(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", ROWS, blank_after=1)
    prompts = load_prompts(src)
    assert texts(prompts) == [r["prompt"] for r in ROWS]
    assert [p.columns for p in prompts] == [{k: v for k, v in r.items() if k != "prompt"} for r in ROWS]
    assert [p.index for p in prompts] == [0, 2, 3]  # line - 1: the blank line 2 counts


def test_jsonl_and_parquet_give_the_same_prompts(tmp_path):
    from_jsonl = load_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS))
    from_parquet = load_prompts(write_parquet(tmp_path / "p.parquet", ROWS))
    assert from_jsonl == from_parquet


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    assert load_prompts(str(path)) == load_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS))


def test_custom_prompt_field(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "prompt": "kept as a column"}])
    (p,) = load_prompts(src, prompt_field="question")
    assert p.text == "Why?" and p.columns == {"prompt": "kept as a column"}


def test_s3_jsonl(bucket):
    url = f"{bucket}/prompts/p.jsonl"
    storage.write_bytes(url, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    assert texts(load_prompts(url)) == [r["prompt"] for r in ROWS]
    with pytest.raises(UserError, match=r"missing\.jsonl: prompt file does not exist"):
        load_prompts(f"{bucket}/missing.jsonl")


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: prompt file does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_unknown_extension(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nhi\n")
    accepted = re.escape("(accepted: .jsonl, .jsonl.gz, .parquet)")
    with pytest.raises(UserError, match=rf"p\.csv: unknown prompt file type {accepted}"):
        load_prompts(str(tmp_path / "p.csv"))


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ('{"prompt": "a"', r"p\.jsonl: line 3 is not valid JSON"),
        ('["prompt", "a"]', r"p\.jsonl: line 3 is a JSON array, not an object"),
        ("42", r"p\.jsonl: line 3 is a JSON number, not an object"),
        ('{"text": "a", "id": 1}', r"p\.jsonl: line 3 has no 'prompt' field \(fields: 'text', 'id'\)"),
        ('{"prompt": 7}', r"p\.jsonl: line 3: 'prompt' must be a string, not a JSON number"),
        ('{"prompt": null}', r"p\.jsonl: line 3: 'prompt' must be a string, not a JSON null"),
    ],
)
def test_bad_jsonl_line(tmp_path, bad_line, match):
    path = tmp_path / "p.jsonl"
    path.write_text(f'{{"prompt": "ok"}}\n\n{bad_line}\n{{"prompt": "after"}}\n')
    with pytest.raises(UserError, match=match):
        load_prompts(str(path))


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl: line 2 is not valid UTF-8"):
        load_prompts(str(path))


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_jsonl(tmp_path, content):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(UserError, match=r"p\.jsonl: no prompts"):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_corrupt_gzip(tmp_path):
    (tmp_path / "p.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"p\.jsonl\.gz: not a valid gzip file"):
        load_prompts(str(tmp_path / "p.jsonl.gz"))


def test_parquet_without_the_column(tmp_path):
    src = write_parquet(tmp_path / "p.parquet", [{"text": "a", "label": 1}])
    with pytest.raises(UserError, match=r"p\.parquet: no column 'prompt' \(columns: text, label\)"):
        load_prompts(src)


def test_parquet_prompt_not_a_string(tmp_path):
    src = write_parquet(tmp_path / "p.parquet", [{"prompt": "a"}, {"prompt": None}])
    with pytest.raises(UserError, match=r"p\.parquet: row 1 \(0-based\): 'prompt' must be a string, not a JSON null"):
        load_prompts(src)


def test_empty_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(UserError, match=r"p\.parquet: no prompts"):
        load_prompts(str(path))


def test_corrupt_parquet(tmp_path):
    good = Path(write_parquet(tmp_path / "good.parquet", ROWS)).read_bytes()
    for name, data in [("junk.parquet", b"this is not parquet"), ("cut.parquet", good[: len(good) // 2])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=re.escape(f"{name}: not a valid parquet file")) as info:
            load_prompts(str(tmp_path / name))
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- prompt lengths


def encode(text: str) -> list[int]:
    return list(text.encode())  # one token a byte


def test_prompt_lengths_fit(tmp_path):
    prompts = [Prompt(0, "abc", {}), Prompt(1, "abcd", {})]
    check_prompt_lengths(prompts, encode, max_new_tokens=3, context=8, src="p.jsonl")  # 1 + 4 + 3 = 8


def test_prompt_too_long_names_the_jsonl_line(tmp_path):
    rows = [{"prompt": "ab"}, {"prompt": "abcdef"}, {"prompt": "abcdefgh"}]
    src = write_jsonl(tmp_path / "p.jsonl", rows, blank_after=1)
    with pytest.raises(UserError, match=r"p\.jsonl: the prompt at line 3 has 6 tokens; at most 4 fit \(context 8"):
        check_prompt_lengths(load_prompts(src), encode, max_new_tokens=3, context=8, src=src)


def test_prompt_too_long_names_the_parquet_row(tmp_path):
    src = write_parquet(tmp_path / "p.parquet", [{"prompt": "ab"}, {"prompt": "abcdef"}])
    with pytest.raises(UserError, match=r"p\.parquet: the prompt at row 1 \(0-based\) has 6 tokens; at most 4 fit"):
        check_prompt_lengths(load_prompts(src), encode, max_new_tokens=3, context=8, src=src)


def test_no_room_for_any_prompt():
    with pytest.raises(UserError, match=r"max_new_tokens 8 \+ <bos> exceed the model's context of 8"):
        check_prompt_lengths([Prompt(0, "", {})], encode, max_new_tokens=8, context=8, src="p.jsonl")


# ---------------------------------------------------------------- held-out split


def test_held_out_split_is_deterministic_and_disjoint():
    prompts = make_prompts(200)
    train, held = split_held_out(prompts, 0.2)
    assert split_held_out(prompts, 0.2) == (train, held)
    assert split_held_out(list(reversed(prompts)), 0.2)[1] == list(reversed(held))  # by text, not position
    assert {p.index for p in train}.isdisjoint(p.index for p in held)
    assert sorted(p.index for p in train + held) == list(range(200))
    assert 10 < len(held) < 70


def test_held_out_split_fixed_across_runs():
    # sha256 of the text, not Python's salted hash: this exact split holds on every machine.
    _, held = split_held_out(make_prompts(20), 0.25)
    assert [p.index for p in held] == [2, 6, 7, 14, 15, 19]


def test_held_out_fraction_zero():
    prompts = make_prompts(5)
    assert split_held_out(prompts, 0.0) == (prompts, [])


def test_held_out_empty_side():
    with pytest.raises(UserError, match=r"held-out fraction 0\.001 of 2 prompts leaves the held-out side empty"):
        split_held_out(make_prompts(2), 0.001)
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        split_held_out(make_prompts(2), 1.0)


# ---------------------------------------------------------------- the loader


def test_epochs_are_permutations_in_different_orders():
    prompts = make_prompts(10)
    loader = PromptLoader(prompts, batch_size=3, seed=1)  # 3 batches an epoch, 1 prompt dropped
    epochs = [[p.index for _ in range(3) for p in loader.next_batch()] for _ in range(4)]
    for order in epochs:
        assert len(order) == len(set(order)) == 9
        assert set(order) <= set(range(10))
    assert len({tuple(o) for o in epochs}) == 4
    assert loader.state_dict() == {"epoch": 4, "batch": 0}


def test_same_seed_same_order_other_seed_other_order():
    prompts = make_prompts(12)
    a, b, c = (PromptLoader(prompts, batch_size=4, seed=s) for s in (7, 7, 8))
    run_a, run_b, run_c = ([texts(x.next_batch()) for _ in range(6)] for x in (a, b, c))
    assert run_a == run_b
    assert run_a != run_c


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 7])
def test_resume_continues_exactly(k):
    prompts = make_prompts(11)
    straight = PromptLoader(prompts, batch_size=3, seed=3)
    expected = [texts(straight.next_batch()) for _ in range(12)]

    first = PromptLoader(prompts, batch_size=3, seed=3)
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint's meta.json holds it
    resumed = PromptLoader(prompts, batch_size=3, seed=3)
    resumed.load_state_dict(state)
    assert [texts(resumed.next_batch()) for _ in range(12 - k)] == expected[k:]


def test_bad_state():
    loader = PromptLoader(make_prompts(10), batch_size=3, seed=0)
    with pytest.raises(UserError, match=r"does not fit 10 prompts in batches of 3 \(3 batches an epoch\)"):
        loader.load_state_dict({"epoch": 0, "batch": 3})
    with pytest.raises(UserError, match=r"is not \{'epoch': int, 'batch': int\}"):
        loader.load_state_dict({"epoch": 0})


def test_batch_larger_than_prompts():
    with pytest.raises(UserError, match=r"prompt batch size 6 is larger than the 5 prompts"):
        PromptLoader(make_prompts(5), batch_size=6, seed=0)


def test_rank_slices_partition_a_batch():
    batch = PromptLoader(make_prompts(20), batch_size=12, seed=0).next_batch()
    for world in (1, 2, 3, 4, 6, 12):
        slices = [rank_slice(batch, r, world) for r in range(world)]
        assert all(len(s) == 12 // world for s in slices)
        assert [p for s in slices for p in s] == batch


def test_rank_slice_uneven():
    with pytest.raises(UserError, match=r"a batch of 10 prompts does not split evenly over 4 ranks"):
        rank_slice(make_prompts(10), 0, 4)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        rank_slice(make_prompts(10), 2, 2)
