"""Rollout worker on a tiny random GPT (no Ray), then the Ray actor group: publish, fan-out, failures."""

from __future__ import annotations

import time

import pytest
import torch

from genpt_dist.errors import UserError
from genpt_dist.model.discriminator import Discriminator, DiscriminatorConfig
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.model.sampling import filter_logits
from genpt_dist.rl.batch import RolloutBatch, RolloutRequest
from genpt_dist.rl.rollout import RolloutGroup
from genpt_dist.rl.rollout_worker import RolloutWorker
from genpt_dist.rl.weights import PackedState, pack_state, unpack_state

V, PAD, BOS, EOS = 50, 0, 1, 2
MODEL = dict(vocab_size=V, block_size=48, n_layer=2, n_head=2, d_model=32)
DISC = dict(vocab_size=V, block_size=48, n_layer=1, n_head=2, d_model=16, pad_id=PAD)
PROMPTS = [[BOS], [BOS, 5, 6], [BOS, 7], [BOS, 3, 4, 5, 6], [BOS], [BOS, 9, 9]]


def gpt_state(seed: int) -> dict[str, torch.Tensor]:
    """A random GPT with large weights (varied logits) and eos made likely, so rows stop at various lengths."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODEL))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.transformer.ln_f.bias.copy_(0.3 * model.transformer.wte.weight[EOS])
    return model.state_dict()


def disc_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    disc = Discriminator(DiscriminatorConfig(**DISC))
    with torch.no_grad():
        for p in disc.parameters():
            p.normal_(0.0, 0.3)
    return disc.state_dict()


def make_worker(**kw) -> RolloutWorker:
    return RolloutWorker(MODEL, DISC, gpt_state(0), pad_id=PAD, eos_id=EOS, threads=torch.get_num_threads(), **kw)


def request(n_rows: int = 6, **kw) -> RolloutRequest:
    args = dict(
        prompts=[PROMPTS[i % len(PROMPTS)] for i in range(n_rows)],
        seeds=[100 + i for i in range(n_rows)],
        max_new_tokens=12,
        top_k=10,
    )
    args.update(kw)
    return RolloutRequest(**args)


@pytest.fixture(scope="module")
def worker() -> RolloutWorker:
    w = make_worker()
    w.load(1, gpt_state(1), 1, disc_state(1))  # policy != reference from here on
    return w


def row_tokens(batch: RolloutBatch, i: int) -> list[int]:
    return batch.tokens[i][batch.attention_mask[i].bool()].tolist()


# ----------------------------------------------------------------------------------------- worker


def test_batch_shapes_and_masks(worker):
    req = request()
    b = worker.generate(req)
    B, P, N = len(req), b.prompt_width, b.gen_width
    assert P == 5 and 1 <= N <= 12 and b.batch_size == B
    assert b.tokens.shape == b.attention_mask.shape == (B, P + N) and b.tokens.dtype == torch.int64
    for t in (b.logprobs, b.ref_logprobs, b.gen_mask):
        assert t.shape == (B, N)
    assert b.lengths.shape == b.d_logits.shape == b.rewards.shape == (B,)
    assert torch.equal(b.gen_mask, b.attention_mask[:, P:])
    assert torch.equal(b.lengths, b.gen_mask.sum(1))
    assert int(b.lengths.max()) == N
    assert (b.tokens[b.attention_mask == 0] == PAD).all()
    for i, p in enumerate(req.prompts):
        assert row_tokens(b, i)[: len(p)] == p  # left-padded prompt, then the generated tokens
        n = int(b.lengths[i])
        assert b.attention_mask[i, : P - len(p)].sum() == 0
        if n < req.max_new_tokens:
            assert b.tokens[i, P + n - 1] == EOS
        assert (b.generated[i, : n - 1] != EOS).all()
    assert (b.lengths < req.max_new_tokens).any(), "the test model should stop some rows early"
    gen = b.gen_mask.bool()
    assert (b.logprobs[~gen] == 0).all() and (b.ref_logprobs[~gen] == 0).all()
    assert (b.logprobs[gen] <= 0).all() and (b.logprobs[gen] > -30).all()
    torch.testing.assert_close(b.rewards, torch.sigmoid(b.d_logits))
    assert b.token_rewards is None and b.mc_tokens == 0
    assert (b.policy_version, b.disc_version) == (1, 1)
    assert b.sampled_tokens >= int(b.lengths.sum()) and b.seconds > 0


@pytest.mark.parametrize(
    "settings", [dict(top_k=10, temperature=0.7), dict(top_k=None, top_p=0.8), dict(top_k=None, temperature=1.3)]
)
def test_logprobs_are_those_of_the_filtered_distribution(worker, settings):
    b = worker.generate(request(**settings))
    P = b.prompt_width
    logits, _ = worker.policy(b.tokens, attention_mask=b.attention_mask)  # (B, P + N, V)
    lp = filter_logits(
        logits[:, P - 1 : -1], settings.get("top_k"), settings.get("top_p"), settings.get("temperature", 1.0)
    )  # (B, N, V)
    expect = lp.gather(-1, b.generated[..., None]).squeeze(-1)  # (B, N)
    gen = b.gen_mask.bool()
    assert torch.isfinite(expect[gen]).all()  # every sampled token is inside the filtered support
    torch.testing.assert_close(b.logprobs[gen], expect[gen], atol=1e-4, rtol=0)


def _logprobs_under(state: dict[str, torch.Tensor], b: RolloutBatch) -> torch.Tensor:
    """(B, N) the generated tokens' log-probs under a GPT of `state`, 0 where nothing was generated."""
    model = GPT(GPTConfig(**MODEL))
    model.load_state_dict(state)
    with torch.no_grad():
        lp = model.token_logprobs(b.tokens, attention_mask=b.attention_mask)[:, b.prompt_width - 1 :]
    return lp.masked_fill(b.gen_mask == 0, 0.0)


