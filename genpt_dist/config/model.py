"""The model's shape and how it samples."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from genpt_dist.config.base import Section


class TransformerShape(Section):
    """The shape of a transformer stack: the GPT's, and the discriminator's encoder."""

    n_layer: int = Field(4, ge=1, description="transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads per block")
    d_model: int = Field(128, ge=1, description="embedding width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on embeddings, attention and MLP")

    @model_validator(mode="after")
    def _check_heads(self) -> TransformerShape:
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} does not divide d_model={self.d_model}")
        return self


class ModelConfig(TransformerShape):
    """The decoder-only GPT (GPT-2 layout)."""

    block_size: int | None = Field(None, ge=2, description="context length; defaults to data.seq_len")
    attention_dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="dropout on the attention weights alone; default: dropout. At 0 a CPU runs a faster kernel than "
        "the math path, which dropout needs, and draws no (B, H, T, T) random mask",
    )
    activation: Literal["gelu_new", "gelu", "relu"] = Field(
        "gelu", description="MLP activation, GPT-2's activation_function names (exports keep it; an init its own)"
    )


class SamplingConfig(Section):
    """Defaults for `generate` and for rollouts."""

    max_new_tokens: int = Field(128, ge=1, description="tokens generated per prompt")
    top_k: int | None = Field(50, ge=1, description="sample among the k most likely tokens (the seed's strategy)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    temperature: float = Field(1.0, gt=0, description="softmax temperature")
