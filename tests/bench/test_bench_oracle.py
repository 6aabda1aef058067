"""`bench oracle --quick`: the SeqGAN synthetic pipeline end to end (oracle corpus -> prepare -> MLE ->
adversarial -> NLL_oracle), plus its pieces on CPU without Ray."""

from __future__ import annotations

import math

import pytest
import torch

from genpt_dist.bench.oracle import ALPHABET, OracleSpec, build_oracle, frontier_at, oracle_nll, sample_symbols, val_nll
from genpt_dist.tokenizer import byte_tokenizer


def test_oracle_samples_only_its_symbols_and_scores_them_below_uniform():
    tok = byte_tokenizer()
    symbols = torch.tensor(tok.encode(ALPHABET))
    assert len(symbols) == 64
    oracle = build_oracle(OracleSpec(), tok.vocab_size)
    tokens, outside = sample_symbols(oracle, 64, 20, symbols, tok.bos_id, seed=0)
    assert tokens.shape == (64, 20) and torch.isin(tokens, symbols).all()
    again, _ = sample_symbols(oracle, 64, 20, symbols, tok.bos_id, seed=0)
    assert torch.equal(tokens, again), "seeded sampling is reproducible"
    own = oracle_nll(oracle, tokens, symbols, tok.bos_id)
    uniform = symbols[torch.randint(0, 64, (64, 20), generator=torch.Generator().manual_seed(0))]
    assert own < math.log(64) < oracle_nll(oracle, uniform, symbols, tok.bos_id), "a peaky oracle"
    assert 0.0 <= outside <= 1.0


def test_val_nll_at_temperature_one_is_the_models_loss_and_cooling_changes_it():
    from genpt_dist.model.gpt import GPT, GPTConfig

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, d_model=32)).eval()
    docs = torch.tensor(tok.encode(ALPHABET))[torch.randint(0, 64, (10, 20))]
    x = torch.cat([torch.full((10, 1), tok.bos_id), docs, torch.full((10, 1), tok.eos_id)], 1)
    with torch.no_grad():
        want = -model.token_logprobs(x).mean().item()
    assert val_nll(model, docs, tok.bos_id, tok.eos_id) == pytest.approx(want, rel=1e-5)
    assert val_nll(model, docs, tok.bos_id, tok.eos_id, temperature=0.5) != pytest.approx(want, rel=1e-3)


def test_frontier_interpolates_between_the_bracketing_temperatures():
    points = [
        {"temperature": 1.0, "nll_oracle": 3.5, "val_ppl": 14.0},
        {"temperature": 0.9, "nll_oracle": 3.2, "val_ppl": 14.4},
        {"temperature": 0.8, "nll_oracle": 2.9, "val_ppl": 15.6},
    ]
    assert frontier_at(points, 14.0) == pytest.approx(3.5)
    assert frontier_at(points, 14.2) == pytest.approx(3.35)
    assert frontier_at(points, 15.0) == pytest.approx(3.05)
    assert frontier_at(points, 13.9) is None and frontier_at(points, 16.0) is None


@pytest.mark.slow
def test_quick_bench_runs_the_pipeline(ray_session, tmp_path):
    from genpt_dist.bench import run_bench

    summary = run_bench("oracle", str(tmp_path / "out"), quick=True)
    assert (tmp_path / "out" / "oracle.json").is_file()
    for key in (
        "nll_oracle_oracle",
        "nll_oracle_random",
        "nll_oracle_mle",
        "nll_oracle_adversarial",
        "val_ppl_mle",
        "val_ppl_adversarial",
        "nll_oracle_rel_change",
        "val_ppl_rel_change",
    ):
        assert math.isfinite(summary[key]), (key, summary[key])
    # A real check of the pipeline: even 30 MLE steps on the oracle's corpus beat an untrained generator.
    assert summary["nll_oracle_mle"] < summary["nll_oracle_random"] - 0.5, summary
    assert summary["nll_oracle_oracle"] < summary["nll_oracle_mle"]
    assert "temperature 1" in summary["sampling"]
    (run,) = summary["adversarial_runs"]  # one stage run in quick mode: the mean is that run
    assert run["nll_oracle"] == pytest.approx(summary["nll_oracle_adversarial"], abs=1e-4)
    frontier = {p["temperature"]: p for p in summary["mle_temperature_frontier"]}
    assert set(frontier) == {0.8, 0.85, 0.9, 0.95, 1.0}
    # the frontier's temperature-1 point is the MLE generator itself (same samples, same held-out text)
    assert frontier[1.0]["nll_oracle"] == pytest.approx(summary["nll_oracle_mle"], abs=1e-4)
    assert frontier[1.0]["val_ppl"] == pytest.approx(summary["val_ppl_mle"], abs=1e-3)
