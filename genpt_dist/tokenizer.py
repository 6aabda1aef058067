"""Tokenizers: a byte-level BPE trained on the corpus, or raw bytes (no training).

Both are Hugging Face `tokenizers` objects with the same three special tokens at fixed ids
(`<pad>`=0, `<bos>`=1, `<eos>`=2), so one code path loads, hashes, saves and exports either, and the
export folder works with `transformers.PreTrainedTokenizerFast`. The byte tokenizer is a BPE with the
256 byte symbols and no merges: one token per UTF-8 byte, which makes bits-per-byte exact.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from genpt_dist import storage

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
GPT2_EOT = "<|endoftext|>"  # GPT-2's one special token: its bos, eos and pad
BYTE_VOCAB = len(SPECIAL_TOKENS) + 256


def _byte_level(tok: HFTokenizer) -> HFTokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (specials and the 256 bytes included)."""
    tok = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # long documents in pre-token-aligned pieces: the same word counts, counted in parallel
    tok.train_from_iterator((piece for text in texts for piece in _split_for_encoding(text)), trainer=trainer)
    return Tokenizer(tok)


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte plus the specials; needs no training."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(tok)


class Tokenizer:
    """A thin wrapper that knows the special ids and its own content hash.

    Ours have `<pad>`=0, `<bos>`=1, `<eos>`=2; a GPT-2 tokenizer (Hugging Face's, imported) has none of
    them and its `<|endoftext|>` serves as bos, eos and pad (`shared_specials`: padding is then masked
    by position, never by id, since the id is also the real <eos>)."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.hf.encode_special_tokens = True  # a literal "<eos>" in text is text, not the special token
        pad_id, bos_id, eos_id = (hf.token_to_id(t) for t in SPECIAL_TOKENS)
        eot = hf.token_to_id(GPT2_EOT)
        if pad_id is None and bos_id is None and eos_id is None and eot is not None:
            pad_id = bos_id = eos_id = eot
        elif pad_id is None or bos_id is None or eos_id is None or (pad_id, bos_id, eos_id) != (0, 1, 2):
            raise ValueError(f"tokenizer special tokens must be <pad>=0, <bos>=1, <eos>=2 (or GPT-2's {GPT2_EOT})")
        self.pad_id: int = pad_id
        self.bos_id: int = bos_id
        self.eos_id: int = eos_id
        self._byte_ids = _byte_lookup(hf)  # (256,) ids when this is the merge-free byte tokenizer

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def shared_specials(self) -> bool:
        """One token is bos, eos and pad (GPT-2's)."""
        return self.pad_id == self.eos_id

    @property
    def loss_pad_id(self) -> int | None:
        """The id whose targets carry no loss in packed data: the pad, unless it is also the eos."""
        return None if self.shared_specials else self.pad_id

    def token(self, token_id: int) -> str:
        """The token's string (e.g. the name of a special token)."""
        text = self.hf.id_to_token(token_id)
        if text is None:
            raise ValueError(f"no token with id {token_id}")
        return text

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def sha256(self) -> str:
        """The hash of the vocabulary, merges and pre-tokenisation: the JSON without a post-processor, which
        only the Hugging Face side applies (`with_bos_post_processor`; we never add special tokens)."""
        text = self.to_json()
        if self.hf.post_processor is not None:
            bare = HFTokenizer.from_str(text)
            bare.post_processor = None
            text = bare.to_str()
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def with_bos_post_processor(self) -> str:
        """This tokenizer's JSON with a post-processor that puts <bos> before every text, as our stages
        prompt the model, so `transformers`' `tok(prompt)` gives our ids (the same `sha256`)."""
        from tokenizers import processors

        hf = HFTokenizer.from_str(self.to_json())
        bos = self.token(self.bos_id)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, self.bos_id)]
        )
        return hf.to_str()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str], dtype: np.dtype | type = np.int64) -> list[np.ndarray]:
        """`encode_batch` for whole documents, as arrays: the same ids, faster and in bounded memory.

        The byte tokenizer is a table lookup on the UTF-8 bytes. A BPE encodes long documents in
        pieces cut where the byte-level pre-tokenizer always splits (`_PIECE_START`), so the ids
        are identical and the pieces run in parallel on the tokenizers library's thread pool (one
        thread where TOKENIZERS_PARALLELISM is off). `encode_batch_fast` (no character offsets) takes
        about ENCODE_BATCH_CHARS characters a call, and each call's ids become arrays before the next:
        an `Encoding` holds tens of bytes a token (ids, token strings, masks), so one call over a
        whole work unit held several times the unit's text."""
        if self._byte_ids is not None:
            return [self._byte_ids[np.frombuffer(t.encode("utf-8"), dtype=np.uint8)].astype(dtype) for t in texts]
        out: list[list[np.ndarray]] = [[] for _ in texts]
        batch: list[str] = []
        owner: list[int] = []
        chars = 0

        def flush() -> None:
            for i, enc in zip(owner, self.hf.encode_batch_fast(batch, add_special_tokens=False)):
                out[i].append(np.asarray(enc.ids, dtype=dtype))
            batch.clear()
            owner.clear()

        for i, text in enumerate(texts):
            for piece in _split_for_encoding(text):
                batch.append(piece)
                owner.append(i)
                chars += len(piece)
                if chars >= ENCODE_BATCH_CHARS:
                    flush()
                    chars = 0
        flush()
        return [np.concatenate(parts) if parts else np.zeros(0, dtype) for parts in out]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, url: str) -> None:
        storage.write_text(url, self.to_json())

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    @classmethod
    def load(cls, url: str) -> Tokenizer:
        return cls.from_json(storage.read_text(url))

    @classmethod
    def from_gpt2_files(cls, vocab_json: str, merges_txt: str) -> Tokenizer:
        """A GPT-2 tokenizer from its `vocab.json` and `merges.txt` texts (what transformers' GPT2Tokenizer
        reads): byte-level BPE without a prefix space, `<|endoftext|>` special."""
        vocab = json.loads(vocab_json)
        lines = [line for line in merges_txt.splitlines() if line and not line.startswith("#version")]
        merges = [tuple(line.split(" ")) for line in lines]
        if any(len(m) != 2 for m in merges):
            raise ValueError("merges.txt: every line must hold two tokens separated by one space")
        tok = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=merges)))  # type: ignore[arg-type]
        if GPT2_EOT in vocab:
            tok.add_special_tokens([GPT2_EOT])
        return cls(tok)


