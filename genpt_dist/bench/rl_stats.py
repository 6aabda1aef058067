"""`bench rl` across seeds: one seed's race read against TRL, the seeds' races summed up, and the table.

A race is one seed's start model and every run from it (`rl.py:_race`). Each run of ours is timed
against TRL's final held-out accuracy *of the same seed*: the seconds of its first snapshot after the
start that reaches it. Across seeds a figure is the mean, min, max (and, for final accuracy, the
population std) over the seeds where the run has it; a seed where a run never reached TRL's accuracy,
or where an extra run failed, has no figure, and the count says so (`reached: k of n`, `ran: k of n`):
a missing time is never averaged as 0. The headlines are judged on the means, on "ours" (on-policy):

* `time_ratio_vs_trl`: mean over seeds of ours' seconds to that seed's TRL final accuracy / TRL's seconds
  to its final snapshot; None (the target not met) unless ours reached it in every seed.
* `final_accuracy_diff_points`: 100 x (mean ours final accuracy - mean TRL final accuracy).
* `rl_lift_points`: 100 x (mean ours final accuracy - mean start model accuracy).

`best_of_ours` names the run of ours with the highest mean final accuracy among those with every seed, and
`best_of_ours_final_accuracy_diff_points` is its mean less TRL's (a figure, not a target).

Pure functions of the races' JSON, so they are tested without running one.
"""

from __future__ import annotations

import statistics
from typing import Any

