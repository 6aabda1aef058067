"""The one place distribution is applied: typed config -> DeepSpeed config -> engine.

Imported only inside Ray Train workers (and by re-partitioning), never by the model code.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from genpt_dist.config import DeepSpeedConfig, OptimConfig

SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory all-reduce, used by its inference all-reduce only


def load_deepspeed():
    """The `deepspeed` module, as training imports it (a worker's engines, re-partitioning; the checkpoint
    layer below reads ZeRO files with DeepSpeed's `zero_to_fp32` directly, once per command). Its autotuner
    imports MLflow at module level when MLflow is installed (about 1.2 s of each process's start; training
    never autotunes), so `mlflow` is unimportable while DeepSpeed is imported, and importable again after
    (checked against deepspeed 0.19.8)."""
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", "") is None:
            del sys.modules["mlflow"]
    return deepspeed


def _without_shm_comm_op() -> None:
    """Mark DeepSpeed's shared-memory all-reduce op unavailable before its torch backend starts: the backend
    loads it on start, a JIT-compiled C++ extension (about 35 s the first time on a machine, a compiler
    probe in each process after), for `inference_all_reduce` alone; training's collectives are
    torch.distributed's. `deepspeed.ops.__compatible_ops__` is the table DeepSpeed keeps for such edits."""
    import deepspeed.ops

    if SHM_COMM_OP in deepspeed.ops.__compatible_ops__:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def resolve_precision(ds: DeepSpeedConfig, use_gpu: bool) -> str:
    """An explicit precision as given; `auto` -> on a GPU bf16 where supported, else fp16; on a CPU bf16
    only where a short matmul measurement (`hardware.auto_precision`, ~0.1 s, cached per process and on
    disk) shows bf16 faster than fp32, else fp32: CPUs with AVX512-BF16 or AMX run bf16 ~2-3x fp32, but
    AVX2-only CPUs emulate it ~50x slower than fp32."""
    if ds.precision != "auto":
        return ds.precision
    from genpt_dist.hardware import auto_precision

    return auto_precision(use_gpu)


def build_ds_config(
    ds: DeepSpeedConfig,
    *,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    precision: str,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON config, built from the typed config in one function (`ds.grad_accum` is the
    recipe's; the caller passes the one in force, which an elastic resume may have rescaled).

    Contiguous gradient buffers only on GPUs, where they stop memory fragmenting; on CPUs the extra
    copy of every gradient costs a few percent of a ZeRO-1/2 step and saves nothing (BENCHMARKS.md,
    "bench train")."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=use_gpu, reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload steps our optimizer on the CPU partitions: torch's fused AdamW runs there (DeepSpeed
        # otherwise refuses any optimizer but its own CPU Adam, a C++ op it would have to compile).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 200}
    return conf


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int):
    """torch AdamW (decay on matrices only) and its warmup + cosine LambdaLR.

    The fused AdamW (one kernel over each tensor, on CPUs and GPUs): DeepSpeed's ZeRO hands it flat
    float32 partitions, over which the foreach version makes a separate memory-bound pass per op (sqrt,
    lerp, addcdiv, ...), several times the fused kernel's time (BENCHMARKS.md, "bench train")."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps))
    return opt, sched


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optimizer, scheduler):
    """Wrap a built model in a DeepSpeed engine (the process group already exists)."""
    deepspeed = load_deepspeed()
    _without_shm_comm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine


def gather_full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (ZeRO-3 parameters are gathered; rank-local otherwise)."""
    deepspeed = load_deepspeed()

    module = engine.module
    params = list(module.parameters())
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _fp32_copies(module.state_dict())
    return _fp32_copies(module.state_dict())


def _fp32_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One fp32 copy per distinct tensor: entries that share storage (the tied embedding and head) keep
    sharing it, so publishing them stores it once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key not in copies or t.data_ptr() == 0:
            copies[key] = t.detach().to(torch.float32, copy=True)
        out[name] = copies[key]
    return out
