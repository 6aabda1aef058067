"""The discriminator's reward transform: a sequence reward from D's logit, and SeqGAN Monte Carlo token rewards.

Used wherever the online discriminator scores rollouts: the `adversarial` stage, and `reinforce` with the
`discriminator` reward spec. The stage's `reward` key picks the transform (``kind``). A checkpoint's
frozen discriminator named by a `model:` spec scores with its raw logit instead (`reward_model`).

Math (pure tensor code, no model calls):

* The discriminator returns a logit ``l(x)`` per sequence, positive meaning "real". The sequence
  reward is ``R(x) = D(x) = sigmoid(l)`` in (0, 1) (``kind="prob"``, SeqGAN) or
  ``R(x) = log D(x) = logsigmoid(l)`` in (-inf, 0) (``kind="log"``, the non-saturating GAN objective:
  its gradient does not vanish while the discriminator confidently rejects the samples).
* SeqGAN (Yu et al. 2017) credits each generated token ``y_t`` with the expected final reward of
  sequences that start with the prefix ``y_{1:t}``: ``Q(y_{1:t}) ~= 1/M sum_m R(y_{1:t} + c_m)`` where
  ``c_m`` are M completions sampled from the current policy. The rollout worker measures this only
  at every ``mc_stride``-th generated position (``positions``) to bound the cost, and
  ``mc_token_rewards`` fills the rest piecewise constantly *backward*: token t takes the score of the
  first measured prefix ending at or after t (a later prefix's value is an estimate of the same
  expectation with more of the sequence fixed). The last generated token, and every token after the
  last measured prefix that lies before it, takes the sequence's own reward ``R(x)``: the prefix
  ending at the last token is the whole sequence, whose reward is known exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def sequence_reward(d_logits: Tensor, kind: Literal["prob", "log"] = "prob") -> Tensor:
    """Reward (B,) of each sequence from its discriminator logit (B,): D(x) or log D(x), float32."""
    x = d_logits.float()  # (B,)
    if kind == "prob":
        return torch.sigmoid(x)  # (B,)
    if kind == "log":
        return F.logsigmoid(x)  # (B,)
    raise ValueError(f"reward kind must be 'prob' or 'log', got {kind!r}")


def mc_token_rewards(prefix_scores: Tensor, positions: Tensor, final_reward: Tensor, gen_mask: Tensor) -> Tensor:
    """Per-token SeqGAN rewards (B, N); see the module docstring.

    prefix_scores: (B, n_pos) mean reward of the completions of the prefix that ends at generated
    index ``positions[j]`` (entries at or after a row's last generated token are ignored).
    positions: (n_pos,) increasing 0-based indices into the generated part. final_reward: (B,) the
    sequence's own reward. gen_mask: (B, N) 1 for generated tokens (eos included), 0 after the stop.
    Returns (B, N) float32, zero where ``gen_mask`` is 0.
    """
    B, N = gen_mask.shape
    mask = gen_mask.bool()  # (B, N)
    final = final_reward.float()[:, None].expand(B, N)  # (B, N)
    positions = positions.to(device=gen_mask.device, dtype=torch.long)  # (n_pos,)
    n_pos = positions.numel()
    if n_pos == 0:
        return final.masked_fill(~mask, 0.0)  # (B, N)
    if prefix_scores.shape != (B, n_pos):
        raise ValueError(f"prefix_scores shape {tuple(prefix_scores.shape)} != (B, n_pos) = {(B, n_pos)}")
    if bool((positions[1:] <= positions[:-1]).any()):
        raise ValueError("positions must be strictly increasing")
    last = mask.long().sum(dim=1) - 1  # (B,) index of the last generated token (-1 for an empty row)
    t = torch.arange(N, device=gen_mask.device)  # (N,)
    j = torch.searchsorted(positions, t)  # (N,) first measured prefix ending at or after t
    has_next = j < n_pos  # (N,)
    j_safe = j.clamp(max=n_pos - 1)  # (N,)
    measured_at = positions[j_safe]  # (N,) where that prefix ends
    usable = has_next[None, :] & (measured_at[None, :] < last[:, None])  # (B, N) a real prefix, not the whole row
    scores = prefix_scores.float()[:, j_safe]  # (B, N)
    out = torch.where(usable, scores, final)  # (B, N)
    return out.masked_fill(~mask, 0.0)  # (B, N)
