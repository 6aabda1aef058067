"""Checkpoints: where they live, which one is the latest valid one, and how to read weights back.

A checkpoint is a folder (in a run's storage, local or s3://) that explains itself:
    meta.json          a `CheckpointMeta`: format, stage, step, tokens seen, world size, ZeRO stage,
                       precision, micro batch, model config, run config, tokenizer hash, dataset, loader
                       state, metrics, the RL / fine-tune counters, and the size of every file below
                       (written last, by rank 0, after all ranks' files are listed)
    tokenizer.json     the tokenizer the model was trained with
    ds/state/...       DeepSpeed's checkpoint: module states and each rank's ZeRO optimizer shard
    rng/rank_<r>.pt    each rank's RNG states
An export folder (see `export`) holds model.safetensors + config.json + tokenizer.json + meta.json
(an `ExportMeta`). Only `genpt_dist.meta` turns meta.json into records and back; a format it does
not know (`genpt-dist/checkpoint-v2`, `-v1` and `genpt-dist/export-v1` are read) is a `UserError`
naming it.

`resolve` takes a run URL (its newest complete checkpoint), a checkpoint folder or an export folder.
A checkpoint whose files are missing or have the wrong size is skipped with a warning, so a truncated
newest checkpoint falls back to the previous valid one; a stage removes the ones Ray Train never
reported (an upload cut short) before it starts (`remove_incomplete`). DeepSpeed's optimizer files
are pickles: load only checkpoints you wrote (weights are read with `weights_only=True` where torch
allows it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genpt_dist import storage
from genpt_dist.errors import UserError
from genpt_dist.meta import META, CheckpointMeta, ExportMeta, parse_meta
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TOKENIZER = "tokenizer.json"
CHECKPOINTS_DIR = "checkpoints"  # Ray Train's run name under the stage's run URL
DS_DIR = "ds"
DS_TAG = "state"
FROZEN = "frozen.safetensors"


@dataclass(frozen=True)
class CheckpointRef:
    url: str  # the checkpoint (or export) folder
    meta: CheckpointMeta | ExportMeta  # its meta.json

    @property
    def is_export(self) -> bool:
        return isinstance(self.meta, ExportMeta)

    @property
    def step(self) -> int:
        return self.meta.step

    @property
    def model_config(self) -> GPTConfig:
        return self.meta.model


def read_meta(folder: str) -> CheckpointMeta | ExportMeta | None:
    """The folder's meta.json record; None when it has none, or one that is not JSON."""
    url = storage.join(folder, META)
    try:
        raw = storage.read_json(url)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # NotADirectory: `folder` is a file
        return None
    return parse_meta(raw, url)


def is_complete(folder: str, meta: CheckpointMeta | ExportMeta) -> bool:
    """Every file meta.json lists is there with its recorded size."""
    for rel, size in meta.files.items():
        try:
            if storage.size(storage.join(folder, rel)) != size:
                return False
        except FileNotFoundError:
            return False
    return True


def _checkpoint_folders(run_url: str) -> tuple[str, list[str], list[str]]:
    """A stage's checkpoints root, every file under it, and its `checkpoint_*` folders (sorted)."""
    root = storage.join(storage.normalize(run_url), CHECKPOINTS_DIR)
    files = storage.list_files(root)
    folders = sorted({m.group(1) for f in files if (m := re.match(rf"({re.escape(root)}/checkpoint_[^/]+)/", f))})
    return root, files, folders


def list_checkpoints(run_url: str) -> list[CheckpointRef]:
    """Complete checkpoints under a stage's run URL, oldest first (incomplete ones warned about)."""
    _, files, folders = _checkpoint_folders(run_url)
    refs = []
    for folder in folders:
        meta = read_meta(folder) if storage.join(folder, META) in files else None
        if not isinstance(meta, CheckpointMeta):
            continue
        if not is_complete(folder, meta):
            log.warning("checkpoint %s is incomplete or corrupt; skipping it", folder)
            continue
        refs.append(CheckpointRef(folder, meta))
    return sorted(refs, key=lambda r: (r.step, r.url))


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it reported


def remove_incomplete(run_url: str) -> list[str]:
    """Delete the checkpoint folders of a stage's run that no command will ever load; returns them.

    A worker killed while its checkpoint was uploading leaves a folder without meta.json, or with files
    missing; Ray Train never hears of it, so its rotation (`keep_checkpoints`) never removes it and every
    later listing warns about it. Call this before the stage's workers start, when nothing of the run is
    uploading. Folders Ray Train reported stay: they are its to rotate."""
    root, files, folders = _checkpoint_folders(run_url)
    snapshot = storage.join(root, RAY_TRAIN_SNAPSHOT)
    reported = (
        {c["checkpoint_dir_name"] for c in storage.read_json(snapshot).get("checkpoint_results", [])}
        if snapshot in files
        else set()
    )
    removed = []
    for folder in folders:
        if storage.name(folder) in reported:
            continue
        meta = read_meta(folder) if storage.join(folder, META) in files else None
        if meta is None or not is_complete(folder, meta):
            log.warning("removing %s: an interrupted upload left it incomplete", folder)
            storage.delete_prefix(folder)
            removed.append(folder)
    return removed