ENCODE_PIECE_CHARS = 1 << 16
ENCODE_BATCH_CHARS = 1 << 20  # characters `encode_arrays` hands to one encode_batch_fast call
# A newline between a visible ASCII character and a letter or digit: the byte-level pre-tokenizer
# (GPT-2's pattern) always makes it a pre-token of its own, so text cut right after it encodes the same.
# (After a run of whitespace it would not: "\n\n" at the end of a piece is one pre-token, inside the
# text "\n", "\n".)
_PIECE_START = re.compile(r"(?<=[!-~])\n(?=[A-Za-z0-9])")


def _split_for_encoding(text: str) -> list[str]:
    """Cut a long text after such newlines (`_PIECE_START`) into pieces of >= 64 Ki chars."""
    if len(text) <= 2 * ENCODE_PIECE_CHARS:
        return [text]
    pieces, start = [], 0
    while len(text) - start > 2 * ENCODE_PIECE_CHARS:
        match = _PIECE_START.search(text, start + ENCODE_PIECE_CHARS)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def _gpt2_byte_chars() -> list[str]:
    """The printable character the byte-level pre-tokenizer uses for each byte 0..255 (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_BYTE_PROBE = "Héllo\r\n\tw\u00f6rld <eos> \x00\x7f \u65e5\u672c\U0001f600 it's 42!\n\n  x"


def _byte_lookup(hf: HFTokenizer) -> np.ndarray | None:
    """The byte -> id table if `hf` is the byte tokenizer (no merges; checked against HF on a probe)."""
    if hf.get_vocab_size() != BYTE_VOCAB:
        return None
    model = json.loads(hf.to_str()).get("model", {})
    if model.get("type") != "BPE" or model.get("merges"):
        return None
    ids = [hf.token_to_id(ch) for ch in _gpt2_byte_chars()]
    if any(i is None for i in ids):
        return None
    table = np.array(ids, dtype=np.int64)
    probe = table[np.frombuffer(_BYTE_PROBE.encode("utf-8"), dtype=np.uint8)].tolist()
    return table if probe == hf.encode(_BYTE_PROBE, add_special_tokens=False).ids else None


def iter_chunks(texts: Iterable[str], budget_bytes: int) -> Iterator[str]:
    """Yield texts until `budget_bytes` of UTF-8 have been yielded (the BPE training sample)."""
    seen = 0
    for text in texts:
        if seen >= budget_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text
