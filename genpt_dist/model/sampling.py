"""Batched autoregressive sampling with temperature, top-k and top-p, returning log-probs.

Algorithm:

1. Prompts of different lengths are left-padded with ``pad_id`` to width P and described by an
   attention mask (1 real, 0 pad); the model derives positions from the mask, so a padded row gives
   the same distribution as the row alone. When every prompt has the same length the mask is dropped
   and the causal fast path is used.
2. With ``use_cache=True`` the prompt is prefilled into a ``KVCache`` sized P + max_new_tokens, then
   each step feeds only the last sampled token (B, 1). With ``use_cache=False`` each step reruns the
   full sequence (for benchmarks); the random stream is consumed identically, so the same seed gives
   the same tokens.
3. Each step: ``filter_logits`` applies temperature, then top-k, then top-p (nucleus) to the last
   logits and renormalises to log-probs; a token is drawn by inverse CDF with one uniform per row
   (``u * total`` searched in the cumulative probabilities, so filtered-out tokens are never drawn and
   the draw is robust to round-off); its log-prob under that same filtered distribution is recorded.
4. A row stops after emitting ``eos_id``; later positions get ``pad_id`` and log-prob 0 (the mask
   stays 1 there, which only affects rows that are already finished). The loop ends early once every
   row has stopped. The per-token step is vectorised over rows.

Sampling runs under ``torch.inference_mode()``; the returned tensors are cloned outside it so that
they can be fed to a later forward that needs autograd (RL log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genpt_dist.model.gpt import GPT


@dataclass
class SampleOutput:
    """Result of ``sample``; rows are in prompt order. N is the number of steps run: max_new_tokens,
    or fewer when every row reached eos earlier."""

    tokens: Tensor  # (B, P + N) long: left-padded prompts then generated tokens, pad_id after a row stops
    logprobs: Tensor  # (B, N) float32: log-prob of each sampled token under the filtered distribution, 0 after stop
    new_lengths: Tensor  # (B,) long: tokens generated per row, eos included
    prompt_width: int  # P, the padded prompt width; generated tokens start at this column


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0) -> Tensor:
    """Log-probs (..., V) of the distribution actually sampled from; removed tokens are -inf.

    Order as in HF ``generate``: divide by ``temperature``; keep exactly the ``top_k`` largest logits
    (ties broken by ``torch.topk``); then keep the smallest prefix of the sorted distribution whose
    mass reaches ``top_p`` (the most likely token always survives); renormalise with log_softmax.
    Computed in float32.
    """
    x = logits.float() / temperature  # (..., V)
    if top_k is not None and top_k < x.size(-1):
        vals, ids = torch.topk(x, top_k, dim=-1)  # (..., k)
        x = torch.full_like(x, float("-inf")).scatter(-1, ids, vals)  # (..., V)
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)  # (..., V)
        probs = sorted_x.softmax(dim=-1)  # (..., V)
        mass_before = probs.cumsum(dim=-1) - probs  # (..., V) mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # (..., V); position 0 has mass_before 0, always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (..., V)
        x = x.masked_fill(drop, float("-inf"))  # (..., V)
    return F.log_softmax(x, dim=-1)  # (..., V)


def _validate(model: GPT, prompts: list[list[int]], max_new_tokens: int, top_k: int | None,
              top_p: float | None, temperature: float) -> None:
    if not prompts:
        raise ValueError("prompts is empty")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    longest, block = max(len(p) for p in prompts), model.config.block_size
    if longest + max_new_tokens > block:
        raise ValueError(
            f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = "
            f"{longest + max_new_tokens} exceeds block_size={block}"
        )
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} outside [0, vocab_size={vocab})")


def _draw(logp: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row from log-probs (B, V) by inverse CDF; returns (B,) long."""
    cdf = logp.exp().cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)  # (B, 1)
    u = u * cdf[:, -1:]  # (B, 1) in [0, total)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.size(-1) - 1)  # (B,)


def sample(model: GPT, prompts: list[list[int]], *, max_new_tokens: int, top_k: int | None = None,
           top_p: float | None = None, temperature: float = 1.0, eos_id: int | None = None,
           pad_id: int = 0, seed: int | None = None, generator: torch.Generator | None = None,
           use_cache: bool = True) -> SampleOutput:
    """Sample up to ``max_new_tokens`` continuations of each prompt; see the module docstring.

    ``generator`` wins over ``seed``; with neither, the global RNG is used. ``top_k=1`` is greedy.
    The model is used as is (call ``model.eval()`` first to disable dropout).
    """
    _validate(model, prompts, max_new_tokens, top_k, top_p, temperature)
    device = model.lm_head.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        out = _sample(model, prompts, max_new_tokens, top_k, top_p, temperature, eos_id, pad_id,
                      generator, use_cache, device)
    return SampleOutput(tokens=out.tokens.clone(), logprobs=out.logprobs.clone(),
                        new_lengths=out.new_lengths.clone(), prompt_width=out.prompt_width)


def _sample(model: GPT, prompts: list[list[int]], max_new_tokens: int, top_k: int | None,
            top_p: float | None, temperature: float, eos_id: int | None, pad_id: int,
            generator: torch.Generator | None, use_cache: bool, device: torch.device) -> SampleOutput:
    B, P, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
    tokens = torch.full((B, P + N), pad_id, dtype=torch.long, device=device)  # (B, P + N)
    mask = torch.ones((B, P + N), dtype=torch.long, device=device)  # (B, P + N)
    for row, p in enumerate(prompts):  # once per call, not per token
        tokens[row, P - len(p):P] = torch.tensor(p, dtype=torch.long, device=device)
        mask[row, :P - len(p)] = 0
    padded = any(len(p) != P for p in prompts)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)  # (B, N)
    new_lengths = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    cache = model.new_cache(B, P + N) if use_cache else None

    n = 0
    for n in range(N):
        width = P + n
        if use_cache:
            start = 0 if n == 0 else width - 1  # prefill the prompt, then one token per step
            logits, _ = model(tokens[:, start:width], cache=cache, last_only=True,
                              attention_mask=mask[:, :width] if padded else None)  # (B, 1, V)
        else:
            logits, _ = model(tokens[:, :width], last_only=True,
                              attention_mask=mask[:, :width] if padded else None)  # (B, 1, V)
        logp = filter_logits(logits[:, -1, :], top_k, top_p, temperature)  # (B, V)
        nxt = _draw(logp, generator)  # (B,)
        lp = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (B,)
        tokens[:, width] = torch.where(done, pad_id, nxt)  # (B,)
        logprobs[:, n] = torch.where(done, 0.0, lp)  # (B,)
        new_lengths += (~done).long()
        if eos_id is not None:
            done = done | (nxt == eos_id)  # (B,)
            if bool(done.all()):
                break
    width = P + n + 1
    return SampleOutput(tokens=tokens[:, :width], logprobs=logprobs[:, :n + 1],
                        new_lengths=new_lengths, prompt_width=P)