def latest_checkpoint(run_url: str) -> CheckpointRef | None:
    refs = list_checkpoints(run_url)
    return refs[-1] if refs else None


def resolve(url: str) -> CheckpointRef:
    """A run URL, a checkpoint folder, an export folder or a Hugging Face GPT-2 folder -> the checkpoint to load."""
    url = storage.normalize(url)
    meta = read_meta(url)
    if meta is not None:
        if not is_complete(url, meta):
            raise UserError(f"checkpoint {url} is incomplete: files listed in {META} are missing or truncated")
        return CheckpointRef(url, meta)
    if storage.exists(storage.join(url, HF_CONFIG)):
        return hf_folder_ref(url)
    ref = latest_checkpoint(url)
    if ref is None:
        raise UserError(f"no checkpoint at {url}: not a run with a complete checkpoint, a checkpoint or an export")
    return ref


HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in the order transformers prefers them
HF_IMPORT = "transformers"  # ExportMeta.export_format of a folder transformers wrote (it has no meta.json)


def hf_tokenizer(url: str) -> Tokenizer:
    """A Hugging Face folder's tokenizer: `tokenizer.json`, or `vocab.json` + `merges.txt` (GPT-2's files)."""
    try:
        if storage.exists(storage.join(url, TOKENIZER)):
            return Tokenizer.load(storage.join(url, TOKENIZER))
        if storage.exists(storage.join(url, "vocab.json")) and storage.exists(storage.join(url, "merges.txt")):
            vocab, merges = (storage.read_text(storage.join(url, f)) for f in ("vocab.json", "merges.txt"))
            return Tokenizer.from_gpt2_files(vocab, merges)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file; json a ValueError
        raise UserError(f"{url}: cannot read its tokenizer: {exc}".splitlines()[0]) from None
    raise UserError(f"{url}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")


