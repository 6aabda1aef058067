"""Conversion between genpt-dist GPT checkpoints and Hugging Face ``GPT2LMHeadModel``.

The GPT in ``genpt_dist.model.gpt`` uses the HF GPT-2 parameter names already; the only difference
is that HF implements ``c_attn``, ``c_proj`` and ``c_fc`` as ``Conv1D`` whose weight is stored as
(in_features, out_features), the transpose of ``nn.Linear``. Conversion therefore transposes those
four weights per block and makes sure ``lm_head.weight`` (tied to ``transformer.wte.weight``) is
present. ``_orig_mod.`` (torch.compile) and ``module.`` (DDP/DeepSpeed) prefixes are stripped.

``transformers`` is not imported here; the HF model is built by the caller from ``hf_config_dict``.
"""

from __future__ import annotations

from torch import Tensor

from genpt_dist.model.gpt import GPTConfig

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions
_PREFIXES = ("_orig_mod.", "module.")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _convert(state_dict: dict[str, Tensor], *, drop_buffers: bool) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        name = _strip(name)
        if drop_buffers and name.startswith("transformer.h.") and name.endswith(_HF_BUFFERS):
            continue
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t()
        out[name] = tensor.detach().contiguous()
    if "transformer.wte.weight" not in out:
        raise KeyError("state dict has no transformer.wte.weight; not a GPT-2 checkpoint")
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def to_hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``GPT.state_dict()`` -> a ``GPT2LMHeadModel`` state dict (Conv1D weights transposed)."""
    return _convert(state_dict, drop_buffers=False)


def from_hf_state_dict(hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``GPT2LMHeadModel`` state dict (or safetensors without the tied head) -> ours."""
    return _convert(hf_sd, drop_buffers=True)


def hf_config_dict(cfg: GPTConfig, *, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """``config.json`` contents for a ``GPT2LMHeadModel`` equivalent to ``GPT(cfg)``."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
