"""`export`: a ZeRO-3 checkpoint written by 2 Ray Train workers -> safetensors and a Hugging Face folder.

Uses the session's one Ray Train run (`trained_run`, tests/helpers.py, shared with generate/evaluate).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_user_error, cli, random_export

from genpt_dist import storage
from genpt_dist.checkpoint import latest_checkpoint, load_model, load_state_dict, resolve
from genpt_dist.config import load_config
from genpt_dist.errors import UserError
from genpt_dist.export import export
from genpt_dist.meta import EXPORT_FORMAT
from genpt_dist.tokenizer import byte_tokenizer

# ------------------------------------------------------------------------------ without Ray


def test_export_roundtrip_both_formats(tmp_path):
    src = random_export(tmp_path / "src")
    ref = resolve(src)
    assert ref.is_export and ref.meta.weights_layout == "genpt"
    want = load_state_dict(ref)
    assert "lm_head.weight" not in want  # tied: left out of the file
    for fmt in ("safetensors", "hf"):
        out = export(src, str(tmp_path / fmt), fmt=fmt)
        assert out["format"] == fmt and out["source"] == src
        model, _, eref = load_model(out["output"])
        assert eref.meta.export_format == fmt and eref.meta.exported_from == src
        for name, tensor in want.items():
            assert torch.equal(model.state_dict()[name], tensor), name
        assert model.lm_head.weight is model.transformer.wte.weight
    back = export(str(tmp_path / "hf"), str(tmp_path / "back"))  # hf layout -> ours again
    assert resolve(back["output"]).meta.source.checkpoint == src  # provenance survives re-exports
    assert all(torch.equal(a, want[k]) for k, a in load_state_dict(resolve(back["output"])).items())


def test_export_refuses_existing_output_unless_overwrite(tmp_path):
    src = random_export(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export(src, str(out))
    export(src, str(out), fmt="hf", overwrite=True)
    export(src, str(out), fmt="safetensors", overwrite=True)  # hf-only files of the last export go
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "meta.json", "model.safetensors", "notes.txt", "tokenizer.json"]


def test_export_s3_to_s3(tmp_path, bucket):
    src = random_export(tmp_path / "src")
    storage.upload_dir(src, f"{bucket}/models/src")
    for fmt in ("safetensors", "hf"):
        out = export(f"{bucket}/models/src", f"{bucket}/exports/{fmt}", fmt=fmt)
        assert out["output"] == f"{bucket}/exports/{fmt}"
        got, _, ref = load_model(out["output"])
        assert ref.meta.format == EXPORT_FORMAT and set(ref.meta.files) <= set(
            storage.name(u) for u in storage.list_files(out["output"])
        )
        ref_model, _, _ = load_model(src)
        for (name, a), b in zip(got.state_dict().items(), ref_model.state_dict().values()):
            assert torch.equal(a, b), name


def test_half_written_export_is_not_taken(tmp_path):
    random_export(tmp_path / "src")
    storage.delete(str(tmp_path / "src" / "meta.json"))  # as if the export died before its last write
    with pytest.raises(UserError, match="no checkpoint"):
        resolve(str(tmp_path / "src"))


# ------------------------------------------------------------------------------ from a ZeRO-3 run


@pytest.mark.slow
def test_export_zero3_checkpoint_both_formats(trained_run, tmp_path):
    ckpt_model, _, ckpt_ref = load_model(trained_run.run)  # consolidated from both ranks' ZeRO-3 shards
    assert ckpt_ref.url == trained_run.checkpoint
    for fmt in ("safetensors", "hf"):
        out = tmp_path / fmt
        proc = cli("export", "--model", trained_run.run, "--output", str(out), "--format", fmt)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["command"] == "export" and summary["source"] == trained_run.checkpoint and summary["step"] == 6
        names = {p.name for p in out.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "meta.json"} <= names
        assert not any(n.endswith((".pt", ".bin", ".pkl", ".pickle")) for n in names)  # no pickle
        meta = resolve(str(out)).meta
        assert meta.format == EXPORT_FORMAT and meta.export_format == fmt and meta.step == 6
        assert meta.source.checkpoint == trained_run.checkpoint and meta.source.run == trained_run.run
        assert meta.source.zero_stage == 3 and meta.source.world_size == 2
        assert meta.data_fingerprint == ckpt_ref.meta.data_fingerprint is not None
        assert meta.tokenizer_sha256 == ckpt_ref.meta.tokenizer_sha256
        assert meta.model == ckpt_ref.meta.model
        assert set(meta.files) == names - {"meta.json"}
        model, tok, ref = load_model(str(out))
        assert ref.is_export and tok.sha256 == meta.tokenizer_sha256
        for (name, a), b in zip(model.state_dict().items(), ckpt_model.state_dict().values()):
            assert torch.equal(a, b), name


HF_CHECK = textwrap.dedent("""
    import json, sys, torch, transformers
    folder, ids = sys.argv[1], json.loads(sys.argv[2])
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    print(json.dumps({"logits": logits.tolist(), "bos": tok.bos_token_id, "eos": tok.eos_token_id,
                      "pad": tok.pad_token_id, "ids": tok("First Citizen:").input_ids,
                      "tied": model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()}))
