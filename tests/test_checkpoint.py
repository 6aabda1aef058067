"""meta.json records: a v1 checkpoint written before `CheckpointMeta` still loads, generates and evaluates;
v2 records round-trip; an unknown format is a one-line error naming it.

tests/fixtures/v1/checkpoint was written by the v1 code (a 4-step, 1-layer, ZeRO-1 pretrain on one
worker) on tests/fixtures/v1/data; nothing here trains.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_user_error, cli

from genpt_dist.checkpoint import is_complete, load_model, resolve
from genpt_dist.errors import UserError
from genpt_dist.meta import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_V1,
    META,
    CheckpointMeta,
    ExportMeta,
    ExportSource,
    FinetuneState,
    RLState,
    parse_meta,
)
from genpt_dist.model.gpt import GPTConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"
V1_CHECKPOINT, V1_DATA = FIXTURES / "checkpoint", FIXTURES / "data"


def test_v1_checkpoint_reads_as_a_record():
    ref = resolve(str(V1_CHECKPOINT))
    meta = ref.meta
    assert isinstance(meta, CheckpointMeta) and not ref.is_export
    assert meta.format == CHECKPOINT_FORMAT_V1 and meta.stage == "pretrain" and ref.step == meta.step == 4
    assert (meta.world_size, meta.zero_stage) == (1, 1)
    assert ref.model_config == GPTConfig(**json.loads((V1_CHECKPOINT / META).read_text())["model"])
    assert meta.micro_batch_size == meta.config["train"]["micro_batch_size"] == 8  # v1: from the run config
    assert meta.data_url and meta.data_fingerprint and meta.rl is None and meta.finetune is None
    assert is_complete(ref.url, meta) and "tokenizer.json" in meta.files


def test_v1_checkpoint_loads_generates_and_evaluates():
    from genpt_dist.evaluate import evaluate
    from genpt_dist.generate import generate

    model, tok, ref = load_model(str(V1_CHECKPOINT))  # consolidated from its ZeRO-1 files
    assert model.config == ref.model_config and tok.sha256 == ref.meta.tokenizer_sha256
    out = io.StringIO()
    summary = generate(str(V1_CHECKPOINT), ["To be"], max_new_tokens=4, seed=0, device="cpu", out=out)
    assert summary["step"] == 4 and summary["samples"] == 1 and summary["new_tokens"] <= 4
    assert "To be" in out.getvalue()
    got = evaluate(str(V1_CHECKPOINT), str(V1_DATA), device="cpu")
    assert got["kind"] == "dataset" and got["tokens"] > 0 and got["loss"] > 0


def _with_format(tmp_path: Path, fmt: str) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(V1_CHECKPOINT, folder)
    raw = json.loads((folder / META).read_text())
    (folder / META).write_text(json.dumps({**raw, "format": fmt}))
    return folder


def test_unknown_format_is_a_one_line_error_naming_it(tmp_path):
    folder = _with_format(tmp_path, "genpt-dist/checkpoint-v9")
    with pytest.raises(UserError) as err:
        resolve(str(folder))
    msg = str(err.value)
    assert "genpt-dist/checkpoint-v9" in msg and str(folder) in msg and "\n" not in msg
    assert_user_error(cli("generate", "--model", str(folder), "--prompt", "x"), "genpt-dist/checkpoint-v9")


def test_a_record_missing_a_field_is_a_user_error(tmp_path):
    raw = json.loads((V1_CHECKPOINT / META).read_text())
    del raw["zero_stage"]
    with pytest.raises(UserError, match="not a valid genpt-dist/checkpoint-v1 record.*zero_stage"):
        parse_meta(raw, "s3://b/ckpt/meta.json")


def _v2() -> CheckpointMeta:
    return CheckpointMeta(
        stage="adversarial",
        step=12,
        tokens_seen=4096,
        world_size=2,
        zero_stage=3,
        precision="bf16",
        model=GPTConfig(vocab_size=259, block_size=64, n_layer=2, n_head=2, d_model=64),
        config={"train": {"micro_batch_size": 16}, "sampling": {"top_k": 20}},
        tokenizer_sha256="ab" * 32,
        data_url="s3://b/data",
        data_fingerprint="cd" * 32,
        init="s3://b/pretrain/checkpoints/checkpoint_1",
        loader={"epoch": 1, "batch": 3},
        metrics={"step": 12, "val_loss": 2.5},
        files={"ds/latest": 5},
        rl=RLState(
            baseline={"mean": 0.1, "count": 3},
            policy_version=12,
            disc_version=14,
            d_pretrained=4,
            discriminator={"n_layer": 2, "n_head": 4, "d_model": 128},
        ),
        finetune=FinetuneState(best_val=float("inf"), bad_evals=0, stopped=False, frozen=["transformer.wte.weight"]),
        saved_at="2026-12-02T00:00:00Z",
        micro_batch_size=8,
    )


def test_v2_record_round_trips():
    meta = _v2()
    raw = json.loads(meta.to_json())
    assert raw["format"] == CHECKPOINT_FORMAT and raw["data"] == {"url": "s3://b/data", "fingerprint": "cd" * 32}
    back = CheckpointMeta.from_json_dict(raw, "somewhere")
    assert back == meta and back.micro_batch_size == 8  # v2: its own field, not the config's 16
    bare = dataclasses.replace(meta, rl=None, finetune=None, micro_batch_size=None)
    assert CheckpointMeta.from_json_dict(json.loads(bare.to_json()), "x") == bare


def test_export_record_round_trips():
    meta = ExportMeta(
        model=_v2().model,
        tokenizer_sha256="ab" * 32,
        export_format="hf",
        weights_layout="hf",
        stage="finetune",
        step=40,
        data_url="s3://b/task.jsonl",
        metrics={"val_loss": 1.0},
        source=ExportSource(checkpoint="s3://b/ft/checkpoints/checkpoint_3", zero_stage=2),
        files={"model.safetensors": 100},
        exported_at="2026-12-02T00:00:00Z",
    )
    back = parse_meta(json.loads(meta.to_json()), "x")
    assert isinstance(back, ExportMeta) and back == meta
