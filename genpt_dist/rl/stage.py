"""`adversarial`: the SeqGAN-style REINFORCE stage, distributed.

Per policy update (step s), on N Ray Train workers, each with the policy's `Engine` and the
discriminator D's learner (`rl.disc_learner`):
1. Prompts: every rank cuts `prompts_per_step / N` windows from its share of the real shards
   (`rl.real_text`);
   a prompt is <bos> + the first `prompt_len` tokens of a window (0: <bos> alone). Rank 0 gathers
   them, repeats each `samples_per_prompt` times and asks the rollout actor pool (`RolloutGroup`)
   for samples, each row seeded by (seed, step, row). The actors hold the latest published policy,
   the frozen reference (the `--init` model) and D, and return tokens, sampling log-probs, reference
   log-probs and D's sequence reward (optionally SeqGAN Monte Carlo per-token rewards). The batch is
   broadcast and every rank keeps its own prompts' rows. The rollouts of step s are requested after
   step s-1's weights are published: strictly on-policy.
2. Policy: advantages from the sequence rewards and the configured baseline (EMA, group mean,
   leave-one-out), whitened over the rank's rows; the KL to the reference as a per-token reward
   penalty or a loss term; loss = token-mean of -A * log pi(a_t) (+ KL, - entropy) (`rl.reinforce`),
   accumulated over micro batches of `adversarial.train.micro_batch_size` rows, one optimizer step
   (`rl.policy_update`).
3. Discriminator: `d_steps` binary cross-entropy updates on real windows (<bos> + prompt_len +
   max_new_tokens real tokens; as many distinct ones as samples) vs this step's samples. Before the
   first policy update D is trained for `pretrain_steps` rounds on samples of the initial policy
   (SeqGAN does this).
4. Publish: full weights of both (ZeRO-3 parameters gathered) go to the object store once, stamped
   with a version; actors load them before their next rollout.
Checkpoints hold the policy and D engines, the baseline state, counters and versions (`RLPart`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from genpt_dist import faults, storage
from genpt_dist.checkpoint import check_init_matches, load_state_dict, resolve
from genpt_dist.config import Config
from genpt_dist.errors import UserError
from genpt_dist.meta import CheckpointMeta, RLState
from genpt_dist.rl.disc_learner import DiscriminatorLearner, disc_model_config
from genpt_dist.rl.policy_update import policy_update
from genpt_dist.rl.real_text import RealTextWindows
from genpt_dist.rl.reinforce import (
    BaselineState,
    rollout_seed,
)
from genpt_dist.rl.rollout import RolloutBatch, RolloutGroup, RolloutRequest
from genpt_dist.train.collective import all_gather_objects, all_reduce_mean, broadcast_object
from genpt_dist.train.engine import Engine, Job, Reporter
from genpt_dist.train.sources import ShardSource

log = logging.getLogger(__name__)

STEP_KEYS = (
    "reward_mean",
    "reward_std",
    "kl",
    "entropy",
    "sample_len",
    "d_acc_real",
    "d_acc_fake",
    "d_loss",
    "pg_loss",
    "rollout_tokens_per_s",
    "rollout_s",
    "publish_s",
    "version_lag",
    "tokens_seen",
    "reissued",
)
VAL_KEYS = ("val_loss", "val_ppl", "val_bpb")


class RLPart:
    """The RL stage's checkpoint part: D's engine, the baseline and the version counters."""

    def __init__(self, disc: DiscriminatorLearner):
        self.disc = disc
        self.baseline = BaselineState()
        self.policy_version, self.disc_version, self.d_pretrained = 0, 0, 0

    def engines(self) -> list[Any]:
        return [self.disc.engine]

    def save(self, folder: Path, rank: int) -> None:
        self.disc.save(folder)

    def load(self, folder: Path, meta: CheckpointMeta) -> None:
        if meta.rl is None:
            raise UserError(f"checkpoint of stage {meta.stage!r} has no RL state to resume the adversarial stage from")
        self.baseline = BaselineState(**meta.rl.baseline)
        self.policy_version, self.disc_version = meta.rl.policy_version, meta.rl.disc_version
        self.d_pretrained = meta.rl.d_pretrained
        self.disc.load(folder)

    def meta_fields(self) -> dict[str, Any]:
        return {
            "rl": RLState(
                baseline=dataclasses.asdict(self.baseline),
                policy_version=self.policy_version,
                disc_version=self.disc_version,
                d_pretrained=self.d_pretrained,
                discriminator=self.disc.config_dict(),
            )
        }


class RLWorker:
    """One rank of the stage: the policy engine, D, the real-text source and (rank 0) the rollout pool."""

    def __init__(self, job: Job, rank: int, world: int, reporter: Reporter):
        self.cfg = cfg = Config.model_validate(job.config)
        adv = cfg.adversarial
        self.group: RolloutGroup = job.extra["rollout_group"]
        self.prompts_per_rank = adv.prompts_per_step // world
        self.rows_per_rank = self.prompts_per_rank * adv.rollout.samples_per_prompt
        source = ShardSource(
            job.data,
            batch_size=self.prompts_per_rank,
            eval_batches=adv.train.eval_batches,
            eval_batch_size=adv.train.micro_batch_size,
            loader=cfg.loader,
            rank=rank,
            world=world,
        )
        self.engine = engine = Engine(job, source, rank=rank, world=world, reporter=reporter)
        self.tok = source.tokenizer
        resume = engine.resume_point()
        engine.build(engine.new_model(), grad_accum=self.rows_per_rank // adv.train.micro_batch_size, resume=resume)
        disc = DiscriminatorLearner(
            cfg, disc_model_config(cfg, self.tok.vocab_size, self.tok.pad_id), precision=engine.precision
        )
        self.state = RLPart(disc)
        engine.parts.append(self.state)
        if resume is not None:
            engine.restore(resume)
        self.reissued_before = self.group.reissued if rank == 0 else 0
        r = cfg.adversarial.rollout
        self.real = RealTextWindows(
            source.train_batches(),
            bos_id=self.tok.bos_id,
            pad_id=self.tok.pad_id,
            width=r.prompt_len + r.sampling.max_new_tokens,
            samples_per_prompt=r.samples_per_prompt,
        )

    # --------------------------------------------------------------- pieces
    def request(self, step: int, windows: list[list[int]]) -> RolloutRequest:
        adv = self.cfg.adversarial
        r, s = adv.rollout, adv.rollout.sampling
        prompts = [w[: 1 + r.prompt_len] for w in windows for _ in range(r.samples_per_prompt)]
        seeds = [rollout_seed(adv.train.seed, step, i) for i in range(len(prompts))]
        # Rows are sampled in batched calls of whole prompt groups, one per actor where possible; tokens
        # depend on this grouping (fixed by the config), never on which actor serves a call.
        per_actor = max(1, adv.prompts_per_step // r.num_actors) * r.samples_per_prompt
        return RolloutRequest(
            prompts=prompts,
            seeds=seeds,
            max_new_tokens=s.max_new_tokens,
            top_k=s.top_k,
            top_p=s.top_p,
            temperature=s.temperature,
            mc_rollouts=adv.mc_rollouts,
            mc_stride=adv.mc_stride,
            reward_kind=adv.reward,
            rows_per_call=per_actor,
        )

    def rollouts(self, step: int, windows: torch.Tensor) -> RolloutBatch:
        """Every rank's prompt windows sampled by the pool (rank 0 asks), the batch on every rank."""
        parts = all_gather_objects(windows.tolist(), self.engine.world)
        batch = None
        if self.engine.rank == 0:
            if step == faults.kill_actor_at_step():  # test hook: an actor dies; its rows are re-issued
                self.group.kill_actor(0)
            batch = self.group.generate(self.request(step, [w for part in parts for w in part]))
        return broadcast_object(batch)

    def my_rows(self, batch: RolloutBatch) -> RolloutBatch:
        """This rank's rows: its own prompts' samples (groups never straddle ranks)."""
        lo, n = self.engine.rank * self.rows_per_rank, len(batch.tokens)
        rows = slice(lo, lo + self.rows_per_rank)
        return dataclasses.replace(
            batch,
            **{
                f.name: getattr(batch, f.name)[rows]
                for f in dataclasses.fields(batch)
                if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).shape[:1] == (n,)
            },
        )

    def publish(self) -> float:
        """Gather full weights (collective) and let rank 0 publish them to the rollout actors."""
        from genpt_dist.train.deepspeed import gather_full_state_dict

        t0 = time.perf_counter()
        policy = gather_full_state_dict(self.engine.engine)
        disc = self.state.disc.full_state_dict()
        if self.engine.rank == 0:
            self.group.publish(self.state.policy_version, policy, self.state.disc_version, disc)
        return time.perf_counter() - t0

    # --------------------------------------------------------------- the loop
    def pretrain_discriminator(self) -> None:
        """SeqGAN: D learns real vs the initial policy's samples before the first policy update."""
        adv, st = self.cfg.adversarial, self.state
        while st.d_pretrained < adv.discriminator.pretrain_steps:
            windows = self.real.next()
            mine = self.my_rows(self.rollouts(-1 - st.d_pretrained, windows))
            d_stats = st.disc.update(self.real.for_discriminator(windows), mine.tokens, mine.attention_mask)
            st.d_pretrained += 1
            if self.engine.rank == 0 and st.d_pretrained % adv.train.log_every == 0:
                log.info(
                    "[adversarial] D pre-train %d/%d acc real %.2f fake %.2f",
                    st.d_pretrained,
                    adv.discriminator.pretrain_steps,
                    d_stats["d_acc_real"],
                    d_stats["d_acc_fake"],
                )
            st.disc_version += 1

    def run(self) -> None:
        from genpt_dist.train.metrics import progress_line

        adv, engine, st = self.cfg.adversarial, self.engine, self.state
        engine.open_metrics_log()
        start_step, t_start = engine.step, time.time()
        self.publish()
        self.pretrain_discriminator()
        publish_s = self.publish()
        while engine.step < adv.train.steps:
            t0 = time.time()
            windows = self.real.next()
            batch = self.rollouts(engine.step, windows)
            mine = self.my_rows(batch)
            rollout_s = time.time() - t0
            stats, st.baseline = policy_update(engine.engine, mine, adv, st.baseline)
            real = self.real.for_discriminator(windows)
            d_steps = adv.discriminator.d_steps
            d_stats = st.disc.update(real, mine.tokens, mine.attention_mask, step=d_steps > 0)
            for _ in range(d_steps - 1):
                st.disc.update(real, mine.tokens, mine.attention_mask)
            engine.step += 1
            st.policy_version += 1
            st.disc_version += d_steps > 0
            engine.tokens_seen += int(batch.gen_mask.sum())
            publish_s = self.publish()
            rewards = mine.rewards
            local = {
                "reward_mean": rewards.mean().item(),
                "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                "kl": stats["kl"],
                "entropy": stats["entropy"],
                "sample_len": mine.lengths.float().mean().item(),
                **{k: d_stats[k] for k in ("d_acc_real", "d_acc_fake", "d_loss")},
                "pg_loss": stats["loss"],
            }
            engine.metrics.update(zip(local, all_reduce_mean(list(local.values()), engine.world)))
            engine.metrics.update(
                step=engine.step,
                rollout_s=rollout_s,
                publish_s=publish_s,
                tokens_seen=engine.tokens_seen,
                rollout_tokens_per_s=float(batch.gen_mask.sum()) / max(rollout_s, 1e-9),
                version_lag=st.policy_version - 1 - batch.policy_version,
                reissued=(self.group.reissued - self.reissued_before) if engine.rank == 0 else 0,
            )
            engine.log_metrics(STEP_KEYS)
            step, cadence = engine.step, engine.cadence
            if engine.rank == 0 and cadence.log(step):
                m = engine.metrics
                progress_line(
                    "adversarial",
                    step,
                    adv.train.steps,
                    m["pg_loss"],
                    m["rollout_tokens_per_s"],
                    0.0,
                    time.time() - t_start,
                    start_step,
                )
                log.info(
                    "[adversarial] step %d reward %.3f kl %.4f entropy %.3f D acc real %.2f fake %.2f publish %.2fs",
                    step,
                    m["reward_mean"],
                    m["kl"],
                    m["entropy"],
                    m["d_acc_real"],
                    m["d_acc_fake"],
                    publish_s,
                )
            if cadence.evaluate(step):
                engine.evaluate()
                engine.log_metrics(VAL_KEYS)
            if cadence.checkpoint(step):
                engine.save_and_report()
        engine.finish(start_step)


