"""Pure tensor math of the policy update (`rl.reinforce`): whitening, baselines, KL, token advantages, the loss,
seeds."""

from __future__ import annotations

import math

import pytest
import torch

from genpt_dist.rl.reinforce import (
    BaselineState,
    advantages,
    derive_seed,
    kl_per_token,
    reinforce_loss,
    reward_to_go,
    rollout_seed,
    token_advantages,
    token_entropy,
    whiten,
)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------- whitening


def test_whiten_masked():
    x = torch.tensor([1.0, 2.0, 3.0, float("inf")])
    out = whiten(x, torch.tensor([1, 1, 1, 0]))
    s = math.sqrt(2 / 3)
    close(out, [-1 / s, 0.0, 1 / s, 0.0], atol=1e-5)
    close(whiten(torch.tensor([2.0, 4.0]), center=False), [2.0, 4.0], atol=1e-5)  # std 1
    close(whiten(torch.tensor([5.0])), [0.0])


# --------------------------------------------------------------------------------------- baselines


R = torch.tensor([1.0, 2.0, 3.0, 6.0])


def test_advantages_none_group_rloo_exact():
    adv, _ = advantages(R, kind="none")
    close(adv, [1.0, 2.0, 3.0, 6.0])
    adv, _ = advantages(R, kind="group", group_size=2)
    close(adv, [-0.5, 0.5, -1.5, 1.5])
    adv, _ = advantages(R, kind="rloo", group_size=2)
    close(adv, [-1.0, 1.0, -3.0, 3.0])
    adv, _ = advantages(R, kind="rloo", group_size=4)
    close(adv, [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], atol=1e-5)


def test_advantages_ema_updates_after_use():
    adv, state = advantages(R, kind="ema", state=BaselineState(), ema_decay=0.9)
    close(adv, [-2.0, -1.0, 0.0, 3.0])  # first batch: its own mean
    assert state.ema == pytest.approx(3.0)
    adv, state2 = advantages(torch.full((4,), 5.0), kind="ema", state=state, ema_decay=0.9)
    close(adv, [2.0] * 4)  # the old average, not one that already saw this batch
    assert state2.ema == pytest.approx(0.9 * 3.0 + 0.1 * 5.0)
    assert state.ema == pytest.approx(3.0)  # not mutated


def test_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size=3"):
        advantages(R, kind="group", group_size=3)
    with pytest.raises(ValueError, match="rloo"):
        advantages(R, kind="rloo", group_size=1)
    with pytest.raises(ValueError, match="baseline kind"):
        advantages(R, kind="mean")


R6 = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])  # 2 prompts x 3 rows: means 3 and 2
EPS = 1e-4
NAN = float("nan")


def test_advantages_dr_grpo_grpo_reinforce_pp_exact():
    adv, _ = advantages(R6, kind="dr_grpo", group_size=3)
    close(adv, [-2.0, -1.0, 3.0, -2.0, 1.0, 1.0])
    # Population stds: sqrt((4 + 1 + 9) / 3) and sqrt((4 + 1 + 1) / 3).
    s1, s2 = math.sqrt(14 / 3), math.sqrt(2.0)
    adv, _ = advantages(R6, kind="grpo", group_size=3)
    close(adv, [-2 / (s1 + EPS), -1 / (s1 + EPS), 3 / (s1 + EPS), -2 / (s2 + EPS), 1 / (s2 + EPS), 1 / (s2 + EPS)])
    # Batch mean 2.5, population std sqrt(21.5 / 6); no per-prompt baseline, group_size ignored.
    sb = math.sqrt(21.5 / 6)
    expected = [d / (sb + EPS) for d in (-1.5, -0.5, 3.5, -2.5, 0.5, 0.5)]
    for g in (1, 3, 4):
        adv, _ = advantages(R6, kind="reinforce++", group_size=g)
        close(adv, expected, atol=1e-6)


def test_advantages_group_is_dr_grpo():
    r = torch.randn(24, generator=torch.Generator().manual_seed(0))
    for g in (1, 3, 8):
        assert torch.equal(advantages(r, kind="group", group_size=g)[0], advantages(r, kind="dr_grpo", group_size=g)[0])


def test_advantages_reinforce_pp_whitens_the_batch():
    r = 5.0 + 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    adv, state = advantages(r, kind="reinforce++", group_size=8)
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(adv.std(correction=0)) == pytest.approx(1.0, abs=1e-3)
    assert state == BaselineState()


