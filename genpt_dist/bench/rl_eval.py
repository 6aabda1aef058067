"""`bench rl`'s measures: the one evaluation that scores every snapshot of every racer (greedy held-out
completions by our sampler, scored by the task's reward file; perplexity on the task text), the step
profile read from our metrics.jsonl, the time a curve first reaches an accuracy, and the plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from genpt_dist.bench import rl_task

REWARD_FILE = Path(rl_task.__file__).resolve()
REWARD_FUNC = "correct"


def load_reward(path: Path = REWARD_FILE, func: str = REWARD_FUNC):
    """The reward function, imported by path as both racers import it."""
    spec = importlib.util.spec_from_file_location("bench_rl_reward_eval", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, func)


class Scorer:
    """Greedy completions of a prompt file by our sampler, scored by the reward function."""

    def __init__(self, rows: list[dict[str, Any]], tok, max_new_tokens: int):
        self.rows, self.tok, self.max_new_tokens = rows, tok, max_new_tokens
        self.prompts = [[tok.bos_id, *tok.encode(r["prompt"])] for r in rows]
        self.reward = load_reward()

    def completions(self, model) -> list[str]:
        from genpt_dist.model.sampling import sample

        out = sample(
            model.eval(),
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            top_k=1,
            eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id,
        )
        gen = out.tokens[:, out.prompt_width :].tolist()
        return [
            self.tok.decode([t for t in row[:n] if t != self.tok.eos_id])
            for row, n in zip(gen, out.new_lengths.tolist())
        ]

    def __call__(self, model) -> dict[str, float]:
        comps = self.completions(model)
        rewards = self.reward([r["prompt"] for r in self.rows], comps, answer=[r["answer"] for r in self.rows])
        return {
            "accuracy": sum(float(x) >= 1.0 for x in rewards) / len(rewards),
            "mean_reward": sum(float(x) for x in rewards) / len(rewards),
        }


def perplexity(model, data: str, tok) -> float:
    """Perplexity of the prepared corpus' val split (`launch.py evaluate`'s figure)."""
    from genpt_dist.data.packing import token_byte_lengths
    from genpt_dist.evaluate import _dataset_batches, score

    batches = _dataset_batches(data, "val", tok, model.config.block_size, 64)
    return score(model, batches, tok.loss_pad_id, token_byte_lengths(tok))["perplexity"]


def gpt_from_hf(path: str, model_config):
    from safetensors.torch import load_file

    from genpt_dist.hf_compat import from_hf_state_dict
    from genpt_dist.model.gpt import GPT

    model = GPT(model_config)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(load_file(path)), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"{path}: not our GPT's weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


# ------------------------------------------------------------------------------------- the bench


def step_profile(rows: list[dict[str, Any]], t_launch: float) -> dict[str, float]:
    """Mean seconds per update from metrics.jsonl: sampling (rollout_s), publishing weights (publish_s), and
    the rest (the policy update, logging, checkpoint writes), plus the time to the end of the first update."""
    steps = [r for r in rows if "rollout_s" in r]
    if len(steps) < 2:
        return {}
    dts = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
    step_s = sum(dts) / len(dts)
    rollout = sum(r["rollout_s"] for r in steps[1:]) / len(dts)
    publish = sum(r.get("publish_s", 0.0) for r in steps[1:]) / len(dts)
    rest = step_s - rollout - publish
    return {
        "first_update_done_s": round(steps[0]["time"] - t_launch, 2),
        "step_s": round(step_s, 4),
        "rollout_s": round(rollout, 4),
        "publish_s": round(publish, 4),
        "update_and_rest_s": round(rest, 4),
        "rollout_share": round(rollout / step_s, 3),
        "publish_share": round(publish / step_s, 3),
        "update_and_rest_share": round(rest / step_s, 3),
    }


def checkpoint_overheads(rows: list[dict[str, Any]], ckpt_steps: list[int]) -> dict[int, float]:
    """{checkpoint step: estimated seconds its writing took}: the update after a checkpoint step took this much
    longer than the median update (an estimate; TRL's snapshot time is measured and excluded exactly)."""
    steps = [r for r in rows if "rollout_s" in r]
    dts = {b["step"]: b["time"] - a["time"] for a, b in zip(steps, steps[1:])}
    if not dts:
        return {}
    median = sorted(dts.values())[len(dts) // 2]
    return {k: max(dts.get(k + 1, median) - median, 0.0) for k in ckpt_steps}


def seconds_to_reach(curve: list[dict[str, Any]], accuracy: float, key: str = "seconds") -> float | None:
    """Seconds (`key`) of the first snapshot after the start whose accuracy reaches `accuracy`."""
    for p in curve:
        if p["step"] > 0 and p["accuracy"] >= accuracy - 1e-9:
            return p[key]
    return None


def plot(curves: dict[str, dict[str, list[dict[str, Any]]]], starts: dict[str, float], path: Path) -> None:
    """One panel per seed (`curves[seed][run]`): held-out accuracy against seconds, each run one colour in
    every panel, the seed's start model dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for runs in curves.values() for n in runs))
    colour = {n: f"C{i}" for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(curves), figsize=(1 + 5 * len(curves), 4.2), sharey=True, squeeze=False)
    for ax, (seed, runs) in zip(axes[0], curves.items()):
        for name, curve in runs.items():
            xs, ys = [p["seconds"] for p in curve], [100 * p["accuracy"] for p in curve]
            ax.plot(xs, ys, marker="o", ms=3, color=colour[name], label=name)
        ax.axhline(100 * starts[seed], color="grey", ls=":", lw=1, label="start model")
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("seconds since the process was launched")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out greedy accuracy, %")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("bench rl: 2-digit addition, ours vs TRL GRPOTrainer (Dr. GRPO)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
