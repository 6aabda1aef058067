"""`prepare`: raw text -> tokenizer.json + WebDataset shards + manifest.json.

Algorithm:
1. Resolve the inputs (files, folders, globs, s3:// prefixes) to a sorted list of source files and
   hash their contents (in HASH_CHUNK pieces); the hash of (sources, data config) is the dataset's
   fingerprint. A folder written by Hugging Face `datasets`' `save_to_disk` contributes its arrow files.
2. If the output already holds a manifest with the same fingerprint and every shard verifies
   (size and sha256), re-use it. A different dataset there is refused unless `--overwrite`.
3. Read and normalise each file into documents (`data.text`: gunzip / zstd, skip binary files, UTF-8
   with counted replacements, BOM and CR/CRLF; one document per file, per `.jsonl` line, or per row of a
   parquet / arrow file's `text_field` column, read a row group at a time).
4. Train the byte-level BPE on a sample of the documents (or take the byte tokenizer).
5. Tokenise, wrap each document in <bos> ... <eos>, assign it to a split (by the hash of its text,
   `text.doc_in_val`, so duplicates never straddle the split; or `split: tail`, the last tokens of the
   stream, at least one whole sample of seq_len + 1 tokens where the stream holds two), concatenate per
   split. A `split: hash` corpus of fewer than SMALL_CORPUS_DOCUMENTS documents is split as `tail` (by
   position) instead, since a hash split of a few documents is often empty; the manifest and the summary
   say which rule ran (`split`). A corpus larger than `data.parallel_min_bytes` is tokenised in Ray
   tasks, on the Ray that `raycluster.init_ray` joins or starts (a local one binds 127.0.0.1 only).
6. Cut each split's stream into samples of seq_len + 1 tokens with stride seq_len (`packing.pack`:
   every token is a prediction target exactly once, the last sample right-padded with <pad>). Train
   samples are permuted (data.seed) so each shard is a random sample of the corpus; val keeps order.
7. Write WebDataset shards (`<key>.tokens.npy` members, built in bulk by `data.shards`), each
   uploaded as it is built; write manifest.json last (`manifest.publish_manifest`).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tqdm import tqdm

from genpt_dist import storage
from genpt_dist.config import DataConfig
from genpt_dist.data.manifest import (
    MANIFEST,
    Manifest,
    ShardInfo,
    SourceInfo,
    SplitInfo,
    TokenizerInfo,
    load_manifest,
    publish_manifest,
)
from genpt_dist.data.packing import pack, token_byte_lengths, token_dtype
from genpt_dist.data.shards import encode_shard
from genpt_dist.data.text import (
    DATASETS_INFO,
    DATASETS_STATE,
    ReadStats,
    datasets_files,
    doc_in_val,
    iter_document_batches,
    uncompressed_name,
)
from genpt_dist.errors import UserError
from genpt_dist.tokenizer import Tokenizer, byte_tokenizer, iter_chunks, train_bpe

log = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
OUTPUT_FILE = re.compile(r"tokenizer\.json|(train|val)-\d{6,}\.tar")  # what prepare writes besides the manifest
# Fewer documents than this and `split: hash` splits by position instead (the last val_fraction of the
# tokens, as `split: tail`): a few documents' hashes often send none, or all, of them to val.
SMALL_CORPUS_DOCUMENTS = 50
HASH_CHUNK = 64 << 20  # bytes of a source read at once while hashing it


# ---------------------------------------------------------------- sources


def _accepted(path: str, extensions: list[str]) -> bool:
    name = uncompressed_name(path)
    return any(name.endswith(ext) for ext in extensions)


def _folder_files(url: str, extensions: list[str]) -> list[str]:
    """The files a folder or prefix contributes: those with one of `extensions`, and in every subfolder
    written by `datasets`' `save_to_disk` (all splits of a DatasetDict), its arrow files and nothing else."""
    files = storage.list_files(url)
    present = set(files)
    dataset_dirs = {
        f.rsplit("/", 1)[0]
        for f in files
        if storage.name(f) == DATASETS_STATE and f.rsplit("/", 1)[0] + "/" + DATASETS_INFO in present
    }
    out = [f for d in sorted(dataset_dirs) for f in datasets_files(d) or []]
    out += [f for f in files if f.rsplit("/", 1)[0] not in dataset_dirs and _accepted(f, extensions)]
    return out


