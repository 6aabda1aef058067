"""Decoder-only GPT, laid out so that it is exactly a Hugging Face GPT-2.

The architecture is GPT-2: learned token and position embeddings, pre-LayerNorm blocks (eps
``layer_norm_eps``, 1e-5), fused qkv projection ``c_attn``, an MLP activation of GPT-2's
``activation_function`` values (``gelu_new``, GELU with the tanh approximation; exact ``gelu``;
``relu``), a final LayerNorm and an ``lm_head`` without bias whose weight is tied to
``transformer.wte``. Module names follow nanoGPT, so ``genpt_dist.hf_compat`` only has to transpose four
Conv1D weights to produce a ``GPT2LMHeadModel`` state dict.

What is unusual compared with nanoGPT:

* Two activation defaults, one rule. Recipes (``ModelConfig.activation``, hence every model a stage
  builds new) default to exact ``gelu``, which is faster than the tanh approximation on a CPU
  (BENCHMARKS.md, "bench train"). ``GPTConfig.activation`` defaults to ``gelu_new`` because a config
  that names no activation is GPT-2's: a Hugging Face ``config.json`` without ``activation_function``
  and a checkpoint whose model config has no ``activation`` must keep computing what they were
  trained with.
* ``attention_mask`` (B, T_total) supports left-padded batches. Positions are then
  ``cumsum(mask) - 1`` clamped at 0, which is what HF ``generate`` does for GPT-2, and padded keys are
  masked out. A query may always attend to itself, so a padded query never sees an all-masked row
  (that would give NaN, and NaN times a zero attention weight still poisons real rows).
* ``KVCache`` holds preallocated per-layer key/value tensors; ``forward(..., cache=c)`` appends the new
  keys/values and attends over everything cached, so prefill + one-token steps give the same logits as
  a full forward.
* ``loss_mask`` weights the per-token cross-entropy (prompt masking for fine-tuning), and
  ``token_logprobs`` returns per-token log-probs for the RL stage.
* Without a mask and without cached keys the attention uses the ``is_causal=True`` fast path of
  ``F.scaled_dot_product_attention``; otherwise an explicit boolean mask is built. bf16 on a CPU with
  short sequences and no attention dropout (training, prefill) runs ``explicit_causal_attention``
  instead, which is faster there than SDPA's CPU flash kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from genpt_dist.model.cross_entropy import cross_entropy

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of a GPT-2 style model."""

    vocab_size: int  # number of token ids (embedding rows and logits)
    block_size: int = 256  # maximum sequence length (rows of the position embedding)
    n_layer: int  # number of transformer blocks
    n_head: int  # attention heads per block; must divide d_model
    d_model: int  # residual stream width (HF n_embd)
    dropout: float = 0.0  # embedding, attention and residual dropout probability
    attention_dropout: float | None = None  # on the attention weights alone; None: ``dropout`` (HF attn_pdrop)
    # The MLP's, by HF GPT-2's name: gelu_new (tanh approximation), gelu, relu. gelu_new is what a config that
    # names none means (GPT-2's); recipes default to gelu (ModelConfig.activation).
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5  # HF layer_norm_epsilon

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"GPTConfig.attention_dropout must be in [0, 1) or None, got {self.attention_dropout}")

    @property
    def attn_pdrop(self) -> float:
        """The dropout probability on attention weights."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Layer ``i`` stores ``k[i]`` and ``v[i]`` of shape (B, n_head, max_len, head_dim). ``length`` is the
    number of positions already written; a forward over T new tokens writes positions
    ``[length, length + T)`` in every layer and then advances ``length`` by T.
    """

    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, hd) after the cached positions; return all keys/values so far."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, H, length + T, hd)

    def advance(self, t: int) -> None:
        """Mark t more positions as written (called once per forward, after all layers)."""
        self.length += t

    def reset(self) -> None:
        """Forget the cached positions; the buffers are reused."""
        self.length = 0


