"""`bench rl`: the addition task and its reward, the figures across seeds (made-up races), `--seeds`, and
`bench rl --quick` end to end (our stages make the start model, ours and TRL race from it, one evaluation
scores both)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from genpt_dist.bench import HEADLINES, rl_stats, rl_task
from genpt_dist.errors import UserError


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


def _curve(points: list[tuple[float, float]], start: float) -> list[dict]:
    """A run's snapshots: the start (step 0) then (seconds, accuracy) every 10 steps."""
    rows = [(0.0, start), *points]
    return [
        {"step": 10 * i, "seconds": t, "seconds_excl_checkpoints": t, "accuracy": a, "mean_reward": a}
        for i, (t, a) in enumerate(rows)
    ]


def _run(kind: str, points: list[tuple[float, float]], start: float, ppl: float, step_s: float) -> dict:
    curve = _curve(points, start)
    return {
        "kind": kind,
        "curve": curve,
        "profile": {"step_s": step_s},
        "final_accuracy": curve[-1]["accuracy"],
        "final_seconds": curve[-1]["seconds"],
        "val_ppl_final": ppl,
    }


def _race(start: float, runs: dict[str, dict], failed: dict[str, str] | None = None) -> dict:
    race = {"start": {"accuracy": start, "val_ppl": 3.0 + start}, "runs": runs, "failed": failed or {}}
    race.update(rl_stats.versus_trl(runs, start))
    return race


@pytest.fixture
def races() -> dict[str, dict]:
    """Three seeds: ours reaches TRL's final accuracy in seeds 0 and 1, never in seed 2; the discriminator run
    fails in seed 1."""
    return {
        "0": _race(
            0.2,
            {
                "ours": _run("ours", [(10.0, 0.5), (20.0, 0.7), (30.0, 0.8)], 0.2, 2.0, 1.0),
                "trl": _run("trl", [(40.0, 0.4), (80.0, 0.6)], 0.2, 2.5, 4.0),
                "ours+discriminator": _run("ours", [(15.0, 0.3), (30.0, 0.9)], 0.2, 2.2, 1.5),
            },
        ),
        "1": _race(
            0.3,
            {
                "ours": _run("ours", [(10.0, 0.4), (20.0, 0.5), (30.0, 0.9)], 0.3, 2.1, 1.0),
                "trl": _run("trl", [(50.0, 0.5), (100.0, 0.9)], 0.3, 2.6, 5.0),
            },
            failed={"ours+discriminator": "RuntimeError: boom"},
        ),
        "2": _race(
            0.1,
            {
                "ours": _run("ours", [(10.0, 0.2), (20.0, 0.3), (30.0, 0.4)], 0.1, 2.4, 1.0),
                "trl": _run("trl", [(45.0, 0.5), (90.0, 0.7)], 0.1, 2.7, 4.5),
                "ours+discriminator": _run("ours", [(15.0, 0.6), (30.0, 0.75)], 0.1, 2.3, 1.5),
            },
        ),
    }


NAMES = ["ours", "trl", "ours+discriminator"]


def test_each_seed_times_ours_against_that_seeds_trl_final_accuracy(races):
    seed0, seed1, seed2 = (races[s] for s in "012")
    # seed 0: TRL ends at 0.6 after 80 s; ours first reaches 0.6 at its 20 s snapshot (0.7)
    assert seed0["runs"]["ours"]["s_to_trl_final_accuracy"] == 20.0 and seed0["time_ratio_vs_trl"] == 0.25
    assert seed0["runs"]["ours+discriminator"]["s_to_trl_final_accuracy"] == 30.0
    # seed 1: TRL ends at 0.9 after 100 s; ours reaches it at its last snapshot
    assert seed1["ours_s_to_trl_final_accuracy"] == 30.0 and seed1["time_ratio_vs_trl"] == 0.3
    # seed 2: ours never reaches TRL's 0.7 (the start at step 0 is never counted), the discriminator run does
    assert seed2["ours_s_to_trl_final_accuracy"] is None and seed2["time_ratio_vs_trl"] is None
    assert seed2["runs"]["ours+discriminator"]["time_ratio_vs_trl"] == pytest.approx(30.0 / 90.0, abs=1e-3)
    assert seed0["final_accuracy_diff_points"] == 20.0 and seed0["rl_lift_points"] == 60.0
    assert seed0["step_s_ratio_vs_trl"] == 0.25
    assert "s_to_trl_final_accuracy" not in seed0["runs"]["trl"]


