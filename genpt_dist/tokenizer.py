"""Tokenizers: a byte-level BPE trained on the corpus, or raw bytes (no training).

Both are Hugging Face `tokenizers` objects with the same three special tokens at fixed ids
(`<pad>`=0, `<bos>`=1, `<eos>`=2), so one code path loads, hashes, saves and exports either, and the
export folder works with `transformers.PreTrainedTokenizerFast`. The byte tokenizer is a BPE with the
256 byte symbols and no merges: one token per UTF-8 byte, which makes bits-per-byte exact.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from genpt_dist import storage

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def _byte_level(tok: HFTokenizer) -> HFTokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> "Tokenizer":
    """Train a byte-level BPE of `vocab_size` tokens (specials and the 256 bytes included)."""
    tok = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def byte_tokenizer() -> "Tokenizer":
    """One token per UTF-8 byte plus the specials; needs no training."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(tok)


class Tokenizer:
    """A thin wrapper that knows the special ids and its own content hash."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.hf.encode_special_tokens = True  # a literal "<eos>" in text is text, not the special token
        self.pad_id, self.bos_id, self.eos_id = (hf.token_to_id(t) for t in SPECIAL_TOKENS)
        if (self.pad_id, self.bos_id, self.eos_id) != (0, 1, 2):
            raise ValueError("tokenizer special tokens must be <pad>=0, <bos>=1, <eos>=2")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, url: str) -> None:
        storage.write_text(url, self.to_json())

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    @classmethod
    def load(cls, url: str) -> "Tokenizer":
        return cls.from_json(storage.read_text(url))


def iter_chunks(texts: Iterable[str], budget_bytes: int) -> Iterator[str]:
    """Yield texts until `budget_bytes` of UTF-8 have been yielded (the BPE training sample)."""
    seen = 0
    for text in texts:
        if seen >= budget_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text
