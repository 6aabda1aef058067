"""One REINFORCE policy update over a rank's rollout rows, through the policy's DeepSpeed engine.

1. Per-token advantages over all the rank's rows first (`reinforce.token_advantages`), from the
   sequence advantages the caller computed over the whole step (`reinforce.advantages`: they need
   whole prompt groups, and batch statistics for the whitening estimators): SeqGAN Monte Carlo
   rewards where given; in `kl_mode="reward"` minus the KL reward-to-go, for which a no-grad forward
   measures the current policy's log-probs; whitened over the batch when `normalize_advantages`
   (`reinforce.whiten`).
2. The loss over the rows `micro_batch_size` at a time: token-mean of -A * log pi(a_t) (+ k3 KL to
   the reference as a loss term, - entropy bonus; `reinforce.reinforce_loss`). Each micro loss is
   weighted by its share of the rank's generated tokens (times the number of micro batches, which
   DeepSpeed's accumulation divides back out), so the accumulated gradient is exactly that of the
   token-mean over all rows; DeepSpeed steps the optimizer once, at the accumulation boundary.
   Rows sampled by an older policy (they carry `behaviour_logprobs`: `rollout.max_staleness >= 1`)
   take the clipped importance-weighted term instead of the plain one; fresh rows with
   `previous_logprobs` (`reinforce.clip_against_previous`) the plain term on the tokens inside the trust
   region of the previous update (`reinforce_loss`).
Stats are the micro batches' stats averaged with the same weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from genpt_dist.config import ReinforceConfig
from genpt_dist.rl.batch import RolloutBatch
from genpt_dist.rl.reinforce import entropy_of_logprobs, kl_per_token, reinforce_loss, token_advantages, whiten


def policy_logprobs(
    engine: Any, rb: RolloutBatch, rows: slice, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, N) log pi of the sampled tokens of `rows` (with grad) and (R, N) the policy's entropy there
    (with grad only when it is in the loss)."""
    P = rb.prompt_width
    tokens, am = rb.tokens[rows].to(engine.device), rb.attention_mask[rows].to(engine.device)
    logits, _ = engine(tokens, attention_mask=am)  # (R, P+N, V)
    logp_all = torch.log_softmax(logits[:, P - 1 : -1].float(), dim=-1)  # (R, N, V)
    logp = logp_all.gather(-1, tokens[:, P:].unsqueeze(-1)).squeeze(-1)  # (R, N)
    with torch.set_grad_enabled(with_entropy and torch.is_grad_enabled()):
        entropy = entropy_of_logprobs(logp_all)  # (R, N)
    return logp, entropy


def policy_update(engine: Any, rb: RolloutBatch, cfg: ReinforceConfig, seq_adv: torch.Tensor) -> dict[str, float]:
    """One optimizer step of `engine` (the policy's DeepSpeed engine) on the rows of `rb`, whose (B,)
    sequence advantages are `seq_adv` (0 for rows left out: their gen_mask is 0); returns the stats."""
    device, micro, rows_total = engine.device, cfg.train.micro_batch_size, len(rb.tokens)
    chunks = [slice(lo, lo + micro) for lo in range(0, rows_total, micro)]
    mask = rb.gen_mask.to(device).float()  # (B, N)
    ref = rb.ref_logprobs.to(device)  # (B, N)
    # k3 as a loss term pulls towards the reference (k1's gradient averages to zero under pi);
    # k1 as a reward penalty is the unbiased per-token estimate.
    estimator: Literal["k1", "k3"] = "k3" if cfg.kl_mode == "loss" else "k1"
    kl_reward = None
    if cfg.kl_mode == "reward" and cfg.kl_coef > 0:  # advantages need the policy's current KL
        with torch.no_grad():
            logp = torch.cat([policy_logprobs(engine, rb, c, False)[0] for c in chunks])  # (B, N)
        kl_reward = kl_per_token(logp, ref, mask, estimator="k1")
    rewards = rb.rewards.to(device).nan_to_num(0.0)  # (B,); rows no reward scored are masked out
    seq_adv = seq_adv.to(device).nan_to_num(0.0)  # (B,)
    token_rewards = rb.token_rewards.to(device) if rb.token_rewards is not None else None
    adv = token_advantages(
        seq_adv,
        mask,
        token_rewards=token_rewards,
        rewards=rewards,
        kl=kl_reward,
        kl_coef=cfg.kl_coef,
        kl_mode=cfg.kl_mode,
    )  # (B, N)
    if cfg.normalize_advantages:
        adv = whiten(adv, mask)
    behaviour = rb.behaviour_logprobs.to(device) if rb.behaviour_logprobs is not None else None  # (B, N)
    previous = rb.previous_logprobs.to(device) if rb.previous_logprobs is not None else None  # (B, N)
    total = mask.sum().clamp(min=1)
    stats: dict[str, float] = {}
    for rows in chunks:
        logp, entropy = policy_logprobs(engine, rb, rows, cfg.entropy_coef > 0)
        kl = kl_per_token(logp, ref[rows], mask[rows], estimator=estimator)
        loss, chunk_stats = reinforce_loss(
            logp,
            adv[rows].detach(),
            mask[rows],
            kl=kl,
            kl_coef=cfg.kl_coef,
            kl_mode=cfg.kl_mode,
            entropy=entropy,
            entropy_coef=cfg.entropy_coef,
            behaviour_logp=behaviour[rows] if behaviour is not None else None,
            previous_logp=previous[rows] if previous is not None else None,
            clip_ratio=cfg.clip_ratio,
        )
        weight = float(mask[rows].sum() / total)  # this chunk's share of the rank's generated tokens
        engine.backward(loss * (weight * len(chunks)))  # DeepSpeed divides by len(chunks)
        engine.step()
        for k, v in chunk_stats.items():
            stats[k] = stats.get(k, 0.0) + weight * v
    return stats
