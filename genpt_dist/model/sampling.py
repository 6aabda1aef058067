"""Batched autoregressive sampling with temperature, top-k and top-p, returning log-probs.

Algorithm:

1. Prompts of different lengths are left-padded with ``pad_id`` to width P and described by an
   attention mask (1 real, 0 pad); the model derives positions from the mask, so a padded row gives
   the same distribution as the row alone. When every prompt has the same length the mask is dropped
   and the causal fast path is used.
2. With ``use_cache=True`` the prompt is prefilled into a ``KVCache`` sized P + max_new_tokens through
   ``GPT.forward``; each later step feeds only the last sampled token (B, 1). With ``use_cache=False``
   each step reruns the full sequence (the benchmark's baseline); the random stream is consumed
   identically, so the same seed gives the same tokens.
3. Each step keeps only the candidates: ``torch.topk`` for top-k (sorted), a full sort when only
   top-p is set, every token otherwise. Temperature divides the candidates' logits, the nucleus
   (top-p) drops the sorted candidates whose more likely predecessors already hold ``top_p`` of the
   mass (the most likely always survives), and ``log_softmax`` renormalises. This is the distribution
   of ``filter_logits`` restricted to its support, so the recorded log-prob of a sampled token equals
   ``filter_logits(...)`` at that token; only (B, k) tensors are touched after the top-k.
4. A token is drawn by the exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` picks i with
   probability ``p_i`` (the Gumbel-max trick without logs); filtered tokens have ``p_i = 0`` and are
   never drawn. One ``exponential_`` call per step, all rows at once.
5. A row stops after emitting ``eos_id``; later positions get ``pad_id`` and log-prob 0 (the mask
   stays 1 there, which only affects rows that are already finished). Whether every row has stopped
   is read back only every ``_STOP_CHECK_EVERY`` steps (a device sync on GPU); the output is then
   trimmed to the longest row, so it is the same as stopping at the first step where all rows stopped.

What is unusual: in eval mode the one-token steps bypass ``GPT.forward`` and run
``model.decode.decode_step``, the same arithmetic straight on the GPT's parameters, with the linears
prepacked for oneDNN on a CPU (see that module); a key-padding mask is sliced from one precomputed
(B, 1, 1, P + N) tensor and positions come from one precomputed offset per row.
``tests/test_generate.py`` checks that both paths give the same logits. Models other than the plain
``GPT`` (or in train mode, where dropout applies) use ``GPT.forward`` for every step.

Sampling runs under ``torch.inference_mode()``; the returned tensors are cloned outside it so that
they can be fed to a later forward that needs autograd (RL log-probs). The model is used in its own
dtype and device: cast it (``model.to(torch.bfloat16)``) for bf16 sampling; log-probs are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genpt_dist.model.decode import DecodeWeights, decodable, decode_step
from genpt_dist.model.gpt import GPT

_STOP_CHECK_EVERY = 8  # steps between reads of "has every row stopped?"


@dataclass
class SampleOutput:
    """Result of ``sample``; rows are in prompt order. N is the number of steps run: max_new_tokens,
    or fewer when every row reached eos earlier."""

    tokens: Tensor  # (B, P + N) long: left-padded prompts then generated tokens, pad_id after a row stops
    logprobs: Tensor  # (B, N) float32: log-prob of each sampled token under the filtered distribution, 0 after stop
    new_lengths: Tensor  # (B,) long: tokens generated per row, eos included
    prompt_width: int  # P, the padded prompt width; generated tokens start at this column


def filter_logits(
    logits: Tensor, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0
) -> Tensor:
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


def _validate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    top_k: int | None,
    top_p: float | None,
    temperature: float,
) -> None:
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


def _pick(
    logits: Tensor, top_k: int | None, top_p: float | None, temperature: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row from the last logits (B, V); returns (token ids (B,), log-probs (B,))."""
    V = logits.size(-1)
    ids = None
    if top_k is not None and top_k < V:
        x, ids = torch.topk(logits, top_k, dim=-1)  # (B, k) sorted, descending
    elif top_p is not None and top_p < 1.0:
        x, ids = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    else:
        x = logits  # (B, V) in vocabulary order
    x = x.float()
    if temperature != 1.0:
        x = x / temperature  # (B, K)
    if top_p is not None and top_p < 1.0:
        probs = x.softmax(dim=-1)  # (B, K) sorted
        x = x.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))  # (B, K) nucleus
    logp = F.log_softmax(x, dim=-1)  # (B, K)
    race = torch.empty_like(logp).exponential_(generator=generator)  # (B, K) ~ Exp(1)
    j = (logp.exp() / race).argmax(dim=-1, keepdim=True)  # (B, 1) chosen candidate
    lp = logp.gather(-1, j).squeeze(-1)  # (B,)
    tok = (j if ids is None else ids.gather(-1, j)).squeeze(-1)  # (B,)
    return tok, lp