def resolve_sources(inputs: list[str], extensions: list[str]) -> list[str]:
    """Inputs -> sorted, de-duplicated file URLs. Explicit files are taken whatever their suffix;
    folders, globs and prefixes contribute files with one of `extensions`."""
    found: set[str] = set()
    for src in inputs:
        if storage.is_s3(src):
            storage.check_bucket(src)
            if storage.exists(src):
                found.add(src)
            else:
                found.update(_folder_files(src, extensions))
            continue
        if any(ch in src for ch in "*?["):
            matches = glob.glob(src, recursive=True)
            found.update(str(Path(m).resolve()) for m in matches if Path(m).is_file() and _accepted(m, extensions))
            for m in matches:
                if Path(m).is_dir():
                    found.update(_folder_files(str(Path(m).resolve()), extensions))
        elif Path(src).is_file():
            found.add(str(Path(src).resolve()))
        elif Path(src).is_dir():
            found.update(_folder_files(str(Path(src).resolve()), extensions))
    if not found:
        raise UserError(f"no input files match {' '.join(inputs)} (looked for {', '.join(extensions)})")
    return sorted(found)


# ---------------------------------------------------------------- tokenising


@dataclass
class TokenisedPart:
    """What one tokenising task returns: each document's tokens wrapped in <bos>/<eos>, in source order,
    and whether its hash puts it in val (`split: hash`; always False for `split: tail`)."""

    docs: list[np.ndarray] = field(default_factory=list)
    in_val: list[bool] = field(default_factory=list)
    stats: ReadStats = field(default_factory=ReadStats)


def tokenise_files(urls: list[str], tokenizer_json: str, cfg: dict[str, Any]) -> TokenisedPart:
    """Read, normalise and tokenise `urls` (runs in the driver or in a Ray task)."""
    data_cfg = DataConfig.model_validate(cfg)
    tok = Tokenizer.from_json(tokenizer_json)
    dtype = token_dtype(tok.vocab_size)
    part = TokenisedPart()
    bos, eos = np.array([tok.bos_id], dtype=dtype), np.array([tok.eos_id], dtype=dtype)
    by_hash = data_cfg.split == "hash"
    for url in urls:
        for docs in iter_document_batches(url, data_cfg.text_field, part.stats):
            for text, ids in zip(docs, tok.encode_arrays(docs, dtype)):
                part.docs.append(np.concatenate([bos, ids, eos]))
                part.in_val.append(by_hash and doc_in_val(text, data_cfg.val_fraction))
    return part


