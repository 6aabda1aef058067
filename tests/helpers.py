"""Helpers shared by test files: the one Ray Train run of the export/generate/evaluate tests, a random
export that needs no Ray, a Hugging Face reward model, and running the CLI as a user does.

`trained_run` (the fixture, in conftest.py) is session scoped and kept on disk under pytest's base temp
folder, so every file that asks for it reuses one 6-step ZeRO-3 run instead of training again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from genpt_dist.checkpoint import latest_checkpoint
from genpt_dist.config import Config, load_config
from genpt_dist.export import ExportProvenance, write_export
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.tokenizer import byte_tokenizer
from genpt_dist.train.engine import LocalReporter

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
RUN_OVERRIDES = [
    "deepspeed.zero_stage=3",
    "train.steps=6",
    "train.checkpoint_every=6",
    "train.eval_every=6",
    "train.log_every=3",
]


@dataclass(frozen=True)
class TrainedRun:
    data: str  # the prepared dataset (byte tokenizer, 64-token samples)
    run: str  # the run folder
    checkpoint: str  # its newest checkpoint folder (ZeRO-3, world size 2)


def get_trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> TrainedRun:
    """Prepare + a 6-step ZeRO-3 pretrain on 2 workers, once per pytest session (cached on disk)."""
    from genpt_dist.data.prepare import prepare
    from genpt_dist.train.pretrain import pretrain

    root = tmp_path_factory.getbasetemp() / "genpt-export-run"
    data, run = str(root / "data"), str(root / "run")
    ref = latest_checkpoint(run) if root.exists() else None
    if ref is None:
        prepare([str(tiny_corpus)], data, load_config(TINY).data)
        pretrain(data, run, load_config(TINY, RUN_OVERRIDES))
        ref = latest_checkpoint(run)
    assert ref is not None and ref.meta.zero_stage == 3 and ref.meta.world_size == 2
    return TrainedRun(data=data, run=run, checkpoint=ref.url)


def local_pretrain(data: str, run: str, cfg: Config) -> LocalReporter:
    """`pretrain` in this process on the Ray-free Engine (one rank, `LocalReporter` in Ray Train's place): the
    base checkpoint a test starts from, without a worker group's start-up (Ray Train's own runs are tested
    in tests/train/test_pretrain.py)."""
    from genpt_dist.train.collective import init_single_process_group
    from genpt_dist.train.pretrain import pretrain_job, pretrain_worker

    init_single_process_group()
    reporter = LocalReporter(run, keep=cfg.train.keep_checkpoints)
    pretrain_worker(pretrain_job(data, run, cfg), 0, 1, reporter)
    return reporter


def random_export(
    folder: Path, fmt: str = "safetensors", block_size: int = 64, seed: int = 0, activation: str = "gelu_new"
) -> str:
    """A freshly initialised tiny GPT (byte tokenizer) written as an export: no Ray needed."""
    torch.manual_seed(seed)
    tok = byte_tokenizer()
    cfg = GPTConfig(
        vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=32, activation=activation
    )
    model = GPT(cfg)
    with torch.no_grad():  # larger than the GPT-2 init, so outputs depend on the context
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    provenance = ExportProvenance(stage="test", config={"sampling": {"max_new_tokens": 8, "top_k": 20}})
    write_export(str(folder), fmt, model.state_dict(), cfg, tok, provenance)
    return str(folder)


def save_classifier(folder: Path, lm_head: bool = False) -> str:
    """A 1-layer GPT-2 sequence classifier (or LM) and a tokenizer made from our byte tokenizer (needs
    transformers: callers skip without it)."""
    import transformers

    tok = byte_tokenizer()
    path = folder / "tokenizer.json"
    path.write_text(tok.to_json())
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", eos_token="<eos>")
    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=tok.pad_id,
    )
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2ForSequenceClassification
    cls(config).save_pretrained(str(folder))
    hf_tok.save_pretrained(str(folder))
    return str(folder)


def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        input=stdin,
        env={**os.environ, **(env or {})},
    )


def assert_user_error(proc: subprocess.CompletedProcess, expect: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:") and expect in last, last
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# One fp32 worker, one layer, every step logged, eval and checkpoint every 2 steps: a run that exercises
# the engine's cadences in seconds.
ONE_WORKER = [
    "scaling.num_workers=1",
    "deepspeed.precision=fp32",
    "model.n_layer=1",
    "train.log_every=1",
    "train.eval_every=2",
    "train.checkpoint_every=2",
]
