"""`export`: a checkpoint (any ZeRO stage, any world size, local or s3://) -> one consolidated folder.

Two formats, both free of pickles:

* ``safetensors`` (ours): ``model.safetensors`` with our parameter names and ``nn.Linear`` layout,
  ``config.json`` (the ``GPTConfig`` and the special token ids), ``tokenizer.json``, ``meta.json``.
* ``hf``: a folder that ``transformers.GPT2LMHeadModel.from_pretrained`` and
  ``PreTrainedTokenizerFast.from_pretrained`` load with no custom code: ``config.json`` from
  ``hf_config_dict``, ``model.safetensors`` with HF names and ``Conv1D`` layout,
  ``generation_config.json`` (the recipe's sampling defaults), ``tokenizer.json``,
  ``tokenizer_config.json`` and ``special_tokens_map.json`` naming <bos>/<eos>/<pad>. Our
  ``meta.json`` rides along (``weights_layout: hf``) so ``load_model``, ``generate`` and ``evaluate``
  take the folder too.

The tied ``lm_head.weight`` is the same tensor as ``transformer.wte.weight``; safetensors refuses
shared storage, so it is left out and re-tied on load (GPT ties it in ``__init__``, HF by
``tie_word_embeddings``). Weights are written as float32, whatever precision the run trained in.

Every file goes through the storage seam; ``meta.json`` (format ``genpt-dist/export-v1``, with the
provenance: source checkpoint and run, step, data fingerprint, tokenizer hash, model and run config,
and the size of every file) is published last, so a half-written export is never taken for complete.
An existing output is refused unless ``overwrite``; then its ``meta.json`` goes first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from genpt_dist import storage
from genpt_dist.checkpoint import CHECKPOINTS_DIR, TOKENIZER, CheckpointRef, load_state_dict, load_tokenizer, resolve
from genpt_dist.errors import UserError
from genpt_dist.hf_compat import hf_config_dict, to_hf_state_dict
from genpt_dist.meta import META, CheckpointMeta, ExportMeta, ExportSource
from genpt_dist.model.gpt import GPTConfig
from genpt_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "hf")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HF_EXTRA = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json")
ALL_FILES = (WEIGHTS, CONFIG, TOKENIZER, *HF_EXTRA)  # what an export may hold besides meta.json
TIED = "lm_head.weight"


def source_run(checkpoint_url: str) -> str | None:
    """The run URL a checkpoint folder belongs to (`<run>/checkpoints/checkpoint_*`), if it does."""
    m = re.match(rf"(.+)/{CHECKPOINTS_DIR}/checkpoint_[^/]+$", checkpoint_url)
    return m.group(1) if m else None


@dataclasses.dataclass(frozen=True)
class ExportProvenance:
    """What an export's weights are and where they came from: the part of its `ExportMeta` that
    `write_export` does not fill in itself."""

    stage: str | None = None  # the stage that trained them
    step: int = 0
    tokens_seen: int | None = None
    data_url: str | None = None
    data_fingerprint: str | None = None
    config: dict[str, Any] | None = None  # the run's Config dump; its `sampling` -> generation_config.json
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    init: str | None = None
    source: ExportSource | None = None  # the checkpoint first exported
    exported_from: str | None = None  # a re-export: the export folder read


def export_meta(ref: CheckpointRef) -> ExportProvenance:
    """The provenance part of an export's meta.json: what the model is and where it came from."""
    m = ref.meta
    src = m.source if isinstance(m, ExportMeta) else None  # re-exporting keeps the original provenance
    if src is None:
        src = ExportSource(checkpoint=ref.url, run=source_run(ref.url), format=m.format, stage=m.stage)
        if isinstance(m, CheckpointMeta):
            src = dataclasses.replace(src, zero_stage=m.zero_stage, world_size=m.world_size, precision=m.precision)
    return ExportProvenance(
        stage=m.stage,
        step=m.step,
        tokens_seen=m.tokens_seen,
        data_url=m.data_url,
        data_fingerprint=m.data_fingerprint,
        config=m.config,
        metrics=dict(m.metrics),
        init=m.init,
        source=src,
        exported_from=ref.url if ref.is_export else None,
    )


