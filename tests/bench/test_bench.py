"""`bench sync`, `bench checkpoint`, `bench prepare` (quick) and `bench all`'s summary: the figures a user
checks are there and agree with each other; an unknown bench is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genpt_dist.bench import run_bench

REPO = Path(__file__).resolve().parents[2]


def test_sync_quick_publishes_to_both_actors(ray_session, tmp_path):
    from genpt_dist.bench.sync import SHAPES
    from genpt_dist.model.gpt import GPT, GPTConfig

    summary = run_bench("sync", str(tmp_path), quick=True)
    result = json.loads((tmp_path / "sync.json").read_text())
    assert ray_session.is_initialized(), "a bench must leave a Ray it did not start running"
    (row,) = result["rows"]
    assert row["size"] == "10M"
    for key in ("sync_s", "put_s", "load_s", "memcpy_s"):
        assert row[key] > 0, (key, row)
    assert row["sync_s"] >= row["put_s"]
    assert summary["sync_s_10M"] == row["sync_s"] and summary["memcpy_s_10M"] == row["memcpy_s"]
    assert summary["ratio_vs_memcpy"] == pytest.approx(row["sync_s"] / row["memcpy_s"], abs=0.01)
    vocab, d, n_layer, n_head = SHAPES["10M"]
    state = GPT(GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, d_model=d)).state_dict()
    published = sum(4 * v.numel() for k, v in state.items() if k != "lm_head.weight")  # tied to wte: once
    assert summary["bytes_10M"] == published, "fp32, as the stage publishes, the tied embedding once"


def test_checkpoint_quick_restores_what_was_saved(tmp_path):
    summary = run_bench("checkpoint", str(tmp_path), quick=True)
    result = json.loads((tmp_path / "checkpoint.json").read_text())
    assert 15e6 < result["bytes"] < 25e6
    for op in ("upload_s", "restore_s"):
        assert result[op]["ours"] > 0 and result[op]["boto3"] > 0
    assert summary["ratio_upload"] == pytest.approx(result["upload_s"]["boto3"] / result["upload_s"]["ours"], rel=1e-2)
    assert summary["ratio_restore"] == pytest.approx(
        result["restore_s"]["boto3"] / result["restore_s"]["ours"], rel=1e-2
    )
    assert result["restored_bytes"] == {"ours": result["bytes"], "boto3": result["bytes"]}
    assert result["restored_identical"] == {"ours": True, "boto3": True}
    assert result["target"]["met"] == (min(summary["ratio_upload"], summary["ratio_restore"]) >= 0.5)


def test_prepare_quick_measures_the_command_against_encode_batch_alone(tmp_path):
    from genpt_dist.bench import HEADLINES

    summary = run_bench("prepare", str(tmp_path), quick=True)
    result = json.loads((tmp_path / "prepare.json").read_text())
    tenth, files, one = result["rows"]
    assert tenth["mb"] == pytest.approx(files["mb"] / 10, rel=0.3) and files["mb"] == one["mb"]  # whole files
    for row in (files, one):  # the same text: the same floor, and (but for file boundaries) the same tokens
        assert row["floor_mb_s"] == files["floor_mb_s"] > 0 and row["peak_rss_mb"] >= row["peak_pss_mb"] > 0
        assert row["vs_floor"] == pytest.approx(row["ours_mb_s"] / row["floor_mb_s"], rel=0.02)
        assert row["bpe_training_s"] < row["ours_s"]
    assert one["tokens"] == pytest.approx(files["tokens"], rel=0.01)
    for kind in ("rss", "pss"):
        key = f"peak_{kind}_mb"
        assert summary[f"{kind}_full_vs_tenth"] == pytest.approx(max(files[key], one[key]) / tenth[key], abs=0.01)
    assert all(read(result) is not None for _, read, _, _ in HEADLINES["prepare"])


@pytest.mark.slow
def test_ttq_quick_curves_val_bpb_against_the_pretrain_clock(ray_session, tmp_path):
    from genpt_dist.bench.ttq import QUICK

    summary = run_bench("ttq", str(tmp_path), quick=True)
    result = json.loads((tmp_path / "ttq.json").read_text())
    curve = result["rows"]
    steps = int(next(o for o in QUICK if o.startswith("train.steps=")).split("=")[1])
    assert [p["step"] for p in curve] == [4, 8, 12] and result["final_step"] == steps
    # seconds since pretrain's start, in order (a tiny model's evals may fall in the same hundredth)
    assert curve[0]["seconds"] > 0 and all(a["seconds"] <= b["seconds"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["seconds"] <= result["pretrain_s"]
    assert curve[-1]["val_bpb"] < curve[0]["val_bpb"] and summary["final_bpb"] == curve[-1]["val_bpb"]
    assert summary["best_bpb_in_budget"] == min(p["val_bpb"] for p in curve)
    assert (tmp_path / "ttq.png").stat().st_size > 10_000


def test_all_runs_each_bench_in_a_process_and_checks_its_targets(tmp_path):
    """`bench all --only checkpoint`: a real child process, its JSON read back, its figures judged."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "bench",
            "all",
            "--quick",
            "--only",
            "checkpoint",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    child = json.loads((tmp_path / "checkpoint.json").read_text())
    rows = json.loads((tmp_path / "all.json").read_text())["rows"]
    assert {r["bench"] for r in rows} == {"checkpoint"} and summary["failed"] == []
    by_figure = {r["figure"]: r for r in rows}
    for figure, key in (("upload vs boto3, x", "ratio_upload"), ("restore vs boto3, x", "ratio_restore")):
        row = by_figure[figure]
        assert row["value"] == pytest.approx(child[key], abs=1e-3) and row["target"] == ">= 0.5"
        assert row["met"] == ("met" if child[key] >= 0.5 else "NOT MET")
    assert summary["targets"] == 2 and summary["targets_met"] == sum(r["met"] == "met" for r in rows)
    assert "bench all (quick)" in proc.stderr  # the summary table


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuch"], "unknown benchmark 'nosuch'"),
        (["all", "--only", "oracle"], "--only: oracle not among the benches"),
        (["all", "--only", "prepare"], "--only: prepare not among the benches"),
        (["train", "--only", "sync"], "--only goes with `bench all`"),
        (["loader", "--set", "train.steps=3"], "--set goes with `bench oracle`"),
        (["oracle", "--set", "adversarial.nosuch=1"], "config error at adversarial.nosuch: unknown key"),
        pytest.param(
            ["train", "--device", "cuda"],
            "--device cuda: no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
    ],
)
def test_bad_bench_arguments_are_one_line_and_exit_2(args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "bench", *args, "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert proc.stdout == ""


def test_train_quick_profiles_each_contender(tmp_path):
    # In a process of its own: the ZeRO contenders set up a 1-process torch.distributed group and its env.
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "bench", "train", "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train.json").read_text())
    rows = {r["contender"]: r for r in summary["rows"]}
    assert set(rows) == {"plain", "hf", "hf_gelu", "zero0", "zero1", "zero2", "zero3"}
    assert summary["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    peak = summary["matmul_gflops"]["bf16"] * 1e9  # the better of the measurements before and after
    assert peak == pytest.approx(max(summary["matmul_gflops"]["bf16_before_after"]) * 1e9, rel=1e-2)
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0 and 0 < row["matmul_share"] <= 1, (name, row)
        assert 0 < row["step_s_best"] <= row["step_s"]  # the best window and the median one
        # mfu is rounded to 4 decimals
        assert row["mfu"] == pytest.approx(summary["flops_per_token"] * row["tokens_per_s"] / peak, abs=6e-5)
        assert 0 < sum(summary["profile"][name]["top_ops"].values()) <= 1
    assert summary["tokens_per_s_zero2"] == rows["zero2"]["tokens_per_s"]
    assert summary["ratios"]["zero2_vs_hf"] == pytest.approx(rows["zero2"]["tokens_per_s"] / rows["hf"]["tokens_per_s"])
    hf_gelu = rows["hf_gelu"]["tokens_per_s"]
    assert summary["ratios"]["zero2_vs_hf_gelu"] == pytest.approx(rows["zero2"]["tokens_per_s"] / hf_gelu)
    before, after = summary["matmul_gflops"]["bf16_before_after"]
    assert summary["matmul_gflops"]["drift"] == pytest.approx(max(before, after) / min(before, after), abs=0.01)
    assert summary["matmul_gflops"]["steady"] == (summary["matmul_gflops"]["drift"] <= 1.3)
    ceiling = rows["hf"]["step_s"] / (rows["zero2"]["step_s"] * rows["zero2"]["matmul_share"])
    assert summary["zero2_vs_hf_ceiling"] == pytest.approx(ceiling, rel=1e-3)