def test_advantages_nan_rows_get_zero_and_leave_the_statistics_alone():
    r = torch.tensor([1.0, NAN, 2.0, 4.0, 5.0, NAN])  # 2 groups of 3, one unscored row each
    scored = ~torch.isnan(r)
    for kind in ("group", "dr_grpo", "grpo", "rloo", "reinforce++", "none"):
        adv, _ = advantages(r, kind=kind, group_size=3)
        assert torch.isfinite(adv).all(), kind
        close(adv[~scored], [0.0, 0.0])
        # The scored rows get what they would get without the unscored ones (groups of 2).
        close(adv[scored], advantages(r[scored], kind=kind, group_size=2)[0], atol=1e-6)
    a = 0.5 / (0.5 + EPS)  # |r - mean| / population std of two rows one apart
    close(advantages(r, kind="grpo", group_size=3)[0], [-a, 0.0, a, -a, a, 0.0])
    close(advantages(r, kind="rloo", group_size=3)[0], [-1.0, 0.0, 1.0, -1.0, 1.0, 0.0])
    # ema: the batch mean (and the update) skip unscored rows.
    adv, state = advantages(r, kind="ema", state=BaselineState())
    close(adv, [-2.0, 0.0, -1.0, 1.0, 2.0, 0.0])
    assert state.ema == pytest.approx(3.0)


def test_advantages_unscored_groups_give_zeros():
    r = torch.tensor([NAN, NAN, NAN, 1.0, NAN, NAN, 0.0, 2.0, 7.0])  # all unscored / one scored / all scored
    for kind in ("group", "dr_grpo", "grpo", "rloo"):
        adv, _ = advantages(r, kind=kind, group_size=3)
        assert torch.isfinite(adv).all(), kind
        close(adv[:6], [0.0] * 6)  # no scored row, or only one: nothing to compare with
        assert (adv[6:] != 0).any(), kind
    all_nan = torch.full((4,), NAN)
    for kind in ("none", "reinforce++"):
        close(advantages(all_nan, kind=kind)[0], [0.0] * 4)
    adv, state = advantages(all_nan, kind="ema", state=BaselineState(ema=2.0))
    close(adv, [0.0] * 4)
    assert state.ema == pytest.approx(2.0)  # nothing scored: the average does not move


def test_advantages_new_kinds_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size=4"):
        advantages(R6, kind="grpo", group_size=4)
    with pytest.raises(ValueError, match="group_size=4"):
        advantages(R6, kind="dr_grpo", group_size=4)
    with pytest.raises(ValueError, match="reinforce\\+\\+"):
        advantages(R6, kind="reinforce")


# ----------------------------------------------------------------------------------- KL, advantages


def test_kl_per_token_k1_k3_masked():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    close(kl_per_token(logp, ref, mask), [[0.5, -1.0, 0.0]])
    d = torch.tensor([0.5, -1.0])
    close(kl_per_token(logp, ref, mask, "k3"), [[*(torch.exp(-d) + d - 1).tolist(), 0.0]])
    assert (kl_per_token(logp, ref, mask, "k3") >= 0).all()


def test_token_advantages_broadcast_and_kl_reward_to_go():
    seq_adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(token_advantages(seq_adv, mask), [[1.0, 1.0, 1.0, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 0.5, 9.0, 9.0]])
    close(reward_to_go(kl, mask), [[0.6, 0.5, 0.3, 0.0], [1.0, 0.5, 0.0, 0.0]], atol=1e-6)
    out = token_advantages(seq_adv, mask, kl=kl, kl_coef=2.0, kl_mode="reward")
    close(out, [[-0.2, 0.0, 0.4, 0.0], [-4.0, -3.0, 0.0, 0.0]], atol=1e-6)
    # In loss mode the KL stays out of the advantages.
    close(token_advantages(seq_adv, mask, kl=kl, kl_coef=2.0, kl_mode="loss"), token_advantages(seq_adv, mask))


