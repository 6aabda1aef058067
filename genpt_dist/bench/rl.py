"""`bench rl`: a verifiable task, our `reinforce` raced against TRL's `GRPOTrainer`, one shared evaluation,
over several seeds.

The task (`rl_task.py`): fixed-width 2-digit addition, `"07+45="` -> `"052"`, all 10,000 problems
shuffled by the seed; `held_out` of them are held out (a prompt file of their own, never in the
corpus), `dev` of the train problems pick the start model. The reward is `rl_task.py:correct` (1.0 when
the completion, up to its first newline, is the answer), the one file both racers import by path.

Each seed of `RLSpec.seeds` (`--seeds`) runs the whole race below in a folder of its own (`_race`): the
problems split by the seed, a start model pretrained with `train.seed=1337+seed` and `loader.seed=seed`,
every racer seeded with `1337+seed`. The headline figures and targets are on the means over the seeds
(`rl_stats.py` defines them); each seed's race is kept whole in the JSON under `seeds`.

1. Start model, by our own stages (each a `launch.py` subprocess in the work folder): `prepare` the
   train problems as a JSONL corpus with the byte tokenizer (`configs/rl-bench.yaml`: one problem per
   sample), `pretrain` a 2-layer 64-wide GPT for `pretrain_steps` at a constant LR, a checkpoint every
   `pretrain_every` steps. A small model learns the hundreds and tens digits first and the units digit
   (a + b mod 10) in a sudden transition; the start model is the first checkpoint whose greedy dev
   accuracy reaches `start_accuracy` (the transition's beginning), and `export --format hf` gives TRL
   the same weights.
2. The racers, one after the other, each in a process of its own, timed from the moment the bench
   launches it (interpreter start, imports, Ray or accelerate set-up all count):
   * ours: `launch.py reinforce --init <start> --prompts train.jsonl --reward python:rl_task.py:correct
     --config rl-bench --set ...`: Dr. GRPO (`baseline=dr_grpo`, `normalize_advantages=false`), a
     checkpoint every `snapshot_every` updates, all kept. A checkpoint's time is the `time` of its step's
     row in the run's metrics.jsonl (logged when the update ends, just before that checkpoint is
     written; earlier checkpoints' writing counts against ours).
   * TRL (`rl_trl.py`): `GRPOConfig(loss_type="dr_grpo", scale_rewards="none", num_iterations=1, ...)`
     with the same G, completion length, top-k (none), temperature, LR and warm-up, Adam betas, weight
     decay, grad clip, KL coefficient, steps and prompts x G rows per step; a callback snapshots the
     policy every `snapshot_every` steps (its own time excluded).
   * more of ours (`RUNS`): `--reward discriminator@0.1 --data <corpus>` added, and
     `reinforce.rollout.max_staleness=1` (one-step-off overlap) when the config has that key.
3. One evaluation of every snapshot of every run, here: greedy completions (our sampler, top_k=1) of the
   held-out prompts scored by `correct`: accuracy (share scoring 1) and mean reward; ours' checkpoints
   through `checkpoint.load_model`, TRL's state dicts through `hf_compat.from_hf_state_dict` into our GPT.
   Final models also get the perplexity of the corpus' val split (real task text; `evaluate.score`, what
   `launch.py evaluate` computes).
4. Across seeds (`rl_stats.py`): each run's final accuracy, val perplexity and seconds to the same seed's
   TRL final accuracy as mean and spread; `rl.png` has one panel per seed.

CPUs: ours runs 1 Ray Train worker (1 torch thread) and 1 rollout actor (1 thread), which take turns
(on-policy) or overlap (max_staleness=1); TRL one process with 2 torch threads. The machine has 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from genpt_dist import storage
from genpt_dist.bench import rl_task
from genpt_dist.bench.rl_eval import (
    REWARD_FILE,
    REWARD_FUNC,
    Scorer,
    checkpoint_overheads,
    gpt_from_hf,
    perplexity,
    plot,
    step_profile,
)
from genpt_dist.bench.rl_stats import aggregate, table_rows, versus_trl
from genpt_dist.errors import UserError

if TYPE_CHECKING:
    from genpt_dist.checkpoint import CheckpointRef
    from genpt_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RECIPE = "rl-bench"
ROOT = Path(__file__).resolve().parents[2]
# torch.distributed's env:// rendezvous: a bench run inside a process group (torchrun's, a test's one-rank
# group) would hand its MASTER_PORT to TRL, whose accelerate then fails to bind a port that is taken.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
REQUIRED = ("ours", "trl")  # the race itself; a failure of another run is recorded and the bench goes on


@dataclass(frozen=True, kw_only=True)
class RLSpec:
    """The bench's sizes (full mode; `QUICK` is a smaller one)."""

    seeds: tuple[int, ...] = (0, 1, 2)  # one whole race each: problem split, start model, racers' seeds
    held_out: int = 256  # held-out problems (a prompt file of their own, not in the corpus)
    dev: int = 256  # train problems that pick the start checkpoint
    pretrain_steps: int = 800  # at most; the start is the first checkpoint reaching start_accuracy
    pretrain_every: int = 25
    start_accuracy: float = 0.2  # greedy dev accuracy of the start model (first checkpoint at or above)
    steps: int = 150  # policy updates, both racers
    prompts_per_step: int = 64
    group: int = 8  # samples per prompt (G)
    max_new_tokens: int = 4  # 3 digits + <eos>
    temperature: float = 1.0
    top_k: int | None = None  # none: sample the policy itself (TRL: top_k=0)
    lr: float = 1e-3
    warmup_steps: int = 10
    kl_coef: float = 0.0
    snapshot_every: int = 15
    trl_threads: int = 2
    timeout_s: float = 900.0  # per subprocess
    runs: tuple[str, ...] = (
        "ours",
        "trl",
        "ours+discriminator",
        "ours max_staleness=1",
        "ours clip_against_previous=false",
    )


