"""`python launch.py prepare` as a user runs it: bad input exits 2 with one line naming the problem.

The contract (ARCHITECTURE.md): exit 2, the last stderr line is `genpt-dist: error: ...`, no
traceback, anything else on stderr is a log line, and nothing a later command would take for a
complete dataset (a manifest.json) is left behind. Success prints the JSON summary as the last
stdout line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genpt_dist import storage

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one error line last on stderr naming the problem, no traceback; returns that line."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("genpt-dist: error: "), proc.stderr
    assert all(LOG_LINE.match(line) for line in lines[:-1]), f"stray stderr lines: {lines[:-1]}"
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert proc.stdout.strip() == ""
    return lines[-1]


def prepare_args(src, out, *extra: str) -> list[str]:
    return ["prepare", "--input", str(src), "--output", str(out), "--config", TINY, *extra]


def no_manifest(out: str) -> bool:
    return not storage.exists(storage.join(out, "manifest.json"))


def test_success_prints_the_summary_last(tiny_corpus, tmp_path):
    out = tmp_path / "ds"
    proc = run_cli(*prepare_args(tiny_corpus, out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["command"] == "prepare" and summary["reused"] is False
    assert summary["manifest"] == str(out / "manifest.json") and (out / "manifest.json").is_file()
    assert summary["train_samples"] > 0 and summary["val_samples"] > 0
    assert "Traceback" not in proc.stderr and "\r" not in proc.stderr  # no progress-bar debris


def test_no_input_matches(tmp_path):
    out = tmp_path / "out"
    line = assert_user_error(run_cli(*prepare_args(tmp_path / "nothing-*.txt", out)), "no input files match")
    assert "nothing-*.txt" in line and no_manifest(str(out))


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n\n\t\n")
    out = tmp_path / "out"
    assert_user_error(run_cli(*prepare_args(tmp_path / "blank.txt", out)), "empty corpus")
    assert no_manifest(str(out))


def test_only_binary_files_with_the_default_bpe(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x7fELF\x00\x00\x01" * 10)
    (tmp_path / "b.txt").write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    proc = run_cli("prepare", "--input", str(tmp_path), "--output", str(out))  # default config: BPE
    assert_user_error(proc, "only binary files", "2 skipped")
    assert len(proc.stderr.splitlines()) == 1  # refused before training anything
    assert no_manifest(str(out))


def test_missing_bucket_is_named(s3_server, tiny_corpus):
    out = "s3://bucket-that-is-not-there/ds"
    assert_user_error(run_cli(*prepare_args(tiny_corpus, out)), "'bucket-that-is-not-there'", "does not exist")


def test_wrong_credentials(s3_auth_server, tiny_corpus):
    env = {"AWS_ENDPOINT_URL_S3": s3_auth_server.endpoint, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0"}
    assert_user_error(
        run_cli(*prepare_args(tiny_corpus, "s3://any-bucket/ds"), env=env),
        "rejected the credentials",
        "InvalidAccessKeyId",
    )


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.seq_lenn=64", "config error at data.seq_lenn: unknown key"),
        ("data.seq_len=1", "config error at data.seq_len:"),
        ("data.vocab_size=100", "vocab_size=100 is smaller than the 256 byte symbols + 3 special tokens"),
    ],
)
def test_bad_config(tiny_corpus, tmp_path, override, needle):
    out = tmp_path / "out"
    assert_user_error(
        run_cli(*prepare_args(tiny_corpus, out, "--set", "data.tokenizer=bpe", "--set", override)), needle
    )
    assert not out.exists()


def test_unknown_key_in_a_config_file(tiny_corpus, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  seq_len: 32\nloader:\n  workers: 2\n")
    proc = run_cli("prepare", "--input", str(tiny_corpus), "--output", str(tmp_path / "out"), "--config", str(cfg))
    assert_user_error(proc, "config error at loader.workers: unknown key")


def test_bad_arguments_are_one_line_too(tmp_path):
    assert_user_error(run_cli("prepare", "--output", str(tmp_path)), "--input")
    assert_user_error(run_cli("no-such-command"), "invalid choice")


def test_a_different_dataset_is_refused_unless_overwrite(tiny_corpus, bucket):
    out = storage.join(bucket, "ds")
    first = run_cli(*prepare_args(tiny_corpus, out))
    assert first.returncode == 0, first.stderr
    before = storage.read_bytes(storage.join(out, "manifest.json"))

    refused = run_cli(*prepare_args(tiny_corpus, out, "--set", "data.seq_len=32"))
    assert_user_error(refused, out, "already holds a different dataset", "--overwrite")
    assert storage.read_bytes(storage.join(out, "manifest.json")) == before  # untouched

    again = run_cli(*prepare_args(tiny_corpus, out))  # the same dataset: re-used, not refused
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["reused"] is True

    replaced = run_cli(*prepare_args(tiny_corpus, out, "--set", "data.seq_len=32", "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr
    summary = json.loads(replaced.stdout.splitlines()[-1])
    assert summary["reused"] is False
    manifest = json.loads(storage.read_bytes(storage.join(out, "manifest.json")))
    assert manifest["seq_len"] == 32
    listed = {u.rsplit("/", 1)[-1] for u in storage.list_files(out)}
    assert listed == {
        "manifest.json",
        "tokenizer.json",
        *(s["name"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]),
    }


def test_unknown_bench_lists_the_known_ones():
    line = assert_user_error(run_cli("bench", "no-such-bench"), "unknown benchmark 'no-such-bench'")
    assert "loader" in line and "prepare" in line


@pytest.mark.slow
def test_loader_bench_quick(tmp_path):
    """The benchmark starts its own moto server, measures ours and the webdataset peer, writes JSON."""
    env = {k: "" for k in ("AWS_ENDPOINT_URL_S3",)}  # it must not depend on the session's server
    proc = run_cli("bench", "loader", "--quick", "--output", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["command"] == "bench" and summary["bench"] == "loader"
    saved = json.loads((tmp_path / "loader.json").read_text())
    assert len(saved["rows"]) == 4
    assert all(r["ours_tok_s"] > 0 and r["webdataset_tok_s"] > 0 for r in saved["rows"])
    assert "ours_tok_s" in proc.stderr  # the table
