"""`bench scaling`: the same pretraining job as 1 worker x 2 torch threads and as 2 workers x 1 thread.

Both go through the real `pretrain` path (Ray Train `TorchTrainer`, DeepSpeed ZeRO-2 bf16, gloo, the
shard loader in-process) on tinyshakespeare prepared with the byte tokenizer into a local folder. Same
model, same global batch (2 x micro batch 8: grad_accum 2 on one worker, 1 on two), same step count; the
worker's torch threads are its `scaling.cpus_per_worker` (`train.launcher.init_worker`). Throughput is taken
from the loop's own progress windows (`metrics.jsonl`), leaving out the first window (start-up, first
steps); eval and the checkpoint happen only after the last window. Wall time (Ray Train start-up,
DeepSpeed init, checkpoint) is reported too. So is how much a second thread speeds up a bf16 matmul in
this process at the time (`matmul_2t_vs_1t`, ~1.9x on a quiet machine): with other work on the cores,
torch's intra-op threads wait at each op's barrier for a descheduled sibling and 2 threads can run
slower than 1, which the 1 x 2 setting pays and the 2 x 1 setting does not.

Target: tokens/s of 2 x 1 >= 0.9 x that of 1 x 2 (data parallelism costs no more than 10% against
intra-op threads on two cores).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from genpt_dist import storage

log = logging.getLogger(__name__)

TARGET_RATIO = 0.9
MICRO = 8
SETTINGS = {"1x2": (1, 2), "2x1": (2, 1)}  # name -> (workers, threads each)


def _steady_tokens_per_s(run: str) -> tuple[float, int]:
    """tokens/s over the loop's progress windows after the first (start-up), and how many were kept.

    A window covers the steps since the previous one at its `tokens_per_s`; its seconds are
    steps / that rate (in any unit of tokens per step, which cancels)."""
    lines = storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()
    windows = [(r["step"], r["tokens_per_s"]) for r in map(json.loads, filter(None, lines)) if "tokens_per_s" in r]
    spans = [(step - prev, rate) for (step, rate), (prev, _) in zip(windows, [(0, 0.0), *windows])]
    kept = spans[1:] or spans
    return sum(n for n, _ in kept) / sum(n / rate for n, rate in kept), len(kept)


def _thread_speedup() -> dict[str, float]:
    """bf16 matmul GFLOP/s of this process on 1 and on 2 threads, now."""
    import torch

    from genpt_dist.train.metrics import measure_matmul_flops

    threads = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out[f"gflops_{n}t"] = round(measure_matmul_flops(torch.bfloat16, n=512, seconds=0.5) / 1e9, 1)
    finally:
        torch.set_num_threads(threads)
    return out


def bench_scaling(quick: bool = False) -> dict[str, Any]:
    """tokens/s of 1 worker x 2 threads vs 2 workers x 1 thread, same job; the ratio."""
    import ray

    from genpt_dist.bench.data import corpus_path
    from genpt_dist.config import load_config
    from genpt_dist.data.prepare import prepare
    from genpt_dist.raycluster import init_ray
    from genpt_dist.train.pretrain import pretrain

    if quick:
        shape, seq_len, steps, log_every = ("model.n_layer=2", "model.n_head=2", "model.d_model=64"), 64, 6, 2
    else:
        shape, seq_len, steps, log_every = ("model.n_layer=4", "model.n_head=4", "model.d_model=256"), 256, 40, 8
    common = [
        *shape,
        f"data.seq_len={seq_len}",
        "data.tokenizer=byte",
        "data.split=tail",
        "loader.num_workers=0",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
        f"train.micro_batch_size={MICRO}",
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.eval_batches=1",
        "train.keep_checkpoints=1",
        "scaling.max_failures=0",
    ]
    matmul = _thread_speedup()
    started = not ray.is_initialized()
    init_ray()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="genpt-bench-scaling-") as tmp:
            text = corpus_path().read_bytes()
            src = Path(tmp) / "corpus.txt"
            src.write_bytes(text[: 256 << 10] if quick else text)
            data = str(Path(tmp) / "data")
            prepare([str(src)], data, load_config(None, common).data)
            for name, (workers, threads) in SETTINGS.items():
                cfg = load_config(
                    None,
                    [
                        *common,
                        f"scaling.num_workers={workers}",
                        f"scaling.cpus_per_worker={threads}",
                        f"deepspeed.grad_accum={2 // workers}",
                    ],
                )
                run = str(Path(tmp) / f"run-{name}")
                t0 = time.perf_counter()
                summary = pretrain(data, run, cfg)
                wall = time.perf_counter() - t0
                tok_s, windows = _steady_tokens_per_s(run)
                rows.append(
                    {
                        "setting": name,
                        "workers": workers,
                        "threads": threads,
                        "steps": steps,
                        "global_batch_tokens": 2 * MICRO * seq_len,
                        "tokens_per_s": round(tok_s, 1),
                        "windows": windows,
                        "wall_s": round(wall, 1),
                        "final_loss": round(summary["train_loss"], 4),
                    }
                )
                log.info("scaling %s: %s", name, rows[-1])
    finally:
        if started:
            ray.shutdown()
    one, two = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    ratio = two / one
    return {
        "what": f"pretrain (Ray Train + DeepSpeed ZeRO-2 bf16, gloo), {steps} steps, global batch {2 * MICRO} x "
        f"{seq_len} tokens, byte tokenizer, tinyshakespeare in a local folder",
        "shape": dict(s.split("=") for s in shape),
        "rows": rows,
        "tokens_per_s_1x2": one,
        "tokens_per_s_2x1": two,
        "ratio_2x1_vs_1x2": round(ratio, 3),
        "matmul": matmul,
        "matmul_2t_vs_1t": round(matmul["gflops_2t"] / matmul["gflops_1t"], 2),
        "target": {"ratio_min": TARGET_RATIO, "met": ratio >= TARGET_RATIO},
    }