QUICK = RLSpec(seeds=(0,), pretrain_every=50, steps=20, snapshot_every=10, runs=("ours", "trl"))


@dataclass(frozen=True)
class RunSpec:
    """One racer: ours with extra rewards / overrides, or TRL."""

    name: str
    kind: str  # "ours" | "trl"
    rewards: tuple[str, ...] = ()  # added to the task's reward
    data: bool = False  # pass --data <the prepared corpus>
    sets: tuple[str, ...] = ()  # extra --set overrides
    needs_key: str | None = None  # a config key the run needs (skipped, and said so, when absent)
    note: str = ""


RUNS = {
    "ours": RunSpec("ours", "ours", note="reinforce, Dr. GRPO, on-policy"),
    "trl": RunSpec("trl", "trl", note="trl.GRPOTrainer, loss_type=dr_grpo, scale_rewards=none"),
    "ours+discriminator": RunSpec(
        "ours+discriminator",
        "ours",
        rewards=("discriminator@0.1",),
        data=True,
        # real windows are whole problems, <bos> aa+bb= (6) sss <eos> (4), as the rollouts' rows
        sets=("reinforce.rollout.prompt_len=6", "reinforce.discriminator.pretrain_steps=5"),
        note="+ discriminator@0.1 trained online on the task corpus",
    ),
    "ours max_staleness=1": RunSpec(
        "ours max_staleness=1",
        "ours",
        sets=("reinforce.rollout.max_staleness=1",),
        needs_key="reinforce.rollout.max_staleness",
        note="one-step-off: step s+1's rollouts sampled while step s trains",
    ),
    "ours clip_against_previous=false": RunSpec(
        "ours clip_against_previous=false",
        "ours",
        sets=("reinforce.clip_against_previous=false",),
        needs_key="reinforce.clip_against_previous",
        note="on-policy without the trust region against the previous policy: one plain step per batch",
    ),
}


# ------------------------------------------------------------------------------------- subprocesses


def _cli(args: list[str], log_to: Path, timeout_s: float) -> tuple[dict[str, Any], float]:
    """`launch.py ARGS` in a process of its own (stderr to `log_to`); (its summary, launch wall time)."""
    return _run(
        [sys.executable, "-c", "from genpt_dist.cli import main; raise SystemExit(main())", *args], log_to, timeout_s
    )


def _run(cmd: list[str], log_to: Path, timeout_s: float) -> tuple[dict[str, Any], float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)  # each racer starts (and pays for) its own local Ray
    for name in RENDEZVOUS_VARS:  # and is a process group of its own, whatever group the bench runs in
        env.pop(name, None)
    with open(log_to, "w") as err:
        t0 = time.time()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, cwd=str(ROOT), start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise UserError(f"bench rl: {' '.join(cmd[3:6])} ran past {timeout_s:.0f}s (log: {log_to})") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log_to.read_text()[-2000:]
        raise RuntimeError(f"bench rl: {' '.join(cmd[3:6])} failed (exit {proc.returncode}); log {log_to}:\n{tail}")
    return json.loads(lines[-1]), t0


# ------------------------------------------------------------------------------------- evaluation


def _config_has(key: str) -> bool:
    from genpt_dist.config import load_config
    from genpt_dist.recipes import recipe_path

    try:
        load_config(recipe_path(RECIPE), [f"{key}=0"])
    except (UserError, ValueError):
        return False
    return True


