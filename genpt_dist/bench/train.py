"""`bench train`: training throughput of ours vs a plain PyTorch loop vs Hugging Face GPT-2, with MFU
against the bf16 / fp32 matmul throughput measured in the same run.

All contenders train the same shape on the same token batch, single process, this process's threads:
- plain:   our GPT, torch AdamW, bf16 autocast, a hand-written loop (nanoGPT style)
- hf:      `transformers.GPT2LMHeadModel` of the same shape, same optimizer, same autocast loop
- zero-k:  our GPT inside a DeepSpeed ZeRO-k engine built by `train.deepspeed` (bf16), world size 1
Each runs `warmup` steps, then is timed over `steps` steps; tokens/s = B * T * steps / seconds; then
two more steps run under torch.profiler, which says what share of the step the matmul and attention
kernels take (`matmul_share`). On this CPU both ours and HF spend ~70% there at ~50% MFU, so one
cannot be much faster than the other: `zero2_vs_hf_ceiling` is what ZeRO-2 would gain over HF if all
of its other ops took no time. torch.compile of the plain loop measured no gain here (2,618 vs 2,678
tokens/s after a 31 s compile), so it is not used.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from typing import Any, Callable

import torch

from genpt_dist.config import DeepSpeedConfig, OptimConfig, TrainConfig
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.train.metrics import measure_matmul_flops

log = logging.getLogger(__name__)


def _time_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def _plain_step(model: torch.nn.Module, x: torch.Tensor, hf: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if hf:
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            else:
                _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _init_single_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")


def _zero_step(cfg: GPTConfig, x: torch.Tensor, stage: int, batch: int) -> Callable[[], None]:
    from genpt_dist.train.deepspeed import build_ds_config, build_engine, build_optimizer

    _init_single_process_group()
    model = GPT(cfg)
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    ds = build_ds_config(DeepSpeedConfig(zero_stage=stage), TrainConfig(micro_batch_size=batch), optim, "bf16")
    opt, sched = build_optimizer(model, optim, 1000)
    engine = build_engine(model, ds, opt, sched)

    def step() -> None:
        _, loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()

    return step


def bench_train(quick: bool = False) -> dict[str, Any]:
    """Step time, tokens/s, MFU and a profile of each contender; ratios ours/HF and ZeRO-k/plain."""
    threads = torch.get_num_threads()
    if quick:
        cfg = GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=2, d_model=64)
        batch, warmup, steps = 4, 1, 2
    else:
        cfg = GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, d_model=384)
        batch, warmup, steps = 8, 3, 8
    T = cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(0))
    peak_bf16 = measure_matmul_flops(torch.bfloat16, seconds=1.0)
    peak_fp32 = measure_matmul_flops(torch.float32, seconds=1.0)
    flops_per_token = GPT(cfg).flops_per_token(T)

    contenders: dict[str, Callable[[], Callable[[], None]]] = {
        "plain": lambda: _plain_step(GPT(cfg), x, hf=False),
        "hf": lambda: _plain_step(_hf_model(cfg), x, hf=True),
    }
    for stage in (0, 1, 2, 3):
        contenders[f"zero{stage}"] = lambda stage=stage: _zero_step(cfg, x, stage, batch)

    rows: dict[str, dict[str, float]] = {}
    profiles: dict[str, dict[str, Any]] = {}
    for name, make in contenders.items():
        torch.manual_seed(0)
        step = make()
        seconds = _time_steps(step, warmup, steps)
        tok_s = batch * T / seconds
        profiles[name] = _profile(step)
        rows[name] = {"contender": name, "step_s": round(seconds, 4), "tokens_per_s": round(tok_s, 1),
                      "mfu": round(flops_per_token * tok_s / peak_bf16, 4),
                      "matmul_share": profiles[name]["matmul_share"]}
        log.info("%-6s step %.3fs  %8.0f tok/s  MFU %.1f%%", name, seconds, tok_s, 100 * rows[name]["mfu"])
        gc.collect()
    ours = rows["zero2"]["tokens_per_s"]
    return {
        "threads": threads,
        "shape": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head, "vocab": cfg.vocab_size,
                  "seq_len": T, "batch": batch},
        "matmul_gflops": {"bf16": peak_bf16 / 1e9, "fp32": peak_fp32 / 1e9},
        "flops_per_token": flops_per_token,
        "rows": list(rows.values()),
        "ratios": {
            "zero2_vs_hf": ours / rows["hf"]["tokens_per_s"],
            "plain_vs_hf": rows["plain"]["tokens_per_s"] / rows["hf"]["tokens_per_s"],
            **{f"zero{s}_vs_plain": rows[f"zero{s}"]["tokens_per_s"] / rows["plain"]["tokens_per_s"] for s in range(4)},
        },
        "mfu_zero2": rows["zero2"]["mfu"],
        "tokens_per_s_zero2": ours,
        # If every op but the matmul/attention kernels took no time: the most ZeRO-2 could gain over HF.
        "zero2_vs_hf_ceiling": rows["hf"]["step_s"] / (rows["zero2"]["step_s"] * rows["zero2"]["matmul_share"]),
        "profile": profiles,
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product")


def _profile(step: Callable[[], None], steps: int = 2) -> dict[str, Any]:
    """Where a step's CPU time goes (torch.profiler, self time): the share of the matmul and attention
    kernels, which bound a step at a given MFU, and the five largest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    matmul = sum(e.self_cpu_time_total for e in events if any(op in e.key for op in MATMUL_OPS))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:5]
    return {"matmul_share": round(matmul / total, 3),
            "top_ops": {e.key[:60]: round(e.self_cpu_time_total / total, 3) for e in top}}


def _hf_model(cfg: GPTConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu_new", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(hf_cfg)