# Longest sequence that bf16 attention on a CPU runs as explicit matmuls (`explicit_causal_attention`): its
# saved probabilities take B * H * T^2 bf16 values a layer, where SDPA's flash kernel keeps none.
EXPLICIT_MAX_T = 512


@functools.lru_cache(maxsize=8)
def _causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, T): 0 on and below the diagonal, -inf above; made once per length, not once per layer and step."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)


def explicit_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) + causal bias) v for q, k, v (B, H, T, hd) of one length, as batched matmuls.

    Scores come from one ``baddbmm`` (the bias, -inf above the diagonal, added in the same kernel),
    the softmax is taken in float32 and its probabilities are cast back to the inputs' dtype for the
    ``bmm`` with v: the arithmetic of nanoGPT's non-flash path under autocast. With bf16 on a CPU
    with AMX matmuls its forward + backward is faster than SDPA's CPU flash kernel at these lengths;
    in float32 the flash kernel is the faster (BENCHMARKS.md, "bench train")."""
    B, H, T, hd = q.shape
    bias = _causal_bias(T, q.dtype, q.device)  # (T, T)
    scores = torch.baddbmm(
        bias.expand(B * H, T, T), q.reshape(B * H, T, hd), k.reshape(B * H, T, hd).transpose(1, 2), alpha=hd**-0.5
    )  # (B*H, T, T)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # at least float32
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)  # (B*H, T, T)
    return torch.bmm(probs, v.reshape(B * H, T, hd)).view(B, H, T, hd)  # (B, H, T, hd)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and an optional KV cache."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.dropout = cfg.attn_pdrop
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache: KVCache | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, T_total, hd)
        dropout = self.dropout if self.training else 0.0
        if (
            is_causal
            and dropout == 0.0
            and q.device.type == "cpu"
            and q.dtype == torch.bfloat16
            and T <= EXPLICIT_MAX_T
        ):
            y = explicit_causal_attention(q, k, v)  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout
            )  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """GPT-2's `activation_function` by name, as a function."""
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d -> activation (``GPTConfig.activation``) -> d."""

    def __init__(self, d_model: int, dropout: float, activation: str = "gelu_new") -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.act = activation_fn(activation)
        self.c_proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.dropout, cfg.activation)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache: KVCache | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class TransformerModules(nn.ModuleDict):
    """``GPT.transformer``: a ModuleDict (the GPT-2 parameter names) whose entries are typed."""

    wte: nn.Embedding
    wpe: nn.Embedding
    drop: nn.Dropout
    h: nn.ModuleList  # of Block
    ln_f: nn.LayerNorm


class GPT(nn.Module):
    """GPT-2 language model: embeddings, ``n_layer`` pre-LN blocks, final LN, tied ``lm_head``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = TransformerModules(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=nn.Embedding(cfg.block_size, cfg.d_model),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------------------------------- sizes

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, the tied wte/lm_head weight counted once.

        ``exclude_embeddings=True`` follows nanoGPT's ``get_num_params(non_embedding=True)``: only the
        position embedding is subtracted. The token embedding stays because, being tied to ``lm_head``,
        it is also the output projection, whose matmul costs FLOPs.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context ``seq_len``.

        nanoGPT ``estimate_mfu`` / PaLM appendix B: ``6 * N + 12 * n_layer * d_model * seq_len`` with
        ``N = num_params(exclude_embeddings=True)``; the first term is the weight matmuls (2 FLOPs per
        multiply-add, times 3 for forward + backward), the second the attention scores and the weighted
        sum of values.
        """
        cfg = self.config
        return 6 * self.num_params(exclude_embeddings=True) + 12 * cfg.n_layer * cfg.d_model * seq_len

    def new_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` rows and up to ``max_len`` positions."""
        cfg = self.config
        if max_len > cfg.block_size:
            raise ValueError(f"cache max_len={max_len} exceeds block_size={cfg.block_size}")
        w = self.lm_head.weight
        return KVCache(
            n_layer=cfg.n_layer,
            batch_size=batch_size,
            n_head=cfg.n_head,
            max_len=max_len,
            head_dim=cfg.d_model // cfg.n_head,
            dtype=dtype or w.dtype,
            device=device or w.device,
        )

    # --------------------------------------------------------------------------------------- forward

    def _positions_and_mask(
        self, B: int, T: int, past: int, attention_mask: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor | None, bool]:
        """Position ids (B or 1, T), the SDPA boolean mask (True = attend) and the is_causal flag.

        Query i sits at key index ``past + i``; it may attend to key j when ``j <= past + i`` and key j
        is a real token, and always to itself.
        """
        T_total = past + T
        if T_total > self.config.block_size:
            raise ValueError(f"sequence length {T_total} exceeds block_size={self.config.block_size}")
        q_idx = past + torch.arange(T, device=device)  # (T,)
        k_idx = torch.arange(T_total, device=device)  # (T_total,)
        if attention_mask is None:
            pos = q_idx.unsqueeze(0)  # (1, T)
            if past == 0:
                return pos, None, True
            if T == 1:
                return pos, None, False  # one new query sees every cached key
            return pos, (k_idx[None, :] <= q_idx[:, None]), False  # (T, T_total)
        if attention_mask.shape != (B, T_total):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != (B, cached + T) = {(B, T_total)}")
        keep = attention_mask.bool()  # (B, T_total)
        pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        causal = k_idx[None, :] <= q_idx[:, None]  # (T, T_total)
        diag = k_idx[None, :] == q_idx[:, None]  # (T, T_total)
        mask = (causal[None] & keep[:, None, :]) | diag[None]  # (B, T, T_total)
        return pos, mask.unsqueeze(1), False  # (B, 1, T, T_total)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        loss_mask: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits and, when ``targets`` is given, the mean cross-entropy.

        idx: (B, T) token ids. targets: (B, T) next-token ids, -100 ignored. loss_mask: (B, T) weights
        (bool or float) of each target position; the loss is ``sum(w * ce) / sum(w)`` over positions
        whose target is not -100. cache: appended to, see ``KVCache``. attention_mask: (B, cached + T),
        1 for real tokens, 0 for left padding. last_only: with no targets, return logits (B, 1, V) of
        the last position only. Returns ``(logits, loss)``: logits (B, T, V) (or (B, 1, V)), loss a
        scalar or None.
        """
        B, T = idx.shape
        past = 0
        if cache is not None:
            past = cache.length
            if cache.batch_size != B:
                raise ValueError(f"cache batch size {cache.batch_size} != input batch size {B}")
            if past + T > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions, need {past + T}")
        pos, attn_mask, is_causal = self._positions_and_mask(B, T, past, attention_mask, idx.device)

        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, is_causal, cache)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if cache is not None:
            cache.advance(T)

        if targets is None:
            if last_only:
                return self.lm_head(x[:, -1:, :]), None  # (B, 1, V)
            return self.lm_head(x), None  # (B, T, V)

        logits = self.lm_head(x)  # (B, T, V)
        ce = cross_entropy(logits, targets)  # (B, T) float32, 0 where the target is -100
        weight = (targets != -100).float()  # (B, T)
        if loss_mask is not None:
            weight = weight * loss_mask.float()  # (B, T)
        loss = (ce * weight).sum() / weight.sum().clamp(min=1.0)
        return logits, loss

    def token_logprobs(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Log-probs (B, T-1) of ``idx[:, 1:]`` given their prefixes; differentiable.

        Entries whose target is a left-pad position are meaningless; mask them with
        ``attention_mask[:, 1:]``.
        """
        logits, _ = self(idx, attention_mask=attention_mask)  # (B, T, V)
        return -cross_entropy(logits[:, :-1], idx[:, 1:])  # (B, T-1)
