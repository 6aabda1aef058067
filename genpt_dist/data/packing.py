"""Packing a token stream into fixed-length training samples, and what each token weighs in bytes.

`pack`: the documents of a split, each wrapped in <bos> ... <eos>, are concatenated into one stream of
L tokens and cut into n = ceil((L - 1) / T) samples of T + 1 tokens with stride T (sample i holds
stream[i*T : i*T + T + 1]). Consecutive samples overlap by one token, so every token after the first
is a prediction target exactly once, and a sample's context crosses document boundaries (the <bos>
and <eos> tell the model where one ends). The last sample is right-padded with <pad>; the loss ignores
pad targets. Nothing is dropped, so the token and target counts in the manifest are exact.

`token_dtype`: the narrowest unsigned dtype that holds every id (uint16 up to 65,536 tokens).

`token_byte_lengths`: the UTF-8 bytes each token stands for (specials: 0), the denominator of
bits-per-byte. Byte-level BPE spells each byte as one character of its vocabulary, so a token's
length in characters is its length in bytes.
"""

from __future__ import annotations

import numpy as np

from genpt_dist.tokenizer import Tokenizer


def pack(stream: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """(L,) token stream -> (n, seq_len + 1) samples with stride seq_len, last one right-padded."""
    if len(stream) < 2:
        return np.zeros((0, seq_len + 1), dtype=stream.dtype)
    n = -(-(len(stream) - 1) // seq_len)  # ceil((L - 1) / T)
    padded = np.full(n * seq_len + 1, pad_id, dtype=stream.dtype)
    padded[: len(stream)] = stream
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # (n, T+1)
    return padded[idx]


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype shards store token ids in: uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """(vocab_size,) UTF-8 bytes each token stands for (specials: 0). Byte-level tokens spell one byte per char."""
    lengths = np.zeros(tok.vocab_size, dtype=np.int64)
    special = {tok.pad_id, tok.bos_id, tok.eos_id}
    for token, idx in tok.hf.get_vocab().items():
        if idx not in special:
            lengths[idx] = len(token)
    return lengths
