"""`bench rl`: the addition task and its reward, and `bench rl --quick` end to end (our stages make the start
model, ours and TRL race from it, one evaluation scores both)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genpt_dist.bench import HEADLINES, rl_task


def test_the_task_is_fixed_width_seeded_and_its_held_out_problems_are_not_trained_on():
    train, held_out = rl_task.split_problems(0, 256)
    assert len(train) + len(held_out) == 10_000 and len(held_out) == 256
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    assert rl_task.split_problems(0, 256) == (train, held_out) and rl_task.split_problems(1, 256) != (train, held_out)
    for prompt, answer in train[:50] + held_out[:50]:
        a, b = int(prompt[:2]), int(prompt[3:5])
        assert prompt == f"{a:02d}+{b:02d}=" and answer == f"{a + b:03d}"
        assert len(prompt + answer) == rl_task.DOC_CHARS
    assert rl_task.corpus_rows(train[:1]) == [{"text": train[0][0] + train[0][1]}]


def test_correct_checks_the_completion_up_to_its_first_newline():
    got = rl_task.correct(
        ["07+45="] * 5, ["052", " 052 ", "052\n13", "52", "0521"], answer=["052"] * 5, extra_column=[1] * 5
    )
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    """`bench rl --quick` once: every racer is a subprocess of its own (its own Ray)."""
    from genpt_dist.bench import run_bench

    out = tmp_path_factory.mktemp("bench-rl")
    summary = run_bench("rl", str(out), quick=True)
    return json.loads(Path(summary["results"]).read_text()), out


@pytest.mark.slow
def test_quick_bench_races_ours_and_trl_from_one_start(quick):
    result, out = quick
    assert (out / "rl.json").is_file()
    png = (out / "rl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    runs = result["runs"]
    assert set(runs) == {"ours", "trl"}
    for name, run in runs.items():
        curve = run["curve"]
        steps = [p["step"] for p in curve]
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == result["spec"]["steps"], name
        assert len(steps) == 1 + result["spec"]["steps"] // result["spec"]["snapshot_every"], name
        seconds = [p["seconds"] for p in curve]
        assert all(b > a for a, b in zip(seconds, seconds[1:])), (name, seconds)  # strictly increasing
        assert all(0.0 <= p["accuracy"] <= 1.0 and 0.0 <= p["mean_reward"] <= 1.0 for p in curve)
        assert run["final_accuracy"] == curve[-1]["accuracy"] and run["final_seconds"] == seconds[-1]
        assert seconds[-1] <= run["process_s"]
        assert run["val_ppl_final"] > 1.0
    # One start: ours' --init checkpoint and TRL's first snapshot (the HF export, read back) score the same.
    start = result["start"]["accuracy"]
    assert runs["ours"]["curve"][0]["accuracy"] == start == runs["trl"]["curve"][0]["accuracy"]
    assert runs["trl"]["curve"][0]["seconds"] > 0.0  # TRL's start snapshot is taken in its process
    assert 0.0 < start < 1.0
    # One reward file, given to both.
    reward_file = result["reward_file"]
    assert Path(reward_file).is_file() and Path(reward_file).name == "rl_task.py"
    assert runs["ours"]["reward_file"] == runs["trl"]["reward_file"] == reward_file
    assert (
        runs["ours"]["reward"] == f"python:{reward_file}:correct" and runs["trl"]["reward"] == f"{reward_file}:correct"
    )
    # Ours' profile comes from its metrics.jsonl.
    profile = runs["ours"]["profile"]
    assert profile["step_s"] > 0 and profile["rollout_s"] > 0
    assert profile["rollout_share"] + profile["publish_share"] + profile["update_and_rest_share"] == pytest.approx(
        1.0, abs=0.01
    )


@pytest.mark.slow
def test_quick_bench_headlines_and_targets_follow_from_the_figures(quick):
    result, _ = quick
    ours, trl = result["runs"]["ours"], result["runs"]["trl"]
    start = result["start"]["accuracy"]
    assert result["rl_lift_points"] == pytest.approx(100 * (ours["final_accuracy"] - start), abs=0.01)
    assert result["final_accuracy_diff_points"] == pytest.approx(
        100 * (ours["final_accuracy"] - trl["final_accuracy"]), abs=0.01
    )
    assert result["trl_s_to_final"] == trl["final_seconds"]
    reach = next(
        (p["seconds"] for p in ours["curve"] if p["step"] > 0 and p["accuracy"] >= trl["final_accuracy"] - 1e-9), None
    )
    assert result["ours_s_to_trl_final_accuracy"] == reach
    if reach is None:
        assert result["time_ratio_vs_trl"] is None
    else:
        assert result["time_ratio_vs_trl"] == pytest.approx(reach / trl["final_seconds"], abs=1e-3)
    targets = result["targets"]
    for key, (op, target) in {
        "time_ratio_vs_trl": ("<=", 0.5),
        "final_accuracy_diff_points": (">=", 0.0),
        "rl_lift_points": (">=", 30.0),
    }.items():
        t = targets[key]
        assert (t["op"], t["target"], t["value"]) == (op, target, result[key])
        want = None if t["value"] is None else (t["value"] <= target if op == "<=" else t["value"] >= target)
        assert t["met"] is want, key
    # bench all's headline rows read the same figures.
    figures = {figure: read(result) for figure, read, _, _ in HEADLINES["rl"]}
    assert list(figures.values()) == [
        result["time_ratio_vs_trl"],
        result["final_accuracy_diff_points"],
        result["rl_lift_points"],
    ]
    assert [r["run"] for r in result["rows"]] == ["start", "ours", "trl"]