from genpt_dist.bench.rl_eval import seconds_to_reach
from genpt_dist.errors import UserError


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2` -> (0, 1, 2): distinct non-negative integers, at least one."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UserError(f"--seeds {text!r}: want distinct non-negative integers separated by commas, e.g. 0,1,2")
    seeds = tuple(int(p) for p in parts)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def versus_trl(runs: dict[str, dict[str, Any]], start_accuracy: float) -> dict[str, Any]:
    """One seed: every run of ours against TRL's final accuracy (written into its entry of `runs`), and the
    seed's own headline figures."""
    ours, trl = runs.get("ours"), runs.get("trl")
    head: dict[str, Any] = {}
    if ours and trl:
        trl_final, trl_s = trl["final_accuracy"], trl["final_seconds"]
        for r in runs.values():
            if r["kind"] == "ours":
                reach = seconds_to_reach(r["curve"], trl_final)
                excl = seconds_to_reach(r["curve"], trl_final, "seconds_excl_checkpoints")
                r["s_to_trl_final_accuracy"] = reach
                r["time_ratio_vs_trl"] = None if reach is None else round(reach / trl_s, 3)
                r["time_ratio_vs_trl_excl_checkpoints"] = None if excl is None else round(excl / trl_s, 3)
        ours_step, trl_step = ours["profile"].get("step_s"), trl["profile"].get("step_s")
        head = {
            "ours_s_to_trl_final_accuracy": ours["s_to_trl_final_accuracy"],
            "trl_s_to_final": trl_s,
            "time_ratio_vs_trl": ours["time_ratio_vs_trl"],
            "time_ratio_vs_trl_excl_checkpoints": ours["time_ratio_vs_trl_excl_checkpoints"],
            "final_accuracy_diff_points": round(100 * (ours["final_accuracy"] - trl_final), 2),
            "step_s_ratio_vs_trl": round(ours_step / trl_step, 3) if ours_step and trl_step else None,
        }
    if ours:
        head["rl_lift_points"] = round(100 * (ours["final_accuracy"] - start_accuracy), 2)
    return head


def spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Mean, min, max and population std of `values` (all None when there are none)."""
    if not values:
        return {"mean": None, "min": None, "max": None, "std": None}
    return {
        "mean": round(statistics.fmean(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "std": round(statistics.pstdev(values), digits),
    }


def _per_seed(races: dict[str, dict[str, Any]], name: str, key: str) -> dict[str, Any]:
    """{seed: run `name`'s `key`}, None for a seed where the run failed or has no such figure."""
    return {s: race["runs"][name].get(key) if name in race["runs"] else None for s, race in races.items()}


def _stat(per_seed: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    values = [v for v in per_seed.values() if v is not None]
    return {**spread(values, digits), "n": len(values), "of": len(per_seed), "per_seed": per_seed}


def _mean_of_all(per_seed: dict[str, Any]) -> float | None:
    """The mean when every seed has a figure, else None (a missing figure is never averaged as 0)."""
    values = list(per_seed.values())
    return statistics.fmean(values) if values and None not in values else None


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100 * (a - b), 2)


def aggregate(races: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The seeds' races (`{seed: race}`, `versus_trl` applied to each) summed up per run in `names` (`ran`: the
    seeds it has figures for, `failed`: why not), the start model's figures, and the headline figures."""
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        acc = _per_seed(races, name, "final_accuracy")
        entry: dict[str, Any] = {
            "ran": sum(v is not None for v in acc.values()),
            "of": len(races),
            "failed": {s: race["failed"][name] for s, race in races.items() if name in race.get("failed", {})},
            "final_accuracy": _stat(acc),
            "val_ppl": _stat(_per_seed(races, name, "val_ppl_final")),
            "final_seconds": _stat(_per_seed(races, name, "final_seconds"), 2),
        }
        if name != "trl":  # ours' runs, timed against the same seed's TRL
            reach = _stat(_per_seed(races, name, "s_to_trl_final_accuracy"), 2)
            ratio = _per_seed(races, name, "time_ratio_vs_trl")
            mean_ratio = _mean_of_all(ratio)
            mean_excl = _mean_of_all(_per_seed(races, name, "time_ratio_vs_trl_excl_checkpoints"))
            entry["s_to_trl_final_accuracy"] = {**reach, "reached": reach["n"]}
            entry["time_ratio_vs_trl"] = {
                "mean": None if mean_ratio is None else round(mean_ratio, 3),
                "mean_excl_checkpoints": None if mean_excl is None else round(mean_excl, 3),
                "reached": reach["n"],
                "of": len(races),
                "per_seed": ratio,
            }
        runs[name] = entry
    start_acc = {s: race["start"]["accuracy"] for s, race in races.items()}
    start = {"accuracy": _stat(start_acc), "val_ppl": _stat({s: race["start"]["val_ppl"] for s, race in races.items()})}

    def mean_acc(name: str) -> float | None:
        per_seed = _per_seed(races, name, "final_accuracy") if name in runs else {}
        values = [v for v in per_seed.values() if v is not None]
        return statistics.fmean(values) if values else None

    ours, trl = runs.get("ours"), runs.get("trl")
    steps = {s: race.get("step_s_ratio_vs_trl") for s, race in races.items()}
    step_mean = _mean_of_all(steps)
    complete = {k: mean_acc(k) for k, v in runs.items() if k != "trl" and v["ran"] == len(races)}
    best = max(complete, key=lambda k: complete[k] or 0.0) if complete else None
    head = {
        "time_ratio_vs_trl": ours["time_ratio_vs_trl"]["mean"] if ours and trl else None,
        "final_accuracy_diff_points": _points(mean_acc("ours"), mean_acc("trl")),
        "rl_lift_points": _points(mean_acc("ours"), statistics.fmean(start_acc.values())),
        "time_ratio_vs_trl_excl_checkpoints": ours["time_ratio_vs_trl"]["mean_excl_checkpoints"]
        if ours and trl
        else None,
        "step_s_ratio_vs_trl": None if step_mean is None else round(step_mean, 3),
        # the run of ours (among those with every seed) with the highest mean final accuracy
        "best_of_ours": best,
        "best_of_ours_final_accuracy_diff_points": _points(complete[best], mean_acc("trl")) if best else None,
    }
    return {"runs": runs, "start": start, **head}


def _span(stat: dict[str, Any]) -> str | None:
    return None if stat["min"] is None else f"{stat['min']:.3f}-{stat['max']:.3f}"


def table_rows(summary: dict[str, Any], notes: dict[str, str], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """`print_table`'s rows: the start model, each run (means over seeds, the accuracy's min-max, seconds to the
    same seed's TRL final accuracy with how many seeds reached it, each seed's accuracy), skipped runs.
    TRL's seconds are those to its final snapshot, the ratio's reference."""
    start = summary["start"]
    seeds = list(start["accuracy"]["per_seed"])
    rows = [
        {
            "run": "start",
            "acc_mean": start["accuracy"]["mean"],
            "acc_min_max": _span(start["accuracy"]),
            "acc_std": start["accuracy"]["std"],
            "val_ppl_mean": start["val_ppl"]["mean"],
            "s_to_trl_final_mean": None,
            "reached": None,
            **{f"acc_seed{s}": start["accuracy"]["per_seed"][s] for s in seeds},
            "note": "pretrain checkpoint per seed",
        }
    ]
    for name, r in summary["runs"].items():
        reach = r.get("s_to_trl_final_accuracy", r["final_seconds"])  # TRL: its final, the reference
        failed = f"; failed: seed {', '.join(r['failed'])}" if r["failed"] else ""
        rows.append(
            {
                "run": name,
                "acc_mean": r["final_accuracy"]["mean"],
                "acc_min_max": _span(r["final_accuracy"]),
                "acc_std": r["final_accuracy"]["std"],
                "val_ppl_mean": r["val_ppl"]["mean"],
                "s_to_trl_final_mean": reach["mean"],
                "reached": f"{reach['n']}/{r['of']}",
                **{f"acc_seed{s}": r["final_accuracy"]["per_seed"].get(s) for s in seeds},
                "note": notes.get(name, "") + failed,
            }
        )
    for name, why in skipped.items():
        rows.append({**dict.fromkeys(rows[0]), "run": name, "note": f"skipped: {why}"})
    return rows
