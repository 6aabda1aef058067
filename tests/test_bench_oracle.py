"""`bench oracle --quick`: the SeqGAN synthetic pipeline end to end (oracle corpus -> prepare -> MLE ->
adversarial -> NLL_oracle), plus its pieces on CPU without Ray."""

from __future__ import annotations

import math

import pytest
import torch

from genpt_dist.bench.oracle import ALPHABET, OracleSpec, build_oracle, oracle_nll, sample_symbols
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


@pytest.mark.slow
def test_quick_bench_runs_the_pipeline(ray_session, tmp_path):
    from genpt_dist.bench import run_bench

    summary = run_bench("oracle", str(tmp_path / "out"), quick=True)
    assert (tmp_path / "out" / "oracle.json").is_file()
    for key in ("nll_oracle_oracle", "nll_oracle_random", "nll_oracle_mle", "nll_oracle_adversarial",
                "val_ppl_mle", "val_ppl_adversarial", "nll_oracle_rel_change", "val_ppl_rel_change"):
        assert math.isfinite(summary[key]), (key, summary[key])
    # A real check of the pipeline: even 30 MLE steps on the oracle's corpus beat an untrained generator.
    assert summary["nll_oracle_mle"] < summary["nll_oracle_random"] - 0.5, summary
    assert summary["nll_oracle_oracle"] < summary["nll_oracle_mle"]
    assert "temperature 1" in summary["sampling"]