def test_token_advantages_with_mc_rewards_subtract_the_baseline():
    rewards, seq_adv = torch.tensor([3.0, 1.0]), torch.tensor([1.0, -2.0])  # baselines 2 and 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    token_rewards = torch.tensor([[2.5, 3.0, 4.0, 7.0], [1.0, 2.0, 5.0, 5.0]])
    out = token_advantages(seq_adv, mask, token_rewards=token_rewards, rewards=rewards)
    close(out, [[0.5, 1.0, 2.0, 0.0], [-2.0, -1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="rewards"):
        token_advantages(seq_adv, mask, token_rewards=token_rewards)


# --------------------------------------------------------------------------------------------- loss


def test_reinforce_loss_gradient_direction_and_masking():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = reinforce_loss(logp, adv, mask)
    loss.backward()
    close(logp.grad, [[-1.0, 0.5, 0.0]])  # -adv / n_tokens; the padded token gets nothing
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # descent raises the good token, lowers the bad one
    assert stats["loss"] == pytest.approx(-(2 * -1.0 - 1 * -2.0) / 2)
    assert stats["adv_mean"] == pytest.approx(0.5) and stats["adv_std"] == pytest.approx(1.5)
    assert set(stats) == {"loss", "pg_loss", "kl", "entropy", "adv_mean", "adv_std"}


def test_reinforce_loss_kl_and_entropy_terms():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (2, 3)
    ref = logp.detach() - 0.3
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.zeros(2, 3)
    kl = kl_per_token(logp, ref, mask, "k1")
    ent = token_entropy(logits)
    loss, stats = reinforce_loss(logp, adv, mask, kl=kl, kl_coef=0.5, kl_mode="loss", entropy=ent, entropy_coef=0.1)
    assert stats["kl"] == pytest.approx(0.3, abs=1e-5)
    assert stats["entropy"] == pytest.approx(float((ent.detach() * mask).sum() / 4), abs=1e-5)
    assert stats["loss"] == pytest.approx(0.5 * 0.3 - 0.1 * stats["entropy"], abs=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # In reward mode the KL is only reported.
    loss_r, stats_r = reinforce_loss(logp, adv, mask, kl=kl, kl_coef=0.5, kl_mode="reward")
    assert stats_r["kl"] == pytest.approx(0.3, abs=1e-5) and float(loss_r.detach()) == pytest.approx(0.0, abs=1e-7)


# -------------------------------------------------------------------------------------------- seeds


def test_reinforce_loss_with_fresh_behaviour_logprobs_has_the_reinforce_gradient():
    torch.manual_seed(0)
    logp0 = torch.randn(3, 5) - 2
    adv, mask = torch.randn(3, 5), torch.ones(3, 5)
    mask[2, 3:] = 0
    plain_logp, ratio_logp = logp0.clone().requires_grad_(True), logp0.clone().requires_grad_(True)
    plain, _ = reinforce_loss(plain_logp, adv, mask)
    ratio, stats = reinforce_loss(ratio_logp, adv, mask, behaviour_logp=logp0, clip_ratio=0.2)
    plain.backward()
    ratio.backward()
    close(ratio_logp.grad, plain_logp.grad)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_fraction"] == 0.0


def test_reinforce_loss_clips_stale_tokens_outside_the_trust_region():
    behaviour = torch.log(torch.full((1, 4), 0.5))
    # ratios 1.5 (adv > 0: clipped, no gradient), 1.1 (inside), 0.5 (adv < 0: clipped), 0.5 (adv > 0: inside)
    logp = torch.log(torch.tensor([[0.75, 0.55, 0.25, 0.25]])).requires_grad_(True)
    adv, mask = torch.tensor([[1.0, 1.0, -1.0, 1.0]]), torch.ones(1, 4)
    loss, stats = reinforce_loss(logp, adv, mask, behaviour_logp=behaviour, clip_ratio=0.2)
    loss.backward()
    assert logp.grad is not None
    ratio = torch.tensor([1.5, 1.1, 0.5, 0.5])
    close(logp.grad[0], torch.tensor([0.0, -1.1, 0.0, -0.5]) / 4)  # d(-A r)/d logp = -A r, mean over 4
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(float(ratio.mean()))
    expected = -(torch.tensor([1.2, 1.1, -0.8, 0.5])).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)


def test_fresh_tokens_the_previous_update_moved_past_the_clip_get_no_gradient():
    previous = torch.log(torch.full((1, 5), 0.5))
    # q = pi / pi_prev: 1.5 (adv > 0: stopped), 1.1 (inside), 0.5 (adv < 0: stopped), 0.5 (adv > 0: pushed
    # back up, kept), 1.5 (adv < 0: pulled back down, kept)
    logp = torch.log(torch.tensor([[0.75, 0.55, 0.25, 0.25, 0.75]])).requires_grad_(True)
    adv, mask = torch.tensor([[1.0, 1.0, -1.0, 1.0, -1.0]]), torch.ones(1, 5)
    loss, stats = reinforce_loss(logp, adv, mask, previous_logp=previous, clip_ratio=0.2)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad[0], torch.tensor([0.0, -1.0, 0.0, -1.0, 1.0]) / 5)  # the REINFORCE gradient where kept
    assert stats["clip_fraction"] == pytest.approx(0.4)
    assert stats["ratio_mean"] == pytest.approx(float(torch.tensor([1.5, 1.1, 0.5, 0.5, 1.5]).mean()))
    # no move yet (previous = current): exactly the plain loss and gradient
    plain_logp, gated_logp = logp.detach().clone().requires_grad_(True), logp.detach().clone().requires_grad_(True)
    plain, _ = reinforce_loss(plain_logp, adv, mask)
    gated, stats = reinforce_loss(gated_logp, adv, mask, previous_logp=logp.detach(), clip_ratio=0.2)
    plain.backward()
    gated.backward()
    close(gated_logp.grad, plain_logp.grad)
    assert float(gated.detach()) == float(plain.detach()) and stats["clip_fraction"] == 0.0


def test_rollout_seed_deterministic_and_distinct():
    assert rollout_seed(7, 3, 5) == rollout_seed(7, 3, 5)
    seeds = {rollout_seed(base, step, i) for base in (0, 1) for step in range(20) for i in range(50)}
    assert len(seeds) == 2 * 20 * 50
    assert all(0 <= s < 2**63 for s in seeds)
    assert rollout_seed(0, 1, 2) != rollout_seed(0, 2, 1)
    assert rollout_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert rollout_seed(0, 12, 3) != rollout_seed(0, 1, 23)  # no ambiguity in the encoding