def sample(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> SampleOutput:
    """Sample up to ``max_new_tokens`` continuations of each prompt; see the module docstring.

    ``generator`` wins over ``seed``; with neither, the global RNG is used. ``top_k=1`` is greedy.
    The model is used as is (call ``model.eval()`` first to disable dropout).
    """
    _validate(model, prompts, max_new_tokens, top_k, top_p, temperature)
    device = model.lm_head.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        out = _sample(
            model, prompts, max_new_tokens, top_k, top_p, temperature, eos_id, pad_id, generator, use_cache, device
        )
    return SampleOutput(
        tokens=out.tokens.clone(),
        logprobs=out.logprobs.clone(),
        new_lengths=out.new_lengths.clone(),
        prompt_width=out.prompt_width,
    )


def _sample(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    top_k: int | None,
    top_p: float | None,
    temperature: float,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None,
    use_cache: bool,
    device: torch.device,
) -> SampleOutput:
    B, P, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (B,)
    tokens = torch.full((B, P + N), pad_id, dtype=torch.long)  # (B, P + N)
    for row, p in enumerate(prompts):  # built on the host, moved once
        tokens[row, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
    mask = (torch.arange(P + N)[None, :] >= (P - lengths)[:, None]).long()  # (B, P + N) 1 = real
    padded = any(len(p) != P for p in prompts)
    tokens, mask, lengths = tokens.to(device), mask.to(device), lengths.to(device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)  # (B, N)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    new_lengths = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    cache = model.new_cache(B, P + N) if use_cache else None
    fused = use_cache and decodable(model)
    weights = DecodeWeights.of(model, B, N - 1) if fused else None
    key_mask = mask.bool()[:, None, None, :] if padded else None  # (B, 1, 1, P + N)
    shift = P - lengths  # (B,) pad columns per row: position = cache index - shift

    nxt = tokens[:, P - 1]
    for n in range(N):
        width = P + n
        if not use_cache:
            logits = model(tokens[:, :width], last_only=True, attention_mask=mask[:, :width] if padded else None)[0][
                :, -1
            ]  # (B, V)
        elif n == 0:
            logits = model(tokens[:, :P], cache=cache, last_only=True, attention_mask=mask[:, :P] if padded else None)[
                0
            ][:, -1]  # (B, V)
        elif fused:
            pos = (width - 1 - shift) if padded else width - 1  # (B,) | int
            km = key_mask[..., :width] if key_mask is not None else None  # (B, 1, 1, width); None unless padded
            assert cache is not None and weights is not None  # fused implies use_cache
            logits = decode_step(model, weights, nxt, pos, cache, km)  # (B, V)
        else:
            logits = model(
                tokens[:, width - 1 : width],
                cache=cache,
                last_only=True,
                attention_mask=mask[:, :width] if padded else None,
            )[0][:, -1]  # (B, V)
        tok, lp = _pick(logits, top_k, top_p, temperature, generator)  # (B,), (B,)
        nxt = tok.masked_fill(done, pad_id) if eos_id is not None else tok  # (B,)
        tokens[:, width] = nxt
        if eos_id is None:
            logprobs[:, n] = lp
            continue
        logprobs[:, n] = lp.masked_fill(done, 0.0)
        new_lengths += ~done
        done = done | (tok == eos_id)  # (B,)
        if n % _STOP_CHECK_EVERY == _STOP_CHECK_EVERY - 1 and bool(done.all()):
            break
    if eos_id is None:
        steps = N
        new_lengths.fill_(N)
    else:
        steps = int(new_lengths.max())  # the first step at which every row had stopped, or N
    return SampleOutput(
        tokens=tokens[:, : P + steps], logprobs=logprobs[:, :steps], new_lengths=new_lengths, prompt_width=P
    )