def adversarial_worker(job: Job, rank: int, world: int, reporter: Reporter) -> None:
    RLWorker(job, rank, world, reporter).run()


def adversarial_job(data: str, init: str, run: str, cfg: Config) -> tuple[Job, Any]:
    """Validate the recipe against the data and `--init` at the edge; the job and the data's manifest."""
    from genpt_dist.data.manifest import load_manifest

    adv, r = cfg.adversarial, cfg.adversarial.rollout
    manifest = load_manifest(data)
    check_init_matches(init, manifest.tokenizer_sha256, manifest.url)
    ref = resolve(init)
    model_cfg = ref.model_config
    _, hi = cfg.scaling.worker_range
    if adv.prompts_per_step % hi:
        raise UserError(f"adversarial.prompts_per_step={adv.prompts_per_step} must be a multiple of the {hi} workers")
    rows = adv.prompts_per_step // hi * r.samples_per_prompt
    if rows % adv.train.micro_batch_size:
        raise UserError(
            f"adversarial.train.micro_batch_size={adv.train.micro_batch_size} must divide the "
            f"{rows} rollout rows per worker (prompts_per_step / workers x samples_per_prompt)"
        )
    n_new = r.sampling.max_new_tokens
    if 1 + r.prompt_len + n_new > model_cfg.block_size:
        raise UserError(
            f"<bos> + prompt_len {r.prompt_len} + max_new_tokens {n_new} exceeds the "
            f"model's context of {model_cfg.block_size}"
        )
    if r.prompt_len + n_new > manifest.seq_len:
        raise UserError(
            f"prompt_len + max_new_tokens = {r.prompt_len + n_new} exceeds the data's "
            f"{manifest.seq_len}-token samples (real windows for D)"
        )
    job = Job(
        stage="adversarial",
        config=cfg.model_dump(mode="json"),
        model=dataclasses.asdict(model_cfg),
        seq_len=manifest.seq_len,
        data=manifest.url,
        run=storage.normalize(run),
        init=ref.url,
    )
    return job, manifest


