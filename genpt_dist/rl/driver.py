"""The RL commands' drivers: validate at the edge, start the rollout pool, run the workers, summarise.

`reinforce` trains toward the rewards the user names (`--reward`, or `reinforce.rewards`), on the
prompts of a file (`--prompts`) or real-text prompts (`--data`); `adversarial` is the seed's recipe,
the discriminator reward on real-text prompts. Everything a worker would only find out later is
checked here, before any worker starts: the reward specs parse and every Python function loads, the
discriminator has real text to train on, the prompts have their field and fit the context, the
batch divides over the workers. What the workers and actors read from the driver's own files (the
prompt rows, Python reward files, the tokenizer) reaches them as data (`rl.inputs.RLInputs`), since
the nodes of a cluster share no disk.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from genpt_dist import storage
from genpt_dist.checkpoint import check_init_matches, load_state_dict, load_tokenizer, resolve
from genpt_dist.config import Config
from genpt_dist.errors import UserError
from genpt_dist.rl.disc_learner import disc_context, disc_model_config
from genpt_dist.rl.inputs import PromptRows, RewardInputs, RLInputs
from genpt_dist.rl.rewards.reward_model import check_reward_model
from genpt_dist.rl.rewards.specs import parse_reward_specs
from genpt_dist.rl.rollout import RolloutGroup
from genpt_dist.rl.stage import rl_worker, stage_section
from genpt_dist.rl.step_metrics import HELD_OUT_KEYS
from genpt_dist.tokenizer import Tokenizer
from genpt_dist.tracking import check_tracking
from genpt_dist.train.engine import Job

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "step",
    "reward_mean",
    "kl",
    "d_acc_real",
    "d_acc_fake",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "rollout_tokens_per_s",
    "publish_s",
    "checkpoint",
)


def rl_job(
    stage: str, init: str, run: str, cfg: Config, *, data: str | None, prompts: str | None
) -> tuple[Job, RLInputs, Tokenizer]:
    """The job of an RL stage and its inputs as data, every input checked (see the module docstring)."""
    check_tracking(cfg.tracking)  # before the rollout actors start: a missing MLflow is one line and exit 2
    sec = stage_section(cfg, stage)
    specs = parse_reward_specs(sec.rewards)
    kinds = {s.kind for s in specs}
    if "discriminator" in kinds and data is None:
        raise UserError("--reward discriminator needs --data: the real text the discriminator is trained on")
    if prompts is None and data is None:
        raise UserError(f"{stage} needs --prompts FILE (prompts and their columns) or --data URL (real-text prompts)")
    if sec.mc_rollouts and kinds != {"discriminator"}:
        raise UserError(
            f"{stage}.mc_rollouts needs the discriminator as the only reward (Monte Carlo prefixes are scored by D)"
        )
    rewards = RewardInputs.read(specs)  # a missing file, module or function fails here, named
    for spec in specs:
        if spec.kind == "model":
            check_reward_model(spec.target)
    ref = resolve(init)
    model_cfg, tok = ref.model_config, load_tokenizer(ref)
    r, n_new = sec.rollout, sec.rollout.sampling.max_new_tokens
    _, hi = cfg.scaling.worker_range
    if sec.prompts_per_step % hi:
        raise UserError(f"{stage}.prompts_per_step={sec.prompts_per_step} must be a multiple of the {hi} workers")
    rows = sec.prompts_per_step // hi * r.samples_per_prompt
    if rows % sec.train.micro_batch_size:
        raise UserError(
            f"{stage}.train.micro_batch_size={sec.train.micro_batch_size} must divide the {rows} rollout "
            f"rows per worker (prompts_per_step / workers x samples_per_prompt)"
        )
    real, seq_len = None, model_cfg.block_size
    if data is not None:
        from genpt_dist.data.manifest import load_manifest

        manifest = load_manifest(data)
        check_init_matches(init, manifest.tokenizer_sha256, manifest.url)
        if prompts is None and 1 + r.prompt_len + n_new > model_cfg.block_size:
            raise UserError(
                f"<bos> + prompt_len {r.prompt_len} + max_new_tokens {n_new} exceeds the model's context "
                f"of {model_cfg.block_size}"
            )
        if r.prompt_len + n_new > manifest.seq_len:
            raise UserError(
                f"prompt_len + max_new_tokens = {r.prompt_len + n_new} exceeds the data's "
                f"{manifest.seq_len}-token samples (real windows)"
            )
        real, seq_len = manifest.url, manifest.seq_len
    rows_of_file = PromptRows.read(prompts, sec, tok.encode, model_cfg.block_size) if prompts is not None else None
    inputs = RLInputs(rewards=rewards, tokenizer_json=tok.to_json(), prompts=rows_of_file, real=real)
    data_url = real or (rows_of_file.url if rows_of_file is not None else None)
    assert data_url is not None  # checked above: prompts or data
    job = Job(
        stage=stage,
        config=cfg.model_dump(mode="json"),
        model=dataclasses.asdict(model_cfg),
        seq_len=seq_len,
        data=data_url,
        run=storage.normalize(run),
        init=ref.url,
    )
    return job, inputs, tok


def run_rl(job: Job, inputs: RLInputs, cfg: Config, tok: Tokenizer, address: str | None) -> dict[str, Any]:
    """Start the rollout pool, run the workers; the final metrics (a reward function's failure: a UserError,
    raised by `fit`)."""
    from genpt_dist.capacity import room_for
    from genpt_dist.raycluster import init_ray
    from genpt_dist.train.launcher import fit

    sec = stage_section(cfg, job.stage)
    r = sec.rollout
    lo, _ = cfg.scaling.worker_range
    init_ray(address)
    # The workers and the actors together: an autoscaling cluster gets one request for both and time to
    # add nodes before the actors are placed (RolloutGroup itself refuses what does not fit now).
    actors = (r.num_actors * r.cpus_per_actor, r.num_actors * r.gpus_per_actor, f"{r.num_actors} rollout actors")
    with room_for(
        lo,
        cfg.scaling.cpus_per_worker,
        cfg.scaling.use_gpu,
        extra_cpus=actors[0],
        extra_gpus=actors[1],
        extra_what=actors[2],
    ):
        assert job.init is not None  # rl_job sets it
        context = disc_context(job.model["block_size"], inputs.prompts is not None)
        group = RolloutGroup(
            r.num_actors,
            cpus_per_actor=r.cpus_per_actor,
            gpus_per_actor=r.gpus_per_actor,
            max_restarts=r.max_restarts,
            model_config=job.model,
            disc_config=dataclasses.asdict(disc_model_config(sec, tok.vocab_size, tok.pad_id, context)),
            reference_state=load_state_dict(resolve(job.init)),
            pad_id=tok.pad_id,
            eos_id=tok.eos_id,
            threads=r.threads,
            rewards=inputs.rewards,
            tokenizer_json=inputs.tokenizer_json,
            keep_previous=sec.clips_against_previous,
        )
        try:
            # The inputs and the pool travel with the worker function; the Job stays plain data.
            stage_fn = functools.partial(rl_worker, inputs=inputs, group=group)
            metrics = fit(job, cfg, stage_fn, address=address, also_needs=actors)
        finally:
            group.shutdown()
    return metrics


def adversarial(data: str, init: str, run: str, cfg: Config, address: str | None = None) -> dict[str, Any]:
    """The seed's recipe: the online discriminator's reward on real-text prompts of `data`."""
    job, inputs, tok = rl_job("adversarial", init, run, cfg, data=data, prompts=None)
    metrics = run_rl(job, inputs, cfg, tok, address)
    return {"command": "adversarial", "run": job.run, "init": job.init, **{k: metrics.get(k) for k in SUMMARY_KEYS}}


def reinforce(
    init: str,
    run: str,
    cfg: Config,
    *,
    prompts: str | None = None,
    data: str | None = None,
    rewards: list[str] | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """REINFORCE toward `rewards` (the `--reward` specs; else the recipe's `reinforce.rewards`)."""
    if rewards:
        cfg = cfg.model_copy(update={"reinforce": cfg.reinforce.model_copy(update={"rewards": list(rewards)})})
    job, inputs, tok = rl_job("reinforce", init, run, cfg, data=data, prompts=prompts)
    metrics = run_rl(job, inputs, cfg, tok, address)
    components = {k: v for k, v in metrics.items() if k.startswith("reward/")}
    return {
        "command": "reinforce",
        "run": job.run,
        "init": job.init,
        "rewards": [s.name for s in inputs.rewards.specs],
        **{k: metrics.get(k) for k in (*SUMMARY_KEYS, *HELD_OUT_KEYS)},
        **components,
    }