""")


@pytest.mark.slow
def test_hf_folder_loads_in_transformers_with_equal_logits(trained_run, tmp_path):
    out = str(tmp_path / "hf")
    export(trained_run.checkpoint, out, fmt="hf")
    model, tok, _ = load_model(trained_run.checkpoint)
    ids = [tok.bos_id, *tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")]
    proc = subprocess.run(
        [sys.executable, "-c", HF_CHECK, out, json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["bos"], got["eos"], got["pad"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert got["ids"] == [tok.bos_id, *tok.encode("First Citizen:")] and got["tied"]  # <bos> as our stages prompt
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    assert (ours - torch.tensor(got["logits"])).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("case", ["not-a-checkpoint", "missing-rank-shard", "output-exists"])
def test_export_bad_input(case, trained_run, tmp_path):
    model, output = trained_run.run, str(tmp_path / "out")
    if case == "not-a-checkpoint":
        model, expect = trained_run.data, "no checkpoint at"
    elif case == "missing-rank-shard":
        model = str(tmp_path / "broken")
        shutil.copytree(trained_run.checkpoint, model)
        shard = next((Path(model) / "ds" / "state").glob("zero_pp_rank_1_*"))
        shard.unlink()
        expect = "is incomplete"
    else:  # a folder with files that are not an unfinished export of ours (those are replaced)
        Path(output).mkdir()
        (Path(output) / "model.safetensors").write_bytes(b"x")
        (Path(output) / "notes.txt").write_text("mine")
        expect = "already exists"
    proc = cli("export", "--model", model, "--output", output)
    assert_user_error(proc, expect)
    if case == "output-exists":
        assert (Path(output) / "model.safetensors").read_bytes() == b"x"
        assert cli("export", "--model", model, "--output", output, "--overwrite").returncode == 0
        assert resolve(output).is_export
    else:
        assert not Path(output).exists()


@pytest.mark.slow
def test_export_zero0_single_worker_keeps_fp32_masters(trained_run, tmp_path):
    """The other consolidation path: ZeRO-0 (one model file), world size 1, bf16 module + fp32 masters (the
    run trained in this process)."""
    from helpers import local_pretrain

    run = str(tmp_path / "run0")
    local_pretrain(
        trained_run.data,
        run,
        load_config(
            TINY,
            [
                "deepspeed.zero_stage=0",
                "scaling.num_workers=1",
                "train.steps=3",
                "train.checkpoint_every=3",
                "train.eval_every=3",
            ],
        ),
    )
    ref = latest_checkpoint(run)
    assert ref.meta.zero_stage == 0 and ref.meta.world_size == 1
    out = export(run, str(tmp_path / "export"), fmt="hf")
    model, _, eref = load_model(out["output"])
    assert eref.meta.source.zero_stage == 0
    module = torch.load(
        Path(ref.url) / "ds" / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    exported = model.state_dict()
    for name, tensor in module.items():
        assert torch.equal(exported[name].to(tensor.dtype), tensor), name  # the module is its masters, rounded
    if ref.meta.precision == "bf16":
        assert any(not torch.equal(exported[n], t.float()) for n, t in module.items())  # not the bf16 copy


def test_transformers_tokenizes_and_greedy_generates_as_we_do(tmp_path):
    """The exported tokenizer puts <bos> first (a post-processor), so `tok(prompt)` + greedy `generate` in
    transformers gives the tokens our sampler gives from <bos> + prompt; the tokenizer's hash is unchanged."""
    transformers = pytest.importorskip("transformers")
    from genpt_dist.model.sampling import sample

    folder = random_export(tmp_path / "hf", "hf")
    ours, tok, ref = load_model(folder)
    assert tok.sha256 == ref.meta.tokenizer_sha256 == byte_tokenizer().sha256
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = hf_tok("First Citizen:", return_tensors="pt")
    assert enc.input_ids[0].tolist() == [tok.bos_id, *tok.encode("First Citizen:")]
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_id)
    out = sample(ours, [enc.input_ids[0].tolist()], max_new_tokens=12, top_k=1, pad_id=tok.pad_id)
    assert theirs[0, enc.input_ids.size(1) :].tolist() == out.tokens[0, out.prompt_width :].tolist()
