"""`generate` and the sampler's fast path: CLI formats, prompts, seeds, errors; checkpoint == export."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import assert_user_error, cli, random_export

from genpt_dist.errors import UserError
from genpt_dist.generate import generate, read_prompts
from genpt_dist.model.decode import PACK_MIN_STEPS, DecodeWeights, decode_step
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.model.sampling import _pick, filter_logits, sample


def _gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"vocab_size": 61, "block_size": 40, "n_layer": 2, "n_head": 2, "d_model": 16, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    return random_export(tmp_path_factory.mktemp("gen") / "export")


# ------------------------------------------------------------------------------ the sampler


@pytest.mark.parametrize(
    "padded, pack, activation, dtype",
    [
        (False, False, "gelu_new", torch.float32),
        (True, False, "gelu_new", torch.float32),
        (True, True, "gelu_new", torch.float32),
        (False, True, "gelu", torch.float32),
        (True, True, "relu", torch.float32),
        (True, True, "gelu_new", torch.bfloat16),
    ],
)
def test_decode_step_matches_forward(padded, pack, activation, dtype):
    model = _gpt(activation=activation).to(dtype)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]] if not padded else [[5, 6, 7, 8, 9], [10, 11]]
    B, P, steps = len(prompts), 5, 6
    idx = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P + steps, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    ref_cache, fast_cache = model.new_cache(B, P + steps), model.new_cache(B, P + steps)
    am = mask[:, :P] if padded else None
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    with torch.inference_mode():
        model(idx, cache=ref_cache, attention_mask=am)
        model(idx, cache=fast_cache, attention_mask=am)
        shift = P - torch.tensor([len(p) for p in prompts])
        weights = DecodeWeights.of(model, B, PACK_MIN_STEPS if pack else 0)
        assert weights.packed == pack  # this CPU's PyTorch has oneDNN: the packed path is the one tested
        for n in range(steps):
            tok = torch.randint(3, 61, (B,))
            width = P + n + 1
            ref = model(
                tok[:, None], cache=ref_cache, attention_mask=mask[:, :width] if padded else None, last_only=True
            )[0][:, -1]
            pos = (width - 1 - shift) if padded else width - 1
            km = mask[:, :width].bool()[:, None, None, :] if padded else None
            fast = decode_step(model, weights, tok, pos, fast_cache, km)
            torch.testing.assert_close(fast, ref, **tol)


def test_sampling_packs_only_long_runs_and_gives_the_same_tokens():
    """Packed and plain linears sample the same tokens (fp32); a short run does not pack."""
    model = _gpt()
    prompts = [[5, 6, 7], [8, 9]]
    assert not DecodeWeights.of(model, 2, PACK_MIN_STEPS - 1).packed
    runs = []
    for pack_min in (PACK_MIN_STEPS, 10_000):  # packed, then never packed
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("genpt_dist.model.decode.PACK_MIN_STEPS", pack_min)
            runs.append(sample(model, prompts, max_new_tokens=PACK_MIN_STEPS + 4, top_k=5, seed=3, pad_id=0))
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "top_k, top_p, temperature", [(None, None, 1.0), (4, None, 0.7), (None, 0.6, 1.3), (5, 0.8, 1.0)]
)
def test_pick_samples_the_filtered_distribution(top_k, top_p, temperature):
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2  # (1, V)
    want = filter_logits(logits, top_k, top_p, temperature).exp()[0]  # (V,)
    n = 40_000
    g = torch.Generator().manual_seed(1)
    tok, lp = _pick(logits.expand(n, -1), top_k, top_p, temperature, g)
    freq = torch.bincount(tok, minlength=12).float() / n
    assert torch.all(freq[want == 0] == 0)
    assert (freq - want).abs().max() < 0.015
    torch.testing.assert_close(lp, want.log()[tok], atol=1e-5, rtol=0)


def test_bf16_model_samples():
    model = _gpt().to(torch.bfloat16)
    out = sample(model, [[1, 2, 3], [4, 5]], max_new_tokens=5, top_k=10, seed=0)
    assert out.tokens.shape == (2, 8) and out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all()


def test_train_mode_uses_forward_and_matches():
    model = _gpt()
    kw = dict(max_new_tokens=6, top_k=10, seed=3)
    a = sample(model, [[1, 2, 3], [4, 5]], **kw)
    b = sample(model.train(), [[1, 2, 3], [4, 5]], **kw)  # dropout 0: same maths, module path
    assert torch.equal(a.tokens, b.tokens)


# ------------------------------------------------------------------------------ generate


def test_generate_jsonl_reproducible_and_batched(export_dir):
    prompts = ["ROMEO:", "Thou art", "a"]
    runs = []
    for batch_size in (32, 32, 2):
        out = io.StringIO()
        summary = generate(export_dir, prompts, num_samples=2, seed=11, fmt="jsonl", batch_size=batch_size, out=out)
        runs.append([json.loads(line) for line in out.getvalue().splitlines()])
        assert summary["samples"] == 6 and summary["seed"] == 11 and summary["max_new_tokens"] == 8
        assert summary["top_k"] == 20  # the export's sampling defaults
    assert runs[0] == runs[1]
    first = runs[0]
    assert [(r["prompt_index"], r["sample_index"]) for r in first] == [(i, j) for i in range(3) for j in range(2)]
    for r in first:
        assert len(r["tokens"]) == len(r["logprobs"]) <= 8 and all(lp <= 0 for lp in r["logprobs"])
        assert r["prompt"] == prompts[r["prompt_index"]]
    assert first[0]["tokens"] != first[1]["tokens"]  # two samples of one prompt differ


def test_generate_text_cli_and_stdin(export_dir, tmp_path):
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("First\n\nSecond\n")
    proc = cli(
        "generate",
        "--model",
        export_dir,
        "--prompt-file",
        str(pfile),
        "--prompt",
        "-",
        "--seed",
        "3",
        "--max-new-tokens",
        "5",
        "--top-k",
        "0",
        "--top-p",
        "0.9",
        "--temperature",
        "0.8",
        stdin="Third\n",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    summary = json.loads(lines[-1])
    assert summary["command"] == "generate" and summary["prompts"] == 3 and summary["samples"] == 3
    assert summary["top_k"] is None and summary["top_p"] == 0.9 and summary["temperature"] == 0.8
    headers = [line for line in lines if line.startswith("===== prompt")]
    assert len(headers) == 3 and "Processing" not in proc.stdout
    assert [c for c in summary["completions"]] and all(len(c) <= 5 * 4 for c in summary["completions"])
    assert read_prompts(["-"], str(pfile), io.StringIO("Third\n")) == ["Third", "First", "Second"]


def test_generate_cuts_max_new_tokens_to_the_context(export_dir):
    summary = generate(export_dir, ["x" * 50], max_new_tokens=30, seed=0, out=io.StringIO())
    assert summary["max_new_tokens"] == 64 - 51


def test_generate_bad_input(export_dir):
    assert_user_error(cli("generate", "--model", export_dir, "--prompt", "x" * 80), "leaves no room")
    assert_user_error(cli("generate", "--model", export_dir), "no prompts")
    with pytest.raises(UserError, match="top_p"):
        generate(export_dir, ["a"], top_p=1.5, out=io.StringIO())


# ------------------------------------------------------------------------------ from a ZeRO-3 run


@pytest.mark.slow
def test_generate_checkpoint_equals_export(trained_run, tmp_path):
    from genpt_dist.export import export

    results = []
    for fmt in ("safetensors", "hf"):
        export(trained_run.run, str(tmp_path / fmt), fmt=fmt)
    for model in (trained_run.checkpoint, str(tmp_path / "safetensors"), str(tmp_path / "hf")):
        proc = cli(
            "generate",
            "--model",
            model,
            "--prompt",
            "First Citizen:",
            "--prompt",
            "ROMEO:",
            "--num-samples",
            "2",
            "--seed",
            "5",
            "--max-new-tokens",
            "20",
            "--format",
            "jsonl",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        assert json.loads(lines[-1])["step"] == 6
        results.append([json.loads(line) for line in lines[:-1]])
    assert len(results[0]) == 4
    assert results[0] == results[1] == results[2]


@pytest.mark.slow
def test_bench_generate_quick(tmp_path):
    from genpt_dist.bench import run_bench

    out = run_bench("generate", str(tmp_path), quick=True)
    assert out["command"] == "bench" and out["speedup_fp32"] > 0 and out["kv_cache_speedup"] > 0
    saved = json.loads((tmp_path / "generate.json").read_text())
    assert {r["impl"] for r in saved["rows"]} == {"ours", "hf generate", "matmuls F.linear", "matmuls packed"}
    # ours' own (packed) matmuls alone are faster than its whole sampling step
    assert 0 < out["ours_of_matmuls_fp32"]["packed"] < 1
    assert saved["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
