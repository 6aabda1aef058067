"""Transformer-encoder discriminator: one real-vs-generated logit per sequence.

Algorithm: token + learned position embeddings -> ``n_layer`` pre-LN bidirectional encoder blocks
(``F.scaled_dot_product_attention`` without a causal mask, padded keys masked out) -> final LayerNorm
-> mean over real tokens -> Linear(d_model, 1). A positive logit means "real".

What is unusual: positions are ``cumsum(mask) - 1`` clamped at 0, as in the GPT, so a sequence gets
the same logit whether it is left-padded, right-padded or not padded at all (padding invariance is
tested). A row with no real token attends to all of its (pad) keys to avoid NaN, and pools to zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from genpt_dist.model.gpt import MLP


@dataclass(kw_only=True)
class DiscriminatorConfig:
    """Shape of the discriminator."""

    vocab_size: int  # number of token ids; must match the policy's tokenizer
    block_size: int = 256  # maximum sequence length
    n_layer: int = 2  # encoder blocks
    n_head: int = 4  # attention heads per block; must divide d_model
    d_model: int = 128  # residual stream width
    dropout: float = 0.1  # embedding, attention and residual dropout probability
    pad_id: int = 0  # token id treated as padding when no attention_mask is given

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"DiscriminatorConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DiscriminatorConfig.dropout must be in [0, 1), got {self.dropout}")


class EncoderBlock(nn.Module):
    """Pre-LN bidirectional block: x + attn(ln_1(x), key padding mask), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.mlp = MLP(cfg.d_model, cfg.dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        x = x + self.resid_dropout(self.c_proj(y))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class Discriminator(nn.Module):
    """Sequence classifier: returns one logit (B,) per row, "real" when positive."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.head = nn.Linear(cfg.d_model, 1)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids; attention_mask (B, T), 1 for real tokens (default ``idx != pad_id``).

        Returns logits (B,).
        """
        B, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        keep = (idx != self.config.pad_id) if attention_mask is None else attention_mask.bool()  # (B, T)
        pos = (keep.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        empty = ~keep.any(dim=-1, keepdim=True)  # (B, 1) rows without a real token
        key_mask = (keep | empty)[:, None, None, :]  # (B, 1, 1, T)

        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, key_mask)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        w = keep.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # (B, C)
        return self.head(pooled).squeeze(-1)  # (B,)