def test_previous_logprobs_are_the_version_just_before():
    kept = make_worker(keep_previous=True)
    b = kept.generate(request(with_previous_logprobs=True))  # nothing replaced yet: the current policy's
    torch.testing.assert_close(b.previous_logprobs, _logprobs_under(gpt_state(0), b), atol=1e-5, rtol=0)
    kept.load(0, gpt_state(1))
    kept.load(1, pack_state(gpt_state(2)))
    b = kept.generate(request(with_previous_logprobs=True))
    assert b.policy_version == 1 and b.behaviour_logprobs is None
    torch.testing.assert_close(b.previous_logprobs, _logprobs_under(gpt_state(1), b), atol=1e-5, rtol=0)
    assert not torch.allclose(b.previous_logprobs, _logprobs_under(gpt_state(2), b), atol=1e-3)
    kept.load(3, gpt_state(3))  # version 2 never arrived (a restart, a resume): no trust region this once
    b = kept.generate(request(with_previous_logprobs=True))
    torch.testing.assert_close(b.previous_logprobs, _logprobs_under(gpt_state(3), b), atol=1e-5, rtol=0)
    assert kept.generate(request()).previous_logprobs is None  # only when asked
    with pytest.raises(ValueError, match="keep_previous"):
        make_worker().generate(request(with_previous_logprobs=True))