def test_across_seeds_means_and_spreads_never_count_a_missing_time_or_a_failed_run(races):
    summary = rl_stats.aggregate(races, NAMES)
    ours, trl, disc = (summary["runs"][n] for n in NAMES)
    acc = ours["final_accuracy"]
    assert acc["per_seed"] == {"0": 0.8, "1": 0.9, "2": 0.4} and (acc["n"], acc["of"]) == (3, 3)
    assert acc["mean"] == pytest.approx(0.7, abs=1e-4) and (acc["min"], acc["max"]) == (0.4, 0.9)
    assert acc["std"] == pytest.approx(statistics.pstdev([0.8, 0.9, 0.4]), abs=1e-4)
    assert ours["val_ppl"]["mean"] == pytest.approx(2.1667, abs=1e-4) and ours["val_ppl"]["max"] == 2.4
    # time to the same seed's TRL final: two seeds of three, averaged over those two
    reach = ours["s_to_trl_final_accuracy"]
    assert reach["per_seed"] == {"0": 20.0, "1": 30.0, "2": None}
    assert (reach["reached"], reach["of"], reach["mean"], reach["min"], reach["max"]) == (2, 3, 25.0, 20.0, 30.0)
    assert ours["time_ratio_vs_trl"]["mean"] is None and ours["time_ratio_vs_trl"]["reached"] == 2
    # the failed seed of an extra run: recorded, left out of its figures, not a zero
    assert (disc["ran"], disc["of"], disc["failed"]) == (2, 3, {"1": "RuntimeError: boom"})
    assert disc["final_accuracy"]["per_seed"]["1"] is None
    assert disc["final_accuracy"]["mean"] == pytest.approx(0.825, abs=1e-4) and disc["final_accuracy"]["n"] == 2
    assert disc["s_to_trl_final_accuracy"]["reached"] == 2 and disc["time_ratio_vs_trl"]["mean"] is None
    # TRL is the reference, not timed against itself
    assert "s_to_trl_final_accuracy" not in trl and trl["final_seconds"]["mean"] == 90.0
    # the start model per seed and on average
    assert summary["start"]["accuracy"]["per_seed"] == {"0": 0.2, "1": 0.3, "2": 0.1}
    assert summary["start"]["accuracy"]["mean"] == pytest.approx(0.2, abs=1e-4)
    assert summary["start"]["val_ppl"]["mean"] == pytest.approx(3.2, abs=1e-4)
    # headlines on the means; the time ratio is None (not met) since ours missed TRL in seed 2
    assert summary["time_ratio_vs_trl"] is None and summary["time_ratio_vs_trl_excl_checkpoints"] is None
    assert summary["final_accuracy_diff_points"] == pytest.approx(100 * (0.7 - (0.6 + 0.9 + 0.7) / 3), abs=0.01)
    assert summary["rl_lift_points"] == pytest.approx(100 * (0.7 - 0.2), abs=0.01)
    assert summary["step_s_ratio_vs_trl"] == pytest.approx(statistics.fmean([1 / 4, 1 / 5, 1 / 4.5]), abs=1e-3)
    assert summary["best_of_ours"] == "ours"  # the discriminator run lacks a seed, so it is not ranked


def test_the_time_ratio_is_the_mean_of_each_seeds_ratio_when_every_seed_reached(races):
    del races["2"]
    summary = rl_stats.aggregate(races, NAMES)
    assert summary["time_ratio_vs_trl"] == pytest.approx((20 / 80 + 30 / 100) / 2, abs=1e-3)
    assert summary["runs"]["ours"]["time_ratio_vs_trl"]["per_seed"] == {"0": 0.25, "1": 0.3}
    assert summary["runs"]["ours"]["s_to_trl_final_accuracy"]["reached"] == 2
    races["1"]["runs"]["ours+discriminator"] = _run("ours", [(15.0, 0.95)], 0.3, 2.0, 1.5)
    races["1"]["failed"] = {}
    races["1"].update(rl_stats.versus_trl(races["1"]["runs"], 0.3))
    summary = rl_stats.aggregate(races, NAMES)
    assert summary["best_of_ours"] == "ours+discriminator"
    assert summary["best_of_ours_final_accuracy_diff_points"] == pytest.approx(100 * (0.925 - 0.75), abs=0.01)


