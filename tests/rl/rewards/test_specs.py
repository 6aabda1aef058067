"""User-chosen rewards (`rl.rewards.specs`): spec parsing, loading python reward functions, batched scoring,
combination, stats."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from genpt_dist.errors import UserError
from genpt_dist.rl.rewards.specs import (
    PythonRewards,
    RewardError,
    RewardSpec,
    combine,
    component_stats,
    load_reward_function,
    parse_reward_specs,
)

NAN = math.nan


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def rewards_from(tmp_path: Path, source: str, func: str = "f", name: str = "r.py") -> PythonRewards:
    file = write(tmp_path / name, source)
    return PythonRewards(parse_reward_specs([f"python:{file}:{func}"]))


# ---------------------------------------------------------------------------------------- parsing


def test_parse_all_forms_and_weights():
    specs = parse_reward_specs(
        [
            "python:rewards/len.py:reward_len",
            "python:my_pkg.scoring:exact_match@0.5",
            "model:s3://bucket/runs/rm/ckpt_100@-2",
            "discriminator",
            "discriminator@1e-1",
            "model:/abs/folder",
        ]
    )
    assert specs == [
        RewardSpec("python", "rewards/len.py:reward_len", 1.0, "reward_len"),
        RewardSpec("python", "my_pkg.scoring:exact_match", 0.5, "exact_match"),
        RewardSpec("model", "s3://bucket/runs/rm/ckpt_100", -2.0, "model"),
        RewardSpec("discriminator", "", 1.0, "discriminator"),
        RewardSpec("discriminator", "", 0.1, "discriminator_2"),
        RewardSpec("model", "/abs/folder", 1.0, "model_2"),
    ]


def test_parse_splits_python_target_on_last_colon_and_weight_on_last_at():
    (spec,) = parse_reward_specs(["python:odd:dir/r.py:score@+3.5"])
    assert (spec.target, spec.name, spec.weight) == ("odd:dir/r.py:score", "score", 3.5)
    (spec,) = parse_reward_specs(["model:s3://user@host/ckpt@1.0"])
    assert (spec.target, spec.weight) == ("s3://user@host/ckpt", 1.0)


def test_parse_names_unique():
    names = [s.name for s in parse_reward_specs(["python:a.py:f", "python:b.py:f", "python:m.x:f", "python:c.py:f_2"])]
    assert names == ["f", "f_2", "f_3", "f_2_2"]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "python",
        "python:",
        "python:r.py",  # no function
        "python:r.py:",  # empty function
        "python::f",  # empty file / module
        "python:.py:f",
        "python:r.py:not-an-identifier",
        "python:bad-module.name:f",
        "python:pkg..mod:f",
        "model:",
        "model",
        "discriminator:x",
        "discriminators",
        "reward:x",
        "discriminator@",
        "discriminator@abc",
        "discriminator@nan",
        "discriminator@inf",
        "discriminator@-inf",
        "discriminator@1e999",  # overflows to inf
        "python:r.py:f@1@2",
        "model:s3://user@host/ckpt",  # an '@' in a URL needs an explicit weight
    ],
)
def test_parse_bad_forms(text):
    with pytest.raises(UserError) as info:
        parse_reward_specs([text])
    msg = str(info.value)
    assert msg.startswith(f"bad --reward {text!r}: expected python:FILE.py:FUNC, python:package.module:FUNC,")
    assert msg.endswith("model:CKPT_OR_FOLDER or discriminator, with an optional @WEIGHT")
    assert "\n" not in msg


def test_parse_empty_list():
    with pytest.raises(UserError, match="no --reward given"):
        parse_reward_specs([])


# ---------------------------------------------------------------------------------------- loading


def test_load_file_relative_and_absolute(tmp_path, monkeypatch):
    write(tmp_path / "r.py", "def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    (rel,) = parse_reward_specs(["python:r.py:f"])
    (ab,) = parse_reward_specs([f"python:{tmp_path / 'r.py'}:f"])
    f1, f2 = load_reward_function(rel), load_reward_function(ab)
    assert f1(completions=["a", "b"]) == [1.0, 1.0]
    assert f1 is not f2  # each import gets its own unique module name
    assert f1.__module__ != f2.__module__ and f1.__module__ in sys.modules


def test_load_package_module(tmp_path, monkeypatch):
    pkg = tmp_path / "my_reward_pkg"
    pkg.mkdir()
    write(pkg / "__init__.py", "")
    write(
        pkg / "scoring.py",
        "def exact(completions, answer, **kw):\n    return [c == a for c, a in zip(completions, answer)]\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = PythonRewards(parse_reward_specs(["python:my_reward_pkg.scoring:exact@2"]))
    out = rewards.score(["p", "q"], ["yes", "no"], [{"answer": "yes"}, {"answer": "yes"}])
    assert out == {"exact": [1.0, 0.0]}  # bool counts as a number


def test_load_missing_file(tmp_path):
    (spec,) = parse_reward_specs([f"python:{tmp_path / 'nope.py'}:f"])
    with pytest.raises(UserError, match=r"reward file '.*nope\.py' does not exist"):
        load_reward_function(spec)


def test_load_module_not_importable():
    (spec,) = parse_reward_specs(["python:no_such_pkg_xyz.mod:f"])
    with pytest.raises(UserError, match=r"reward module 'no_such_pkg_xyz\.mod' is not importable: .*no_such_pkg_xyz"):
        load_reward_function(spec)


def test_load_file_raises_on_import(tmp_path):
    file = write(tmp_path / "boom.py", "raise RuntimeError('no GPU\\nhere')\n")
    (spec,) = parse_reward_specs([f"python:{file}:f"])
    with pytest.raises(UserError, match=r"reward file '.*boom\.py' raised on import: RuntimeError: no GPU here$"):
        load_reward_function(spec)
    assert not any(m.endswith("_boom") for m in sys.modules)


def test_load_module_raises_on_import(tmp_path, monkeypatch):
    write(tmp_path / "boom_mod_xyz.py", "x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (spec,) = parse_reward_specs(["python:boom_mod_xyz:f"])
    with pytest.raises(UserError, match=r"reward module 'boom_mod_xyz' raised on import: ZeroDivisionError"):
        load_reward_function(spec)


def test_load_no_such_function(tmp_path):
    file = write(tmp_path / "r.py", "def g(**kw):\n    return []\n")
    (spec,) = parse_reward_specs([f"python:{file}:f"])
    with pytest.raises(UserError, match=r"reward file '.*r\.py' has no function 'f'"):
        load_reward_function(spec)


def test_load_not_callable(tmp_path):
    file = write(tmp_path / "r.py", "f = 3\n")
    (spec,) = parse_reward_specs([f"python:{file}:f"])
    with pytest.raises(UserError, match=r"'f' is not callable \(it is a int\)"):
        load_reward_function(spec)


def test_load_rejects_other_kinds():
    with pytest.raises(ValueError):
        load_reward_function(RewardSpec("model", "x", 1.0, "model"))


# ---------------------------------------------------------------------------------------- scoring


def test_trl_reward_len_as_in_trl_docs(tmp_path):
    rewards = rewards_from(
        tmp_path,
        """
        def reward_len(completions, **kwargs):
            return [-abs(20 - len(c)) for c in completions]
        """,
        func="reward_len",
    )
    out = rewards.score(["p1", "p2"], ["x" * 20, "x" * 5], [{"answer": "a"}, {"answer": "b"}])
    assert out == {"reward_len": [0.0, -15.0]}
    assert all(isinstance(v, float) for v in out["reward_len"])


def test_columns_reach_function_by_name_aligned_with_rows(tmp_path):
    rewards = rewards_from(
        tmp_path,
        """
        def f(prompts, completions, answer, level, **kwargs):
            assert set(kwargs) == {"note"}, kwargs
            return [
                float(len(p) * 100 + (c == a) * 10 + (lv or 0)) if n is None else None
                for p, c, a, lv, n in zip(prompts, completions, answer, level, kwargs["note"])
            ]
        """,
    )
    columns = [{"answer": "A", "level": 1}, {"answer": "B", "level": 2, "note": "skip"}, {"answer": "C"}]
    out = rewards.score(["p", "pp", "ppp"], ["A", "x", "C"], columns)
    # row 1 has a note -> None -> NaN; row 2 lacks "level" -> None reaches the function
    assert out["f"][0] == 111.0 and math.isnan(out["f"][1]) and out["f"][2] == 310.0


def test_prompts_and_completions_columns_do_not_override(tmp_path):
    rewards = rewards_from(tmp_path, "def f(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    assert rewards.score(["p"], ["abc"], [{"completions": "zzzzzz", "prompts": "q"}]) == {"f": [3.0]}


def test_several_functions_and_non_python_specs_ignored(tmp_path):
    a = write(tmp_path / "a.py", "def f(completions, **kw):\n    return (1, True)\n")
    b = write(tmp_path / "b.py", "def f(completions, **kw):\n    return [None, 2.5]\n")
    specs = parse_reward_specs([f"python:{a}:f", "discriminator", f"python:{b}:f@-1", "model:ckpt"])
    out = PythonRewards(specs).score(["p", "q"], ["x", "y"], [{}, {}])
    assert list(out) == ["f", "f_2"]
    assert out["f"] == [1.0, 1.0]
    assert math.isnan(out["f_2"][0]) and out["f_2"][1] == 2.5


def test_numpy_scalars_count_as_numbers(tmp_path):
    pytest.importorskip("numpy")
    rewards = rewards_from(tmp_path, "import numpy as np\ndef f(**kw):\n    return [np.float32(0.5), np.int64(2)]\n")
    assert rewards.score(["a", "b"], ["c", "d"], [{}, {}]) == {"f": [0.5, 2.0]}


@pytest.mark.parametrize(
    "body, match",
    [
        ("raise KeyError('answer')", r"reward function 'f' \(.*r\.py:f\) raised KeyError: 'answer'$"),
        ("return 1.0", r"reward function 'f' .* returned a float, expected a list of 2 numbers"),
        ("return {'a': 1}", r"reward function 'f' .* returned a dict, expected a list of 2 numbers"),
        ("return [1.0]", r"reward function 'f' .* returned 1 values, expected 2"),
        ("return [1.0, 2.0, 3.0]", r"reward function 'f' .* returned 3 values, expected 2"),
        ("return [1.0, 'good']", r"reward function 'f' .* returned a non-number at row 1: 'good'"),
        ("return [[1.0], 2.0]", r"reward function 'f' .* returned a non-number at row 0: \[1\.0\]"),
        ("return [float('nan'), 1.0]", r"reward function 'f' .* returned nan at row 0"),
        ("return [1.0, float('-inf')]", r"reward function 'f' .* returned -inf at row 1"),
    ],
)
def test_reward_errors(tmp_path, body, match):
    rewards = rewards_from(tmp_path, f"def f(prompts, completions, **kw):\n    {body}\n")
    with pytest.raises(RewardError, match=match) as info:
        rewards.score(["p", "q"], ["a", "b"], [{}, {}])
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_score_rejects_misaligned_batches(tmp_path):
    rewards = rewards_from(tmp_path, "def f(**kw):\n    return []\n")
    with pytest.raises(ValueError, match="differ"):
        rewards.score(["p"], ["a", "b"], [{}, {}])


# ------------------------------------------------------------------------------------ combination


def test_combine_weights_and_nan_rows():
    specs = parse_reward_specs(["python:a.py:f@2", "discriminator@-0.5", "model:ckpt"])
    components = {
        "f": torch.tensor([1.0, NAN, 3.0, NAN]),
        "discriminator": torch.tensor([0.4, 0.8, NAN, NAN]),
        "model": torch.tensor([10.0, 1.0, NAN, NAN]),
    }
    out = combine(components, specs)
    assert out.shape == (4,) and out.dtype == torch.float32
    torch.testing.assert_close(out[:3], torch.tensor([2.0 - 0.2 + 10.0, -0.4 + 1.0, 6.0]))
    assert math.isnan(out[3].item())  # no component scored the row: not scored


def test_combine_single_component_and_mismatch():
    specs = parse_reward_specs(["discriminator"])
    torch.testing.assert_close(combine({"discriminator": torch.tensor([0.25])}, specs), torch.tensor([0.25]))
    with pytest.raises(ValueError, match="missing"):
        combine({}, specs)
    with pytest.raises(ValueError, match="unexpected"):
        combine({"discriminator": torch.tensor([0.25]), "other": torch.tensor([1.0])}, specs)


def test_component_stats():
    stats = component_stats(
        {"f": torch.tensor([1.0, NAN, 3.0]), "one": torch.tensor([NAN, 5.0]), "none": torch.tensor([NAN, NAN])}
    )
    assert stats == {
        "reward/f/mean": 2.0,
        "reward/f/std": 1.0,
        "reward/one/mean": 5.0,
        "reward/one/std": 0.0,
        "reward/none/mean": 0.0,
        "reward/none/std": 0.0,
    }
    assert not any(math.isnan(v) for v in stats.values())
