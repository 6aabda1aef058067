"""What the RL stage measures and logs each step, from the step's whole batch (the same on every rank).

A row no reward component scored has a NaN reward: it counts in `scored` (the share scored) and in no
mean. Each component's mean and std are logged as `reward/<name>/mean` and `reward/<name>/std`. The
held-out figures are those of greedy completions of the held-out prompts: their mean reward and the
share that reaches `pass_reward` (pass@1 for a checker reward).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from genpt_dist.rl.batch import RolloutBatch
from genpt_dist.rl.rewards.specs import component_stats

log = logging.getLogger(__name__)

STEP_KEYS = (
    "reward_mean",
    "reward_std",
    "scored",
    "kl",
    "entropy",
    "sample_len",
    "pg_loss",
    "rollout_tokens_per_s",
    "rollout_s",
    "publish_s",
    "version_lag",
    "ratio_mean",
    "clip_fraction",
    "tokens_seen",
    "reissued",
)
D_KEYS = ("d_acc_real", "d_acc_fake", "d_loss")
VAL_KEYS = ("val_loss", "val_ppl", "val_bpb")
HELD_OUT_KEYS = ("held_out_reward", "held_out_accuracy")


def reward_metrics(batch: RolloutBatch) -> dict[str, float]:
    """The combined reward of the scored rows (mean, std), the share scored, each component's mean and std."""
    rewards = batch.rewards  # (B,) NaN = not scored
    scored = ~torch.isnan(rewards)
    values = rewards[scored]
    out = {
        "reward_mean": values.mean().item() if len(values) else math.nan,
        "reward_std": values.std().item() if len(values) > 1 else 0.0,
        "scored": scored.float().mean().item(),
    }
    if batch.reward_components is not None:
        out.update(component_stats(dict(zip(batch.reward_names, batch.reward_components.unbind(1)))))
    return out


def held_out_metrics(rewards: torch.Tensor, pass_reward: float) -> dict[str, float]:
    """The held-out figures of greedy completions' rewards (H,), NaN = not scored."""
    scored = rewards[~torch.isnan(rewards)]
    return {
        "held_out_reward": scored.mean().item() if len(scored) else math.nan,
        "held_out_accuracy": (rewards >= pass_reward).float().mean().item(),
    }


def step_keys(metrics: dict[str, Any]) -> list[str]:
    """The keys of a step's metrics record: the step's, D's and every reward component's."""
    return [*STEP_KEYS, *D_KEYS, *(k for k in metrics if k.startswith("reward/"))]


def log_step(
    stage: str, step: int, m: dict[str, Any], *, steps: int, elapsed_s: float, start_step: int, with_d: bool
) -> None:
    """The progress line, then the step's reward, KL, entropy, D's accuracies (`with_d`) and publish time."""
    from genpt_dist.train.metrics import progress_line

    progress_line(stage, step, steps, m["pg_loss"], m["rollout_tokens_per_s"], 0.0, elapsed_s, start_step)
    d = f" D acc real {m['d_acc_real']:.2f} fake {m['d_acc_fake']:.2f}" if with_d else ""
    log.info(
        "[%s] step %d reward %.3f kl %.4f entropy %.3f%s publish %.2fs",
        stage,
        step,
        m["reward_mean"],
        m["kl"],
        m["entropy"],
        d,
        m["publish_s"],
    )
