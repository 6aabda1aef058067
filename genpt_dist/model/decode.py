"""One-token decode steps run straight on a GPT's parameters, with the CPU's linears prepacked.

A sampler's step after the prefill feeds one token per row, (B, 1), through every block. At a small
batch each weight is multiplied once per step, so the step is bound by how fast the matmuls stream
the weights, and ``GPT.forward``'s ~15 module calls per block (masks and positions rebuilt every
step) cost more than the arithmetic of a small model. ``DecodeWeights`` gathers each block's
parameters once per ``sample`` call and ``decode_step`` runs the same arithmetic as
``GPT.forward(tok[:, None], cache=cache, last_only=True)`` in eval mode on them: ``F.layer_norm``,
the four linears, ``F.scaled_dot_product_attention`` over the cache with a key-padding mask.

Linears: on a CPU whose PyTorch has oneDNN, every weight (the tied lm_head too) is reordered once into
oneDNN's blocked layout for an M of the batch size (``torch.ops.mkldnn._reorder_linear_weight``) and
each step calls ``torch.ops.mkldnn._linear_pointwise`` with the MLP's activation as the matmul's
post-op (``gelu`` with algorithm ``tanh`` for ``gelu_new``, ``none`` for exact ``gelu``; ``relu``).
These are the ops ``torch.compile``'s freezing pass lowers a CPU ``nn.Linear`` to. ``F.linear`` on the
(out, in) weight at M = 8 reads it at a fraction of the memory bandwidth; the packed kernel reads it
at about the bandwidth (the `matmuls` rows of BENCHMARKS.md, "bench generate"). Packing copies each
weight once (the copies live as long as the ``DecodeWeights``), so it pays back only over several
steps: ``PACK_MIN_STEPS``. Elsewhere (a GPU, another dtype, PyTorch
without oneDNN, too few steps) the linears are plain ``F.linear`` with the activation after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from genpt_dist.model.gpt import GPT, Block, KVCache, activation_fn

PACK_MIN_STEPS = 16  # one-token steps a sample call runs before its linears are packed (packing ~ 5 plain steps)
_POST_OPS = {"gelu_new": ("gelu", "tanh"), "gelu": ("gelu", "none"), "relu": ("relu", "")}  # oneDNN post-ops

Linear = Callable[[Tensor], Tensor]  # (B, in) -> (B, out)


def can_pack(weight: Tensor) -> bool:
    """Whether oneDNN's prepacked linear serves this weight: a CPU tensor in fp32 or bf16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packed_linear(weight: Tensor, bias: Tensor | None, batch: int, activation: str | None = None) -> Linear:
    """``act(x @ weight.T + bias)`` for (batch, in) inputs, weight packed by oneDNN once, now."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)  # oneDNN blocked layout, a copy
    attr, algorithm = _POST_OPS[activation] if activation else ("none", "")
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)


def plain_linear(weight: Tensor, bias: Tensor | None, activation: str | None = None) -> Linear:
    """``act(F.linear(x, weight, bias))``."""
    if activation is None:
        return lambda x: F.linear(x, weight, bias)
    act = activation_fn(activation)
    return lambda x: act(F.linear(x, weight, bias))


@dataclass(frozen=True)
class BlockWeights:
    """One block's parameters as ``decode_step`` uses them."""

    ln_1: tuple[Tensor, Tensor]  # (C,), (C,) weight, bias
    qkv: Linear  # (B, C) -> (B, 3C)
    proj: Linear  # (B, C) -> (B, C), the attention output projection
    ln_2: tuple[Tensor, Tensor]  # (C,), (C,)
    fc_act: Linear  # (B, C) -> (B, 4C), the MLP's up projection with its activation
    fc_proj: Linear  # (B, 4C) -> (B, C)


@dataclass(frozen=True)
class DecodeWeights:
    """A GPT's parameters gathered for ``decode_step``; ``packed`` says which linears are used."""

    blocks: list[BlockWeights]
    lm_head: Linear  # (B, C) -> (B, V)
    packed: bool

    @classmethod
    def of(cls, model: GPT, batch: int, steps: int) -> DecodeWeights:
        """The weights of ``model`` for ``steps`` one-token steps at ``batch`` rows; packed where
        ``can_pack`` allows and ``steps >= PACK_MIN_STEPS``."""
        pack = steps >= PACK_MIN_STEPS and can_pack(model.lm_head.weight)
        act = model.config.activation

        def linear(m: torch.nn.Linear, activation: str | None = None) -> Linear:
            if pack:
                return packed_linear(m.weight, m.bias, batch, activation)
            return plain_linear(m.weight, m.bias, activation)

        blocks = [
            BlockWeights(
                ln_1=(b.ln_1.weight, b.ln_1.bias),
                qkv=linear(b.attn.c_attn),
                proj=linear(b.attn.c_proj),
                ln_2=(b.ln_2.weight, b.ln_2.bias),
                fc_act=linear(b.mlp.c_fc, act),
                fc_proj=linear(b.mlp.c_proj),
            )
            for b in cast("Iterable[Block]", model.transformer.h)  # GPT builds h from Blocks only
        ]
        return cls(blocks=blocks, lm_head=linear(model.lm_head), packed=pack)


def decodable(model: GPT) -> bool:
    """Whether ``decode_step`` computes what ``model.forward`` does: a plain GPT in eval mode."""
    return type(model) is GPT and not model.training


def decode_step(
    model: GPT, weights: DecodeWeights, tok: Tensor, pos: Tensor | int, cache: KVCache, key_mask: Tensor | None
) -> Tensor:
    """Logits (B, V) of one new token per row at cache index ``cache.length``; appends its keys/values.

    tok: (B,) ids. pos: (B,) position ids, or an int shared by every row. key_mask: (B, 1, 1,
    length + 1) bool, True for real keys, or None when no row is padded. Same arithmetic as
    ``GPT.forward(tok[:, None], cache=cache, last_only=True)`` in eval mode.
    """
    tf, cfg = model.transformer, model.config
    B, C, H = tok.size(0), cfg.d_model, cfg.n_head
    L, eps = cache.length, tf.ln_f.eps
    wpe = tf.wpe.weight[pos] if isinstance(pos, int) else F.embedding(pos, tf.wpe.weight)  # (C,) | (B, C)
    x = F.embedding(tok, tf.wte.weight) + wpe  # (B, C)
    for i, blk in enumerate(weights.blocks):
        h = F.layer_norm(x, (C,), *blk.ln_1, eps)  # (B, C)
        q, k, v = blk.qkv(h).view(B, 3, H, 1, C // H).unbind(1)  # 3 x (B, H, 1, hd)
        keys, values = cache.k[i], cache.v[i]  # (B, H, max_len, hd)
        keys[:, :, L : L + 1] = k
        values[:, :, L : L + 1] = v
        y = F.scaled_dot_product_attention(
            q, keys[:, :, : L + 1], values[:, :, : L + 1], attn_mask=key_mask
        )  # (B, H, 1, hd)
        x = x + blk.proj(y.reshape(B, C))  # (B, C)
        h = F.layer_norm(x, (C,), *blk.ln_2, eps)  # (B, C)
        x = x + blk.fc_proj(blk.fc_act(h))  # (B, C)
    cache.advance(1)
    x = F.layer_norm(x, (C,), tf.ln_f.weight, tf.ln_f.bias, eps)  # (B, C)
    return weights.lm_head(x)  # (B, V)
