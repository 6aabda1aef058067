"""`prepare`: raw text -> tokenizer.json + WebDataset shards + manifest.json.

Algorithm:
1. Resolve the inputs (files, folders, globs, s3:// prefixes) to a sorted list of source files and
   hash their contents (in HASH_CHUNK pieces); the hash of (sources, data config) is the dataset's
   fingerprint. A folder written by Hugging Face `datasets`' `save_to_disk` contributes its arrow files.
2. If the output already holds a manifest with the same fingerprint and every shard verifies
   (size and sha256), re-use it. A different dataset there is refused unless `--overwrite`.
3. Plan work units of about `data.unit_bytes` (`tokenise.plan_units`: consecutive files together, a
   text or JSONL file of `data.range_min_bytes` or more in byte ranges cut where the ids cannot change).
   A unit is read and normalised into documents (`data.text`: gunzip / zstd, skip binary files, UTF-8
   with counted replacements, BOM and CR/CRLF; one document per file, per `.jsonl` line, or per row of a
   parquet / arrow file's `text_field` column, read a row group at a time).
4. Train the byte-level BPE on a sample of the documents (or take the byte tokenizer, or `--tokenizer`).
5. Tokenise the units (`tokenise.tokenise_to_spill`: in Ray tasks on the Ray that `raycluster.init_ray`
   joins or starts, a local one on 127.0.0.1 only, when the corpus exceeds `data.parallel_min_bytes` and
   has more than one unit; else in the driver), each document wrapped in <bos> ... <eos> and assigned to
   a split by the hash of its text (`text.doc_in_val`, so duplicates never straddle the split; one read
   in ranges by its file's sha256). The tokens go to a spill file on local disk, in source order, with a
   table of documents.
6. Write train.bin and val.bin from the spill (`TokenSpill.write_splits`): by the documents' split, or
   for `split: tail` the last tokens of the stream (at least one whole sample of seq_len + 1 tokens
   where the stream holds two). A `split: hash` corpus of fewer than SMALL_CORPUS_DOCUMENTS documents is
   split as `tail` instead, since a hash split of a few documents is often empty; the manifest and the
   summary say which rule ran (`split`). Samples are the stream cut with stride seq_len (`packing.pack`:
   every token a prediction target exactly once, the last sample right-padded with <pad>), read row
   by row from the split's file (`Split.samples`); train samples are permuted (data.seed) so each shard
   is a random sample of the corpus; val keeps order.
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
from genpt_dist.data.packing import token_byte_lengths, token_dtype
from genpt_dist.data.shards import encode_shard
from genpt_dist.data.text import DATASETS_INFO, DATASETS_STATE, ReadStats, datasets_files, uncompressed_name
from genpt_dist.data.tokenise import Part, Split, TokenSpill, plan_units, sample_texts, tokenise_to_spill
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


# ---------------------------------------------------------------- splitting


def split_rule(split: str, documents: int) -> str:
    """The rule that splits the corpus: `split` as configured, except that a hash split of fewer than
    SMALL_CORPUS_DOCUMENTS documents is a position split (`_tail_split`), named with its reason."""
    if split == "hash" and documents < SMALL_CORPUS_DOCUMENTS:
        return f"position ({documents} documents < {SMALL_CORPUS_DOCUMENTS})"
    return split


# ---------------------------------------------------------------- shards


def write_shards(
    split: Split, name: str, out_url: str, cfg: DataConfig, pad_id: int, tmpdir: str, permute: bool
) -> list[ShardInfo]:
    """Pack `split` into samples (`packing.pack`'s rule) and write them as `<name>-NNNNNN.tar` shards of
    `shard_samples` (keys `<name>-<row index>`), in order or in a seeded permutation (`permute`); a shard's
    samples are gathered from the split's file on disk as it is built."""
    n = split.num_samples(cfg.seq_len)
    order = np.random.default_rng(cfg.seed).permutation(n) if permute else np.arange(n)
    shards: list[ShardInfo] = []
    for i, lo in enumerate(range(0, n, cfg.shard_samples)):
        rows = split.samples(order[lo : lo + cfg.shard_samples], cfg.seq_len, pad_id)
        data = encode_shard([f"{name}-{j:09d}" for j in range(lo, lo + len(rows))], rows)
        shard = f"{name}-{i:06d}.tar"
        url = storage.join(out_url, shard)
        if len(data) <= storage.MULTIPART_THRESHOLD:
            storage.write_bytes(url, data)
        else:  # big shards go up in parallel parts
            local = Path(tmpdir) / shard
            local.write_bytes(data)
            storage.upload_file(local, url)
            local.unlink()
        shards.append(
            ShardInfo(name=shard, samples=int(len(rows)), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
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


def _train_tokenizer(units: list[list[Part]], cfg: DataConfig) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return byte_tokenizer()
    sample_stats = ReadStats()  # a range at a time: the sampler stops reading once it has enough
    sample = iter_chunks(sample_texts(units, cfg.text_field, sample_stats), cfg.tokenizer_train_bytes)
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

    units = plan_units(sources, cfg.unit_bytes, cfg.range_min_bytes)
    t_tok = time.time()
    tok = given if given is not None else _train_tokenizer(units, cfg)
    tokenizer_seconds = time.time() - t_tok if given is None else 0.0
    dtype = token_dtype(tok.vocab_size)
    splits: dict[str, SplitInfo] = {}
    with tempfile.TemporaryDirectory(prefix="genpt-prepare-") as tmpdir:
        spill = TokenSpill(tmpdir, dtype)
        parallel = total_bytes >= cfg.parallel_min_bytes and len(units) > 1
        tokenise_to_spill(units, tok, cfg, parallel, address, spill)
        spill.close()
        stats = spill.stats
        if stats.documents == 0:
            _refuse_empty(stats)
        rule = split_rule(cfg.split, stats.documents)
        if rule not in ("hash", cfg.split):
            log.info("%d documents: splitting by position, not hash (split: %s)", stats.documents, rule)
        streams = spill.write_splits(rule != "hash", cfg.val_fraction, cfg.seq_len, token_byte_lengths(tok))
        spill.path.unlink()  # the splits hold the tokens now
        documents = spill.documents_per_split()
        for split in SPLITS:
            stream = streams[split]
            if stream.num_samples(cfg.seq_len) == 0 and (split == "train" or cfg.val_fraction > 0):
                total = sum(streams[s].tokens for s in SPLITS)
                if rule == "hash":
                    hint = " (few documents: try --set data.split=tail)"
                else:
                    hint = f" ({total} tokens in all, under two {cfg.seq_len + 1}-token samples: lower data.seq_len)"
                raise UserError(f"the {split} split is empty{hint}")
            splits[split] = SplitInfo(
                shards=write_shards(stream, split, output, cfg, tok.pad_id, tmpdir, permute=split == "train"),
                samples=stream.num_samples(cfg.seq_len),
                documents=documents[split] if rule == "hash" else None,
                tokens=stream.tokens,
                targets=max(stream.tokens - 1, 0),
                bytes=stream.bytes,
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
    seconds = time.time() - t0
    return _summary(manifest, False, seconds, total_bytes / 1e6, tokenizer_seconds, max(len(spill.nodes), 1))


def _refuse_empty(stats: ReadStats) -> NoReturn:
    if stats.files and stats.binary_skipped == stats.files:
        raise UserError(f"only binary files in the input ({stats.files} skipped)")
    raise UserError(f"empty corpus: {stats.files} file(s) hold no text")


def _summary(
    manifest: Manifest, reused: bool, seconds: float, mb: float, tokenizer_seconds: float = 0.0, nodes: int = 0
) -> dict[str, Any]:
    """The command's JSON line; `tokenizer_seconds`: BPE training, part of `seconds`; `nodes`: the Ray
    nodes the tokenising tasks ran on (1 in the driver alone, 0 for a re-used dataset)."""
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
        "tokenizer_seconds": round(tokenizer_seconds, 2),
        "nodes": nodes,
    }
