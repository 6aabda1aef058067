"""`reinforce` end to end: a Python reward (TRL's signature) with prompt columns rises, mixed with the
discriminator and a reward model, resumes in the same prompt order, and refuses bad input in one line
before any worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, save_classifier
from safetensors import safe_open

from genpt_dist import storage
from genpt_dist.checkpoint import list_checkpoints
from genpt_dist.config import load_config
from genpt_dist.errors import UserError
from genpt_dist.rl.rewards.reward_model import DiscriminatorRewardModel, check_reward_model, load_reward_model
from genpt_dist.rl.state import PREVIOUS_POLICY

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

# The share of the row's `letter` column in the completion: the column reaches the function by name.
REWARD = """
def letter_share(prompts, completions, letter, **kwargs):
    return [c.count(x) / max(len(c), 1) for c, x in zip(completions, letter)]


def raises(prompts, completions, **kwargs):
    raise ValueError("no score today")
"""


@pytest.fixture(scope="module")
def setup(data_and_base, tmp_path_factory) -> dict[str, str]:
    """Tiny data, a barely trained generator, a reward file and a prompt file with a `letter` column."""
    data, base = data_and_base
    root = tmp_path_factory.mktemp("rl")
    (root / "reward.py").write_text(REWARD)
    prompts = root / "prompts.jsonl"
    words = ["ROMEO:", "JULIET:", "To be", "My lord,", "What", "Now", "Come", "Good"]
    prompts.write_text(
        "".join(json.dumps({"prompt": w, "letter": "e", "id": i}) + "\n" for i, w in enumerate(words * 3))
    )
    return {"data": data, "base": base, "reward": str(root / "reward.py"), "prompts": str(prompts)}


def _metrics(run: str) -> list[dict]:
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    return [m for m in rows if "reward_mean" in m]


def _reinforce(s: dict[str, str], run: str, rewards: list[str], *overrides: str, data: bool = False) -> dict:
    from genpt_dist.rl.driver import reinforce

    return reinforce(
        s["base"],
        run,
        load_config(TINY, list(overrides)),
        prompts=s["prompts"],
        data=s["data"] if data else None,
        rewards=rewards,
    )


@pytest.mark.slow
def test_a_python_reward_over_prompt_columns_rises(setup, tmp_path):
    run = str(tmp_path / "run")
    spec = f"python:{setup['reward']}:letter_share"
    out = _reinforce(
        setup,
        run,
        [spec],
        "reinforce.train.steps=12",
        "reinforce.optim.lr=3e-3",
        "reinforce.kl_coef=0",
        "reinforce.baseline=grpo",
        "reinforce.train.eval_every=6",
        "reinforce.prompts.held_out_fraction=0.3",
        "reinforce.prompts.pass_reward=0.05",
    )
    assert out["step"] == 12 and out["rewards"] == ["letter_share"] and out["checkpoint"]
    steps = _metrics(run)
    assert [m["step"] for m in steps] == list(range(1, 13))
    first, last = sum(m["reward_mean"] for m in steps[:3]) / 3, sum(m["reward_mean"] for m in steps[-3:]) / 3
    assert last > first + 0.05, [round(m["reward_mean"], 3) for m in steps]
    assert all(m["reward/letter_share/mean"] == pytest.approx(m["reward_mean"], abs=1e-5) for m in steps)
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    held = [m for m in rows if "held_out_accuracy" in m]  # greedy completions of the held-out prompts
    assert [m["step"] for m in held] == [6, 12] and all(0 <= m["held_out_accuracy"] <= 1 for m in held)
    assert out["held_out_reward"] == pytest.approx(held[-1]["held_out_reward"])
    meta = list_checkpoints(run)[-1].meta
    assert meta.stage == "reinforce" and meta.rl is not None and meta.rl.discriminator is None


@pytest.mark.slow
def test_weighted_rewards_combine_and_resume_keeps_the_prompt_order(setup, tmp_path):
    """A function, the discriminator and a reward model score every row; the reward is their weighted sum."""
    (tmp_path / "rm").mkdir()
    folder = save_classifier(tmp_path / "rm")
    spec = [f"python:{setup['reward']}:letter_share@2", "discriminator@0.5", f"model:{folder}@0.1"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    _reinforce(setup, straight, spec, "reinforce.train.steps=4", "reinforce.train.checkpoint_every=2", data=True)
    _reinforce(setup, split, spec, "reinforce.train.steps=2", "reinforce.train.checkpoint_every=2", data=True)
    _reinforce(setup, split, spec, "reinforce.train.steps=4", "reinforce.train.checkpoint_every=2", data=True)
    a, b = _metrics(straight), _metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m in a:  # every row is scored by every component: the reward is their weighted sum
        parts = m["reward/letter_share/mean"], m["reward/discriminator/mean"], m["reward/model/mean"]
        combined = 2 * parts[0] + 0.5 * parts[1] + 0.1 * parts[2]
        assert m["reward_mean"] == pytest.approx(combined, abs=1e-4) and "d_acc_real" in m
    assert list_checkpoints(split)[-1].meta.loader["prompts"] == list_checkpoints(straight)[-1].meta.loader["prompts"]
    # The policy version before each checkpoint's is in it: the resumed run's first update clipped against it.
    for ref in list_checkpoints(split):
        with safe_open(str(Path(ref.url) / PREVIOUS_POLICY), framework="pt") as f:
            assert int(f.metadata()["version"]) == ref.meta.rl.policy_version - 1 and f.keys()
    for x, y in zip(a[2:], b[2:]):  # after the resume: the same prompts, weights and seeds, so the same rewards
        assert y["reward/letter_share/mean"] == pytest.approx(x["reward/letter_share/mean"], abs=1e-4), (a, b)
        assert y["reward/model/mean"] == pytest.approx(x["reward/model/mean"], abs=1e-4), (a, b)
    # The D this run trained, as a frozen `model:` reward for another run: real text against the near-random
    # bytes its barely trained policy wrote, so it ranks Shakespeare above noise.
    check_reward_model(straight)
    scorer = load_reward_model(straight)
    assert isinstance(scorer, DiscriminatorRewardModel)
    real = (
        ["ROMEO:", "First Citizen:", "KING RICHARD III:", "JULIET:"],
        [
            " Is the day so young?",
            " Before we proceed any further, hear me speak.",
            " Now is the winter of our discontent",
            " O Romeo, Romeo! wherefore art thou Romeo?",
        ],
    )
    noise = [w[::-1].swapcase() for w in real[0]], ["".join(chr(33 + (7 * i * i) % 90) for i in range(40))] * 4
    real_scores, noise_scores = scorer.score(*real), scorer.score(*noise)
    assert sum(real_scores) / 4 > sum(noise_scores) / 4, (real_scores, noise_scores)
    assert scorer.score(*real) == real_scores  # frozen, deterministic
    with pytest.raises(UserError, match="without a discriminator"):
        check_reward_model(setup["base"])


@pytest.mark.slow
def test_a_reward_function_that_raises_is_one_line_and_keeps_the_last_checkpoint(setup, tmp_path):
    run = str(tmp_path / "run")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "reinforce",
            "--init",
            setup["base"],
            "--run",
            run,
            "--prompts",
            setup["prompts"],
            "--reward",
            f"python:{setup['reward']}:raises",
            "--config",
            str(TINY),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:") and "raises" in last and "no score today" in last, last
    assert not list_checkpoints(run)


@pytest.fixture(scope="module")
def files(tmp_path_factory, setup) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    no_field = root / "no_field.jsonl"
    no_field.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    long = root / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 200}) + "\n")
    return {"no_field": str(no_field), "long": str(long)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["spec", "no-file", "no-function", "disc-without-data", "no-prompts", "field", "too-long"]
)
def test_reinforce_bad_input(case, setup, files, tmp_path):
    reward = f"python:{setup['reward']}:letter_share"
    args, expect = {
        "spec": (["--prompts", setup["prompts"], "--reward", "python:nofunc"], "bad --reward 'python:nofunc'"),
        "no-file": (["--prompts", setup["prompts"], "--reward", "python:missing.py:f"], "missing.py"),
        "no-function": (["--prompts", setup["prompts"], "--reward", f"python:{setup['reward']}:nope"], "nope"),
        "disc-without-data": (["--prompts", setup["prompts"], "--reward", "discriminator"], "needs --data"),
        "no-prompts": (["--reward", reward], "needs --prompts FILE"),
        "field": (["--prompts", files["no_field"], "--reward", reward], "line 2"),
        "too-long": (["--prompts", files["long"], "--reward", reward], "context"),
    }[case]
    run = str(tmp_path / "run")
    proc = cli("reinforce", "--init", setup["base"], "--run", run, "--config", str(TINY), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:") and expect in last, last
    assert "Traceback" not in proc.stderr and not list_checkpoints(run)


@pytest.mark.slow
def test_max_staleness_one_lags_one_version_clips_and_checkpoints_the_untrained_position(setup, tmp_path):
    """One-step-off: step s+1's rollouts are sampled while step s trains, by the weights before it."""
    spec = [f"python:{setup['reward']}:letter_share"]
    stale = ["reinforce.rollout.max_staleness=1", "reinforce.clip_ratio=0.02", "reinforce.optim.lr=3e-3"]
    straight, short = str(tmp_path / "straight"), str(tmp_path / "short")
    _reinforce(setup, straight, spec, "reinforce.train.steps=4", "reinforce.train.checkpoint_every=2", *stale)
    _reinforce(setup, short, spec, "reinforce.train.steps=2", "reinforce.train.checkpoint_every=2", *stale)
    steps = _metrics(straight)
    assert [m["version_lag"] for m in steps] == [0, 1, 1, 1]
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=0.05)  # fresh rows: the sampler's own weights
    assert max(m["clip_fraction"] for m in steps[1:]) > 0, steps  # stale rows leave the trust region
    # At step 2 the straight run had step 3's prompts in flight; its checkpoint records the position before
    # them, as the run that stopped at step 2 does, so a resume re-draws them.
    at2 = [c for c in list_checkpoints(straight) if c.step == 2]
    assert at2 and at2[0].meta.loader["prompts"] == list_checkpoints(short)[-1].meta.loader["prompts"]