def _ours_sets(spec: RLSpec, seed: int) -> list[str]:
    rows = spec.prompts_per_step * spec.group
    return [
        f"reinforce.train.steps={spec.steps}",
        f"reinforce.train.checkpoint_every={spec.snapshot_every}",
        f"reinforce.train.keep_checkpoints={spec.steps // spec.snapshot_every + 2}",
        f"reinforce.train.micro_batch_size={rows}",
        f"reinforce.train.seed={1337 + seed}",
        f"reinforce.prompts_per_step={spec.prompts_per_step}",
        f"reinforce.rollout.samples_per_prompt={spec.group}",
        f"reinforce.rollout.sampling.max_new_tokens={spec.max_new_tokens}",
        f"reinforce.rollout.sampling.temperature={spec.temperature}",
        f"reinforce.rollout.sampling.top_k={'null' if spec.top_k is None else spec.top_k}",
        f"reinforce.optim.lr={spec.lr}",
        f"reinforce.optim.warmup_steps={spec.warmup_steps}",
        f"reinforce.kl_coef={spec.kl_coef}",
        "reinforce.baseline=dr_grpo",
        "reinforce.normalize_advantages=false",
    ]


@dataclass(frozen=True)
class _Start:
    """One seed's start model and what every run of that seed is scored with."""

    ref: CheckpointRef  # its pretrain checkpoint
    hf: str  # the same weights exported for TRL
    tok: Tokenizer
    scorer: Scorer  # greedy held-out accuracy
    data: str  # the prepared corpus (its val split gives the perplexity)
    eval: dict[str, float]  # the scorer's figures of the start model
    entry: dict[str, Any]  # the race JSON's "start"


def _start_model(
    spec: RLSpec, seed: int, root: Path, held_out: list[tuple[str, str]], dev: list[tuple[str, str]], logs: Path
) -> _Start:
    """`prepare` + `pretrain` by our stages, seeded by `seed`; the first checkpoint at `start_accuracy`."""
    from genpt_dist.checkpoint import list_checkpoints, load_model

    data, pre = str(root / "data"), str(root / "pretrain")
    _cli(
        ["prepare", "--input", str(root / "corpus.jsonl"), "--output", data, "--config", RECIPE],
        logs / "prepare.log",
        spec.timeout_s,
    )
    n_ckpt = spec.pretrain_steps // spec.pretrain_every
    _cli(
        [
            "pretrain", "--data", data, "--run", pre, "--config", RECIPE, "--set",
            f"train.steps={spec.pretrain_steps}", f"train.checkpoint_every={spec.pretrain_every}",
            f"train.eval_every={spec.pretrain_every}", f"train.keep_checkpoints={n_ckpt + 1}",
            f"train.seed={1337 + seed}", f"loader.seed={seed}",
        ],
        logs / "pretrain.log",
        spec.timeout_s,
    )  # fmt: skip
    refs = list_checkpoints(pre)
    _, tok, _ = load_model(refs[0].url)
    dev_scorer = Scorer(rl_task.prompt_rows(dev), tok, spec.max_new_tokens)
    pretrain_curve, start_ref = [], refs[-1]
    for ref in refs:
        acc = dev_scorer(load_model(ref.url)[0])["accuracy"]
        pretrain_curve.append({"step": ref.step, "dev_accuracy": acc})
        if acc >= spec.start_accuracy:
            start_ref = ref
            break
    start_model, _, _ = load_model(start_ref.url)
    hf = str(root / "start-hf")
    _cli(["export", "--model", start_ref.url, "--output", hf, "--format", "hf"], logs / "export.log", spec.timeout_s)
    scorer = Scorer(rl_task.prompt_rows(held_out), tok, spec.max_new_tokens)
    start_eval = scorer(start_model)
    entry = {
        "pretrain_step": start_ref.step,
        "checkpoint": start_ref.url,
        "accuracy": start_eval["accuracy"],
        "mean_reward": start_eval["mean_reward"],
        "val_ppl": round(perplexity(start_model, data, tok), 4),
        "pretrain_dev_curve": pretrain_curve,
    }
    return _Start(start_ref, hf, tok, scorer, data, start_eval, entry)


