"""The RL stage's inputs are data: built on the driver, they serve a worker and an actor that cannot see
the driver's files (a node of a cluster shares no disk with it). No Ray, no checkpoint."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from genpt_dist.config import load_config
from genpt_dist.errors import UserError
from genpt_dist.rl.inputs import PromptRows, RewardInputs, RLInputs
from genpt_dist.rl.rewards.specs import RewardError, parse_reward_specs
from genpt_dist.rl.step_prompts import StepPrompts
from genpt_dist.tokenizer import byte_tokenizer

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
WORDS = ["ROMEO:", "JULIET:", "To be", "My lord,", "What", "Now", "Come", "Good", "Fair", "Hence"]

REWARD = """
def letter_share(prompts, completions, letter, **kwargs):
    return [c.count(x) / max(len(c), 1) for c, x in zip(completions, letter)]


def raises(prompts, completions, **kwargs):
    raise ValueError("no score today")
"""


def _files(root: Path) -> tuple[Path, Path]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w, "letter": "e", "id": i}) + "\n" for i, w in enumerate(WORDS)))
    reward = root / "reward.py"
    reward.write_text(REWARD)
    return prompts, reward


def _shipped(inputs: RLInputs) -> RLInputs:
    """The inputs as another process receives them."""
    return pickle.loads(pickle.dumps(inputs))


def test_the_inputs_carry_the_files_contents_not_their_paths(tmp_path, monkeypatch):
    cfg = load_config(TINY, ["reinforce.prompts.held_out_fraction=0.3"])
    sec, tok = cfg.reinforce, byte_tokenizer()
    prompts, reward = _files(tmp_path)
    data = prompts.read_bytes()
    specs = parse_reward_specs([f"python:{reward}:letter_share@2"])
    inputs = RLInputs(
        rewards=RewardInputs.read(specs),
        tokenizer_json=tok.to_json(),
        prompts=PromptRows.read(str(prompts), sec, tok.encode, 64),
    )
    prompts.unlink()  # what a worker on another node sees of the driver's files: nothing
    reward.unlink()
    monkeypatch.chdir(tmp_path.parent)
    inputs = _shipped(inputs)

    rows = inputs.prompts
    assert rows is not None and rows.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.index for p in (*rows.train, *rows.held_out)) == list(range(len(WORDS)))
    assert rows.held_out and all(p.columns == {"letter": "e", "id": p.index} for p in rows.train)

    source = StepPrompts(cfg, sec, inputs, rank=0, world=1)
    source.start()  # no real text: nothing to open
    request, windows = source.draw(0)
    assert windows is None and request is not None
    assert set(request.texts or []) <= {p.text for p in rows.train}
    assert len(request) == sec.prompts_per_step * sec.rollout.samples_per_prompt
    assert source.source.data_fingerprint == rows.sha256

    python = inputs.rewards.python_rewards()
    assert python is not None
    assert python.score(["p", "q"], ["eee", "xy"], [{"letter": "e"}, {"letter": "e"}]) == {"letter_share": [1.0, 0.0]}
    assert [s.name for s in inputs.rewards.specs] == ["letter_share"] and inputs.rewards.specs[0].weight == 2


def test_a_reward_failure_names_the_users_file_not_the_private_copy(tmp_path):
    _, reward = _files(tmp_path)
    rewards = _shipped_rewards([f"python:{reward}:raises"])
    python = rewards.python_rewards()
    assert python is not None
    with pytest.raises(RewardError, match="no score today") as err:
        python.score(["p"], ["c"], [{}])
    assert str(reward) in str(err.value) and "genpt-rewards-" not in str(err.value)


def _shipped_rewards(texts: list[str]) -> RewardInputs:
    return pickle.loads(pickle.dumps(RewardInputs.read(parse_reward_specs(texts))))


def test_same_named_reward_files_stay_apart_and_relative_paths_read_from_the_current_folder(tmp_path, monkeypatch):
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        body = f"def f(prompts, completions, **kw):\n    return [{value}] * len(prompts)\n"
        (tmp_path / name / "r.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    rewards = _shipped_rewards(["python:a/r.py:f", "python:b/r.py:f"])
    assert set(rewards.files) == {"a/r.py", "b/r.py"}
    monkeypatch.chdir(tmp_path.parent)  # an actor's folder is not the driver's
    python = rewards.python_rewards()
    assert python is not None and python.score(["p"], ["c"], [{}]) == {"f": [1.0], "f_2": [2.0]}


def test_module_rewards_ship_no_file_and_a_missing_file_fails_on_the_driver(tmp_path):
    rewards = RewardInputs.read(parse_reward_specs(["discriminator", "python:json:dumps"]))
    assert rewards.files == {} and rewards.kinds == {"discriminator", "python"} and rewards.needs_texts
    assert not RewardInputs.read(parse_reward_specs(["discriminator"])).needs_texts
    assert RewardInputs.read(parse_reward_specs(["discriminator"])).python_rewards() is None
    with pytest.raises(UserError, match="missing.py"):
        RewardInputs.read(parse_reward_specs([f"python:{tmp_path / 'missing.py'}:f"]))


def test_the_stage_needs_prompts_or_real_text():
    with pytest.raises(ValueError, match="prompt file or from the real text"):
        RLInputs(rewards=RewardInputs(specs=()), tokenizer_json="{}")
