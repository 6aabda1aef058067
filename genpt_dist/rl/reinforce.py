"""REINFORCE with a baseline, a KL guard to the pretrained model and an entropy bonus (pure tensor math).

The algorithm
-------------
The policy pi_theta generates ``a_1..a_T`` after a prompt; the rewards score the sequence
(``rl.rewards``). The score-function (REINFORCE) estimator of the gradient of the expected reward is

    grad J = E[ sum_t A_t * grad log pi(a_t | s_<t) ]

estimated on a batch of rollouts by the loss ``-mean_t(A_t * log pi(a_t | s_<t))`` with ``A_t``
detached. The mean runs over every generated token of the batch (token-level mean, eos included,
padding after the stop excluded), so long sequences weigh more than short ones.

``A_t`` is the sequence advantage of the row (``advantages``), the same for every token of the row,
unless SeqGAN Monte Carlo token rewards are given, in which case ``A_t = Q_t - b`` with the row's
baseline b (``token_advantages``). Estimators (``kind``); g is ``group_size`` (samples per prompt),
B the number of rows given:

* ``none``:  A = r. Unbiased, highest variance.
* ``ema``:   A = r - b with b an exponential moving average of past batch-mean rewards; the first
  batch uses its own mean. The average is updated *after* the advantages are computed. Unbiased
  (b does not depend on this batch's actions, except on the first batch).
* ``rloo``:  A_i = r_i - mean of the *other* g-1 rows of the prompt (leave-one-out; Kool et al.
  2019, Ahmadian et al. 2024). Unbiased: the baseline never sees the row's own action.
* ``dr_grpo`` (alias ``group``): A_i = r_i - mean_g, the mean over the g rows of the prompt, without
  the std (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"). The mean includes the
  row itself, so A = (g-1)/g * the rloo advantage: unbiased up to that constant shrink. ``group`` is
  the older name of the same estimator, kept for existing recipes.
* ``grpo``:  A_i = (r_i - mean_g) / (std_g + 1e-4), std_g the *population* std (divide by g) of the
  prompt's rows (GRPO, Shao et al. 2024, DeepSeekMath; eps as in TRL). TRL divides by torch's
  default (Bessel, g-1) std, so its advantages are sqrt((g-1)/g) times these. The std scaling
  reweights prompts: those whose rows nearly agree (too easy or too hard) are scaled up, which Dr.
  GRPO calls a difficulty bias; the gradient is biased, in exchange for advantages that do not
  depend on the reward's scale.
* ``reinforce++``: A = (r - mean_B) / (std_B + 1e-4) over the whole batch given, population std, no
  per-prompt baseline (global whitening; REINFORCE++, Hu 2025). The caller passes every row of the
  step (across workers) so the statistics are the step's. Dividing by one std per step is a step-size
  rescale and does not reweight prompts; the batch mean includes the row itself (bias O(1/B)).
  Without a per-prompt baseline the variance is higher than ``rloo``'s when prompts differ in
  difficulty; ``group_size`` is ignored.

``rloo``, ``dr_grpo``/``group`` and ``grpo`` expect the rows of a prompt to be contiguous,
``group_size`` rows each. Rows whose reward is NaN (not scored) are left out of every statistic (the
means, stds, counts and the ema update) and get A = 0; a group with no scored row gives 0s, and so
does a group with a single scored row (no other row to compare it with; also under ``rloo``).

KL to the frozen reference pi_ref (the pretrained model) keeps the policy from collapsing onto what
fools the discriminator. Per token, with the sampled token's log-probs under both models,
``k1 = log pi - log pi_ref`` (unbiased for KL(pi || pi_ref), can be negative) or
``k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` (>= 0, lower variance; Schulman 2020).
Two ways to apply it (``kl_mode``):

* ``loss``:   add ``kl_coef * mean_t(kl_t)`` to the loss, with kl computed from log-probs that carry
  the gradient. Use k3 here: its gradient ``(1 - pi_ref/pi) grad log pi`` has expectation
  ``grad KL(pi_ref || pi)``, a proper pull towards the reference. With k1 the term's gradient is
  ``grad log pi(a_t)``, whose expectation under pi is zero: k1 in the loss only adds noise.
* ``reward``: treat ``-kl_coef * kl_t`` as a per-token reward (detached), so token t is charged the
  reward-to-go ``kl_coef * sum_{t' >= t} kl_t'`` of the KL it and its successors incur, as in
  RLHF PPO. Subtracted from A_t before the loss.

An entropy bonus ``-entropy_coef * mean_t(H(pi(. | s_<t)))`` can be added to counter early collapse.

Left out, and why: no PPO importance ratio or clipping and no value network. The stage takes one
optimizer step per rollout batch, sampled by the policy it updates (strictly on-policy: the
rollouts of step s are requested after step s-1's weights are published), so the plain estimator
is exact in expectation. Rollouts are sampled with temperature / top-k / top-p, so
strictly the behaviour distribution is the filtered one; the loss uses log-probs of the unfiltered
policy at temperature 1 (the distribution being trained), the usual approximation.

Seeds: each rollout row is sampled with its own generator, seeded with
``rollout_seed(base_seed, step, sample_index)``: a 63-bit hash (BLAKE2b) of the run's seed, the
policy step and the row's index within the step (``prompt_index * samples_per_prompt + j``). It
depends on nothing else (not the actor, not the split of rows across actors, not restarts), so a
rollout batch is reproducible and a re-issued chunk gives the same tokens. Further streams (Monte
Carlo completions) are derived with ``derive_seed(row_seed, ...)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

_SEED_BITS = 63


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from any integers (BLAKE2b of their decimal form); order matters."""
    text = ",".join(str(int(p)) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << _SEED_BITS) - 1)