def test_the_table_has_a_row_per_run_with_means_spread_reach_and_each_seeds_accuracy(races):
    summary = rl_stats.aggregate(races, NAMES)
    notes = {"ours": "on-policy", "trl": "TRL"}
    rows = rl_stats.table_rows(summary, notes, {"ours max_staleness=1": "config has no key"})
    assert [r["run"] for r in rows] == ["start", *NAMES, "ours max_staleness=1"]
    assert all(list(r) == list(rows[0]) for r in rows)  # print_table reads the first row's keys
    ours, trl, disc = rows[1:4]
    assert ours["acc_mean"] == pytest.approx(0.7, abs=1e-4) and ours["acc_min_max"] == "0.400-0.900"
    assert ours["reached"] == "2/3" and ours["s_to_trl_final_mean"] == 25.0 and ours["note"] == "on-policy"
    assert (ours["acc_seed0"], ours["acc_seed1"], ours["acc_seed2"]) == (0.8, 0.9, 0.4)
    assert trl["reached"] == "3/3" and trl["s_to_trl_final_mean"] == 90.0
    assert disc["acc_seed1"] is None and disc["note"].endswith("failed: seed 1")
    assert rows[-1]["note"] == "skipped: config has no key" and rows[-1]["acc_mean"] is None
    assert rows[0]["acc_seed2"] == 0.1 and rows[0]["reached"] is None


