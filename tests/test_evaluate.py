"""`evaluate`: loss, perplexity and bits-per-byte on a dataset's val split or a raw text file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_user_error, cli, random_export

from genpt_dist.checkpoint import load_model
from genpt_dist.config import load_config
from genpt_dist.data.prepare import prepare
from genpt_dist.errors import UserError
from genpt_dist.evaluate import evaluate


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    return random_export(tmp_path_factory.mktemp("eval") / "export")


@pytest.fixture(scope="module")
def byte_data(tiny_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval") / "bytes")
    prepare([str(tiny_corpus)], out, load_config(TINY).data)
    return out


def test_text_file_metrics_match_a_direct_computation(export_dir, tmp_path):
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer — é\n"
    path = tmp_path / "t.txt"
    path.write_text(text)
    got = evaluate(export_dir, str(path), batch_size=3)
    model, tok, _ = load_model(export_dir)
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]  # one document; the byte tokenizer: 1 token per byte
    block = model.config.block_size
    nats = 0.0
    for lo in range(0, len(ids) - 1, block):
        window = torch.tensor([ids[lo : lo + block + 1]])
        logits, _ = model(window[:, :-1])
        nats += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    targets = len(ids) - 1
    assert got["tokens"] == targets and got["bytes"] == len(text.encode("utf-8"))
    assert got["loss"] == pytest.approx(nats / targets, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / targets), rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


def test_dataset_val_split(export_dir, byte_data):
    from genpt_dist.data.manifest import load_manifest

    got = evaluate(export_dir, byte_data)
    val = load_manifest(byte_data).splits["val"]
    assert got["kind"] == "dataset" and got["split"] == "val"
    assert got["tokens"] == val.targets and got["bytes"] <= val.bytes
    assert all(np.isfinite([got["loss"], got["perplexity"], got["bpb"]]))
    assert got["bpb"] == pytest.approx(got["loss"] * got["tokens"] / math.log(2) / got["bytes"])


def test_evaluate_bad_input(export_dir, tiny_corpus, tmp_path):
    bpe = str(tmp_path / "bpe")
    prepare([str(tiny_corpus)], bpe, load_config(TINY, ["data.tokenizer=bpe", "data.vocab_size=300"]).data)
    assert_user_error(cli("evaluate", "--model", export_dir, "--data", bpe), "different tokenizer")
    with pytest.raises(UserError, match="neither a prepared dataset"):
        evaluate(export_dir, str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="holds no text"):
        evaluate(export_dir, str(tmp_path / "empty.txt"))


@pytest.mark.slow
def test_evaluate_checkpoint_and_export_agree(trained_run, tiny_corpus, tmp_path):
    from genpt_dist.export import export

    export(trained_run.checkpoint, str(tmp_path / "hf"), fmt="hf")
    raw = tmp_path / "raw.txt"
    raw.write_bytes(tiny_corpus.read_bytes()[:6000])
    for data, kind in ((trained_run.data, "dataset"), (str(raw), "text")):
        results = []
        for model in (trained_run.run, str(tmp_path / "hf")):
            proc = cli("evaluate", "--model", model, "--data", data)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            assert out["command"] == "evaluate" and out["kind"] == kind and out["step"] == 6
            assert all(math.isfinite(out[k]) for k in ("loss", "perplexity", "bpb")) and out["tokens"] > 0
            results.append(out)
        for key in ("loss", "perplexity", "bpb", "tokens"):
            assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), key
        assert results[0]["loss"] < math.log(259)  # 6 steps already beat the uniform distribution
