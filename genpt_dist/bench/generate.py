"""`bench generate`: sampling tokens/s, ours (`model.sampling.sample`) against the peer, Hugging Face
`GPT2LMHeadModel.generate`, on the same exported weights, in one run.

A freshly initialised GPT (6 layers x 384 wide, 6 heads, vocab 8192, context 256; quick: 2 x 128) is
written with `export.write_export` as an `hf` export folder; ours loads it with `load_model`, the peer
with `GPT2LMHeadModel.from_pretrained`. Both sample the same left-padded prompts (lengths 24-32,
random ids), with the same batch, top-k 50, temperature 0.8 and new-token count; neither stops at
<eos> (ours: no eos id; HF: `eos_token_id` unset), so each produces exactly batch x new tokens.
Each setting is warmed up once, then timed `REPEATS` times alternating ours and HF; the best time
counts, in wall-clock seconds and in process CPU seconds (`cpu_s`: less disturbed when other jobs
share the machine, since time spent descheduled is not counted). Rows: ours and HF in fp32 and in
bf16 (weights cast; on a CPU bf16 halves the bytes each step streams, which is what a small-batch
decode step waits on), at batch 1 and 8; and ours with vs without the KV cache at a shorter
new-token count (without a cache every step reruns the whole sequence, so its cost grows with the square
of the length). `--device cuda` (or `auto` on a GPU machine) runs both on the GPU, timed after a
device synchronize.

The `matmuls` rows time only the model's linears for a one-token step at batch 8 (`matmul_step_s`),
as plain `F.linear` (what HF runs) and packed for oneDNN (what ours runs on a CPU, see
`model.decode`): `ours_of_matmuls_fp32` says how much of ours' step the rest (attention over the
cache, norms, top-k, the draw) adds. `F.linear` at M = 8 reads the weights well below the memory
bandwidth, so its row is no floor for a sampler that packs them. Headline (batch 8): ours vs HF in
fp32, in bf16, and ours in bf16 against HF's default fp32.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from genpt_dist.device import describe, pick_device, synchronize
from genpt_dist.model.decode import can_pack

if TYPE_CHECKING:
    from genpt_dist.model.gpt import GPT

REPEATS = 5
TOP_K, TEMPERATURE = 50, 0.8


def _export_random_model(folder: str, quick: bool):
    from genpt_dist.export import ExportProvenance, write_export
    from genpt_dist.model.gpt import GPT, GPTConfig
    from genpt_dist.tokenizer import byte_tokenizer

    n_layer, n_head, d_model = (2, 4, 128) if quick else (6, 6, 384)
    cfg = GPTConfig(vocab_size=8192, block_size=256, n_layer=n_layer, n_head=n_head, d_model=d_model)
    torch.manual_seed(0)
    model = GPT(cfg)
    tok = byte_tokenizer()  # the model's vocabulary is larger than the tokenizer's: allowed
    write_export(folder, "hf", model.state_dict(), cfg, tok, ExportProvenance(stage="bench"))  # no source
    return cfg


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [32 - (7 * i) % 9 for i in range(batch)]  # 24..32, mixed: left padding is exercised
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_inputs(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _best_time(fn: Callable[[], int], repeats: int, device: torch.device) -> tuple[float, int, float]:
    """(best wall seconds, tokens produced, best process CPU seconds) over `repeats` calls."""
    best, best_cpu, produced = float("inf"), float("inf"), 0
    for _ in range(repeats):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        produced = fn()
        synchronize(device)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, produced, best_cpu


def matmul_step_s(model: GPT, batch: int, device: torch.device, pack: bool, steps: int = 50) -> float:
    """Seconds per decode step of a GPT's matmuls alone: each block's four linears (qkv, attention
    projection, MLP up with its activation, MLP down) and the lm_head on (batch, d_model) inputs, as
    `model.decode.DecodeWeights` runs them, packed for oneDNN or plain `F.linear`; best of 3 x `steps`.

    A one-token step at a small batch multiplies every weight once, so a sampler whose linears run
    this way cannot run a step in less; the rest of its step is attention, norms, top-k and the draw."""
    from genpt_dist.model.decode import PACK_MIN_STEPS, DecodeWeights

    weights = DecodeWeights.of(model, batch, PACK_MIN_STEPS if pack else 0)
    layers = [(f, d) for b in weights.blocks for f, d in ((b.qkv, 0), (b.proj, 0), (b.fc_act, 0), (b.fc_proj, 1))]
    layers.append((weights.lm_head, 0))
    C, dtype = model.config.d_model, model.lm_head.weight.dtype
    inputs = [torch.randn(batch, C, dtype=dtype, device=device), torch.randn(batch, 4 * C, dtype=dtype, device=device)]
    best = float("inf")
    with torch.inference_mode():
        for repeat in range(4):  # the first is a warm-up
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                for f, d in layers:
                    f(inputs[d])
            synchronize(device)
            if repeat:
                best = min(best, (time.perf_counter() - t0) / steps)
    return best


def bench_generate(quick: bool = False, device: str = "auto") -> dict[str, Any]:
    import transformers

    from genpt_dist.checkpoint import load_model
    from genpt_dist.model.sampling import sample

    transformers.logging.set_verbosity_error()
    dev = pick_device(device)
    new_tokens = 32 if quick else 128
    cache_cmp_tokens = 16 if quick else 32
    batches = (8,) if quick else (1, 8)
    repeats = 2 if quick else REPEATS
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="genpt-bench-gen-") as folder:
        cfg = _export_random_model(folder, quick)
        ours32, tok, _ = load_model(folder, dev)
        hf = transformers.GPT2LMHeadModel
        models = {
            "fp32": (ours32, hf.from_pretrained(folder, local_files_only=True).eval().to(dev)),
            "bf16": (
                load_model(folder, dev)[0].to(torch.bfloat16),
                hf.from_pretrained(folder, local_files_only=True, dtype=torch.bfloat16).eval().to(dev),
            ),
        }
        for _, peer in models.values():
            peer.generation_config.eos_token_id = None  # never stop early: exactly batch x new tokens

        def run_ours(model, prompts, n, use_cache=True) -> Callable[[], int]:
            def fn() -> int:
                out = sample(
                    model,
                    prompts,
                    max_new_tokens=n,
                    top_k=TOP_K,
                    temperature=TEMPERATURE,
                    seed=0,
                    pad_id=tok.pad_id,
                    use_cache=use_cache,
                )
                return int(out.new_lengths.sum())

            return fn

        def run_hf(model, prompts, n) -> Callable[[], int]:
            ids, mask = (t.to(dev) for t in _hf_inputs(prompts, tok.pad_id))

            def fn() -> int:
                torch.manual_seed(0)
                with torch.inference_mode():
                    out = model.generate(
                        ids,
                        attention_mask=mask,
                        do_sample=True,
                        top_k=TOP_K,
                        temperature=TEMPERATURE,
                        max_new_tokens=n,
                        pad_token_id=tok.pad_id,
                    )
                return int(out[:, ids.size(1) :].numel())

            return fn

        summary: dict[str, Any] = {}
        for batch in batches:
            prompts = _prompts(batch, cfg.vocab_size)
            for dtype, (ours, hf) in models.items():
                fns = {"ours": run_ours(ours, prompts, new_tokens), "hf": run_hf(hf, prompts, new_tokens)}
                for fn in fns.values():
                    fn()  # warm-up (allocator, oneDNN kernels)
                timed: dict[str, list[tuple[float, int, float]]] = {name: [] for name in fns}
                for _ in range(repeats):  # alternate, so a noisy neighbour hurts both alike
                    for name, fn in fns.items():
                        timed[name].append(_best_time(fn, 1, dev))
                best = {name: min(timed[name]) for name in fns}
                cpu = {name: min(t[2] for t in timed[name]) for name in fns}
                for name in fns:
                    seconds, produced, _ = best[name]
                    rows.append(
                        {
                            "impl": "ours" if name == "ours" else "hf generate",
                            "dtype": dtype,
                            "batch": batch,
                            "new": new_tokens,
                            "cache": "yes",
                            "seconds": round(seconds, 3),
                            "cpu_s": round(cpu[name], 3),
                            "tok_per_s": produced / seconds,
                        }
                    )
                speedup, cpu_speedup = best["hf"][0] / best["ours"][0], cpu["hf"] / cpu["ours"]
                rows[-2]["vs_hf"] = f"{speedup:.2f}x"
                rows[-1]["vs_hf"] = "1.00x"
                summary[f"b{batch}_{dtype}"] = {
                    "ours_tok_per_s": round(rows[-2]["tok_per_s"], 1),
                    "hf_tok_per_s": round(rows[-1]["tok_per_s"], 1),
                    "speedup": round(speedup, 3),
                    "cpu_time_speedup": round(cpu_speedup, 3),
                }

        floors: dict[str, dict[str, float]] = {}
        for dtype, (ours, _) in models.items():  # what a step of only the matmuls takes, batch 8
            hf_tok_s = summary[f"b{batches[-1]}_{dtype}"]["hf_tok_per_s"]
            floors[dtype] = {}
            for kind, pack in (("F.linear", False), ("packed", True)):
                if pack and not can_pack(ours.lm_head.weight):
                    continue
                step_s = matmul_step_s(ours, batches[-1], dev, pack)
                floors[dtype][kind] = batches[-1] / step_s
                rows.append(
                    {
                        "impl": f"matmuls {kind}",
                        "dtype": dtype,
                        "batch": batches[-1],
                        "new": new_tokens,
                        "cache": "",
                        "seconds": round(step_s * new_tokens, 3),
                        "cpu_s": "",
                        "tok_per_s": floors[dtype][kind],
                        "vs_hf": f"{floors[dtype][kind] / hf_tok_s:.2f}x",
                    }
                )

        prompts = _prompts(batches[-1], cfg.vocab_size)
        times = {}
        for use_cache in (True, False):
            fn = run_ours(ours32, prompts, cache_cmp_tokens, use_cache)
            fn()
            times[use_cache] = _best_time(fn, 2, dev)
            seconds, produced, cpu_s = times[use_cache]
            rows.append(
                {
                    "impl": "ours",
                    "dtype": "fp32",
                    "batch": batches[-1],
                    "new": cache_cmp_tokens,
                    "cache": "yes" if use_cache else "no",
                    "seconds": round(seconds, 3),
                    "cpu_s": round(cpu_s, 3),
                    "tok_per_s": produced / seconds,
                    "vs_hf": "",
                }
            )
        cache_speedup = times[False][0] / times[True][0]

    b = batches[-1]
    fp32, bf16 = summary[f"b{b}_fp32"], summary[f"b{b}_bf16"]
    return {
        "device": describe(dev),
        "model": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size},
        "settings": {
            "top_k": TOP_K,
            "temperature": TEMPERATURE,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
        },
        "rows": rows,
        "batch": b,
        "ours_fp32_tok_per_s": fp32["ours_tok_per_s"],
        "hf_fp32_tok_per_s": fp32["hf_tok_per_s"],
        "speedup_fp32": fp32["speedup"],
        "cpu_time_speedup_fp32": fp32["cpu_time_speedup"],
        "ours_bf16_tok_per_s": bf16["ours_tok_per_s"],
        "hf_bf16_tok_per_s": bf16["hf_tok_per_s"],
        "speedup_bf16": bf16["speedup"],
        "cpu_time_speedup_bf16": bf16["cpu_time_speedup"],
        "speedup_ours_bf16_vs_hf_fp32": round(bf16["ours_tok_per_s"] / fp32["hf_tok_per_s"], 3),
        "kv_cache_speedup": round(cache_speedup, 2),
        "matmuls_fp32_tok_per_s": {kind: round(v, 1) for kind, v in floors["fp32"].items()},
        "ours_of_matmuls_fp32": {kind: round(fp32["ours_tok_per_s"] / v, 3) for kind, v in floors["fp32"].items()},
        "weights_mb": {
            k: round(sum(p.numel() * p.element_size() for p in m.parameters()) / 1e6, 1) for k, (m, _) in models.items()
        },
        "by_setting": summary,
    }
