"""`bench oracle`: the SeqGAN synthetic-data benchmark (Yu et al. 2017, section 5), on our real stages.

The setting: a randomly initialised "oracle" language model is the true data distribution. It
generates the training corpus; a generator is trained on that corpus by maximum likelihood
(`pretrain`, Ray Train x DeepSpeed workers), then by the adversarial stage (`adversarial`: REINFORCE
against an online discriminator, KL-guarded to the MLE model). Because the true distribution is
known, sample quality is measurable exactly:

    NLL_oracle(G) = - E_{x ~ G} [ 1/T sum_t log p_oracle(x_t | x_<t) ]      (nats per token)

estimated on `eval_samples` sequences sampled from G at temperature 1 with no top-k / top-p (a lower
temperature trivially lowers NLL_oracle by mode seeking; it is never used here). Its counterpart,
which catches a generator that only drops modes, is the perplexity of G on held-out oracle text
(the dataset's val split). Reported for a random (untrained, the MLE run's initial weights), the
MLE and the adversarial generator, plus the oracle's own NLL on its samples (its entropy rate, a floor
for a generator that matches it; a sharper-than-oracle generator can go below it). The adversarial
stage runs `stage_runs` times from the one MLE generator (adversarial.train.seed, seed + 1, ...: its discriminator
initialisation, rollouts and real windows differ); the mean is the headline figure, each run and the
standard deviation are reported beside it.

The peer is the MLE generator cooled: sampled at temperatures 0.8-1.0 it traces a frontier of
NLL_oracle against val perplexity (`mle_temperature_frontier`), and the adversarial generator is
compared with it at its own val perplexity (`nll_oracle_rel_to_frontier`; Caccia et al. 2018,
"Language GANs falling short"): negative means the stage bought more NLL_oracle per unit of
perplexity than cooling does, positive that its gain is mode seeking, and worse aimed.

Choices, and how they differ from SeqGAN:
* Oracle: our GPT (`OracleSpec`: 2 layers, 64 wide, 4 heads), every weight matrix drawn from
  N(0, 0.3^2) instead of GPT-2's 0.02 so its next-token distributions are peaky (about 2 nats per token
  against log 64 = 4.16 for uniform); SeqGAN's oracle is an LSTM with N(0, 1) weights over 5,000 tokens.
  It samples sequences of exactly `seq_len` (20, as SeqGAN) symbols from <bos>, over a 64-symbol
  alphabet (the base64 characters).
* Tokens: the corpus goes through our real `prepare` as JSONL (`{"text": "<20 base64 chars>"}` per
  line) with the byte tokenizer, which maps each character to one token id. The oracle is a GPT over
  the byte tokenizer's 259 ids whose sampling is restricted to the 64 symbol ids, so oracle symbols
  and generator tokens are the same ids. `data.seq_len = seq_len + 2` makes every sample exactly one
  document, `<bos> x_1..x_20 <eos>` (plus the next <bos> as the last target), so the generator learns
  sequences from <bos> and the stage's real windows are `<bos> x_1..x_20`, like its rollouts.
* The generators have 259 outputs, the oracle defines only 64: NLL_oracle samples each generator
  over the 64 symbols (its other logits, <eos> among them, masked; fixed length 20 as in SeqGAN). The
  probability mass that removes is reported (`outside_mass`): ~0 for trained generators.
* The train/val split is prepare's (hash of the sequence text, 10% val; duplicates never straddle).

What limits it, measured (why the discriminator stays near chance on MLE samples, the offline probes,
the residual discriminator, the runs of this recipe): BENCHMARKS.md, "bench oracle".
"""

from __future__ import annotations

import json
import logging
import math
import string
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.recipes import recipe_path
from genpt_dist.val_loss import LossSums, batch_loss_sums

log = logging.getLogger(__name__)
ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"  # 64 oracle symbols
SEQGAN = {"mle": 9.038, "seqgan": 8.736}  # Yu et al. 2017, table 1 (NLL_oracle)
FRONTIER_TEMPERATURES = (0.8, 0.85, 0.9, 0.95, 1.0)  # the MLE generator cooled: the mode-seeking peer


@dataclass(frozen=True, kw_only=True)
class OracleSpec:
    """The synthetic task: the oracle's shape and seed, the corpus and the evaluation sizes."""

    n_layer: int = 2  # oracle transformer blocks
    n_head: int = 4  # oracle attention heads
    d_model: int = 64  # oracle width
    init_std: float = 0.3  # std of every oracle weight matrix (GPT-2 uses 0.02): a peaky distribution
    seed: int = 20170204  # oracle weights and corpus sampling
    seq_len: int = 20  # symbols per sequence (SeqGAN: 20)
    train_sequences: int = 10_000  # corpus size before prepare's 10% val split (SeqGAN: 10,000)
    eval_samples: int = 2_000  # generator samples scored by the oracle
    eval_seed: int = 7  # seed of the evaluation samples (the same for every generator)
    stage_runs: int = (
        3  # adversarial stages from the one MLE generator, adversarial.train.seed + 0, 1, ...: the mean counts
    )


