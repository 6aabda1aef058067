"""CPU tests of the GPT, its KV cache, the sampler, the discriminator and the HF GPT-2 conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genpt_dist.hf_compat import from_hf_state_dict, hf_config_dict, to_hf_state_dict
from genpt_dist.model.cross_entropy import cross_entropy
from genpt_dist.model.discriminator import Discriminator, DiscriminatorConfig
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.model.sampling import filter_logits, sample

V = 50


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, d_model=16)
    kw.update(overrides)
    model = GPT(GPTConfig(**kw))
    # Larger weights than the GPT-2 init so that logits (and sampled tokens) vary with the context.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def padded_batch(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return idx, mask


# ------------------------------------------------------------------------------------------ GPT


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"d_model=30.*n_head=4"):
        GPTConfig(vocab_size=V, n_layer=1, n_head=4, d_model=30)


def test_attention_dropout_apart_from_the_residual_dropout():
    """attention_dropout=0 keeps dropout on embeddings and residual branches only; the export says so."""
    cfg = GPTConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, dropout=0.2, attention_dropout=0.0)
    model = GPT(cfg).train()
    attn = model.transformer.h[0].attn
    assert attn.dropout == 0.0 and attn.resid_dropout.p == 0.2 and model.transformer.drop.p == 0.2
    x = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        h = model.transformer.h[0].ln_1(model.transformer.wte(x))
        attn.resid_dropout.eval()  # what is left random is the attention weights' dropout: none
        assert torch.equal(attn(h, None, True, None), attn(h, None, True, None))
    hf = hf_config_dict(cfg, bos_id=1, eos_id=2, pad_id=0)
    assert (hf["attn_pdrop"], hf["resid_pdrop"], hf["embd_pdrop"]) == (0.0, 0.2, 0.2)
    assert GPTConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, dropout=0.1).attn_pdrop == 0.1  # default
    with pytest.raises(ValueError, match="attention_dropout"):
        GPTConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, attention_dropout=1.0)


def test_explicit_causal_attention_equals_sdpa_and_trains_bf16_alike(monkeypatch):
    """The explicit bf16 CPU path is SDPA's causal attention: exact in float64, and a bf16 model's loss and
    gradients through it stay within bf16 rounding of the same model on SDPA's flash kernel."""
    from genpt_dist.model import gpt as gpt_module

    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours = gpt_module.explicit_causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g))

    x = torch.randint(0, V, (4, 32))

    def loss_and_grads(model: GPT) -> tuple[torch.Tensor, list[torch.Tensor]]:
        _, loss = model(x[:, :-1], x[:, 1:])
        return loss.float(), [g.float() for g in torch.autograd.grad(loss, list(model.parameters()))]

    model = tiny_gpt(n_head=4, d_model=32).to(torch.bfloat16).train()
    explicit = loss_and_grads(model)
    monkeypatch.setattr(gpt_module, "EXPLICIT_MAX_T", 0)  # every length to SDPA
    flash = loss_and_grads(model)
    torch.testing.assert_close(explicit[0], flash[0], rtol=2e-2, atol=0)
    for a, b in zip(explicit[1], flash[1]):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-3


def test_tied_head_and_sizes():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    cfg = model.config
    n = model.num_params()
    assert model.num_params(exclude_embeddings=True) == n - cfg.block_size * cfg.d_model
    assert model.flops_per_token(32) == 6 * (n - 32 * 16) + 12 * 2 * 16 * 32


def test_kv_cache_matches_full_forward():
    model = tiny_gpt()
    idx = torch.randint(0, V, (3, 12))
    full, _ = model(idx)
    cache = model.new_cache(3, 12)
    chunks = [model(idx[:, :5], cache=cache)[0]]  # prefill
    chunks.append(model(idx[:, 5:8], cache=cache)[0])  # multi-token step with a cache
    chunks += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(8, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_row_matches_unpadded_and_cache():
    model = tiny_gpt()
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]
    idx, mask = padded_batch(rows)
    logits, _ = model(idx, attention_mask=mask)
    for i, r in enumerate(rows):
        alone, _ = model(torch.tensor([r]))
        torch.testing.assert_close(logits[i, -len(r) :], alone[0], atol=1e-5, rtol=0)
    # Same through the cache with a growing mask.
    cache = model.new_cache(3, idx.size(1) + 1)
    model(idx, cache=cache, attention_mask=mask)
    nxt = torch.tensor([[20], [21], [22]])
    step, _ = model(nxt, cache=cache, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1))
    for i, r in enumerate(rows):
        alone, _ = model(torch.tensor([r + [20 + i]]))
        torch.testing.assert_close(step[i, -1], alone[0, -1], atol=1e-5, rtol=0)