def adversarial(data: str, init: str, run: str, cfg: Config, address: str | None = None) -> dict[str, Any]:
    """Driver: validate, start the rollout pool, run the workers, summarise."""
    from genpt_dist.capacity import room_for
    from genpt_dist.raycluster import init_ray
    from genpt_dist.train.launcher import fit

    r = cfg.adversarial.rollout
    job, manifest = adversarial_job(data, init, run, cfg)
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
        tok = manifest.load_tokenizer()
        assert job.init is not None  # adversarial_job sets it
        ref_state = load_state_dict(resolve(job.init))
        group = RolloutGroup(
            r.num_actors,
            cpus_per_actor=r.cpus_per_actor,
            gpus_per_actor=r.gpus_per_actor,
            max_restarts=r.max_restarts,
            model_config=job.model,
            disc_config=dataclasses.asdict(disc_model_config(cfg, tok.vocab_size, tok.pad_id)),
            reference_state=ref_state,
            pad_id=tok.pad_id,
            eos_id=tok.eos_id,
            threads=r.threads,
        )
        try:
            job = dataclasses.replace(job, extra={"rollout_group": group})
            metrics = fit(job, cfg, adversarial_worker, address=address, also_needs=actors)
        finally:
            group.shutdown()
    keys = (
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
    return {"command": "adversarial", "run": job.run, "init": job.init, **{k: metrics.get(k) for k in keys}}
