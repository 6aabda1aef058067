"""`bench sync`: publishing policy weights to 2 rollout actors, end to end, against a plain memory copy.

What the adversarial stage does after every policy step (`rl.stage.RLWorker.publish`):
`gather_full_state_dict` (full fp32 weights) -> `RolloutGroup.publish` (`pack_state` + one `ray.put`) ->
each actor, before its next rollout, `ray.get`s the packed state and `RolloutWorker.load`s it into its
policy. Here that path runs for GPT-shaped state dicts of ~10M / 50M / 100M parameters (fp32, as the
stage publishes) to 2 real `RolloutWorker`s in 2 Ray actors; the clock runs from `pack_state` to both
actors holding the new version (median of `repeats` versions, after one warm-up version). The actors are
`RolloutActor`s with one extra method, `sync`, that does exactly what `generate` does before it samples.
`gather_s` (the stage's own fp32 copy of the weights, `gather_full_state_dict`, before publishing) is
reported beside it, outside the clock.

Peer: one `numpy.copyto` of the same number of bytes (into a buffer already touched), the floor of
any path that moves the bytes once. Target: 100M parameters to 2 actors in <= 0.5 s.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import statistics
import time
from typing import Any

import numpy as np
import torch

from genpt_dist.model.discriminator import DiscriminatorConfig
from genpt_dist.model.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)

TARGET_S = 0.5  # 100M parameters to 2 actors
ACTORS = 2
SHAPES = {  # name -> (vocab, d_model, n_layer, n_head); GPT-2 style, tied embeddings
    "10M": (8192, 256, 10, 4),
    "50M": (16384, 512, 14, 8),
    "100M": (24576, 768, 12, 12),
}


@functools.lru_cache(maxsize=1)
def _sync_actor_cls():
    import ray

    from genpt_dist.rl.rollout import WeightRefs, _RolloutActor

    class _SyncActor(_RolloutActor):
        def sync(self, weights: WeightRefs) -> dict[str, float]:
            """The weight sync of `generate` (fetch only a new version, load it), timed; no sampling."""
            t0 = time.perf_counter()
            policy = ray.get(weights.policy[0]) if weights.policy_version != self.worker.policy_version else None
            t1 = time.perf_counter()
            self.worker.load(weights.policy_version, policy)
            del policy
            t2 = time.perf_counter()
            return {"version": self.worker.policy_version, "get_s": t1 - t0, "load_s": t2 - t1}

    return ray.remote(_SyncActor)


def _memcpy_s(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return min(times)


class _Engine:
    """The two things `gather_full_state_dict` reads from a DeepSpeed engine (ZeRO <= 2: no gather)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @staticmethod
    def zero_optimization_stage() -> int:
        return 2


def _bench_size(name: str, cfg: GPTConfig, repeats: int) -> dict[str, Any]:
    import ray

    from genpt_dist.rl.rollout import WeightRefs
    from genpt_dist.rl.weights import pack_state
    from genpt_dist.train.deepspeed import gather_full_state_dict

    torch.manual_seed(0)
    engine = _Engine(GPT(cfg))
    t0 = time.perf_counter()
    state = gather_full_state_dict(engine)  # what the stage hands to RolloutGroup.publish: fp32 copies
    gather_s = time.perf_counter() - t0
    del engine
    params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")  # tied: counted once
    ref = ray.put(pack_state(state))
    disc = dataclasses.asdict(
        DiscriminatorConfig(vocab_size=cfg.vocab_size, block_size=32, n_layer=1, d_model=32, n_head=2)
    )
    actor_cls = _sync_actor_cls()
    actors = [
        actor_cls.options(num_cpus=1).remote(
            f"sync-{i}", dataclasses.asdict(cfg), disc, ref, pad_id=0, eos_id=2, threads=1
        )
        for i in range(ACTORS)
    ]
    try:
        ray.get([a.ready.remote() for a in actors])
        del ref
        runs = []
        for version in range(repeats + 1):  # version 0 warms the path up (first-touch of the buffers)
            t0 = time.perf_counter()
            packed = pack_state(state)
            weights = WeightRefs(version, [ray.put(packed)], -1, [])
            t_put = time.perf_counter() - t0
            out = ray.get([a.sync.remote(weights) for a in actors])
            total = time.perf_counter() - t0
            assert all(o["version"] == version for o in out), out
            del weights, packed
            if version:
                runs.append(
                    {
                        "total_s": total,
                        "put_s": t_put,
                        "get_s": max(o["get_s"] for o in out),
                        "load_s": max(o["load_s"] for o in out),
                    }
                )
    finally:
        for a in actors:
            ray.kill(a)
    nbytes = sum(a.nbytes for a in pack_state(state).arrays.values())
    memcpy = _memcpy_s(nbytes, max(3, repeats))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row = {
        "size": name,
        "bytes": nbytes,
        "params_m": round(params / 1e6, 1),
        "mb": round(nbytes / 1e6, 1),
        "sync_s": round(med["total_s"], 3),
        "put_s": round(med["put_s"], 3),
        "get_s": round(med["get_s"], 3),
        "load_s": round(med["load_s"], 3),
        "memcpy_s": round(memcpy, 4),
        "vs_memcpy": f"{med['total_s'] / memcpy:.1f}x",
        "gb_s": round(nbytes / med["total_s"] / 1e9, 2),
        "gather_s": round(gather_s, 3),
    }
    log.info("sync %s: %s", name, row)
    return row


def bench_sync(quick: bool = False) -> dict[str, Any]:
    """Seconds from publish to 2 actors holding the new weights, per model size; ratio to a memcpy."""
    import ray

    from genpt_dist.raycluster import init_ray

    sizes = ["10M"] if quick else list(SHAPES)
    repeats = 2 if quick else 3
    started = not ray.is_initialized()
    init_ray()
    rows = []
    try:
        for name in sizes:
            vocab, d, n_layer, n_head = SHAPES[name]
            rows.append(
                _bench_size(
                    name,
                    GPTConfig(vocab_size=vocab, block_size=256, n_layer=n_layer, n_head=n_head, d_model=d),
                    repeats,
                )
            )
            gc.collect()
    finally:
        if started:
            ray.shutdown()
    last = rows[-1]
    out: dict[str, Any] = {
        "what": f"fp32 GPT state dict -> pack_state + ray.put -> {ACTORS} RolloutWorkers loaded (median of "
        f"{repeats}); peer: one numpy copy of the same bytes",
        "threads": torch.get_num_threads(),
        "rows": rows,
        **{f"sync_s_{r['size']}": r["sync_s"] for r in rows},
        **{f"memcpy_s_{r['size']}": r["memcpy_s"] for r in rows},
        **{f"bytes_{r['size']}": r.pop("bytes") for r in rows},
        "ratio_vs_memcpy": round(last["sync_s"] / last["memcpy_s"], 2),
    }
    if last["size"] == "100M":
        out["target"] = {"sync_s_100M": TARGET_S, "met": last["sync_s"] <= TARGET_S}
    return out