def _trl(spec: RLSpec, seed: int, start: _Start, out: Path, prompts: Path, logs: Path) -> tuple[dict[str, Any], Any]:
    """TRL's run from the start model's HF export; (its entry, its final model)."""
    cmd = [
        sys.executable, "-m", "genpt_dist.bench.rl_trl", "--model", start.hf, "--prompts", str(prompts),
        "--reward", f"{REWARD_FILE}:{REWARD_FUNC}", "--output", str(out), "--steps", str(spec.steps),
        "--prompts-per-step", str(spec.prompts_per_step), "--group", str(spec.group),
        "--max-new-tokens", str(spec.max_new_tokens), "--top-k", str(spec.top_k or 0),
        "--temperature", str(spec.temperature), "--lr", str(spec.lr),
        "--warmup-steps", str(spec.warmup_steps), "--beta", str(spec.kl_coef),
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--weight-decay", "0.0",
        "--max-grad-norm", "1.0",
        "--snapshot-every", str(spec.snapshot_every), "--threads", str(spec.trl_threads),
        "--seed", str(1337 + seed),
    ]  # fmt: skip
    summary, t_launch = _run(cmd, logs / "trl.log", spec.timeout_s)
    t_done = time.time()
    snaps = json.loads((out / "snapshots.json").read_text())
    curve = []
    for s in snaps:
        model = gpt_from_hf(s["file"], start.ref.model_config)
        curve.append({"step": s["step"], "seconds": round(s["wall"] - t_launch, 2), **start.scorer(model)})
    history = json.loads((out / "log_history.json").read_text())
    step_times = [h["step_time"] for h in history if "step_time" in h]
    entry = {
        "kind": "trl",
        "reward_file": str(REWARD_FILE),
        "reward": f"{REWARD_FILE}:{REWARD_FUNC}",
        "threads": summary["threads"],
        "versions": {k: summary[k] for k in ("trl", "transformers", "torch")},
        "train_reward_last": history[-2].get("reward") if len(history) > 1 else None,
        "profile": {
            "setup_s": summary["setup_s"],
            "step_s": round(sum(step_times) / max(len(step_times), 1), 4),
            "snapshot_s_excluded": summary["snapshot_s"],
        },
        "process_s": round(t_done - t_launch, 2),
        "curve": curve,
    }
    return entry, model


def _ours(
    spec: RLSpec, seed: int, run: RunSpec, start: _Start, out: Path, prompts: Path, logs: Path
) -> tuple[dict[str, Any], Any]:
    """A `reinforce` run of ours from the start checkpoint; (its entry, its final model)."""
    from genpt_dist.checkpoint import list_checkpoints, load_model

    reward_spec = f"python:{REWARD_FILE}:{REWARD_FUNC}"
    args = [
        "reinforce", "--init", start.ref.url, "--run", str(out), "--prompts", str(prompts),
        "--reward", reward_spec, *(a for r in run.rewards for a in ("--reward", r)),
        *(["--data", start.data] if run.data else []), "--config", RECIPE,
        "--set", *_ours_sets(spec, seed), *run.sets,
    ]  # fmt: skip
    summary, t_launch = _cli(args, logs / f"{out.name}.log", spec.timeout_s)
    t_done = time.time()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step_time = {m["step"]: m["time"] for m in metrics if "rollout_s" in m}
    ckpts = list_checkpoints(str(out))
    saves = checkpoint_overheads(metrics, [r.step for r in ckpts])
    curve = [{"step": 0, "seconds": 0.0, "seconds_excl_checkpoints": 0.0, **start.eval}]  # the --init
    for ref in ckpts:
        final = load_model(ref.url)[0]
        t = step_time[ref.step] - t_launch
        before = sum(v for k, v in saves.items() if k < ref.step)
        curve.append(
            {
                "step": ref.step,
                "seconds": round(t, 2),
                "seconds_excl_checkpoints": round(t - before, 2),
                **start.scorer(final),
            }
        )
    entry = {
        "kind": "ours",
        "reward_file": str(REWARD_FILE),
        "reward": reward_spec,
        "extra_rewards": list(run.rewards),
        "sets": list(run.sets),
        "threads": "1 worker x 1 thread + 1 rollout actor x 1 thread",
        "train_reward_last": summary.get("reward_mean"),
        "profile": step_profile(metrics, t_launch),
        "process_s": round(t_done - t_launch, 2),
        "curve": curve,
    }
    return entry, final