def _safetensors_metadata(url: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, from its header alone (8-byte length, then JSON)."""
    try:
        (length,) = struct.unpack("<Q", storage.read_bytes(url, 0, 8))
        header = json.loads(storage.read_bytes(url, 8, 8 + length))
    except (struct.error, ValueError) as exc:
        raise UserError(f"{url}: not a safetensors file ({exc})") from None
    return header.get("__metadata__") or {}


def hf_folder_ref(url: str) -> CheckpointRef:
    """A folder written by transformers' `save_pretrained` (a GPT-2 and its tokenizer) as a read-only export:
    the model config mapped (`hf_compat.gpt_config_from_hf`), the weights file found, the tokenizer checked
    against the embedding."""
    from genpt_dist.hf_compat import gpt_config_from_hf

    try:
        config = storage.read_json(storage.join(url, HF_CONFIG))
    except ValueError:
        raise UserError(f"{url}: {HF_CONFIG} is not valid JSON") from None
    weights = next((w for w in HF_WEIGHTS if storage.exists(storage.join(url, w))), None)
    ours = weights == HF_WEIGHTS[0] and "genpt_layout" in _safetensors_metadata(storage.join(url, HF_WEIGHTS[0]))
    if ours:  # weights our export wrote, in a folder its last write (meta.json) never reached
        raise UserError(f"no checkpoint at {url}: an export of ours without its {META} (cut short)")
    model = gpt_config_from_hf(config, url)
    if weights is None:
        raise UserError(f"{url}: no weights file ({' or '.join(HF_WEIGHTS)})")
    tok = hf_tokenizer(url)
    if tok.vocab_size > model.vocab_size:
        raise UserError(
            f"{url}: the tokenizer has {tok.vocab_size} tokens, the model's embedding only {model.vocab_size}"
        )
    meta = ExportMeta(
        model=model,
        tokenizer_sha256=tok.sha256,
        export_format=HF_IMPORT,
        weights_layout="hf",
        weights=weights,
        exported_from=url,
    )
    return CheckpointRef(url, meta)


def load_tokenizer(ref: CheckpointRef) -> Tokenizer:
    if isinstance(ref.meta, ExportMeta) and ref.meta.export_format == HF_IMPORT:
        return hf_tokenizer(ref.url)
    tok = Tokenizer.load(storage.join(ref.url, TOKENIZER))
    if tok.sha256 != ref.meta.tokenizer_sha256:
        raise UserError(f"{ref.url}: tokenizer.json does not match the hash in {META}")
    if tok.vocab_size > ref.model_config.vocab_size:
        raise UserError(f"{ref.url}: tokenizer has {tok.vocab_size} tokens, model only {ref.model_config.vocab_size}")
    return tok


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng/rank_)(\d+)(?:_|\.pt$)")  # one rank's partition or RNG state


def download(ref: CheckpointRef, local_dir: str | Path, only_rank: int | None = None) -> Path:
    """Copy a checkpoint folder into `local_dir`. With `only_rank`, other ranks' ZeRO partitions and RNG
    states are left out: a resume at the world size the checkpoint was written with reads only its own."""
    root = ref.url.rstrip("/") + "/"
    for file_url in storage.list_files(ref.url):
        rel = file_url[len(root) :]
        other = _RANK_FILE.search(rel)
        if only_rank is not None and other and int(other.group(1)) != only_rank:
            continue
        storage.download_file(file_url, Path(local_dir) / rel)
    return Path(local_dir)


def _stage0_fp32(states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights of a ZeRO-0 checkpoint: the optimizer's fp32 master copies where it kept them.

    With bf16, ZeRO-0 saves the bf16 module and, in the optimizer state, ``fp32_groups``: per param
    group, the fp32 masters in parameter order. Each module tensor takes the head of the group whose
    master has its shape and rounds to exactly its value; tied aliases and frozen parameters keep the
    module's tensor. Anything that does not line up falls back to the module's (bf16) weights."""
    module = states["module"]
    groups = [list(g) for g in ((states.get("optimizer") or {}).get("fp32_groups") or [])]
    if not groups or all(v.dtype == torch.float32 for v in module.values()):
        return {k: v.float() for k, v in module.items()}
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in module.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:  # lm_head.weight is transformer.wte.weight
            out[name] = out[seen[ptr]]
            continue
        seen[ptr] = name
        for group in groups:
            head = group[0] if group else None
            if head is not None and head.shape == tensor.shape and torch.equal(head.to(tensor.dtype), tensor):
                out[name] = group.pop(0).float()
                break
        else:
            out[name] = tensor.float()
    if any(groups):
        log.warning(
            "ZeRO-0 checkpoint: fp32 master weights do not line up with the module; using its %s weights",
            next(iter(module.values())).dtype,
        )
        return {k: v.float() for k, v in module.items()}
    return out


def consolidate_local(folder: str | Path, zero_stage: int, engine_dir: str = DS_DIR) -> dict[str, torch.Tensor]:
    """fp32 weights from a local DeepSpeed checkpoint of any ZeRO stage and world size; `engine_dir` is the
    engine's folder in it (the policy's by default; the RL stage's discriminator has its own)."""
    ds_dir = Path(folder) / engine_dir
    if zero_stage == 0:
        states = torch.load(ds_dir / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return _stage0_fp32(states)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "Setting accelerator to CPU" warning
    # DeepSpeed prints its progress (and binds its logger, on first import) to stdout, which belongs
    # to the command's output (generate's text, the final JSON line): send it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
    return {k: v.float() for k, v in state.items()}


def load_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint (consolidated from its ZeRO shards) or of an export."""
    meta = ref.meta
    if isinstance(meta, ExportMeta):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        weights = storage.join(ref.url, meta.weights)
        if weights.endswith(".bin"):  # a torch pickle: tensors only, no code runs
            try:
                state = torch.load(io.BytesIO(storage.read_bytes(weights)), map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
                raise UserError(f"{weights}: refused by torch.load(weights_only=True): {exc}".splitlines()[0]) from None
        else:
            try:
                state = load_safetensors(storage.read_bytes(weights))
            except SafetensorError as exc:
                raise UserError(f"cannot read {weights}: {exc}".splitlines()[0]) from None
        if meta.weights_layout == "hf":  # an `export --format hf` folder: HF names and Conv1D layout
            from genpt_dist.hf_compat import from_hf_state_dict

            state = from_hf_state_dict(state)
        return state
    with tempfile.TemporaryDirectory(prefix="genpt-ckpt-") as tmp:
        storage.download_dir(storage.join(ref.url, DS_DIR), Path(tmp) / DS_DIR)
        try:
            state = consolidate_local(tmp, meta.zero_stage)
        except (FileNotFoundError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise UserError(f"cannot consolidate {ref.url}: {exc}".splitlines()[0]) from None
    frozen = storage.join(ref.url, FROZEN)
    if storage.exists(frozen):  # parameters a fine-tune held fixed, exactly (the engine may hold bf16 copies)
        from safetensors.torch import load as load_safetensors

        state.update(load_safetensors(storage.read_bytes(frozen)))
    return state


def load_model(url: str, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, CheckpointRef]:
    """A ready-to-use model (eval mode, fp32) and its tokenizer from any checkpoint or export URL."""
    ref = resolve(url)
    tok = load_tokenizer(ref)
    model = GPT(ref.model_config)
    state = load_state_dict(ref)
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight"]
    if real_missing or unexpected:
        raise UserError(
            f"{ref.url}: weights do not match the model config (missing {real_missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return model.to(device).eval(), tok, ref


def check_init_matches(init: str, tokenizer_sha256: str, data_url: str) -> None:
    """`--init` must be a generator checkpoint (or export) trained with the data's tokenizer."""
    ref = resolve(init)
    tok = load_tokenizer(ref)
    if tok.sha256 != tokenizer_sha256:
        raise UserError(f"--init {ref.url} was trained with a different tokenizer than the data at {data_url}")
