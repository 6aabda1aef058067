"""The meta.json records: what a checkpoint or an export folder says of itself.

`CheckpointMeta` (a training checkpoint, format `genpt-dist/checkpoint-v2`; `-v1`, written before
these records, is still read) and `ExportMeta` (an export folder, `genpt-dist/export-v1`) are the
only code that turns meta.json into Python and back: `to_json` writes one, `parse_meta` reads
either kind and refuses a format it does not know, or a malformed record, in one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from genpt_dist.errors import UserError
from genpt_dist.model.gpt import GPTConfig

CHECKPOINT_FORMAT = "genpt-dist/checkpoint-v2"
CHECKPOINT_FORMAT_V1 = "genpt-dist/checkpoint-v1"  # before CheckpointMeta: still read
EXPORT_FORMAT = "genpt-dist/export-v1"
META = "meta.json"


# On disk a checkpoint keeps v1's
# layout (the dataset as "data": {"url", "fingerprint"}); v2 adds "micro_batch_size" at the top level.


@dataclass(frozen=True)
class RLState:
    """The adversarial stage's counters."""

    baseline: dict[str, Any]  # rl.reinforce.BaselineState as a dict
    policy_version: int  # policy weight versions published to the rollout actors
    disc_version: int  # discriminator updates made
    d_pretrained: int  # discriminator warm-up steps done before the first policy step
    discriminator: dict[str, Any] | None  # model.discriminator.DiscriminatorConfig as a dict


@dataclass(frozen=True)
class FinetuneState:
    """The fine-tune stage's early-stopping bookkeeping."""

    best_val: float  # lowest val loss so far
    bad_evals: int  # evaluations since it last improved
    stopped: bool  # patience ran out: the stage is finished
    frozen: list[str]  # parameters held fixed (their exact values are in frozen.safetensors)