def _race(spec: RLSpec, seed: int, runs: list[RunSpec], root: Path) -> dict[str, Any]:
    """One seed's whole race in `root`: problems split by `seed`, the start model, every run, one evaluation.
    A failure of a run outside `REQUIRED` is recorded under "failed" and the race goes on."""
    t_race = time.time()
    logs = root / "logs"
    logs.mkdir(parents=True)
    train, held_out = rl_task.split_problems(seed, spec.held_out)
    rl_task.write_jsonl(rl_task.corpus_rows(train), root / "corpus.jsonl")
    prompts = rl_task.write_jsonl(rl_task.prompt_rows(train), root / "train.jsonl")
    rl_task.write_jsonl(rl_task.prompt_rows(held_out), root / "held_out.jsonl")
    start = _start_model(spec, seed, root, held_out, train[: spec.dev], logs)
    phases = {"start_model_s": time.time() - t_race}

    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for run in runs:
        t0 = time.time()
        out = root / run.name.replace(" ", "_").replace("=", "").replace("+", "_")
        try:
            if run.kind == "trl":
                entry, final = _trl(spec, seed, start, out, prompts, logs)
            else:
                entry, final = _ours(spec, seed, run, start, out, prompts, logs)
        except (RuntimeError, UserError) as exc:
            if run.name in REQUIRED:
                raise
            log.warning("bench rl: seed %d: run %r failed: %s", seed, run.name, exc)
            failed[run.name] = " ".join(str(exc).split())[-1500:]
            continue
        curve = entry["curve"]
        results[run.name] = {
            **entry,
            "note": run.note,
            "final_accuracy": curve[-1]["accuracy"],
            "final_mean_reward": curve[-1]["mean_reward"],
            "final_seconds": curve[-1]["seconds"],
            "val_ppl_final": round(perplexity(final, start.data, start.tok), 4),
        }
        phases[f"{run.name}_s"] = time.time() - t0
    head = versus_trl(results, start.eval["accuracy"])
    return {
        "seed": seed,
        "held_out_prompts": len(held_out),
        "start": start.entry,
        "runs": results,
        "failed": failed,
        **head,
        "seconds": round(time.time() - t_race, 1),
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }


TARGETS = {"time_ratio_vs_trl": ("<=", 0.5), "final_accuracy_diff_points": (">=", 0.0), "rl_lift_points": (">=", 30.0)}
SECONDS_PER_SEED = {False: 900.0, True: 180.0}  # one seed's whole race (start model, every run, evaluation); quick


def _judge(value: float | None, op: str, target: float) -> dict[str, Any]:
    met = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"value": value, "op": op, "target": target, "met": met}


def bench_rl(
    quick: bool = False, output: str | None = None, workdir: str | None = None, seeds: tuple[int, ...] | None = None
) -> dict[str, Any]:
    spec = QUICK if quick else RLSpec()
    if seeds is not None:
        spec = replace(spec, seeds=tuple(seeds))
    torch.set_num_threads(2)
    runs = [RUNS[n] for n in spec.runs]
    skipped = {r.name: f"config has no {r.needs_key}" for r in runs if r.needs_key and not _config_has(r.needs_key)}
    runs = [r for r in runs if r.name not in skipped]

    races: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="genpt-bench-rl-", dir=workdir) as tmp:
        for seed in spec.seeds:
            races[str(seed)] = _race(spec, seed, runs, Path(tmp) / f"seed{seed}")
        png = Path(tmp) / "rl.png"
        plot(
            {s: {n: r["curve"] for n, r in race["runs"].items()} for s, race in races.items()},
            {s: race["start"]["accuracy"] for s, race in races.items()},
            png,
        )
        png_url = None
        if output is not None:
            png_url = storage.join(storage.normalize(output), "rl.png")
            storage.write_bytes(png_url, png.read_bytes())

    summary = aggregate(races, [r.name for r in runs])
    head = {k: v for k, v in summary.items() if k not in ("runs", "start")}
    met = {k: _judge(head[k], op, t) for k, (op, t) in TARGETS.items()}
    per_seed = {s: race["seconds"] for s, race in races.items()}
    met["bench_seconds_per_seed"] = {
        **_judge(max(per_seed.values()), "<=", SECONDS_PER_SEED[quick]),
        "statistic": "the slowest seed's race: split, start model, every run, their evaluation",
        "per_seed": per_seed,
    }
    return {
        "spec": asdict(spec),
        "task": "fixed-width 2-digit addition 'aa+bb=' -> 'sss' (byte tokenizer), reward rl_task.py:correct",
        "reward_file": str(REWARD_FILE),
        "timing": "seconds since the bench launched each racer's process; ours: metrics.jsonl `time` of the "
        "checkpoint's step (checkpoint writes count), TRL: the snapshot's time.time() less earlier snapshots' time",
        "cpus": "ours: 1 Ray Train worker x 1 torch thread + 1 rollout actor x 1 thread; TRL: 1 process x "
        f"{spec.trl_threads} torch threads; {os.cpu_count()} cores",
        "seeds": races,
        "summary": summary,
        "skipped": skipped,
        **head,
        "targets": met,
        "png": png_url,
        "rows": table_rows(summary, {r.name: r.note for r in runs}, skipped),
    }
