"""`bench prepare`: the `prepare` command at scale, against the tokenizer's own floor, in one run.

Corpus: generated, seeded, from tinyshakespeare's lines drawn at random: CORPUS_MB (1 GB; quick: 8 MB)
as files of FILE_MB each, the same text as one single file (one document, read in byte ranges), and
a tenth of it as files (the memory baseline).

- Ours: the whole command (`launch.py prepare --config demo`: a 4096-token BPE, hash split, shards in a
  local folder) in a subprocess with a fresh Ray; MB/s of raw text with the BPE training excluded
  (`seconds - tokenizer_seconds`, the training reported apart), and the peak memory of its process
  tree (the driver, Ray's own processes and its workers, summed; sampled every 0.2 s) two ways: RSS,
  where a shared page (the object store, the libraries) counts once per process that maps it, and PSS,
  where it is divided among them, so the tree's PSS is the memory it takes from the machine.
- Floor: Hugging Face `tokenizers`' `encode_batch` (its own thread pool, all cores) over the same text
  alone, with the tokenizer ours trained: the files read a unit (`data.unit_bytes`) at a time, cut into the
  pieces ours encodes, only the `encode_batch` calls timed.
Targets: ours >= 0.7x the floor on both corpus shapes; peak memory (PSS) of the full corpus within 1.5x
of the tenth's (memory does not grow with the corpus); the RSS ratio is reported beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from genpt_dist.bench.data import corpus_path

CORPUS_MB = 1024
QUICK_CORPUS_MB = 8
FILE_MB = 4
BASELINE_FRACTION = 10  # the memory baseline is this fraction of the corpus
LAUNCH = Path(__file__).resolve().parents[2] / "launch.py"


def generate_corpus(folder: Path, total_mb: float, file_mb: float, seed: int = 0) -> list[Path]:
    """`total_mb` of tinyshakespeare lines drawn at random, as files of `file_mb` each."""
    lines = np.array(corpus_path().read_text().split("\n"), dtype=object)
    mean = sum(len(line) + 1 for line in lines) / len(lines)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(max(1, round(total_mb / file_mb))):
        path = folder / f"doc-{i:05d}.txt"
        path.write_text("\n".join(lines[rng.integers(0, len(lines), int(file_mb * 1e6 / mean))]) + "\n")
        files.append(path)
    return files


def concatenate(files: list[Path], path: Path) -> Path:
    with open(path, "wb") as out:
        for f in files:
            out.write(f.read_bytes())
    return path


def _tree_memory(proc: Any) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over `proc` and its descendants."""
    import psutil

    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:  # gone between the listing and the read
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return rss, pss


def run_prepare(inputs: list[Path], output: Path) -> dict[str, Any]:
    """Our `prepare` in a subprocess: its JSON summary plus the peak RSS and PSS of its process tree."""
    import psutil

    cmd = [sys.executable, str(LAUNCH), "prepare", "--input", *map(str, inputs), "--output", str(output)]
    cmd += ["--config", "demo", "--address", "local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    watched = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        while not done.is_set():
            rss, pss = _tree_memory(watched)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {**summary, "peak_rss_mb": round(peak_rss / 2**20), "peak_pss_mb": round(peak_pss / 2**20)}


def encode_floor(files: list[Path], tokenizer_json: Path) -> float:
    """Seconds Hugging Face `encode_batch` alone takes over the files' text (in our pieces, a unit at a time)."""
    from tokenizers import Tokenizer as HFTokenizer

    from genpt_dist.config import DataConfig
    from genpt_dist.tokenizer import _split_for_encoding

    tok = HFTokenizer.from_file(str(tokenizer_json))
    seconds, batch, size = 0.0, [], 0
    for i, f in enumerate(files):
        text = f.read_text()
        batch += _split_for_encoding(text)
        size += len(text)
        if size >= DataConfig().unit_bytes or i == len(files) - 1:
            t0 = time.perf_counter()
            tok.encode_batch(batch, add_special_tokens=False)
            seconds += time.perf_counter() - t0
            batch, size = [], 0
    return seconds


def _row(name: str, mb: float, ours: dict[str, Any], floor_s: float | None) -> dict[str, Any]:
    tokenise_s = ours["seconds"] - ours["tokenizer_seconds"]
    return {
        "corpus": name,
        "mb": round(mb, 1),
        "ours_s": ours["seconds"],
        "bpe_training_s": ours["tokenizer_seconds"],
        "ours_mb_s": round(mb / tokenise_s, 2),
        "floor_mb_s": round(mb / floor_s, 2) if floor_s else None,
        "vs_floor": round(floor_s / tokenise_s, 3) if floor_s else None,
        "peak_rss_mb": ours["peak_rss_mb"],
        "peak_pss_mb": ours["peak_pss_mb"],
        "tokens": ours["train_tokens"] + ours["val_tokens"],
    }


def _full_vs_tenth(rows: list[dict[str, Any]], key: str) -> float:
    """The larger of the two full-corpus peaks over the tenth's."""
    return round(max(rows[1][key], rows[2][key]) / rows[0][key], 2)


def bench_prepare(quick: bool = False) -> dict[str, Any]:
    total_mb = QUICK_CORPUS_MB if quick else CORPUS_MB
    file_mb = 0.5 if quick else FILE_MB
    rows = []
    with tempfile.TemporaryDirectory(prefix="genpt-bench-prepare-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        files = generate_corpus(root / "many", total_mb, file_mb)
        single = concatenate(files, root / "one.txt")
        tenth = generate_corpus(root / "tenth", total_mb / BASELINE_FRACTION, file_mb, seed=1)
        generate_s = time.perf_counter() - t0
        mb, tenth_mb = (sum(f.stat().st_size for f in group) / 1e6 for group in (files, tenth))

        small = run_prepare([root / "tenth"], root / "out-tenth")
        rows.append(_row(f"{total_mb / BASELINE_FRACTION:g} MB, {len(tenth)} files", tenth_mb, small, None))
        many = run_prepare([root / "many"], root / "out-many")
        floor_s = encode_floor(files, root / "out-many" / "tokenizer.json")
        rows.append(_row(f"{total_mb} MB, {len(files)} files", mb, many, floor_s))
        one = run_prepare([single], root / "out-one")
        rows.append(_row(f"{total_mb} MB, one file", mb, one, floor_s))
    return {
        "what": "prepare (BPE 4096, hash split, local folder) MB/s without BPE training vs HF encode_batch alone",
        "rows": rows,
        "generate_s": round(generate_s, 1),
        "vs_floor_files": rows[1]["vs_floor"],
        "vs_floor_one_file": rows[2]["vs_floor"],
        "ours_mb_s_files": rows[1]["ours_mb_s"],
        "floor_mb_s": rows[1]["floor_mb_s"],
        "pss_full_vs_tenth": _full_vs_tenth(rows, "peak_pss_mb"),
        "rss_full_vs_tenth": _full_vs_tenth(rows, "peak_rss_mb"),
        "bpe_training_s": rows[1]["bpe_training_s"],
    }
