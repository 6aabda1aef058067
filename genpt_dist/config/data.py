"""What `prepare` makes of raw text, and how the loader streams it back."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from genpt_dist.config.base import Section

NUM_SPECIAL_TOKENS = 3  # <pad>, <bos>, <eos>
BYTE_ALPHABET = 256


class DataConfig(Section):
    """How `prepare` turns raw text into shards."""

    tokenizer: Literal["bpe", "byte"] = Field("bpe", description="byte-level BPE trained on the corpus, or raw bytes")
    vocab_size: int = Field(8192, description="BPE vocabulary size including the 3 special tokens")
    seq_len: int = Field(256, ge=2, description="tokens a model sees per sample; a sample stores seq_len + 1")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents (hash) or tokens (tail) for val")
    split: Literal["hash", "tail"] = Field("hash", description="hash: by document hash; tail: last tokens are val")
    shard_samples: int = Field(2048, ge=1, description="samples per WebDataset shard")
    text_field: str = Field("text", description="JSONL field holding a document's text")
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".py", ".jsonl", ".parquet"],
        description="file types taken from folders and globs (a .gz or .zst suffix is also accepted; "
        "datasets save_to_disk folders are always taken)",
    )
    tokenizer_train_bytes: int = Field(64 << 20, ge=1, description="corpus bytes sampled to train the BPE")
    parallel_min_bytes: int = Field(32 << 20, ge=0, description="corpora above this are tokenised by Ray tasks")
    unit_bytes: int = Field(16 << 20, ge=1 << 12, description="source bytes per tokenising work unit (a Ray task)")
    range_min_bytes: int = Field(
        64 << 20, ge=1 << 12, description="an uncompressed text or JSONL file this large is read in unit_bytes ranges"
    )
    seed: int = Field(0, description="seed of the segment shuffle across shards")

    @model_validator(mode="after")
    def _check_vocab(self) -> DataConfig:
        need = BYTE_ALPHABET + NUM_SPECIAL_TOKENS
        if self.tokenizer == "bpe" and self.vocab_size < need:
            raise ValueError(
                f"vocab_size={self.vocab_size} is smaller than the {BYTE_ALPHABET} byte symbols + "
                f"{NUM_SPECIAL_TOKENS} special tokens a byte-level BPE needs ({need})"
            )
        return self


class LoaderConfig(Section):
    """The streaming WebDataset loader."""

    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank (0 = in-process)")
    max_bad_shard_fraction: float = Field(0.1, ge=0.0, le=1.0, description="stop when more shards than this are bad")
    seed: int = Field(0, description="seed of the per-epoch shard and sample shuffle")