QUICK = OracleSpec(train_sequences=1_000, eval_samples=200, stage_runs=1)
QUICK_OVERRIDES = [
    "train.steps=30",
    "train.eval_every=30",
    "train.checkpoint_every=30",
    "adversarial.train.steps=2",
    "adversarial.train.eval_every=2",
    "adversarial.train.checkpoint_every=2",
    "adversarial.discriminator.pretrain_steps=2",
]


# ------------------------------------------------------------------------------------- the oracle


def build_oracle(spec: OracleSpec, vocab_size: int) -> GPT:
    """A GPT with every weight matrix (embeddings included) drawn from N(0, init_std^2), biases 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = GPT(
            GPTConfig(
                vocab_size=vocab_size,
                block_size=spec.seq_len + 1,
                n_layer=spec.n_layer,
                n_head=spec.n_head,
                d_model=spec.d_model,
            )
        )
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, spec.init_std)
    return model.eval()


def _symbol_mask(vocab_size: int, symbols: torch.Tensor) -> torch.Tensor:
    """(V,) 0 on the oracle's symbol ids, -inf elsewhere (added to logits)."""
    mask = torch.full((vocab_size,), float("-inf"))
    mask[symbols] = 0.0
    return mask


@torch.inference_mode()
def sample_symbols(
    model: GPT,
    n: int,
    length: int,
    symbols: torch.Tensor,
    bos_id: int,
    seed: int,
    batch: int = 500,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """`n` sequences of `length` symbols sampled from <bos> at `temperature`, over `symbols` only.

    Returns tokens (n, length) and the mean per-step probability the model put outside `symbols`."""
    g = torch.Generator().manual_seed(seed)
    mask = _symbol_mask(model.config.vocab_size, symbols)
    out, outside = [], 0.0
    for lo in range(0, n, batch):
        B = min(batch, n - lo)
        cache = model.new_cache(B, length + 1)
        x = torch.full((B, 1), bos_id, dtype=torch.long)  # (B, 1)
        rows = []
        for _ in range(length):
            logits = model(x, cache=cache, last_only=True)[0][:, -1].float() / temperature  # (B, V)
            probs = F.softmax(logits, dim=-1)  # (B, V)
            outside += (1.0 - probs[:, symbols].sum(-1)).sum().item()
            x = torch.multinomial(F.softmax(logits + mask, dim=-1), 1, generator=g)  # (B, 1)
            rows.append(x)
        out.append(torch.cat(rows, dim=1))  # (B, length)
    return torch.cat(out), outside / (n * length)


@torch.inference_mode()
def oracle_nll(oracle: GPT, tokens: torch.Tensor, symbols: torch.Tensor, bos_id: int) -> float:
    """Mean -log p_oracle(x_t | x_<t) per token of `tokens` (n, T), the oracle restricted to its symbols."""
    mask = _symbol_mask(oracle.config.vocab_size, symbols)
    total = 0.0
    for chunk in tokens.split(500):
        x = F.pad(chunk, (1, 0), value=bos_id)  # (B, T+1)
        logp = F.log_softmax(oracle(x)[0][:, :-1].float() + mask, dim=-1)  # (B, T, V)
        total += -logp.gather(-1, chunk.unsqueeze(-1)).sum().item()
    return total / tokens.numel()


@torch.inference_mode()
def val_nll(model: GPT, docs: torch.Tensor, bos_id: int, eos_id: int, temperature: float = 1.0) -> float:
    """Mean NLL per target of `<bos> x <eos>` over held-out sequences `docs` (n, T): symbols and <eos>,
    under the model's next-token distributions at `temperature` (`val_loss`, as training's val loss)."""
    no_bytes = torch.zeros(model.config.vocab_size)  # bits-per-byte is not wanted here
    sums = LossSums()
    for chunk in docs.split(500):
        x = torch.cat([torch.full((len(chunk), 1), bos_id), chunk, torch.full((len(chunk), 1), eos_id)], 1)
        sums += batch_loss_sums(lambda idx: model(idx)[0], x[:, :-1], x[:, 1:], no_bytes, temperature)
    return sums.loss


def frontier_at(points: list[dict[str, float]], val_ppl: float) -> float | None:
    """NLL_oracle of the temperature frontier at `val_ppl`, linearly interpolated between the two points
    (temperature <= 1) that bracket it; None outside the frontier's range."""
    cooled = sorted((p for p in points if p["temperature"] <= 1.0), key=lambda p: p["val_ppl"])
    for lo, hi in zip(cooled, cooled[1:]):
        if lo["val_ppl"] <= val_ppl <= hi["val_ppl"]:
            w = (val_ppl - lo["val_ppl"]) / max(hi["val_ppl"] - lo["val_ppl"], 1e-12)
            return lo["nll_oracle"] + w * (hi["nll_oracle"] - lo["nll_oracle"])
    return None


# ------------------------------------------------------------------------------------- the bench


def _write_corpus(tokens: torch.Tensor, id_to_char: dict[int, str], path: Path) -> list[str]:
    texts = ["".join(id_to_char[i] for i in row) for row in tokens.tolist()]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def _row(name: str, nll: float, vppl: float | None, outside: float | None, note: str) -> dict[str, Any]:
    return {
        "generator": name,
        "nll_oracle": round(nll, 4),
        "val_ppl": None if vppl is None else round(vppl, 4),
        "outside_mass": None if outside is None else round(outside, 5),
        "note": note,
    }


def bench_oracle(quick: bool = False, workdir: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    from genpt_dist.checkpoint import load_model
    from genpt_dist.config import load_config
    from genpt_dist.data.prepare import prepare
    from genpt_dist.data.text import doc_in_val
    from genpt_dist.errors import UserError
    from genpt_dist.rl.driver import adversarial
    from genpt_dist.tokenizer import byte_tokenizer
    from genpt_dist.train.pretrain import pretrain

    spec = QUICK if quick else OracleSpec()
    overrides = [*(QUICK_OVERRIDES if quick else []), *(overrides or [])]
    recipe = recipe_path("oracle")
    cfg = load_config(recipe, overrides)
    r, rs = cfg.adversarial.rollout, cfg.adversarial.rollout.sampling
    if cfg.data.seq_len != spec.seq_len + 2 or rs.max_new_tokens != spec.seq_len or r.prompt_len != 0:
        raise UserError(
            f"{recipe.name}: data.seq_len must be {spec.seq_len + 2} (one <bos> x <eos> sequence per "
            f"sample), adversarial.rollout.sampling.max_new_tokens {spec.seq_len} and prompt_len 0"
        )
    if rs.top_k is not None or rs.top_p is not None or rs.temperature != 1.0:
        raise UserError(f"{recipe.name}: rollouts must sample the policy itself (top_k/top_p null, temperature 1)")
    tok = byte_tokenizer()
    symbols = torch.tensor(tok.encode(ALPHABET))  # (64,) one byte token per character
    id_to_char = dict(zip(symbols.tolist(), ALPHABET))
    oracle = build_oracle(spec, tok.vocab_size)
    times: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="genpt-bench-oracle-", dir=workdir) as tmp:
        root = Path(tmp)
        t0 = time.time()
        corpus, _ = sample_symbols(oracle, spec.train_sequences, spec.seq_len, symbols, tok.bos_id, spec.seed)
        texts = _write_corpus(corpus, id_to_char, root / "oracle.jsonl")
        in_val = torch.tensor([doc_in_val(t, cfg.data.val_fraction) for t in texts])
        held_out = corpus[in_val]  # the val split's sequences (prepare splits by the same hash)
        summary = prepare([str(root / "oracle.jsonl")], str(root / "data"), cfg.data)
        times["corpus_s"] = time.time() - t0
        log.info("oracle corpus: %d train / %d val sequences", summary["train_samples"], summary["val_samples"])

        t0 = time.time()
        mle_out = pretrain(str(root / "data"), str(root / "mle"), cfg)
        times["mle_s"] = time.time() - t0
        t0 = time.time()
        adv_outs = [
            adversarial(
                str(root / "data"),
                str(root / "mle"),
                str(root / f"adv-{i}"),
                load_config(recipe, [*overrides, f"adversarial.train.seed={cfg.adversarial.train.seed + i}"]),
            )
            for i in range(spec.stage_runs)
        ]
        times["adversarial_s"] = time.time() - t0

        t0 = time.time()
        torch.manual_seed(cfg.train.seed)  # the MLE run's initial weights (Engine.new_model seeds the same way)
        m = cfg.model
        random_gen = GPT(
            GPTConfig(
                vocab_size=tok.vocab_size,
                block_size=cfg.block_size,
                n_layer=m.n_layer,
                n_head=m.n_head,
                d_model=m.d_model,
            )
        ).eval()
        mle_gen = load_model(str(root / "mle"))[0]

        def score(model: GPT, temperature: float = 1.0) -> tuple[dict[str, float], float]:
            """NLL_oracle of `eval_samples` samples and val perplexity at `temperature`; outside mass."""
            samples, outside = sample_symbols(
                model, spec.eval_samples, spec.seq_len, symbols, tok.bos_id, spec.eval_seed, temperature=temperature
            )
            return {
                "nll_oracle": oracle_nll(oracle, samples, symbols, tok.bos_id),
                "val_ppl": math.exp(val_nll(model, held_out, tok.bos_id, tok.eos_id, temperature)),
            }, outside

        rows = [
            _row(
                "oracle",
                oracle_nll(oracle, corpus[: spec.eval_samples], symbols, tok.bos_id),
                None,
                None,
                "its own samples: entropy rate",
            )
        ]
        results: dict[str, dict[str, float]] = {}
        for name, model in (("random", random_gen), ("mle", mle_gen)):
            results[name], outside = score(model)
            rows.append(
                _row(
                    name,
                    results[name]["nll_oracle"],
                    results[name]["val_ppl"],
                    outside,
                    "temperature 1, no top-k, over the 64 symbols",
                )
            )
        runs = []
        for i in range(spec.stage_runs):
            run, outside = score(load_model(str(root / f"adv-{i}"))[0])
            runs.append(run)
            rows.append(
                _row(
                    f"adversarial-{i}",
                    run["nll_oracle"],
                    run["val_ppl"],
                    outside,
                    f"stage run, adversarial.train.seed={cfg.adversarial.train.seed + i}",
                )
            )
        results["adversarial"] = {k: sum(r[k] for r in runs) / len(runs) for k in ("nll_oracle", "val_ppl")}
        spread = (
            sum((r["nll_oracle"] - results["adversarial"]["nll_oracle"]) ** 2 for r in runs) / max(len(runs) - 1, 1)
        ) ** 0.5
        mean = results["adversarial"]
        rows.append(
            _row(
                f"adversarial (mean of {len(runs)})",
                mean["nll_oracle"],
                mean["val_ppl"],
                None,
                f"NLL_oracle std across runs {spread:.4f}",
            )
        )
        # temperature 1 is the MLE row itself (same samples, same held-out text): not sampled again
        frontier = [
            {"temperature": t, **(score(mle_gen, t)[0] if t != 1.0 else results["mle"])} for t in FRONTIER_TEMPERATURES
        ]
        times["eval_s"] = time.time() - t0

    mle, adv = results["mle"], results["adversarial"]
    rel = adv["nll_oracle"] / mle["nll_oracle"] - 1.0
    ppl_rel = adv["val_ppl"] / mle["val_ppl"] - 1.0
    rows.append(
        {
            "generator": "adversarial vs mle",
            "nll_oracle": f"{100 * rel:+.2f}%",
            "val_ppl": f"{100 * ppl_rel:+.2f}%",
            "outside_mass": None,
            "note": f"SeqGAN paper: {100 * (SEQGAN['seqgan'] / SEQGAN['mle'] - 1):+.2f}%",
        }
    )
    for point in frontier:
        if point["temperature"] != 1.0:
            rows.append(
                _row(
                    f"mle at temperature {point['temperature']:g}",
                    point["nll_oracle"],
                    point["val_ppl"],
                    None,
                    "the peer: MLE cooled (mode seeking), no adversarial stage",
                )
            )
    # The adversarial generator against MLE cooled to the same held-out perplexity (Caccia et al. 2018):
    # negative = the stage buys more NLL_oracle per unit of val perplexity than lowering the temperature.
    cooled = frontier_at(frontier, adv["val_ppl"])
    vs_frontier = None if cooled is None else adv["nll_oracle"] / cooled - 1.0
    return {
        "sampling": "every generator sampled at temperature 1, top_k None, top_p None (over the oracle's 64 symbols); "
        "the peer, MLE cooled, at the temperatures of mle_temperature_frontier",
        "spec": asdict(spec),
        "recipe": str(recipe),
        "overrides": overrides,
        "train_sequences": summary["train_samples"],
        "val_sequences": int(in_val.sum()),
        "nll_oracle_oracle": rows[0]["nll_oracle"],
        **{f"nll_oracle_{k}": round(v["nll_oracle"], 4) for k, v in results.items()},
        **{f"val_ppl_{k}": round(v["val_ppl"], 4) for k, v in results.items() if k != "random"},
        "nll_oracle_rel_change": round(rel, 4),
        "val_ppl_rel_change": round(ppl_rel, 4),
        "target_met": rel <= -0.033 and ppl_rel <= 0.05,
        "mle_temperature_frontier": [{k: round(v, 4) for k, v in point.items()} for point in frontier],
        "nll_oracle_rel_to_frontier": None if vs_frontier is None else round(vs_frontier, 4),
        "adversarial_runs": [{k: round(v, 4) for k, v in r.items()} for r in runs],
        "nll_oracle_adversarial_std": round(spread, 4),
        "seqgan_paper": SEQGAN,
        "stage_metrics": {"mle": mle_out, "adversarial": adv_outs},
        "phase_seconds": {k: round(v, 1) for k, v in times.items()},
        "rows": rows,
    }