def _tokenise_all(
    sources: list[str], tok: Tokenizer, cfg: DataConfig, total_bytes: int, address: str | None
) -> TokenisedPart:
    """Tokenise every source, in Ray tasks when the corpus is large; merge in source order."""
    tok_json, cfg_dict = tok.to_json(), cfg.model_dump()
    chunk = max(1, len(sources) // 64)
    groups = [sources[i : i + chunk] for i in range(0, len(sources), chunk)]
    bar = tqdm(total=len(groups), desc="tokenise", unit="chunk", leave=False, disable=None)
    parts: list[TokenisedPart]
    if total_bytes >= cfg.parallel_min_bytes and len(groups) > 1:
        import ray

        from genpt_dist.raycluster import init_ray

        init_ray(address)  # never a bare ray.init: a local Ray must bind 127.0.0.1 only
        remote = ray.remote(tokenise_files)
        refs = [remote.remote(g, tok_json, cfg_dict) for g in groups]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
        try:
            parts = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:  # a bad input found in a task: still one line
            if isinstance(exc.cause, UserError):
                raise UserError(str(exc.cause)) from None
            raise
    else:
        parts = []
        for g in groups:
            parts.append(tokenise_files(g, tok_json, cfg_dict))
            bar.update(1)
    bar.close()
    merged = TokenisedPart()
    for part in parts:
        merged.docs.extend(part.docs)
        merged.in_val.extend(part.in_val)
        merged.stats.add(part.stats)
    return merged


def split_rule(split: str, documents: int) -> str:
    """The rule that splits the corpus: `split` as configured, except that a hash split of fewer than
    SMALL_CORPUS_DOCUMENTS documents is a position split (`_tail_split`), named with its reason."""
    if split == "hash" and documents < SMALL_CORPUS_DOCUMENTS:
        return f"position ({documents} documents < {SMALL_CORPUS_DOCUMENTS})"
    return split


def _concat(docs: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(docs) if docs else np.zeros(0, dtype)


def _hash_split(merged: TokenisedPart, dtype: np.dtype) -> dict[str, np.ndarray]:
    return {
        "train": _concat([d for d, v in zip(merged.docs, merged.in_val) if not v], dtype),
        "val": _concat([d for d, v in zip(merged.docs, merged.in_val) if v], dtype),
    }


def _tail_split(merged: TokenisedPart, val_fraction: float, seq_len: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The last `val_fraction` of the stream's tokens are val; at least one whole sample (seq_len + 1
    tokens) when the stream holds two, so a small corpus still gets a val sample."""
    stream = _concat(merged.docs, dtype)
    val = int(len(stream) * val_fraction)
    if val_fraction > 0 and val < seq_len + 1 <= len(stream) // 2:
        val = seq_len + 1
    cut = len(stream) - val
    return {"train": stream[:cut], "val": stream[cut:]}


# ---------------------------------------------------------------- shards


def write_shards(samples: np.ndarray, split: str, out_url: str, shard_samples: int, tmpdir: str) -> list[ShardInfo]:
    """Write `samples` as `<split>-NNNNNN.tar` shards (keys `<split>-<row index>`), in order."""
    shards: list[ShardInfo] = []
    for i, lo in enumerate(range(0, len(samples), shard_samples)):
        rows = samples[lo : lo + shard_samples]
        data = encode_shard([f"{split}-{j:09d}" for j in range(lo, lo + len(rows))], rows)
        name = f"{split}-{i:06d}.tar"
        url = storage.join(out_url, name)
        if len(data) <= storage.MULTIPART_THRESHOLD:
            storage.write_bytes(url, data)
        else:  # big shards go up in parallel parts
            local = Path(tmpdir) / name
            local.write_bytes(data)
            storage.upload_file(local, url)
            local.unlink()
        shards.append(
            ShardInfo(name=name, samples=int(len(rows)), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
    return shards


# ---------------------------------------------------------------- the command


def _source_info(url: str) -> SourceInfo:
    """A source's size and sha256, read HASH_CHUNK bytes at a time (memory does not grow with the file)."""
    size, digest = storage.size(url), hashlib.sha256()
    for start in range(0, size, HASH_CHUNK):
        digest.update(storage.read_bytes(url, start, min(start + HASH_CHUNK, size)))
    return SourceInfo(url=url, bytes=size, sha256=digest.hexdigest())


def _fingerprint(sources: list[SourceInfo], cfg: DataConfig, given: Tokenizer | None = None) -> str:
    payload = {"sources": [(s.url, s.sha256) for s in sources], "data": cfg.model_dump()}
    if given is not None:  # the same corpus under another tokenizer is another dataset
        payload["tokenizer"] = given.sha256
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def given_tokenizer(src: str) -> Tokenizer:
    """`prepare --tokenizer SRC`: a tokenizer.json file, a Hugging Face folder (tokenizer.json, or GPT-2's
    vocab.json + merges.txt) or a checkpoint / run / export of ours; anything else is a one-line error."""
    from genpt_dist.checkpoint import hf_tokenizer, load_tokenizer, resolve

    url = storage.normalize(src)
    if url.endswith(".json"):
        try:
            return Tokenizer.load(url)
        except FileNotFoundError:
            raise UserError(f"--tokenizer {src}: no such file") from None
        except Exception as exc:  # tokenizers' own error for a file that is not a tokenizer
            raise UserError(f"--tokenizer {src}: not a tokenizer.json ({exc})".splitlines()[0]) from None
    try:
        return load_tokenizer(resolve(url))  # a checkpoint, run or export of ours, or a transformers model folder
    except UserError:
        if storage.exists(storage.join(url, TOKENIZER_FILE)) or storage.exists(storage.join(url, "vocab.json")):
            return hf_tokenizer(url)  # a tokenizer saved on its own (save_pretrained of a tokenizer)
        kinds = "a tokenizer.json, a Hugging Face model or tokenizer folder, or one of our checkpoints"
        raise UserError(f"--tokenizer {src} is none of {kinds}") from None


def _verify_existing(out_url: str, fingerprint: str) -> Manifest | None:
    """The existing manifest if it is this very dataset and all its shards verify, else None."""
    manifest = load_manifest(out_url)
    if manifest.fingerprint != fingerprint:
        return None
    for split in SPLITS:
        for shard in manifest.shards(split):
            data = storage.read_bytes(manifest.shard_url(shard))
            if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
                log.warning("shard %s does not verify; preparing again", shard.name)
                return None
    return manifest


def _train_tokenizer(urls: list[str], cfg: DataConfig) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return byte_tokenizer()
    sample_stats = ReadStats()

    def sample_texts():
        for url in urls:  # a batch at a time: the sampler stops reading once it has enough
            for docs in iter_document_batches(url, cfg.text_field, sample_stats):
                yield from docs

    sample = iter_chunks(sample_texts(), cfg.tokenizer_train_bytes)
    first = next(sample, None)
    if first is None:  # the sampler read every file and found no text
        _refuse_empty(sample_stats)
    log.info("training a %d-token byte-level BPE", cfg.vocab_size)
    return train_bpe(itertools.chain([first], sample), cfg.vocab_size)


def prepare(
    inputs: list[str],
    output: str,
    cfg: DataConfig,
    overwrite: bool = False,
    address: str | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Run the whole `prepare` command; returns the JSON summary. `address`: the Ray cluster to tokenise
    a large corpus on (as `--address`; default RAY_ADDRESS, else a local Ray). `tokenizer`: reuse that
    tokenizer (`given_tokenizer`) instead of training one, e.g. to continue pretraining a GPT-2."""
    t0 = time.time()
    output = storage.normalize(output)
    storage.check_bucket(output)
    given = given_tokenizer(tokenizer) if tokenizer else None
    urls = resolve_sources(inputs, cfg.extensions)
    sources = [_source_info(url) for url in tqdm(urls, desc="hash sources", unit="file", leave=False, disable=None)]
    total_bytes = sum(s.bytes for s in sources)
    fingerprint = _fingerprint(sources, cfg, given)
    manifest_url = storage.join(output, MANIFEST)

    if storage.exists(manifest_url):
        reused = _verify_existing(output, fingerprint)
        if reused is not None:
            log.info("re-using the verified dataset at %s", output)
            return _summary(reused, reused=True, seconds=time.time() - t0, mb=total_bytes / 1e6)
        if load_manifest(output).fingerprint != fingerprint and not overwrite:
            raise UserError(f"{output} already holds a different dataset (pass --overwrite to replace it)")
    storage.delete(manifest_url)  # from here on the output is incomplete until the new manifest lands
    for url in storage.list_files(output):  # only what an earlier prepare wrote; other files stay
        if OUTPUT_FILE.fullmatch(url[len(output) + 1 :]):
            storage.delete(url)

    tok = given if given is not None else _train_tokenizer(urls, cfg)
    merged = _tokenise_all(urls, tok, cfg, total_bytes, address)
    stats = merged.stats
    if stats.documents == 0:
        _refuse_empty(stats)

    dtype = token_dtype(tok.vocab_size)
    rule = split_rule(cfg.split, stats.documents)
    if rule == "hash":
        streams = _hash_split(merged, dtype)
    else:
        if rule != cfg.split:
            log.info("%d documents: splitting by position, not hash (split: %s)", stats.documents, rule)
        streams = _tail_split(merged, cfg.val_fraction, cfg.seq_len, dtype)
    documents = {"train": merged.in_val.count(False), "val": merged.in_val.count(True)}
    merged.docs.clear()  # the streams hold the tokens now
    byte_len = token_byte_lengths(tok)
    splits: dict[str, SplitInfo] = {}
    with tempfile.TemporaryDirectory(prefix="genpt-prepare-") as tmpdir:
        for split in SPLITS:
            samples = pack(streams[split], cfg.seq_len, tok.pad_id)
            if len(samples) == 0 and (split == "train" or cfg.val_fraction > 0):
                total = sum(len(streams[s]) for s in SPLITS)
                if rule == "hash":
                    hint = " (few documents: try --set data.split=tail)"
                else:
                    hint = f" ({total} tokens in all, under two {cfg.seq_len + 1}-token samples: lower data.seq_len)"
                raise UserError(f"the {split} split is empty{hint}")
            if split == "train":
                samples = samples[np.random.default_rng(cfg.seed).permutation(len(samples))]
            splits[split] = SplitInfo(
                shards=write_shards(samples, split, output, cfg.shard_samples, tmpdir),
                samples=int(len(samples)),
                documents=documents[split] if rule == "hash" else None,
                tokens=int(len(streams[split])),
                targets=int(max(len(streams[split]) - 1, 0)),
                bytes=int(byte_len[streams[split]].sum()),
            )
    tok.save(storage.join(output, TOKENIZER_FILE))
    manifest = Manifest(
        url=output,
        fingerprint=fingerprint,
        seq_len=cfg.seq_len,
        sample_tokens=cfg.seq_len + 1,
        token_dtype=dtype.name,
        tokenizer=TokenizerInfo(
            file=TOKENIZER_FILE,
            sha256=tok.sha256,
            kind="given" if given is not None else cfg.tokenizer,
            vocab_size=tok.vocab_size,
            pad_id=tok.pad_id,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            source=storage.normalize(tokenizer) if tokenizer else None,
        ),
        splits=splits,
        documents=stats.documents,
        sources=sources,
        stats=stats,
        config=cfg.model_dump(),
        split=rule,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    publish_manifest(manifest)
    return _summary(manifest, reused=False, seconds=time.time() - t0, mb=total_bytes / 1e6)


def _refuse_empty(stats: ReadStats) -> NoReturn:
    if stats.files and stats.binary_skipped == stats.files:
        raise UserError(f"only binary files in the input ({stats.files} skipped)")
    raise UserError(f"empty corpus: {stats.files} file(s) hold no text")


def _summary(manifest: Manifest, reused: bool, seconds: float, mb: float) -> dict[str, Any]:
    splits = manifest.splits
    return {
        "command": "prepare",
        "output": manifest.url,
        "manifest": storage.join(manifest.url, MANIFEST),
        "reused": reused,
        "train_samples": splits["train"].samples,
        "val_samples": splits["val"].samples,
        "train_tokens": splits["train"].tokens,
        "val_tokens": splits["val"].tokens,
        "shards": sum(len(splits[s].shards) for s in SPLITS),
        "documents": manifest.documents,
        "split": manifest.split,
        "vocab_size": manifest.tokenizer.vocab_size,
        "binary_skipped": manifest.stats.binary_skipped,
        "replacement_chars": manifest.stats.replacement_chars,
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb / max(seconds, 1e-9), 2),
    }
