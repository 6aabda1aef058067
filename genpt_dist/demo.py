"""`demo`: the pipeline on the embedded corpus (this interpreter's standard-library sources), local Ray.

Stages run in order under one run folder; each later stage is added here as it lands.
"""

from __future__ import annotations

import logging
import sysconfig
from itertools import islice
from pathlib import Path
from typing import Any

from genpt_dist import storage
from genpt_dist.config import load_config
from genpt_dist.data.loader import ShardLoader
from genpt_dist.data.manifest import load_manifest
from genpt_dist.data.prepare import prepare

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def embedded_corpus() -> list[str]:
    """The top-level `*.py` modules of the running interpreter's standard library."""
    return [str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")]


def run_demo(run: str, config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    cfg = load_config(config or DEMO_CONFIG, overrides)
    data_url = storage.join(storage.normalize(run), "data")
    summary = prepare(embedded_corpus(), data_url, cfg.data)
    log.info("prepared %d train / %d val samples at %s", summary["train_samples"], summary["val_samples"], data_url)

    manifest = load_manifest(data_url)
    tok = manifest.load_tokenizer()
    loader = ShardLoader(manifest, "train", batch_size=4, seed=cfg.loader.seed)
    batch = next(islice(iter(loader), 1))
    print(f"\nfirst training sample ({batch.shape[1]} tokens), decoded:\n{tok.decode(batch[0].tolist())[:400]}\n")
    return {"command": "demo", "run": storage.normalize(run), "data": data_url, "prepare": summary,
            "batch_shape": list(batch.shape)}
