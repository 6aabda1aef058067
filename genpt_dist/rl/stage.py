"""The RL stage, distributed: `reinforce` (rewards the user names) and `adversarial` (the seed's recipe).

Per policy update (step s), on N Ray Train workers, each with the policy's `Engine` and, when the
discriminator is a reward, its learner (`rl.disc_learner`):
1. Prompts (`rl.step_prompts`): from a prompt file's rows (`reinforce --prompts`, one global batch of
   `prompts_per_step` per step in a per-epoch shuffle, every rank taking its slice; the file's other
   fields are the rows' columns), or real-text windows of the shards (`--data`: <bos> + the first
   `prompt_len` tokens). Rank 0 repeats each prompt `samples_per_prompt` times and asks the rollout
   actor pool (`RolloutGroup`) for samples, each row seeded by (seed, step, row). The actors hold the
   latest published policy, the frozen reference (the `--init` model) and D, and return tokens,
   sampling log-probs, reference log-probs and the rewards (`rl.rewards`: Python functions called as
   TRL calls them, D's sequence reward; their weighted sum; optionally SeqGAN Monte Carlo token
   rewards). The batch is broadcast and every rank keeps its own prompts' rows. The rollouts of step
   s are requested after step s-1's weights are published: strictly on-policy. With
   `rollout.max_staleness = k >= 1` the requests of steps up to s+k go out before step s trains
   (`rl.inflight`; one-step-off at k = 1, as veRL's), so the actors sample while the workers
   update; a row then lags the policy by up to k versions (`version_lag`), and the update corrects
   with the clipped importance ratio to the sampling policy (`reinforce.reinforce_loss`; the actors
   return its log-probs), logging `ratio_mean` and `clip_fraction`. On-policy with
   `reinforce.clip_against_previous` the actors also return the log-probs under the version before, and
   tokens the last update already moved past the clip get no gradient (the same stats). A checkpoint records the prompt
   position of the first step not yet trained: a resumed run re-draws the steps that were in flight
   (real-text windows in flight are skipped: that stream is not rewound).
2. Policy: sequence advantages over the whole step's rows (every rank computes the same ones) with
   the configured estimator (`reinforce.advantages`), rows no reward scored left out; then the
   token-level loss with the KL guard, accumulated over micro batches, one optimizer step
   (`rl.policy_update`).
3. Discriminator (when it is a reward): `d_steps` binary cross-entropy updates on real windows vs
   this step's samples; before the first policy update D is trained for `pretrain_steps` rounds on
   samples of the initial policy (SeqGAN does this).
4. Publish: full weights of the policy (and D) go to the object store once, stamped with a version;
   actors load them before their next rollout.
Checkpoints hold the policy (and D) engines, the baseline state, counters, versions and the prompt
position (`RLPart`, `PromptSource`). What a step logs is in `rl.step_metrics`. The drivers that
validate the inputs, ship them to the workers as data (`rl.inputs.RLInputs`) and start the rollout
pool are in `rl.driver`; the pool reaches the workers beside the `Job`, which stays plain data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from genpt_dist import faults
from genpt_dist.config import Config, ReinforceConfig
from genpt_dist.errors import UserError
from genpt_dist.rl.disc_learner import DiscriminatorLearner, disc_context, disc_model_config
from genpt_dist.rl.inflight import InFlightRollouts
from genpt_dist.rl.inputs import RLInputs
from genpt_dist.rl.policy_update import policy_update
from genpt_dist.rl.reinforce import advantages
from genpt_dist.rl.rollout import RolloutBatch, RolloutGroup, RolloutRequest
from genpt_dist.rl.state import RLPart
from genpt_dist.rl.step_metrics import HELD_OUT_KEYS, VAL_KEYS, held_out_metrics, log_step, reward_metrics, step_keys
from genpt_dist.rl.step_prompts import StepPrompts
from genpt_dist.train.collective import all_reduce_mean, broadcast_object
from genpt_dist.train.engine import Engine, Job, Reporter

log = logging.getLogger(__name__)

Sent = tuple[list[Any] | None, torch.Tensor | None]  # a step sent: rank 0's chunk refs, this rank's real windows


def stage_section(cfg: Config, stage: str) -> ReinforceConfig:
    """The RL section a stage runs with: `adversarial` or `reinforce`."""
    return cfg.adversarial if stage == "adversarial" else cfg.reinforce


class StageStopped(Exception):
    """A user error met inside the loop (a reward function that fails): every rank stops cleanly."""


class RLWorker:
    """One rank of the stage: the policy engine, D, the step prompts and (rank 0) the rollout pool."""

    def __init__(self, job: Job, inputs: RLInputs, group: RolloutGroup, rank: int, world: int, reporter: Reporter):
        self.cfg = cfg = job.cfg  # validated once per process (Job.cfg)
        self.stage, self.section = job.stage, stage_section(cfg, job.stage)
        sec = self.section
        self.group = group
        self.rows_per_rank = sec.prompts_per_step // world * sec.rollout.samples_per_prompt
        self.prompts = StepPrompts(cfg, sec, inputs, rank=rank, world=world)
        self.engine = engine = Engine(job, self.prompts.source, rank=rank, world=world, reporter=reporter)
        self.tok = tok = self.prompts.tok
        resume = engine.resume_point()
        engine.build(engine.new_model(), grad_accum=self.rows_per_rank // sec.train.micro_batch_size, resume=resume)
        disc = None
        if "discriminator" in inputs.rewards.kinds:
            context = disc_context(job.model["block_size"], inputs.prompts is not None)
            disc = DiscriminatorLearner(
                cfg, sec, disc_model_config(sec, tok.vocab_size, tok.pad_id, context), precision=engine.precision
            )
        keeps_previous = rank == 0 and sec.clips_against_previous
        self.state = RLPart(disc, previous_source=group.previous_policy if keeps_previous else None)
        engine.parts.append(self.state)
        if resume is not None:
            engine.restore(resume)
        self.prompts.start()  # after the restore: the real text continues from the checkpoint's position
        self.reissued_before = group.reissued if rank == 0 else 0

    # --------------------------------------------------------------- the pool, as every rank sees it
    def submit(self, step: int) -> Sent:
        """Draw step `step`'s prompts (every rank) and have rank 0 send them to the pool without waiting; the
        rows are sampled by the policy published last. `collect` waits for them."""
        request, windows = self.prompts.draw(step)
        refs = self.group.generate_refs(request) if request is not None else None
        if self.engine.rank == 0 and step == faults.kill_actor_at_step():  # test hook: an actor dies
            self.group.kill_actor(0)  # its rows are re-issued to another
        return refs, windows

    def collect(self, sent: Sent) -> tuple[RolloutBatch, torch.Tensor | None]:
        """A step's rollouts on every rank, and this rank's real windows of it; its prompts are consumed."""
        refs, windows = sent
        batch = self._collect_on_rank0(refs)
        self.prompts.consumed()
        return batch, windows

    def _collect_on_rank0(self, refs: list[Any] | None) -> RolloutBatch:
        """Rank 0 waits for the pool's chunks `refs`; the batch on every rank. A reward that fails (a
        UserError from an actor) stops every rank (`StageStopped`) instead of leaving the others waiting."""
        batch, error = None, None
        if self.engine.rank == 0:
            assert refs is not None
            try:
                batch = self.group.collect(refs)
            except UserError as exc:
                error = str(exc)
        batch, error = broadcast_object((batch, error))
        if error is not None:
            raise StageStopped(error)
        return batch

    def sample(self, request: RolloutRequest | None) -> RolloutBatch:
        """Rank 0 has the pool sample `request` now; the batch on every rank (blocking)."""
        return self._collect_on_rank0(self.group.generate_refs(request) if request is not None else None)

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
        disc = self.state.disc.full_state_dict() if self.state.disc is not None else None
        if self.engine.rank == 0:
            self.group.publish(
                self.state.policy_version, policy, self.state.disc_version if disc is not None else None, disc
            )
        return time.perf_counter() - t0

    def evaluate_held_out(self) -> dict[str, float]:
        """The held-out figures of greedy completions (`rl.step_metrics`), the same on every rank."""
        rewards = self.sample(self.prompts.held_out_request()).rewards  # (H,) NaN = not scored
        result = held_out_metrics(rewards, self.section.prompts.pass_reward)
        self.engine.metrics.update(result)
        return result

    # --------------------------------------------------------------- the discriminator
    def pretrain_discriminator(self) -> None:
        """SeqGAN: D learns real vs the initial policy's samples before the first policy update."""
        sec, st = self.section, self.state
        assert st.disc is not None and self.prompts.real is not None
        while st.d_pretrained < sec.discriminator.pretrain_steps:
            batch, windows = self.collect(self.submit(-1 - st.d_pretrained))
            assert windows is not None
            mine = self.my_rows(batch)
            d_stats = st.disc.update(self.prompts.real.for_discriminator(windows), mine.tokens, mine.attention_mask)
            st.d_pretrained += 1
            if self.engine.rank == 0 and st.d_pretrained % sec.train.log_every == 0:
                log.info(
                    "[%s] D pre-train %d/%d acc real %.2f fake %.2f",
                    self.stage,
                    st.d_pretrained,
                    sec.discriminator.pretrain_steps,
                    d_stats["d_acc_real"],
                    d_stats["d_acc_fake"],
                )
            st.disc_version += 1

    def train_discriminator(self, windows: torch.Tensor, mine: RolloutBatch) -> dict[str, float]:
        """`d_steps` updates of D on this step's real windows vs samples (0: only measured)."""
        st, d_steps = self.state, self.section.discriminator.d_steps
        assert st.disc is not None and self.prompts.real is not None
        real = self.prompts.real.for_discriminator(windows)
        d_stats = st.disc.train_on(real, mine.tokens, mine.attention_mask, d_steps)
        st.disc_version += d_steps > 0
        return d_stats

    # --------------------------------------------------------------- the loop
    def run(self) -> None:
        engine = self.engine
        engine.open_metrics_log()
        start_step = engine.step
        try:
            self._run(start_step)
        except StageStopped as stop:
            engine.stop_for_user_error(str(stop))
            return
        engine.finish(start_step)

    def _run(self, start_step: int) -> None:
        sec, engine, st = self.section, self.engine, self.state
        t_start = time.time()
        self.publish()
        if st.previous is not None and engine.rank == 0:  # resumed: the actors get the version before back
            self.group.set_previous_policy(*st.previous)
        if st.disc is not None:
            self.pretrain_discriminator()
        self.publish()
        in_flight = InFlightRollouts(
            self.submit, max_staleness=sec.rollout.max_staleness, steps=sec.train.steps, first_step=engine.step
        )
        while engine.step < sec.train.steps:
            t0 = time.time()
            batch, windows = self.collect(in_flight.take(engine.step).handle)
            rollout_s = time.time() - t0  # the wait for rollouts the overlap did not hide
            local = self.train_step(batch, windows)
            engine.step += 1
            st.policy_version += 1
            engine.tokens_seen += int(batch.gen_mask.sum())
            publish_s = self.publish()
            engine.metrics.update(zip(local, all_reduce_mean(list(local.values()), engine.world)))
            engine.metrics.update(
                reward_metrics(batch),
                step=engine.step,
                rollout_s=rollout_s,
                publish_s=publish_s,
                tokens_seen=engine.tokens_seen,
                rollout_tokens_per_s=float(batch.gen_mask.sum()) / max(rollout_s, 1e-9),
                version_lag=st.policy_version - 1 - batch.policy_version,
                reissued=(self.group.reissued - self.reissued_before) if engine.rank == 0 else 0,
            )
            engine.log_metrics(step_keys(engine.metrics))
            step, cadence = engine.step, engine.cadence
            if engine.rank == 0 and cadence.log(step):
                log_step(
                    self.stage,
                    step,
                    engine.metrics,
                    steps=sec.train.steps,
                    elapsed_s=time.time() - t_start,
                    start_step=start_step,
                    with_d="d_acc_real" in local,
                )
            if cadence.evaluate(step):
                if engine.evaluate():
                    engine.log_metrics(VAL_KEYS)
                if self.prompts.held_out:
                    self.evaluate_held_out()
                    engine.log_metrics(HELD_OUT_KEYS)
            if cadence.checkpoint(step):
                engine.save_and_report()

    def train_step(self, batch: RolloutBatch, windows: torch.Tensor | None) -> dict[str, float]:
        """The policy update on this rank's rows, then D's; this rank's figures of them (to be averaged)."""
        sec, engine, st = self.section, self.engine, self.state
        # Sequence advantages over every row of the step (identical on all ranks), then this rank's.
        seq_adv, st.baseline = advantages(
            batch.rewards,
            kind=sec.baseline,
            group_size=sec.rollout.samples_per_prompt,
            state=st.baseline,
            ema_decay=sec.ema_decay,
        )
        mine, lo = self.my_rows(batch), engine.rank * self.rows_per_rank
        scored = ~torch.isnan(mine.rewards)  # (B,) rows no reward scored take no part in the update
        mine = dataclasses.replace(mine, gen_mask=mine.gen_mask * scored[:, None])
        stats = policy_update(engine.engine, mine, sec, seq_adv[lo : lo + self.rows_per_rank])
        d_stats = self.train_discriminator(windows, mine) if st.disc is not None and windows is not None else {}
        return {
            "kl": stats["kl"],
            "entropy": stats["entropy"],
            "ratio_mean": stats.get("ratio_mean", 1.0),
            "clip_fraction": stats.get("clip_fraction", 0.0),
            "sample_len": mine.lengths.float().mean().item(),
            "pg_loss": stats["loss"],
            **d_stats,
        }


def rl_worker(job: Job, rank: int, world: int, reporter: Reporter, *, inputs: RLInputs, group: RolloutGroup) -> None:
    """A stage function for `train.launcher.fit`, with the inputs and the pool bound by the driver
    (`functools.partial`: they travel to the workers with the worker function, beside the `Job`)."""
    RLWorker(job, inputs, group, rank, world, reporter).run()
