"""Fine-tuning: learns a task on held-back prompts, masks the prompt, keeps frozen weights exact."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genpt_dist.checkpoint import load_model, load_state_dict, resolve
from genpt_dist.config import FinetuneConfig, load_config
from genpt_dist.data.prepare import prepare
from genpt_dist.data.task import Example, collate, load_task
from genpt_dist.model.sampling import sample
from genpt_dist.tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def _swap_task(path: Path) -> Path:
    """'a b ->' -> ' b a' for every pair of digits: a fixed rule, so held-back prompts are predictable."""
    with path.open("w") as f:
        for a, b in itertools.product(range(10), range(10)):
            f.write(json.dumps({"prompt": f"{a} {b} ->", "completion": f" {b} {a}"}) + "\n")
    return path


def test_collate_masks_the_prompt():
    tok = byte_tokenizer()
    p, c = tok.encode("2 7 ->"), tok.encode(" 7 2") + [tok.eos_id]
    ex = Example([tok.bos_id, *p, *c], loss_from=len(p))
    idx, targets = collate([ex, Example([tok.bos_id, *tok.encode("x"), tok.eos_id], loss_from=0)], tok.pad_id)
    assert idx.shape == targets.shape == (2, len(ex.tokens) - 1)
    assert (targets[0, : len(p)] == -100).all(), "prompt targets must carry no loss"
    assert targets[0, len(p) :].tolist() == c
    assert targets[1, :2].tolist() == [tok.encode("x")[0], tok.eos_id] and (targets[1, 2:] == -100).all()


def test_task_split_and_validation(tmp_path):
    tok, cfg = byte_tokenizer(), FinetuneConfig()
    data = load_task(str(_swap_task(tmp_path / "t.jsonl")), tok, cfg, block_size=64)
    assert len(data.train) + len(data.val) == 100 and data.val and data.kind == "prompt-completion"
    assert not {tuple(e.tokens) for e in data.train} & {tuple(e.tokens) for e in data.val}


@pytest.fixture(scope="module")
def base_run(ray_session, tiny_corpus, tmp_path_factory) -> str:
    """A 4-step base, trained in this process."""
    from helpers import local_pretrain

    root = tmp_path_factory.mktemp("ft")
    prepare([str(tiny_corpus)], str(root / "data"), load_config(TINY).data)
    run = str(root / "base")
    local_pretrain(
        str(root / "data"), run, load_config(TINY, ["train.steps=4", "train.checkpoint_every=4", "train.eval_every=4"])
    )
    return run


@pytest.mark.slow
def test_finetune_learns_held_back_prompts(base_run, tmp_path):
    from genpt_dist.train.finetune import finetune

    task = _swap_task(tmp_path / "swap.jsonl")
    cfg = load_config(
        TINY,
        [
            "finetune.train.steps=400",
            "finetune.train.eval_every=100",
            "finetune.train.micro_batch_size=16",
            "finetune.optim.lr=3e-3",
            "finetune.optim.warmup_steps=20",
        ],
    )
    out = finetune(str(task), base_run, str(tmp_path / "run"), cfg)
    assert out["checkpoint"] and out["val_loss"] < 0.05
    model, tok, _ = load_model(out["checkpoint"])
    held_back = load_task(str(task), tok, cfg.finetune, block_size=64).val
    assert len(held_back) >= 5
    correct = 0
    for ex in held_back:
        prompt, answer = ex.tokens[: 1 + ex.loss_from], ex.tokens[1 + ex.loss_from :]
        got = sample(model, [prompt], max_new_tokens=len(answer), top_k=1, eos_id=tok.eos_id, seed=0)
        correct += got.tokens[0, got.prompt_width :].tolist()[: len(answer)] == answer
    assert correct / len(held_back) >= 0.95, f"{correct}/{len(held_back)} held-back prompts exact"


@pytest.mark.slow
def test_frozen_weights_stay_bit_identical(base_run, tmp_path):
    from genpt_dist.train.finetune import finetune

    cfg = load_config(
        TINY,
        [
            "finetune.train.steps=6",
            "finetune.train.eval_every=3",
            "finetune.freeze_embeddings=true",
            "finetune.freeze_first_blocks=1",
            "finetune.patience=0",
        ],
    )
    out = finetune(str(_swap_task(tmp_path / "swap.jsonl")), base_run, str(tmp_path / "run"), cfg)
    before, after = load_state_dict(resolve(base_run)), load_state_dict(resolve(out["checkpoint"]))
    frozen = [k for k in before if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))]
    trained = [k for k in before if k.startswith("transformer.h.1.") and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing-field", "empty-completion", "too-long", "other-tokenizer"])
def test_finetune_bad_input(case, base_run, tiny_corpus, tmp_path):
    task = tmp_path / "task.jsonl"
    lines = [{"prompt": "1 2 ->", "completion": " 2 1"}] * 3
    extra: list[str] = []
    expect = {
        "missing-field": "task.jsonl:3: needs string fields",
        "empty-completion": "task.jsonl:2: empty",
        "too-long": "do not fit the 64-token context",
        "other-tokenizer": "different tokenizer",
    }[case]
    if case == "missing-field":
        lines[2] = {"prompt": "x"}
    elif case == "empty-completion":
        lines[1] = {"prompt": "x", "completion": "  "}
    elif case == "too-long":
        lines[0] = {"prompt": "y" * 80, "completion": " z"}
        extra = ["--set", "finetune.too_long=refuse"]
    if case == "other-tokenizer":
        task_arg = str(tmp_path / "bpe")
        prepare([str(tiny_corpus)], task_arg, load_config(TINY, ["data.tokenizer=bpe", "data.vocab_size=300"]).data)
    else:
        task.write_text("".join(json.dumps(x) + "\n" for x in lines))
        task_arg = str(task)
    proc = _cli(
        "finetune",
        "--task",
        task_arg,
        "--init",
        base_run,
        "--run",
        str(tmp_path / "run"),
        "--config",
        str(TINY),
        *extra,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:") and expect in last, last
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