DIES_ONCE = """
import os

MARKER = {marker!r}


def letter_share_dies_once(prompts, completions, letter, **kwargs):
    if not os.path.exists(MARKER):  # the first call: the rollout actor dies while scoring
        open(MARKER, "w").close()
        os._exit(1)
    return [c.count(x) / max(len(c), 1) for c, x in zip(completions, letter)]
"""


@pytest.mark.slow
def test_an_actor_killed_while_scoring_loses_and_doubles_no_row(setup, tmp_path):
    """The killed actor's rows are re-issued: every step's rows, rewards and tokens are those of a run
    without the kill (rows are seeded per call, so the actor that serves them does not matter)."""
    (tmp_path / "dies.py").write_text(DIES_ONCE.format(marker=str(tmp_path / "died")))
    calm, killed = str(tmp_path / "calm"), str(tmp_path / "killed")
    _reinforce(setup, calm, [f"python:{setup['reward']}:letter_share"], "reinforce.train.steps=2")
    _reinforce(setup, killed, [f"python:{tmp_path / 'dies.py'}:letter_share_dies_once"], "reinforce.train.steps=2")
    assert (tmp_path / "died").exists()
    a, b = _metrics(calm), _metrics(killed)
    assert sum(m["reissued"] for m in b) >= 1 and sum(m["reissued"] for m in a) == 0
    for x, y in zip(a, b, strict=True):
        assert y["tokens_seen"] == x["tokens_seen"] and y["scored"] == 1.0
        assert y["reward_mean"] == pytest.approx(x["reward_mean"], abs=1e-6)
