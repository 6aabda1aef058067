"""`bench train`: training throughput of ours vs a plain PyTorch loop vs Hugging Face GPT-2, with MFU
against the bf16 / fp32 matmul throughput measured in the same run.

All contenders train the same shape on the same token batch, single process, on `--device` (the CPU
with this process's threads, or one GPU; shape on a GPU: GPT-2 124M at context 1024):
- plain:   our GPT, torch AdamW, bf16 autocast, a hand-written loop (nanoGPT style)
- hf:      `transformers.GPT2LMHeadModel` of the same shape as GPT-2 ships it (`gelu_new`, the tanh GELU
           written in PyTorch ops), same optimizer, same autocast loop
- hf_gelu: the same with `activation_function="gelu"`, the exact GELU our recipes default to
           (`model.activation`): the like-for-like peer of our model
- zero-k:  our GPT inside a DeepSpeed ZeRO-k engine built by `train.deepspeed` (bf16), world size 1
Our GPT has the recipes' default activation. All are built first and warmed up; then `windows` rounds
each time `steps` steps of every contender in turn, and a contender's step time is the median of its
windows (`step_s`; its best window is `step_s_best`): a shared machine's speed moves both ways, slowed
by a busy neighbour and, on a VM whose matmul unit is sometimes uncontended, sped up for a few seconds
at a time, and the median is the figure neither moves; tokens/s = B * T / step time. A bf16 matmul
peak is measured before and after the windows: when the two differ by more than `MAX_PEAK_DRIFT` the
run says the machine was not steady (`matmul_gflops.steady`). Then two more steps of each run under
torch.profiler, which says what share of the step the matmul and attention kernels take (`matmul_share`);
`zero2_vs_hf_ceiling` is what ZeRO-2 would gain over HF if all of its other ops took no time. On a GPU
the same code runs with CUDA tensors, autocast on "cuda", DeepSpeed's cuda accelerator over nccl, and a
device-side profile.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from genpt_dist.config import DeepSpeedConfig, ModelConfig, OptimConfig
from genpt_dist.device import describe, pick_device, synchronize
from genpt_dist.hardware import measure_matmul
from genpt_dist.model.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)


ACTIVATION = ModelConfig.model_fields["activation"].default  # what a recipe trains with unless it says otherwise
# A matmul peak measured after the contenders' windows more than this many times apart from the one before
# them: the machine's speed moved during the run (`matmul_gflops.steady` is false, and the run says so).
MAX_PEAK_DRIFT = 1.3

# (shape, batch, warmup steps, timed steps per window, windows) per setting; our GPT trains with ACTIVATION
SHAPES: dict[str, tuple[GPTConfig, int, int, int, int]] = {
    "quick": (GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=2, d_model=64), 4, 1, 2, 1),
    "cpu": (GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, d_model=384), 8, 3, 2, 7),
    # GPT-2 124M (vocab padded to a multiple of 64, as nanoGPT does)
    "cuda": (GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, d_model=768), 16, 5, 10, 3),
}


def _time_window(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean seconds per step over `steps` steps."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def _plain_step(model: torch.nn.Module, x: torch.Tensor, hf: bool) -> Callable[[], None]:
    model.to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            if hf:
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            else:
                _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _zero_step(cfg: GPTConfig, x: torch.Tensor, stage: int, batch: int) -> Callable[[], None]:
    from genpt_dist.train.collective import init_single_process_group
    from genpt_dist.train.deepspeed import build_ds_config, build_engine, build_optimizer

    init_single_process_group(x.device)
    model = GPT(cfg)
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    ds = build_ds_config(
        DeepSpeedConfig(zero_stage=stage),
        micro_batch_size=batch,
        grad_accum=1,
        grad_clip=optim.grad_clip,
        precision="bf16",
        use_gpu=x.device.type == "cuda",
    )
    opt, sched = build_optimizer(model, optim, 1000)
    engine = build_engine(model, ds, opt, sched)

    def step() -> None:
        _, loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()

    return step


def _matmul_peak(dtype: torch.dtype, dev: torch.device) -> float:
    return measure_matmul(dtype, device=dev, samples=20, sample_s=0.05).flops


def bench_train(quick: bool = False, device: str = "auto") -> dict[str, Any]:
    """Step time, tokens/s, MFU and a profile of each contender; ratios ours/HF and ZeRO-k/plain."""
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    threads = torch.get_num_threads()
    shape, batch, warmup, steps, windows = SHAPES["quick" if quick else dev.type]
    cfg = dataclasses.replace(shape, activation=ACTIVATION)
    T = cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    # The MFU denominator: the best of a bf16 matmul measured before and after timing the contenders, so a
    # neighbour that slows one measurement does not flatter every MFU of the run; each measurement is itself
    # the best of 20 samples of ~50 ms (`hardware.measure_matmul`).
    peaks_bf16 = [_matmul_peak(torch.bfloat16, dev)]
    peak_fp32 = _matmul_peak(torch.float32, dev)
    flops_per_token = GPT(cfg).flops_per_token(T)

    contenders: dict[str, Callable[[], Callable[[], None]]] = {
        "plain": lambda: _plain_step(GPT(cfg), x, hf=False),
        "hf": lambda: _plain_step(_hf_model(cfg, "gelu_new"), x, hf=True),
        "hf_gelu": lambda: _plain_step(_hf_model(cfg, cfg.activation), x, hf=True),
    }
    for stage in (0, 1, 2, 3):
        contenders[f"zero{stage}"] = functools.partial(_zero_step, cfg, x, stage, batch)

    steppers: dict[str, Callable[[], None]] = {}
    for name, make in contenders.items():
        torch.manual_seed(0)
        steppers[name] = make()
        for _ in range(warmup):
            steppers[name]()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for window in range(windows):
        for name, step in steppers.items():
            times[name].append(_time_window(step, steps, dev))
        log.info("window %d/%d: %s", window + 1, windows, "  ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    median = {name: statistics.median(t) for name, t in times.items()}
    peaks_bf16.append(_matmul_peak(torch.bfloat16, dev))
    peak_bf16 = max(peaks_bf16)
    drift = peak_bf16 / min(peaks_bf16)
    if drift > MAX_PEAK_DRIFT:
        log.warning(
            "the bf16 matmul peak moved %.1fx during the run (%.0f GFLOP/s before the windows, %.0f after): the "
            "machine was not steady; the ratios compare medians of interleaved windows, MFU takes the higher peak",
            drift,
            peaks_bf16[0] / 1e9,
            peaks_bf16[1] / 1e9,
        )
    rows: dict[str, dict[str, Any]] = {}
    profiles: dict[str, dict[str, Any]] = {}
    for name in list(steppers):
        profiles[name] = _profile(steppers.pop(name), dev)
        tok_s = round(batch * T / median[name], 1)
        rows[name] = {
            "contender": name,
            "step_s": round(median[name], 4),
            "step_s_best": round(min(times[name]), 4),
            "tokens_per_s": tok_s,
            "mfu": round(flops_per_token * tok_s / peak_bf16, 4),
            "matmul_share": profiles[name]["matmul_share"],
        }
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ours = rows["zero2"]["tokens_per_s"]
    return {
        "device": describe(dev),
        "threads": threads,
        "shape": {
            "n_layer": cfg.n_layer,
            "d_model": cfg.d_model,
            "n_head": cfg.n_head,
            "vocab": cfg.vocab_size,
            "seq_len": T,
            "batch": batch,
        },
        "matmul_gflops": {
            "bf16": peak_bf16 / 1e9,
            "fp32": peak_fp32 / 1e9,
            "bf16_before_after": [round(p / 1e9, 1) for p in peaks_bf16],
            "drift": round(drift, 2),
            "steady": drift <= MAX_PEAK_DRIFT,
        },
        "flops_per_token": flops_per_token,
        "timing": {"warmup_steps": warmup, "steps_per_window": steps, "windows": windows, "step_s": "median window"},
        "rows": list(rows.values()),
        "ratios": {
            "zero2_vs_hf": ours / rows["hf"]["tokens_per_s"],
            "zero2_vs_hf_gelu": ours / rows["hf_gelu"]["tokens_per_s"],
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
MATMUL_KERNELS = ("gemm", "xmma", "cutlass", "flash", "fmha")  # cuBLAS / CUTLASS matmuls, attention


def _profile(step: Callable[[], None], device: torch.device, steps: int = 2) -> dict[str, Any]:
    """Where a step's time goes on the device (torch.profiler, self time; CPU time on the CPU, kernel
    time on a GPU): the share of the matmul and attention ops, which bound a step at a given MFU, and
    the five largest ops."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)

    def self_time(e: Any) -> float:
        return e.self_device_time_total if on_gpu else e.self_cpu_time_total

    # On a GPU the kernels themselves (each counted once; their launching ops would count them again).
    events = [
        e
        for e in prof.key_averages()
        if self_time(e) > 0 and (not on_gpu or e.device_type == torch.autograd.DeviceType.CUDA)
    ]
    names = MATMUL_KERNELS if on_gpu else MATMUL_OPS
    total = sum(map(self_time, events)) or 1.0
    matmul = sum(self_time(e) for e in events if any(op in e.key.lower() for op in names))
    top = sorted(events, key=lambda e: -self_time(e))[:5]
    return {
        "matmul_share": round(matmul / total, 3),
        "top_ops": {e.key[:60]: round(self_time(e) / total, 3) for e in top},
    }


def _hf_model(cfg: GPTConfig, activation: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # attn_implementation is taken by PreTrainedConfig's **kwargs, which GPT2Config's typed dataclass fields omit
    hf_cfg = GPT2Config(  # type: ignore[call-arg]
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function=activation,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(hf_cfg)