def test_the_plot_has_a_panel_per_seed(races, tmp_path):
    from genpt_dist.bench.rl_eval import plot

    curves = {s: {n: r["curve"] for n, r in race["runs"].items()} for s, race in races.items()}
    plot(curves, {s: race["start"]["accuracy"] for s, race in races.items()}, tmp_path / "rl.png")
    png = (tmp_path / "rl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_bench_rl_races_each_seed_in_a_folder_of_its_own_and_judges_the_means(races, monkeypatch, tmp_path):
    from genpt_dist.bench import rl

    roots = []

    def race(spec, seed, runs, root):
        roots.append(root.name)
        assert [r.name for r in runs] == NAMES and not root.exists()
        return {**races[str(seed)], "seed": seed, "seconds": 100.0 + seed}

    monkeypatch.setattr(rl, "_race", race)
    monkeypatch.setattr(rl, "_config_has", lambda key: False)
    result = rl.bench_rl(output=str(tmp_path), seeds=(0, 1, 2))
    assert roots == ["seed0", "seed1", "seed2"] and list(result["seeds"]) == ["0", "1", "2"]
    assert result["spec"]["seeds"] == (0, 1, 2) and result["skipped"] == {
        "ours max_staleness=1": "config has no reinforce.rollout.max_staleness",
        "ours clip_against_previous=false": "config has no reinforce.clip_against_previous",
    }
    assert (tmp_path / "rl.png").read_bytes()[:4] == b"\x89PNG"
    summary = rl_stats.aggregate(races, NAMES)
    assert result["summary"] == summary
    targets = result["targets"]
    assert targets["time_ratio_vs_trl"] == {"value": None, "op": "<=", "target": 0.5, "met": None}
    assert targets["rl_lift_points"]["value"] == summary["rl_lift_points"] and targets["rl_lift_points"]["met"]
    assert targets["final_accuracy_diff_points"]["met"] is (summary["final_accuracy_diff_points"] >= 0)
    per_seed = targets["bench_seconds_per_seed"]
    assert (per_seed["value"], per_seed["target"], per_seed["met"]) == (102.0, 900.0, True)
    assert per_seed["per_seed"] == {"0": 100.0, "1": 101.0, "2": 102.0}
    assert [r["run"] for r in result["rows"]] == [
        "start",
        *NAMES,
        "ours max_staleness=1",
        "ours clip_against_previous=false",
    ]


@pytest.mark.parametrize("text, seeds", [("0,1,2", (0, 1, 2)), (" 3, 7 ", (3, 7)), ("5", (5,))])
def test_seeds_parse(text, seeds):
    assert rl_stats.parse_seeds(text) == seeds


@pytest.mark.parametrize(
    "text, message",
    [
        ("a", "want distinct"),
        ("1,,2", "want distinct"),
        ("-1", "want distinct"),
        ("", "want distinct"),
        ("1,1", "repeated"),
    ],
)
def test_bad_seeds_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        rl_stats.parse_seeds(text)


@pytest.mark.parametrize(
    "args, message",
    [
        (["rl", "--seeds", "0,x"], "--seeds '0,x': want distinct non-negative integers"),
        (["rl", "--seeds", "2,2"], "--seeds '2,2': a seed is repeated"),
        (["train", "--seeds", "0,1"], "--seeds goes with `bench rl`, not `bench train`"),
        (["all", "--seeds", "0"], "--seeds goes with `bench rl`, not `bench all`"),
    ],
)
def test_bad_seeds_flags_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    from genpt_dist.cli import main

    assert main(["bench", *args, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"genpt-dist: error: {message}"), err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_seeds_reach_bench_rl(monkeypatch, tmp_path, capsys):
    from genpt_dist.bench import rl
    from genpt_dist.cli import main

    got: dict = {}

    def fake(quick=False, output=None, **kwargs):
        got.clear()
        got.update(quick=quick, **kwargs)
        return {"rows": []}

    monkeypatch.setattr(rl, "bench_rl", fake)
    assert main(["bench", "rl", "--quick", "--seeds", "0,2", "--output", str(tmp_path)]) == 0
    assert got == {"quick": True, "seeds": (0, 2)}
    assert main(["bench", "rl", "--output", str(tmp_path)]) == 0
    assert got == {"quick": False}  # no --seeds: the spec's own
    assert rl.RLSpec().seeds == (0, 1, 2) and rl.QUICK.seeds == (0,)


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
    assert result["spec"]["seeds"] == [0] and set(result["seeds"]) == {"0"}  # quick: one seed
    race = result["seeds"]["0"]
    assert race["seed"] == 0 and race["failed"] == {}
    runs = race["runs"]
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
    start = race["start"]["accuracy"]
    assert runs["ours"]["curve"][0]["accuracy"] == start == runs["trl"]["curve"][0]["accuracy"]
    assert runs["trl"]["curve"][0]["seconds"] > 0.0  # TRL's start snapshot is taken in its process
    assert 0.0 < start < 1.0 and race["start"]["val_ppl"] > 1.0
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
    race = result["seeds"]["0"]
    ours, trl = race["runs"]["ours"], race["runs"]["trl"]
    start = race["start"]["accuracy"]
    # the seed's own figures
    assert race["rl_lift_points"] == pytest.approx(100 * (ours["final_accuracy"] - start), abs=0.01)
    assert race["final_accuracy_diff_points"] == pytest.approx(
        100 * (ours["final_accuracy"] - trl["final_accuracy"]), abs=0.01
    )
    assert race["trl_s_to_final"] == trl["final_seconds"]
    reach = next(
        (p["seconds"] for p in ours["curve"] if p["step"] > 0 and p["accuracy"] >= trl["final_accuracy"] - 1e-9), None
    )
    assert race["ours_s_to_trl_final_accuracy"] == ours["s_to_trl_final_accuracy"] == reach
    if reach is None:
        assert race["time_ratio_vs_trl"] is None
    else:
        assert race["time_ratio_vs_trl"] == pytest.approx(reach / trl["final_seconds"], abs=1e-3)
    # over one seed the means are that seed's figures
    summary = result["summary"]
    assert summary["runs"]["ours"]["final_accuracy"]["per_seed"] == {"0": ours["final_accuracy"]}
    assert summary["runs"]["ours"]["s_to_trl_final_accuracy"]["reached"] == (0 if reach is None else 1)
    assert summary["start"]["accuracy"]["per_seed"] == {"0": start}
    for key in ("rl_lift_points", "final_accuracy_diff_points", "time_ratio_vs_trl"):
        assert result[key] == race[key], key
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
    per_seed = targets["bench_seconds_per_seed"]
    assert (per_seed["op"], per_seed["target"], per_seed["per_seed"]) == ("<=", 180.0, {"0": race["seconds"]})
    assert per_seed["value"] == race["seconds"] and per_seed["met"] is (race["seconds"] <= 180.0)
    # bench all's headline rows read the same figures.
    figures = {figure: read(result) for figure, read, _, _ in HEADLINES["rl"]}
    assert list(figures.values()) == [
        result["time_ratio_vs_trl"],
        result["final_accuracy_diff_points"],
        result["rl_lift_points"],
        result["best_of_ours_final_accuracy_diff_points"],
    ]
    assert result["best_of_ours"] == "ours"
    assert [r["run"] for r in result["rows"]] == ["start", "ours", "trl"]
    assert result["rows"][1]["acc_seed0"] == ours["final_accuracy"]