def rollout_seed(base_seed: int, step: int, sample_index: int) -> int:
    """The seed of rollout row ``sample_index`` of policy step ``step`` in a run seeded ``base_seed``."""
    return derive_seed(base_seed, step, sample_index)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (0 when the mask is empty); differentiable."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------- baselines


@dataclass
class BaselineState:
    """What a baseline carries across steps (checkpointed with the stage's counters)."""

    ema: float | None = None  # moving average of batch-mean rewards; None before the first batch


AdvantageKind = Literal["ema", "group", "dr_grpo", "grpo", "rloo", "reinforce++", "none"]
_GROUP_KINDS = ("group", "dr_grpo", "grpo", "rloo")
_STD_EPS = 1e-4  # added to the std in grpo / reinforce++ (TRL's GRPO value)


def advantages(
    rewards: Tensor,
    *,
    kind: AdvantageKind,
    group_size: int = 1,
    state: BaselineState | None = None,
    ema_decay: float = 0.9,
) -> tuple[Tensor, BaselineState]:
    """Sequence advantages (B,) and the updated baseline state; see the module docstring.

    rewards: (B,) one per row, NaN where a row was not scored (its advantage is 0 and it is left out of
    the statistics); for ``group``/``dr_grpo``/``grpo``/``rloo`` rows ``[k*g, (k+1)*g)`` share a prompt.
    For ``grpo`` and ``reinforce++`` the advantage is scaled, so ``rewards - A`` is no baseline.
    The state is not mutated; a new one is returned.
    """
    state = state or BaselineState()
    r = rewards.detach().float()  # (B,)
    B = r.numel()
    scored = ~torch.isnan(r)  # (B,) rows that have a reward
    r0 = r.masked_fill(~scored, 0.0)  # (B,) NaN -> 0, so sums skip unscored rows
    if kind == "none":
        return r0, state
    if kind == "ema":
        if not bool(scored.any()):
            return r0, state  # nothing scored: all 0, the average does not move
        batch_mean = float(r[scored].mean())
        base = batch_mean if state.ema is None else state.ema
        new_ema = batch_mean if state.ema is None else ema_decay * state.ema + (1.0 - ema_decay) * batch_mean
        return (r0 - base).masked_fill(~scored, 0.0), BaselineState(ema=new_ema)
    if kind == "reinforce++":
        g = max(B, 1)  # one group: the whole batch
    elif kind in _GROUP_KINDS:
        g = group_size
        if g < 1 or B % g:
            raise ValueError(f"{B} rewards do not split into groups of group_size={g}")
        if kind == "rloo" and g < 2:
            raise ValueError("the rloo baseline needs group_size >= 2 (samples_per_prompt)")
    else:
        raise ValueError(f"baseline kind must be one of {', '.join(get_args(AdvantageKind))}, got {kind!r}")
    grouped = r0.view(B // g, g)  # (G, g)
    m = scored.view(B // g, g)  # (G, g)
    n = m.sum(dim=1, keepdim=True).float()  # (G, 1) scored rows per group
    total = grouped.sum(dim=1, keepdim=True)  # (G, 1) over scored rows
    if kind == "rloo":
        group_base = (total - grouped) / (n - 1).clamp(min=1.0)  # (G, g) mean of the other scored rows
        adv = (grouped - group_base).masked_fill(n < 2, 0.0)  # (G, g) a lone scored row has no baseline
    else:  # group, dr_grpo, grpo, reinforce++
        adv = grouped - total / n.clamp(min=1.0)  # (G, g)
        if kind in ("grpo", "reinforce++"):
            var = (adv.square() * m).sum(dim=1, keepdim=True) / n.clamp(min=1.0)  # (G, 1) population variance
            adv = adv / (var.sqrt() + _STD_EPS)  # (G, g)
    return adv.masked_fill(~m, 0.0).reshape(B), state


# ------------------------------------------------------------------------------------------ KL


def kl_per_token(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate (B, N) from sampled-token log-probs; 0 where mask is 0.

    Differentiable through ``logp``. k1 = logp - ref_logp; k3 = exp(-d) + d - 1 with d = logp - ref_logp.
    """
    d = logp - ref_logp  # (B, N)
    if estimator == "k1":
        kl = d
    elif estimator == "k3":
        kl = torch.expm1(-d) + d  # (B, N) = exp(-d) - 1 + d >= 0
    else:
        raise ValueError(f"KL estimator must be k1 or k3, got {estimator!r}")
    return kl.masked_fill(~mask.bool(), 0.0)  # (B, N)


def reward_to_go(x: Tensor, mask: Tensor) -> Tensor:
    """(B, N) suffix sums ``sum_{t' >= t} x_t'`` over masked entries; 0 where mask is 0."""
    m = mask.bool()
    x = x.masked_fill(~m, 0.0)  # (B, N)
    rtg = x.flip(-1).cumsum(-1).flip(-1)  # (B, N)
    return rtg.masked_fill(~m, 0.0)


def token_advantages(
    seq_adv: Tensor,
    mask: Tensor,
    *,
    token_rewards: Tensor | None = None,
    rewards: Tensor | None = None,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_mode: Literal["loss", "reward"] = "loss",
) -> Tensor:
    """Per-token advantages (B, N), detached, 0 where ``mask`` is 0.

    * Without ``token_rewards``: ``A_t = seq_adv`` on every generated token.
    * With MC ``token_rewards`` (B, N): ``A_t = token_rewards_t - b`` where ``b = rewards - seq_adv`` is
      the baseline ``advantages`` subtracted; ``rewards`` (B,) is then required.
    * ``kl_mode="reward"`` with ``kl`` (B, N) and ``kl_coef > 0``: additionally
      ``A_t -= kl_coef * sum_{t' >= t} kl_t'`` (the KL reward-to-go). In ``loss`` mode kl is ignored here.

    Normalise afterwards if wanted: ``whiten(adv, mask)``.
    """
    m = mask.bool()
    B, N = m.shape
    if token_rewards is None:
        adv = seq_adv.detach().float()[:, None].expand(B, N).clone()  # (B, N)
    else:
        if rewards is None:
            raise ValueError("token_advantages with token_rewards needs the sequence rewards (for the baseline)")
        baseline = (rewards.detach().float() - seq_adv.detach().float())[:, None]  # (B, 1)
        adv = token_rewards.detach().float() - baseline  # (B, N)
    if kl_mode not in ("loss", "reward"):
        raise ValueError(f"kl_mode must be loss or reward, got {kl_mode!r}")
    if kl_mode == "reward" and kl is not None and kl_coef != 0.0:
        adv = adv - kl_coef * reward_to_go(kl.detach().float(), m)  # (B, N)
    return adv.masked_fill(~m, 0.0)


def whiten(x: Tensor, mask: Tensor | None = None, eps: float = 1e-6, *, center: bool = True) -> Tensor:
    """``(x - mean) / (std + eps)`` over the entries where ``mask`` is 1 (all when None): the
    ``normalize_advantages`` step of the policy update, over a rank's per-token advantages.

    ``center=False`` only divides by the std (the mean is still used to compute it). Masked-out
    entries come back as 0. The std is the population std (no Bessel correction), so a single entry
    gives 0, not NaN.
    """
    xf = x.float()
    keep = torch.ones_like(xf, dtype=torch.bool) if mask is None else mask.bool().expand_as(xf)
    xf = torch.where(keep, xf, 0.0)  # masked entries never reach the sums (even if inf/NaN)
    n = keep.sum().clamp(min=1)
    mean = xf.sum() / n
    var = torch.where(keep, (xf - mean) ** 2, 0.0).sum() / n
    out = (xf - mean if center else xf) / (var.sqrt() + eps)
    return torch.where(keep, out, 0.0)


def entropy_of_logprobs(logp_all: Tensor) -> Tensor:
    """Entropy (...,) of the distributions whose log-probabilities are `logp_all` (..., V); differentiable."""
    return -(logp_all.exp() * logp_all).sum(dim=-1)  # (...,)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (...,) of softmax(logits) over the last dim, float32; differentiable."""
    return entropy_of_logprobs(F.log_softmax(logits.float(), dim=-1))


# ---------------------------------------------------------------------------------------- loss


def reinforce_loss(
    logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_mode: Literal["loss", "reward"] = "loss",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    behaviour_logp: Tensor | None = None,
    previous_logp: Tensor | None = None,
    clip_ratio: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """The REINFORCE loss (scalar, differentiable) and its stats; token-level means over ``mask``.

    logp: (B, N) log pi(a_t | s_<t) of the sampled tokens, with grad. adv: (B, N) advantages
    (detached here). mask: (B, N) 1 for generated tokens. kl: (B, N) per-token KL with grad
    (``kl_per_token(logp, ref_logp, mask)``), added as ``kl_coef * mean(kl)`` when kl_mode is "loss"
    (in "reward" mode it is reported only; it belongs in ``token_advantages``). entropy: (B, N)
    per-token policy entropy with grad, subtracted as ``entropy_coef * mean(entropy)``.

    loss = mean(-adv * logp) [+ kl_coef * mean(kl)] [- entropy_coef * mean(entropy)].

    Stale rollouts (sampled by an older policy mu, ``behaviour_logp`` = (B, N) log mu(a_t) at temperature
    1 over the full vocabulary, as logp is): the policy-gradient term is importance-weighted and
    clipped as PPO clips it (veRL's one-step-off and TRL's num_iterations > 1 do the same),
    ``mean(-min(r * adv, clip(r, 1 - clip_ratio, 1 + clip_ratio) * adv))`` with r = pi(a_t) / mu(a_t).
    At r = 1 (fresh rollouts) its gradient is the REINFORCE gradient above, so on-policy that clip never
    acts: the update is a single step from the sampling policy.

    Fresh rollouts with ``previous_logp`` = (B, N) log pi_prev(a_t), the policy one update before the
    sampling one: a trust region against that update. With q = pi(a_t) / pi_prev(a_t), a token whose
    probability the previous update already moved past the clip in its advantage's direction (q > 1 +
    clip_ratio with adv > 0, q < 1 - clip_ratio with adv < 0) gets no gradient, the others the REINFORCE
    gradient: ``mean(-adv * logp * keep)``. It is the gradient of the stale case's clipped term with the
    ratio's value set to 1 (the rows are the current policy's own samples, no importance weight) and its
    clip taken from the previous policy, which is where a one-step-off update's clip stops a token.
    Stats: loss, pg_loss, kl, entropy, adv_mean, adv_std (plain floats; kl/entropy 0 when not given),
    with behaviour_logp or previous_logp: ratio_mean (r or q) and clip_fraction (the share of tokens
    that carry no gradient).
    """
    m = mask.bool()
    a = adv.detach().float()  # (B, N)
    stats: dict[str, float] = {}
    if behaviour_logp is None and previous_logp is None:
        pg = masked_mean(-a * logp.float(), m)
    elif behaviour_logp is None:
        assert previous_logp is not None
        q = torch.exp(logp.detach().float() - previous_logp.float())  # (B, N)
        stopped = ((a > 0) & (q > 1 + clip_ratio)) | ((a < 0) & (q < 1 - clip_ratio))  # (B, N)
        pg = masked_mean(-a * logp.float() * (~stopped).float(), m)
        stats.update(ratio_mean=float(masked_mean(q, m)), clip_fraction=float(masked_mean(stopped.float(), m)))
    else:
        ratio = torch.exp(logp.float() - behaviour_logp.detach().float())  # (B, N)
        unclipped, clipped = -a * ratio, -a * ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
        pg = masked_mean(torch.maximum(unclipped, clipped), m)
        stats.update(
            ratio_mean=float(masked_mean(ratio.detach(), m)),
            clip_fraction=float(masked_mean((clipped > unclipped).float(), m)),
        )
    loss = pg
    stats["pg_loss"] = float(pg.detach())
    kl_mean = masked_mean(kl.float(), m) if kl is not None else None
    if kl_mean is not None and kl_mode == "loss" and kl_coef != 0.0:
        loss = loss + kl_coef * kl_mean
    ent_mean = masked_mean(entropy.float(), m) if entropy is not None else None
    if ent_mean is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * ent_mean
    a_mean = masked_mean(a, m)
    a_std = masked_mean((a - a_mean) ** 2, m).sqrt()
    stats.update(
        loss=float(loss.detach()),
        kl=float(kl_mean.detach()) if kl_mean is not None else 0.0,
        entropy=float(ent_mean.detach()) if ent_mean is not None else 0.0,
        adv_mean=float(a_mean),
        adv_std=float(a_std),
    )
    return loss, stats