def test_last_only_and_token_logprobs():
    model = tiny_gpt()
    idx = torch.randint(0, V, (2, 9))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    lp = model.token_logprobs(idx)
    ref = full[:, :-1].log_softmax(-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    assert lp.shape == (2, 8)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)


def test_loss_mask_selects_positions():
    model = tiny_gpt()
    idx = torch.randint(0, V, (2, 10))
    targets = torch.randint(0, V, (2, 10))
    logits, loss = model(idx, targets)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 10)
    torch.testing.assert_close(loss, ce.mean())
    loss_mask = torch.zeros(2, 10, dtype=torch.bool)
    loss_mask[0, 6:] = True
    loss_mask[1, 3:5] = True
    _, masked = model(idx, targets, loss_mask=loss_mask)
    torch.testing.assert_close(masked, ce[loss_mask].mean())
    assert not torch.isclose(masked, loss)
    ignored = targets.masked_fill(~loss_mask, -100)
    torch.testing.assert_close(model(idx, ignored)[1], masked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [3 * 37, 10**9])  # 3 rows a chunk (a short last one), or one chunk
def test_chunked_cross_entropy_matches_torch(dtype, chunk_elements):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5, 37, generator=g)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 37, (4, 5), generator=g)
    targets[0, :2] = -100
    targets[3, 4] = -100
    weights = torch.rand(4, 5, generator=g)  # a non-uniform upstream gradient

    ours = cross_entropy(logits, targets, chunk_elements=chunk_elements)
    (ours * weights).sum().backward()
    grad, logits.grad = logits.grad, None
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none").view(
        4, 5
    )
    (ref * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (4, 5)
    assert bool((ours[targets == -100] == 0).all())
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert grad.dtype == dtype and bool((grad[targets == -100] == 0).all())
    torch.testing.assert_close(grad, logits.grad, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------- sampling


PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]


def test_sampling_reproducible_and_cache_independent():
    model = tiny_gpt()
    kw = dict(max_new_tokens=10, top_k=20, top_p=0.9, temperature=1.3, seed=123)
    a = sample(model, PROMPTS, **kw)
    b = sample(model, PROMPTS, **kw)
    c = sample(model, PROMPTS, use_cache=False, **kw)
    assert a.tokens.shape == (3, 15) and a.logprobs.shape == (3, 10) and a.prompt_width == 5
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    torch.testing.assert_close(a.logprobs, c.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(a.new_lengths, torch.full((3,), 10))
    d = sample(model, PROMPTS, **{**kw, "seed": 124})
    assert not torch.equal(a.tokens, d.tokens)
    g = torch.Generator().manual_seed(123)
    assert torch.equal(sample(model, PROMPTS, generator=g, **{**kw, "seed": None}).tokens, a.tokens)


def test_top_k_1_is_greedy():
    model = tiny_gpt()
    out = sample(model, PROMPTS, max_new_tokens=6, top_k=1, seed=0)
    assert torch.all(out.logprobs == 0)
    for i, p in enumerate(PROMPTS):
        seq = list(p)
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        assert out.tokens[i, out.prompt_width :].tolist() == seq[len(p) :]


def test_logprobs_match_recomputation():
    model = tiny_gpt()
    top_k, top_p, temp = 10, 0.8, 0.7
    out = sample(model, PROMPTS, max_new_tokens=8, top_k=top_k, top_p=top_p, temperature=temp, seed=7)
    P = out.prompt_width
    mask = (torch.arange(out.tokens.size(1)) >= P - torch.tensor([len(p) for p in PROMPTS])[:, None]).long()
    logits, _ = model(out.tokens, attention_mask=mask)
    logp = filter_logits(logits[:, P - 1 : -1], top_k, top_p, temp)  # (B, N, V)
    ref = logp.gather(-1, out.tokens[:, P:, None]).squeeze(-1)
    assert torch.isfinite(out.logprobs).all()
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=0)


def test_filter_logits_keeps_top_k_and_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    lp = filter_logits(logits, top_k=3)
    assert torch.isinf(lp[0, 3:]).all() and torch.isfinite(lp[0, :3]).all()
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0))
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, ...]
    lp = filter_logits(logits, top_p=float(probs[0] + probs[1] / 2))
    assert torch.isfinite(lp[0, :2]).all() and torch.isinf(lp[0, 2:]).all()
    lp = filter_logits(logits, top_p=1e-6)
    assert torch.isfinite(lp[0, 0]) and torch.isinf(lp[0, 1:]).all()