def _invalid(where: str, fmt: str, exc: Exception) -> UserError:
    reason = f"field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
    return UserError(f"{where}: {META} is not a valid {fmt} record ({type(exc).__name__}: {reason})")


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's meta.json: what was trained, how, on what, and where the stage stood."""

    stage: str  # pretrain | adversarial | finetune
    step: int  # optimizer steps done
    tokens_seen: int  # training tokens consumed, all ranks
    world_size: int  # workers that wrote it (a resume at another size re-partitions)
    zero_stage: int  # DeepSpeed ZeRO stage of ds/
    precision: str  # fp32 | bf16 | fp16, as resolved for the run
    model: GPTConfig  # the generator's shape
    config: dict[str, Any]  # the run's Config dump as written (old recipes need not validate today)
    tokenizer_sha256: str  # hash of tokenizer.json
    data_url: str | None  # the dataset (or task) the stage trained on
    data_fingerprint: str | None  # its manifest's sha256 (a task: None)
    init: str | None  # the checkpoint the stage started from
    loader: dict[str, Any]  # the train loader's position
    metrics: dict[str, Any]  # the latest logged metrics (step, train_loss, val_loss, ...)
    files: dict[str, int] = field(default_factory=dict)  # rel path -> size, every file of the folder
    rl: RLState | None = None  # adversarial stage only
    finetune: FinetuneState | None = None  # finetune stage only
    saved_at: str = ""  # UTC, ISO 8601
    micro_batch_size: int | None = None  # per-rank micro batch of the writing run (v1: from config.train)
    format: str = CHECKPOINT_FORMAT

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["data"] = {"url": raw.pop("data_url"), "fingerprint": raw.pop("data_fingerprint")}
        return json.dumps(raw, indent=2, sort_keys=True)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any], where: str) -> CheckpointMeta:
        fmt = raw.get("format")
        if fmt not in (CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_V1):
            raise UserError(
                f"{where}: unknown {META} format {fmt!r} (this version reads {CHECKPOINT_FORMAT}, "
                f"{CHECKPOINT_FORMAT_V1} and {EXPORT_FORMAT})"
            )
        try:
            data = raw.get("data") or {}
            config = dict(raw.get("config") or {})
            micro = (
                raw.get("micro_batch_size")
                if fmt == CHECKPOINT_FORMAT
                else ((config.get("train") or {}).get("micro_batch_size"))
            )
            return cls(
                stage=str(raw["stage"]),
                step=int(raw["step"]),
                tokens_seen=int(raw["tokens_seen"]),
                world_size=int(raw["world_size"]),
                zero_stage=int(raw["zero_stage"]),
                precision=str(raw["precision"]),
                model=GPTConfig(**raw["model"]),
                config=config,
                tokenizer_sha256=str(raw["tokenizer_sha256"]),
                data_url=data.get("url"),
                data_fingerprint=data.get("fingerprint"),
                init=raw.get("init"),
                loader=dict(raw.get("loader") or {}),
                metrics=dict(raw.get("metrics") or {}),
                files={k: int(v) for k, v in (raw.get("files") or {}).items()},
                rl=RLState(**raw["rl"]) if raw.get("rl") else None,
                finetune=FinetuneState(**raw["finetune"]) if raw.get("finetune") else None,
                saved_at=str(raw.get("saved_at") or ""),
                micro_batch_size=None if micro is None else int(micro),
                format=fmt,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _invalid(where, fmt, exc) from None


@dataclass(frozen=True)
class ExportSource:
    """The checkpoint an export was first made from (re-exports keep it)."""

    checkpoint: str  # its folder URL
    run: str | None = None  # the run URL it belongs to, if it lies in one
    format: str | None = None  # its meta.json format
    stage: str | None = None
    zero_stage: int | None = None
    world_size: int | None = None
    precision: str | None = None


@dataclass(frozen=True)
class ExportMeta:
    """An export folder's meta.json (built and published last by `export.write_export`)."""

    model: GPTConfig
    tokenizer_sha256: str  # hash of tokenizer.json
    export_format: str  # safetensors | hf
    weights_layout: str  # genpt (our names, nn.Linear) | hf (HF names, Conv1D)
    stage: str | None = None  # the stage that trained the weights
    step: int = 0
    tokens_seen: int | None = None
    data_url: str | None = None  # the training data of the source checkpoint
    data_fingerprint: str | None = None
    config: dict[str, Any] | None = None  # the source run's Config dump (its `sampling` = generate's defaults)
    metrics: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # the checkpoint the source stage started from
    source: ExportSource | None = None  # None: weights made without a checkpoint (tests, benches)
    weights: str = "model.safetensors"  # the weights file, relative to the folder
    dtype: str = "float32"
    files: dict[str, int] = field(default_factory=dict)  # file name -> size, every file but meta.json
    exported_from: str | None = None  # a re-export: the export folder it was read from
    exported_at: str = ""  # UTC, ISO 8601
    format: str = EXPORT_FORMAT

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["data"] = {"url": raw.pop("data_url"), "fingerprint": raw.pop("data_fingerprint")}
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any], where: str) -> ExportMeta:
        fmt = raw.get("format")
        if fmt != EXPORT_FORMAT:
            raise UserError(
                f"{where}: unknown {META} format {fmt!r} for an export (this version reads {EXPORT_FORMAT})"
            )
        try:
            data = raw.get("data") or {}
            tokens = raw.get("tokens_seen")
            return cls(
                stage=raw.get("stage"),
                step=int(raw.get("step") or 0),
                tokens_seen=None if tokens is None else int(tokens),
                model=GPTConfig(**raw["model"]),
                tokenizer_sha256=str(raw["tokenizer_sha256"]),
                data_url=data.get("url"),
                data_fingerprint=data.get("fingerprint"),
                config=raw.get("config"),
                metrics=dict(raw.get("metrics") or {}),
                init=raw.get("init"),
                source=ExportSource(**raw["source"]) if raw.get("source") else None,
                export_format=str(raw["export_format"]),
                weights_layout=str(raw["weights_layout"]),
                weights=str(raw.get("weights") or "model.safetensors"),
                dtype=str(raw.get("dtype") or "float32"),
                files={k: int(v) for k, v in (raw.get("files") or {}).items()},
                exported_from=raw.get("exported_from"),
                exported_at=str(raw.get("exported_at") or ""),
                format=fmt,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _invalid(where, fmt, exc) from None


def parse_meta(raw: Any, where: str) -> CheckpointMeta | ExportMeta:
    """A meta.json's parsed JSON -> its record; an unknown format or a malformed record is a UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {META} is not a JSON object")
    if raw.get("format") == EXPORT_FORMAT:
        return ExportMeta.from_json_dict(raw, where)
    return CheckpointMeta.from_json_dict(raw, where)
