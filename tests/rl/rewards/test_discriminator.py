"""The discriminator's reward transform (`rl.rewards.discriminator`): D(x) or log D(x) from a logit, and
SeqGAN Monte Carlo token rewards filled backward from the measured prefixes."""

from __future__ import annotations

import math

import pytest
import torch

from genpt_dist.rl.rewards.discriminator import mc_token_rewards, sequence_reward


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_sequence_reward_prob_and_log():
    logits = torch.tensor([0.0, math.log(3.0), -2.0])
    close(sequence_reward(logits, "prob"), [0.5, 0.75, 1 / (1 + math.e**2)])
    close(sequence_reward(logits, "log"), [math.log(0.5), math.log(0.75), -math.log(1 + math.e**2)])
    assert torch.isfinite(sequence_reward(torch.tensor([-200.0]), "log")).all()  # no log(0)
    with pytest.raises(ValueError, match="prob"):
        sequence_reward(logits, "logit")


def test_mc_token_rewards_backward_fill():
    scores = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    positions = torch.tensor([1, 4])
    final = torch.tensor([0.9, 0.8, 0.7])
    lengths = torch.tensor([8, 4, 5])
    gen_mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    out = mc_token_rewards(scores, positions, final, gen_mask)
    close(
        out,
        [
            [0.1, 0.1, 0.2, 0.2, 0.2, 0.9, 0.9, 0.9],  # tokens after the last prefix take the final reward
            [0.3, 0.3, 0.8, 0.8, 0.0, 0.0, 0.0, 0.0],  # prefix at 4 lies past the end: final; then zeros
            [0.5, 0.5, 0.7, 0.7, 0.7, 0.0, 0.0, 0.0],  # prefix at 4 is the whole row: its own reward
        ],
    )


def test_mc_token_rewards_without_prefixes_is_the_final_reward():
    gen_mask = torch.tensor([[1, 1, 0]])
    out = mc_token_rewards(torch.zeros(1, 0), torch.zeros(0, dtype=torch.long), torch.tensor([0.4]), gen_mask)
    close(out, [[0.4, 0.4, 0.0]])