def _hf_tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, dict[str, Any]]:
    # Ours are <bos>/<eos>/<pad>; an imported GPT-2 tokenizer's <|endoftext|> is all three.
    specials = {
        "bos_token": tok.token(tok.bos_id),
        "eos_token": tok.token(tok.eos_id),
        "pad_token": tok.token(tok.pad_id),
    }
    # The byte-level BPE covers every byte, so no unknown token exists; GPT-2 names <eos> as unk, we
    # leave it unset rather than alias a real token.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "padding_side": "left",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
        "added_tokens_decoder": {
            str(tok.hf.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in dict.fromkeys(specials.values())
        },
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def _generation_config(provenance: ExportProvenance, tok: Tokenizer) -> dict[str, Any]:
    sampling = (provenance.config or {}).get("sampling") or {}
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "do_sample": True}
    for ours, theirs in (
        ("max_new_tokens", "max_new_tokens"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("temperature", "temperature"),
    ):
        if sampling.get(ours) is not None:
            gen[theirs] = sampling[ours]
    return gen


def _check_output(output: str, ref: CheckpointRef, overwrite: bool) -> None:
    if output == ref.url or output.startswith(ref.url + "/"):
        raise UserError(f"--output {output} lies inside the checkpoint being exported")
    if not storage.is_s3(output) and Path(output).is_file():
        raise UserError(f"--output {output} is a file, not a folder")
    existing = storage.list_files(output)
    if not existing:
        return
    names = {f[len(output.rstrip("/")) + 1 :] for f in existing}
    interrupted = META not in names and names <= set(ALL_FILES)  # an export of ours that never finished
    if interrupted:
        log.info("--output %s holds an unfinished export (no %s); replacing it", output, META)
    elif not overwrite:
        raise UserError(f"--output {output} already exists ({len(existing)} files); pass --overwrite to replace it")
    storage.delete(storage.join(output, META))  # incomplete from here on, until the new meta.json lands
    for name in ALL_FILES:
        storage.delete(storage.join(output, name))


def write_export(
    output: str, fmt: str, state: dict[str, torch.Tensor], cfg: GPTConfig, tok: Tokenizer, provenance: ExportProvenance
) -> dict[str, int]:
    """Write an export of our-layout fp32 weights `state` to `output` (checked empty); meta.json last.

    `provenance` (see `export_meta`) goes into meta.json; returns {file name: bytes} of what was written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    state = {k: v.detach().to(torch.float32) for k, v in state.items()}
    if fmt == "hf":
        state = to_hf_state_dict(state)
    state.pop(TIED, None)  # shares storage with transformer.wte.weight; re-tied on load
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "hf":
        texts = {
            CONFIG: hf_config_dict(cfg, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id),
            "generation_config.json": _generation_config(provenance, tok),
            **_hf_tokenizer_files(tok, cfg.block_size),
        }
    else:
        texts = {
            CONFIG: {
                "architecture": "genpt-dist GPT",
                "weights_layout": "genpt",
                **dataclasses.asdict(cfg),
                "pad_token_id": tok.pad_id,
                "bos_token_id": tok.bos_id,
                "eos_token_id": tok.eos_id,
            }
        }

    files: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="genpt-export-") as tmp:
        local = Path(tmp) / WEIGHTS
        save_file(state, str(local), metadata={"format": "pt", "genpt_layout": "hf" if fmt == "hf" else "genpt"})
        storage.upload_file(local, storage.join(output, WEIGHTS))  # multipart on S3 when large
        files[WEIGHTS] = local.stat().st_size
    tok_bytes = (tok.with_bos_post_processor() if fmt == "hf" else tok.to_json()).encode("utf-8")
    storage.write_bytes(storage.join(output, TOKENIZER), tok_bytes)
    files[TOKENIZER] = len(tok_bytes)
    for name, obj in texts.items():
        data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
        storage.write_bytes(storage.join(output, name), data)
        files[name] = len(data)
    meta = ExportMeta(
        **{f.name: getattr(provenance, f.name) for f in dataclasses.fields(provenance)},
        model=cfg,
        tokenizer_sha256=tok.sha256,
        export_format=fmt,
        weights_layout="hf" if fmt == "hf" else "genpt",
        weights=WEIGHTS,
        dtype="float32",
        files=files,
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    storage.publish(output, META, meta.to_json().encode(), required=list(files))
    return files


def export(model: str, output: str, fmt: str = "safetensors", overwrite: bool = False) -> dict[str, Any]:
    """Run the whole `export` command; returns the JSON summary."""
    t0 = time.time()
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    ref = resolve(model)
    output = storage.normalize(output)
    storage.check_bucket(output)
    _check_output(output, ref, overwrite)
    tok = load_tokenizer(ref)
    state = load_state_dict(ref)
    files = write_export(output, fmt, state, ref.model_config, tok, export_meta(ref))
    n_params = sum(v.numel() for k, v in state.items() if k != TIED)
    log.info("exported %s (step %d, %d parameters) to %s as %s", ref.url, ref.step, n_params, output, fmt)
    return {
        "command": "export",
        "output": output,
        "format": fmt,
        "source": ref.url,
        "step": ref.step,
        "parameters": n_params,
        "bytes": sum(files.values()),
        "files": sorted([*files, META]),
        "seconds": round(time.time() - t0, 2),
    }
