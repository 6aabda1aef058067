"""`bench checkpoint`: checkpoint upload and restore through our storage path, against raw boto3, on a
moto S3 server the bench starts on 127.0.0.1.

The files are laid out as one ZeRO-2 bf16 checkpoint of 2 workers (`ds/state/` model states = 2 bytes a
parameter, each rank's optimizer shard = 12 bytes a parameter / 2, plus rng, tokenizer.json and meta.json),
of incompressible bytes: ~100 MB (quick: ~20 MB).

- upload, ours: what `ray.train.report(checkpoint=...)` does with it (`train.engine.Engine.save_and_report`):
  Ray Train's `persist_current_checkpoint` = `create_dir` + Ray's `pyarrow.fs.copy_files` helper onto the
  `pyarrow.fs.S3FileSystem` that `storage.pyarrow_filesystem` builds for `RunConfig`.
- upload, peer: `client.upload_file` per file (boto3's default transfer settings), one after another.
- restore, ours: `storage.download_dir` (what `Engine.restore` and `checkpoint.download` call).
- restore, peer: `client.download_file` per file (default settings), one after another.
Each is timed `repeats` times (best kept); restored bytes are checked against what was written.
Target: ours >= 0.5x raw boto3's MB/s, both ways.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from genpt_dist import storage

TARGET_RATIO = 0.5


def write_checkpoint_files(folder: Path, params: int, seed: int = 0) -> dict[str, int]:
    """A ZeRO-2 bf16 checkpoint's files for `params` parameters and 2 ranks; returns relative path -> bytes."""
    from genpt_dist.checkpoint import DS_DIR, DS_TAG, TOKENIZER
    from genpt_dist.meta import META

    rng = np.random.default_rng(seed)
    sizes = {
        f"{DS_DIR}/{DS_TAG}/mp_rank_00_model_states.pt": 2 * params,
        **{f"{DS_DIR}/{DS_TAG}/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 6 * params for r in (0, 1)},
        f"{DS_DIR}/latest": 5,
        **{f"rng/rank_{r}.pt": 1500 for r in (0, 1)},
        TOKENIZER: 300_000,
        META: 4000,
    }
    for rel, n in sizes.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(n))
    return sizes


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _ray_train_upload(local: Path, url: str) -> None:
    """Ray Train's checkpoint persist (v2 `StorageContext.persist_current_checkpoint`) onto our filesystem.

    Ray Train builds the filesystem once per run; here it is built per upload (a few ms)."""
    from pyarrow import fs as pafs
    from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

    s3, path = storage.pyarrow_filesystem(url)
    s3.create_dir(path)
    _pyarrow_fs_copy_files(
        source=str(local), destination=path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3
    )


def _boto3_upload(local: Path, url: str) -> None:
    bucket, prefix = storage.split_s3(url)
    client = storage.s3_client()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


def _boto3_download(url: str, local: Path) -> None:
    bucket, prefix = storage.split_s3(url)
    client = storage.s3_client()
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    ]
    for key in keys:
        dest = local / key[len(prefix) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(dest))


def _best_of(repeats: int, run: Callable[[int], None]) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_checkpoint(quick: bool = False) -> dict[str, Any]:
    """MB/s of checkpoint upload and restore: ours vs raw boto3, same files, same server."""
    from genpt_dist.bench.data import local_s3

    params, repeats = (1_400_000, 1) if quick else (7_000_000, 2)
    with local_s3() as bucket, tempfile.TemporaryDirectory(prefix="genpt-bench-ckpt-") as tmp:
        src = Path(tmp) / "ckpt"
        sizes = write_checkpoint_files(src, params)
        nbytes, files = sum(sizes.values()), len(sizes)
        want = _digests(src)
        dest = {who: f"{bucket}/{who}" for who in ("ours", "boto3")}
        warm = Path(tmp) / "warm"  # imports, S3 SDK start-up and connections: once per process, not timed
        (warm / "x").mkdir(parents=True)
        (warm / "x" / "f").write_bytes(b"warm")
        _ray_train_upload(warm, f"{bucket}/warm/ours")
        _boto3_upload(warm, f"{bucket}/warm/boto3")
        up = {
            "ours": _best_of(repeats, lambda i: _ray_train_upload(src, f"{dest['ours']}/{i}")),
            "boto3": _best_of(repeats, lambda i: _boto3_upload(src, f"{dest['boto3']}/{i}")),
        }
        restored: dict[str, Path] = {}

        def restore(who: str, fn: Callable[[str, Path], object]) -> Callable[[int], None]:
            def run(i: int) -> None:
                restored[who] = Path(tmp) / f"restore-{who}-{i}"
                fn(f"{dest[who]}/0", restored[who])

            return run

        down = {
            "ours": _best_of(repeats, restore("ours", storage.download_dir)),
            "boto3": _best_of(repeats, restore("boto3", _boto3_download)),
        }
        identical = {who: _digests(path) == want for who, path in restored.items()}
        restored_bytes = {
            who: sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) for who, path in restored.items()
        }
    mb = nbytes / 1e6
    rows = []
    for op, t in (("upload", up), ("restore", down)):
        rows.append(
            {
                "op": op,
                "files": files,
                "mb": round(mb, 1),
                "ours_s": round(t["ours"], 3),
                "boto3_s": round(t["boto3"], 3),
                "ours_mb_s": round(mb / t["ours"], 1),
                "boto3_mb_s": round(mb / t["boto3"], 1),
                "ratio": f"{t['boto3'] / t['ours']:.2f}x",
            }
        )
    ratios = {"upload": up["boto3"] / up["ours"], "restore": down["boto3"] / down["ours"]}
    return {
        "what": f"ZeRO-2 checkpoint files ({files}, {mb:.0f} MB) to/from moto S3 on 127.0.0.1, best of {repeats}; "
        "ours: Ray Train's pyarrow upload on storage.pyarrow_filesystem, storage.download_dir; "
        "peer: boto3 upload_file / download_file per file",
        "bytes": nbytes,
        "files": files,
        "rows": rows,
        "upload_s": {k: round(v, 4) for k, v in up.items()},
        "restore_s": {k: round(v, 4) for k, v in down.items()},
        "ratio_upload": round(ratios["upload"], 3),
        "ratio_restore": round(ratios["restore"], 3),
        "restored_bytes": restored_bytes,
        "restored_identical": identical,
        "target": {"ratio_min": TARGET_RATIO, "met": min(ratios.values()) >= TARGET_RATIO},
    }