def test_ref_logprobs_are_the_reference_model(worker):
    b = worker.generate(request())
    reference = GPT(GPTConfig(**MODEL))
    reference.load_state_dict(gpt_state(0))
    policy = GPT(GPTConfig(**MODEL))
    policy.load_state_dict(gpt_state(1))
    for i in range(b.batch_size):
        row = torch.tensor([row_tokens(b, i)])
        n = int(b.lengths[i])
        with torch.no_grad():
            ref = reference.token_logprobs(row)[0, -n:]
            pol = policy.token_logprobs(row)[0, -n:]
        torch.testing.assert_close(b.ref_logprobs[i, :n], ref, atol=1e-5, rtol=0)
        assert not torch.allclose(b.ref_logprobs[i, :n], pol, atol=1e-3)  # not the policy's
    with torch.no_grad():
        disc = Discriminator(DiscriminatorConfig(**DISC))
        disc.load_state_dict(disc_state(1))
        torch.testing.assert_close(b.d_logits, disc.eval()(b.tokens, b.attention_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows_per_call,cut", [(1, 2), (1, 5), (2, 4)])
def test_split_requests_give_identical_rows(worker, rows_per_call, cut):
    req = request(rows_per_call=rows_per_call, mc_rollouts=2, mc_stride=3)
    whole = worker.generate(req)
    parts = RolloutBatch.concat([worker.generate(req.rows(0, cut)), worker.generate(req.rows(cut, len(req)))])
    assert parts.prompt_width == whole.prompt_width
    for name in ("tokens", "attention_mask", "gen_mask", "lengths"):
        assert torch.equal(getattr(parts, name), getattr(whole, name)), name
    for name in ("logprobs", "ref_logprobs", "d_logits", "rewards", "token_rewards"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), atol=1e-5, rtol=0)


def test_seeds_change_the_samples(worker):
    a = worker.generate(request())
    b = worker.generate(request(seeds=[7 + i for i in range(6)]))
    assert not torch.equal(a.tokens, b.tokens) or not torch.equal(a.lengths, b.lengths)


def test_load_changes_versions_and_outputs():
    w = make_worker()
    assert w.versions == (-1, -1)
    before = w.generate(request())
    w.load(3, gpt_state(1), None, None)
    assert w.versions == (3, -1)
    after = w.generate(request())
    assert after.policy_version == 3
    assert not torch.equal(before.tokens, after.tokens)
    w.load(None, None, 4, disc_state(2))
    assert w.versions == (3, 4)
    rescored = w.generate(request())
    assert torch.equal(rescored.tokens, after.tokens)  # same policy, same seeds
    assert not torch.allclose(rescored.d_logits, after.d_logits)


def test_mc_token_rewards(worker):
    req = request(mc_rollouts=3, mc_stride=3, reward_kind="prob")
    b = worker.generate(req)
    tr = b.token_rewards
    assert tr is not None and tr.shape == b.logprobs.shape
    gen = b.gen_mask.bool()
    assert (tr[~gen] == 0).all()
    assert ((tr[gen] > 0) & (tr[gen] < 1)).all()
    last = b.lengths - 1
    torch.testing.assert_close(tr[torch.arange(b.batch_size), last], b.rewards)
    long_rows = [i for i in range(b.batch_size) if b.lengths[i] > 3]
    assert long_rows, "need a row longer than one MC stride"
    for i in long_rows:
        n = int(b.lengths[i])
        assert torch.equal(tr[i, 0:3], tr[i, 2].expand(3))  # tokens 0..2 share the prefix ending at 2
        assert not torch.allclose(tr[i, 2], b.rewards[i])  # a measured prefix, not the final reward
        assert (tr[i, (n - 1) // 3 * 3 : n] == b.rewards[i]).all()  # after the last measured prefix
    assert b.mc_tokens > 0 and b.mc_seconds > 0 and b.seconds >= b.mc_seconds


def test_concat_pads_prompt_left_and_generation_right(worker):
    a = worker.generate(request(n_rows=1))  # prompt [BOS]
    b = worker.generate(request(n_rows=4).rows(3, 4))  # prompt of 5 tokens
    c = RolloutBatch.concat([a, b])
    assert c.prompt_width == 5 and c.gen_width == max(a.gen_width, b.gen_width)
    assert row_tokens(c, 0) == row_tokens(a, 0) and row_tokens(c, 1) == row_tokens(b, 0)
    torch.testing.assert_close(c.logprobs[0, : a.gen_width], a.logprobs[0])
    assert torch.equal(c.gen_mask[1, : b.gen_width], b.gen_mask[0])
    assert c.sampled_tokens == a.sampled_tokens + b.sampled_tokens


def test_pack_state_stores_tied_weights_once_and_keeps_bf16():
    model = GPT(GPTConfig(**MODEL))
    packed = pack_state(model.state_dict())
    assert packed.aliases == {"lm_head.weight": "transformer.wte.weight"}
    restored = unpack_state(packed)
    assert restored.keys() == model.state_dict().keys()
    fresh = GPT(GPTConfig(**MODEL))
    fresh.load_state_dict(restored)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    bf = {"w": torch.randn(3, 4).to(torch.bfloat16)}
    assert isinstance(pack_state(bf), PackedState)
    assert torch.equal(unpack_state(pack_state(bf))["w"], bf["w"])


# -------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def group(ray_session):
    g = RolloutGroup(
        2,
        cpus_per_actor=0.5,
        gpus_per_actor=0.0,
        max_restarts=2,
        model_config=MODEL,
        disc_config=DISC,
        reference_state=gpt_state(0),
        pad_id=PAD,
        eos_id=EOS,
        threads=1,
        keep_previous=True,
    )
    yield g
    g.shutdown()


@pytest.mark.slow
def test_group_publish_and_generate(group):
    group.publish(1, gpt_state(1), 1, disc_state(1))
    b = group.generate(request(n_rows=8))
    assert (b.policy_version, b.disc_version) == (1, 1) and b.batch_size == 8
    assert set(b.actor.split(",")) == {"rollout-0", "rollout-1"}
    assert b.sync_seconds > 0
    assert group.actor_versions() == [(1, 1), (1, 1)]
    seconds = group.publish(2, gpt_state(2))  # the discriminator stays at version 1
    assert seconds < 5
    b2 = group.generate(request(n_rows=8))
    assert (b2.policy_version, b2.disc_version) == (2, 1)
    assert group.actor_versions() == [(2, 1), (2, 1)]
    assert not torch.equal(b.tokens, b2.tokens) or not torch.equal(b.lengths, b2.lengths)


@pytest.mark.slow
def test_group_survives_an_actor_killed_mid_request(group):
    group.publish(4, gpt_state(2), 5, disc_state(3))
    group.publish(5, gpt_state(3))
    assert group.previous_policy()[0] == 4
    req = request(n_rows=16, max_new_tokens=24, top_k=None, rows_per_call=2, with_previous_logprobs=True)
    expected = group.generate(req)
    torch.testing.assert_close(expected.previous_logprobs, _logprobs_under(gpt_state(2), expected), atol=1e-5, rtol=0)
    reissued = group.reissued
    refs = group.generate_refs(req)
    group.kill_actor(0)
    got = group.collect(refs)
    assert group.reissued >= reissued + 1
    assert got.batch_size == 16 and got.policy_version == 5
    assert torch.equal(got.tokens, expected.tokens)  # every row once, in order, same samples
    assert torch.equal(got.lengths, expected.lengths)
    torch.testing.assert_close(got.rewards, expected.rewards, atol=1e-5, rtol=0)
    assert group.actors_alive() == 2  # the killed actor was restarted
    again = group.generate(req)  # the restarted actor catches up to version 5, and gets version 4 back
    assert torch.equal(again.tokens, expected.tokens)
    torch.testing.assert_close(again.previous_logprobs, expected.previous_logprobs, atol=1e-5, rtol=0)
    assert group.actor_versions() == [(5, 5), (5, 5)]


@pytest.mark.slow
def test_group_refuses_actors_the_cluster_cannot_hold(ray_session):
    kw = dict(
        max_restarts=0, model_config=MODEL, disc_config=DISC, reference_state=gpt_state(0), pad_id=PAD, eos_id=EOS
    )
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"3 rollout actors x 2 CPUs need 6 CPUs; the Ray cluster has 4"):
        RolloutGroup(3, cpus_per_actor=2.0, gpus_per_actor=0.0, **kw)
    with pytest.raises(UserError, match="GPU"):
        RolloutGroup(1, cpus_per_actor=0.5, gpus_per_actor=1.0, **kw)
    assert time.perf_counter() - t0 < 5