def test_rows_stop_at_eos_and_get_pad():
    model = tiny_gpt()
    free = sample(model, PROMPTS, max_new_tokens=10, seed=3)
    gen = free.tokens[:, free.prompt_width :]
    eos = int(gen[0, 2])  # a token row 0 emits at step 2, so row 0 stops there
    out = sample(model, PROMPTS, max_new_tokens=10, seed=3, eos_id=eos, pad_id=49)
    P = out.prompt_width
    for i in range(3):
        n = int(out.new_lengths[i])
        row = out.tokens[i, P:]
        assert row[:n].tolist() == gen[i, :n].tolist()
        if n < row.numel() or eos in row[:n].tolist():
            assert row[n - 1] == eos and eos not in row[: n - 1].tolist()
        assert torch.all(row[n:] == 49) and torch.all(out.logprobs[i, n:] == 0)
        assert torch.all(out.logprobs[i, :n] < 0)
    assert out.new_lengths[0] <= 3


def test_loop_ends_when_all_rows_stop():
    model = tiny_gpt()
    greedy = sample(model, [[1, 2, 3]], max_new_tokens=10, top_k=1)
    eos = int(greedy.tokens[0, 3])
    out = sample(model, [[1, 2, 3], [1, 2, 3]], max_new_tokens=10, top_k=1, eos_id=eos)
    assert out.tokens.shape == (2, 4) and out.new_lengths.tolist() == [1, 1]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=0.0), "temperature"),
        (dict(max_new_tokens=28), r"\(5\).*\(28\).*33.*block_size=32"),
    ],
)
def test_sampling_rejects_bad_args(kw, match):
    model = tiny_gpt()
    with pytest.raises(ValueError, match=match):
        sample(model, PROMPTS, **{"max_new_tokens": 4, **kw})


def test_sampled_tokens_usable_with_autograd():
    model = tiny_gpt().train()
    out = sample(model.eval(), PROMPTS, max_new_tokens=3, seed=0)
    lp = model.train().token_logprobs(out.tokens)
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None


# -------------------------------------------------------------------------------- discriminator


def test_discriminator_shape_and_padding_invariance():
    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig(vocab_size=V, block_size=32, d_model=32, pad_id=0)).eval()
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    idx, mask = padded_batch(rows)
    logits = disc(idx, mask)
    assert logits.shape == (3,)
    for i, r in enumerate(rows):
        alone = disc(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
        right = disc(torch.tensor([r + [0, 0, 0]]))  # default mask: idx != pad_id
        torch.testing.assert_close(logits[i], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(right[0], alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(disc(torch.zeros(1, 4, dtype=torch.long))).all()


def test_discriminator_config_validation():
    with pytest.raises(ValueError, match=r"d_model=30.*n_head=4"):
        DiscriminatorConfig(vocab_size=V, d_model=30, n_head=4)


# ------------------------------------------------------------------------------------------- HF


def test_hf_gpt2_logits_match_and_round_trip():
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt()
    cfg_dict = hf_config_dict(model.config, bos_id=1, eos_id=2, pad_id=0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg_dict)).eval()
    hf_sd = to_hf_state_dict(model.state_dict())
    hf.load_state_dict(hf_sd, strict=True)
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
        assert (ours - theirs).abs().max() <= 1e-4
        # Left padding: HF with the same position ids must agree on the real positions.
        pidx, mask = padded_batch([[3, 4, 5, 6, 7, 8], [9, 10, 11]])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ours_p, _ = model(pidx, attention_mask=mask)
        theirs_p = hf(input_ids=pidx, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert (ours_p[real] - theirs_p[real]).abs().max() <= 1e-4

    back = from_hf_state_dict(hf.state_dict())
    ours_sd = model.state_dict()
    assert set(back) == set(ours_sd)
    for k, v in ours_sd.items():
        assert torch.equal(back[k], v), k
    # A saved HF checkpoint may lack the tied head and (older versions) carry causal-mask buffers.
    no_head = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    no_head["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    fresh = GPT(model.config)
    fresh.load_state_dict(from_hf_state_dict(no_head), strict=True)
    torch.testing.assert_close(fresh(idx)[0], ours)
