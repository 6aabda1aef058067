"""Conversion between genpt-dist GPT checkpoints and Hugging Face ``GPT2LMHeadModel``.

The GPT in ``genpt_dist.model.gpt`` uses the HF GPT-2 parameter names already; the only difference
is that HF implements ``c_attn``, ``c_proj`` and ``c_fc`` as ``Conv1D`` whose weight is stored as
(in_features, out_features), the transpose of ``nn.Linear``. Conversion therefore transposes those
four weights per block and makes sure ``lm_head.weight`` (tied to ``transformer.wte.weight``) is
present. ``_orig_mod.`` (torch.compile) and ``module.`` (DDP/DeepSpeed) prefixes are stripped.

``transformers`` is not imported here; the HF model is built by the caller from ``hf_config_dict``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from genpt_dist.errors import UserError
from genpt_dist.model.gpt import ACTIVATIONS, GPTConfig

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
        "activation_function": cfg.activation,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attn_pdrop,
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


# GPT-2 config options our GPT implements only at these values: (key, the value it must have, default).
_FIXED = (
    ("scale_attn_by_inverse_layer_idx", False, False),
    ("reorder_and_upcast_attn", False, False),
    ("scale_attn_weights", True, True),
    ("add_cross_attention", False, False),
)


def gpt_config_from_hf(config: dict[str, Any], where: str) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 `config.json`; a one-line UserError for another model type or
    an option our GPT does not implement (each named)."""
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{where}: model_type {model_type!r} is not supported (only gpt2 folders are read)")
    architectures = config.get("architectures") or ["GPT2LMHeadModel"]
    if not any(str(a).endswith("LMHeadModel") for a in architectures):
        raise UserError(
            f"{where}: a {', '.join(map(str, architectures))}, not a GPT-2 language model (GPT2LMHeadModel)"
        )
    unsupported = [f"{key}={config[key]!r}" for key, value, _ in _FIXED if config.get(key, value) != value]
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        unsupported.append(f"activation_function={activation!r} (supported: {', '.join(ACTIVATIONS)})")
    d_model = int(config.get("n_embd", 768))
    if config.get("n_inner") not in (None, 4 * d_model):
        unsupported.append(f"n_inner={config['n_inner']!r} (only 4 * n_embd)")
    if config.get("tie_word_embeddings", True) is not True:
        unsupported.append("tie_word_embeddings=false")
    if unsupported:
        raise UserError(f"{where}: GPT-2 options this model does not implement: {', '.join(unsupported)}")
    try:
        return GPTConfig(
            vocab_size=int(config["vocab_size"]),
            block_size=int(config.get("n_positions", config.get("n_ctx", 1024))),
            n_layer=int(config["n_layer"]),
            n_head=int(config["n_head"]),
            d_model=d_model,
            activation=activation,
            layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: not a valid GPT-2 config ({exc})") from None
