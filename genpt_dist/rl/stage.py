"""The RL stage, distributed: `reinforce` (rewards the user names) and `adversarial` (the seed's recipe).

Per policy update (step s), on N Ray Train workers, each with the policy's `Engine` and, when the
discriminator is a reward, its learner (`rl.disc_learner`):
1. Prompts: from a prompt file (`reinforce --prompts`: `rl.prompts`, one global batch of
   `prompts_per_step` per step in a per-epoch shuffle, every rank taking its slice; the file's
   other fields are the rows' columns), or real-text windows of the shards (`--data`, `rl.real_text`:
   <bos> + the first `prompt_len` tokens). Rank 0 repeats each prompt `samples_per_prompt` times and
   asks the rollout actor pool (`RolloutGroup`) for samples, each row seeded by (seed, step, row). The
   actors hold the latest published policy, the frozen reference (the `--init` model) and D, and
   return tokens, sampling log-probs, reference log-probs and the rewards (`rl.rewards`: Python
   functions called as TRL calls them, D's sequence reward; their weighted sum; optionally SeqGAN
   Monte Carlo token rewards). The batch is broadcast and every rank keeps its own prompts' rows. The
   rollouts of step s are requested after step s-1's weights are published: strictly on-policy.
   With `rollout.max_staleness = k >= 1` the requests of steps up to s+k go out before step s
   trains (one-step-off at k = 1, as veRL's), so the actors sample while the workers update; a
   row then lags the policy by up to k versions (`version_lag`), and the update corrects with
   the clipped importance ratio to the sampling policy (`reinforce.reinforce_loss`; the actors
   return its log-probs), logging `ratio_mean` and `clip_fraction`. A checkpoint records the
   prompt position of the first step not yet trained: a resumed run re-draws the steps that
   were in flight (real-text windows in flight are skipped: that stream is not rewound).
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
position (`RLPart`, `PromptSource`). The drivers that validate and start a run are in `rl.driver`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Any

import torch

from genpt_dist import faults
from genpt_dist.checkpoint import load_tokenizer, resolve
from genpt_dist.config import Config, ReinforceConfig
from genpt_dist.errors import UserError
from genpt_dist.rl.disc_learner import DiscriminatorLearner, disc_context, disc_model_config
from genpt_dist.rl.policy_update import policy_update
from genpt_dist.rl.prompts import Prompt, PromptLoader, load_prompts, split_held_out
from genpt_dist.rl.real_text import RealTextWindows
from genpt_dist.rl.reinforce import advantages, rollout_seed
from genpt_dist.rl.rewards.specs import component_stats, parse_reward_specs
from genpt_dist.rl.rollout import RolloutBatch, RolloutGroup, RolloutRequest
from genpt_dist.rl.state import PromptSource, RLPart
from genpt_dist.train.collective import all_gather_objects, all_reduce_mean, broadcast_object
from genpt_dist.train.engine import Engine, Job, Reporter
from genpt_dist.train.sources import ShardSource

log = logging.getLogger(__name__)

STEP_KEYS = (
    "reward_mean",
    "reward_std",
    "scored",
    "kl",
    "entropy",
    "sample_len",
    "pg_loss",
    "rollout_tokens_per_s",
    "rollout_s",
    "publish_s",
    "version_lag",
    "ratio_mean",
    "clip_fraction",
    "tokens_seen",
    "reissued",
)
D_KEYS = ("d_acc_real", "d_acc_fake", "d_loss")
VAL_KEYS = ("val_loss", "val_ppl", "val_bpb")
HELD_OUT_KEYS = ("held_out_reward", "held_out_accuracy")


def stage_section(cfg: Config, stage: str) -> ReinforceConfig:
    """The RL section a stage runs with: `adversarial` or `reinforce`."""
    return cfg.adversarial if stage == "adversarial" else cfg.reinforce


class StageStopped(Exception):
    """A user error met inside the loop (a reward function that fails): every rank stops cleanly."""


class RLWorker:
    """One rank of the stage: the policy engine, D, the prompt source and (rank 0) the rollout pool."""

    def __init__(self, job: Job, rank: int, world: int, reporter: Reporter):
        self.cfg = cfg = Config.model_validate(job.config)
        self.stage, self.section = job.stage, stage_section(cfg, job.stage)
        sec = self.section
        self.specs = parse_reward_specs(sec.rewards)
        self.uses_disc = any(spec.kind == "discriminator" for spec in self.specs)
        self.group: RolloutGroup = job.extra["rollout_group"]
        self.prompts_per_rank = sec.prompts_per_step // world
        self.rows_per_rank = self.prompts_per_rank * sec.rollout.samples_per_prompt
        real = None
        if job.extra.get("real"):
            real = ShardSource(
                job.extra["real"],
                batch_size=self.prompts_per_rank,
                eval_batches=sec.train.eval_batches,
                eval_batch_size=sec.train.micro_batch_size,
                loader=cfg.loader,
                rank=rank,
                world=world,
            )
        self.prompt_source: PromptSource | None = None
        source: ShardSource | PromptSource
        self.held_out: list[Prompt] = []
        if job.extra.get("prompts"):
            train, held_out = split_held_out(
                load_prompts(job.extra["prompts"], sec.prompts.prompt_field), sec.prompts.held_out_fraction
            )
            self.held_out = held_out[: sec.prompts.eval_prompts]
            loader = PromptLoader(train, batch_size=sec.prompts_per_step, seed=sec.train.seed)
            assert job.init is not None  # the driver sets it
            tok = real.tokenizer if real is not None else load_tokenizer(resolve(job.init))
            source = PromptSource(loader, tok, real, job.extra["prompts_sha256"], self.prompts_per_rank)
            self.prompt_source = source
        else:
            assert real is not None, "prompts come from a file or from the real text"
            source = real
        self.engine = engine = Engine(job, source, rank=rank, world=world, reporter=reporter)
        self.tok = source.tokenizer
        resume = engine.resume_point()
        engine.build(engine.new_model(), grad_accum=self.rows_per_rank // sec.train.micro_batch_size, resume=resume)
        disc = None
        if self.uses_disc:
            disc = DiscriminatorLearner(
                cfg,
                sec,
                disc_model_config(sec, self.tok.vocab_size, self.tok.pad_id, disc_context(job)),
                precision=engine.precision,
            )
        self.state = RLPart(disc)
        engine.parts.append(self.state)
        if resume is not None:
            engine.restore(resume)
        self.reissued_before = self.group.reissued if rank == 0 else 0
        # Submitted steps not yet trained on: (rank 0's chunk refs, this rank's real windows), oldest first.
        self.in_flight: collections.deque[tuple[list[Any] | None, torch.Tensor | None]] = collections.deque()
        r = sec.rollout
        self.real = None
        if real is not None:
            self.real = RealTextWindows(
                real.train_batches(),
                bos_id=self.tok.bos_id,
                pad_id=self.tok.pad_id,
                width=r.prompt_len + r.sampling.max_new_tokens,
                samples_per_prompt=r.samples_per_prompt,
            )
        self.texts_needed = any(spec.kind in ("python", "model") for spec in self.specs)

    # --------------------------------------------------------------- pieces
    def request(
        self, step: int, prompts: list[list[int]], texts: list[str] | None, columns: list[dict[str, Any]] | None
    ) -> RolloutRequest:
        """Each prompt `samples_per_prompt` times, with its text and columns for the reward functions."""
        sec = self.section
        r, s, g = sec.rollout, sec.rollout.sampling, sec.rollout.samples_per_prompt
        rows = [p for p in prompts for _ in range(g)]
        seeds = [rollout_seed(sec.train.seed, step, i) for i in range(len(rows))]
        # Rows are sampled in batched calls of whole prompt groups, one per actor where possible; tokens
        # depend on this grouping (fixed by the config), never on which actor serves a call.
        per_actor = max(1, sec.prompts_per_step // r.num_actors) * g
        return RolloutRequest(
            prompts=rows,
            seeds=seeds,
            max_new_tokens=s.max_new_tokens,
            top_k=s.top_k,
            top_p=s.top_p,
            temperature=s.temperature,
            mc_rollouts=sec.mc_rollouts,
            mc_stride=sec.mc_stride,
            reward_kind=sec.reward,
            rows_per_call=per_actor,
            texts=[t for t in texts for _ in range(g)] if texts is not None else None,
            columns=[c for c in columns for _ in range(g)] if columns is not None else None,
            with_behaviour_logprobs=r.max_staleness > 0,
        )

    def step_prompts(self, step: int) -> tuple[RolloutRequest | None, torch.Tensor | None]:
        """Rank 0's rollout request for this step (None elsewhere) and this rank's real windows (for D)."""
        windows = self.real.next() if self.real is not None else None
        if self.prompt_source is not None:
            batch = self.prompt_source.draw()  # the same global batch on every rank
            if self.engine.rank != 0:
                return None, windows
            prompts = [[self.tok.bos_id, *self.tok.encode(p.text)] for p in batch]
            return self.request(step, prompts, [p.text for p in batch], [p.columns for p in batch]), windows
        assert windows is not None
        parts = all_gather_objects(windows.tolist(), self.engine.world)
        if self.engine.rank != 0:
            return None, windows
        plen = 1 + self.section.rollout.prompt_len
        prompts = [w[:plen] for part in parts for w in part]
        texts = [self.tok.decode(p[1:]) for p in prompts] if self.texts_needed else None
        return self.request(step, prompts, texts, None), windows

    def sample_on_rank0(self, request: RolloutRequest | None) -> RolloutBatch:
        """Rank 0 has the pool sample `request`; the batch on every rank (blocking)."""
        refs = self.group.generate_refs(request) if request is not None else None
        return self.collect_on_rank0(refs)

    def collect_on_rank0(self, refs: list[Any] | None) -> RolloutBatch:
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

    def submit(self, step: int) -> None:
        """Draw step `step`'s prompts (every rank) and have rank 0 send them to the pool without waiting; the
        rows are sampled by the policy published last. `take` collects the oldest submission."""
        request, windows = self.step_prompts(step)
        refs = self.group.generate_refs(request) if request is not None else None
        if self.engine.rank == 0 and step == faults.kill_actor_at_step():  # test hook: an actor dies
            self.group.kill_actor(0)  # its rows are re-issued to another
        self.in_flight.append((refs, windows))

    def take(self) -> tuple[RolloutBatch, torch.Tensor | None]:
        """The oldest submitted step's rollouts on every rank, and this rank's real windows of it."""
        refs, windows = self.in_flight.popleft()
        batch = self.collect_on_rank0(refs)
        if self.prompt_source is not None:
            self.prompt_source.consumed()
        return batch, windows

    def rollouts(self, step: int) -> tuple[RolloutBatch, torch.Tensor | None]:
        """The step's rollouts, sampled now by the latest policy (strictly on-policy)."""
        self.submit(step)
        return self.take()

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
        """Greedy completions of the held-out prompts (rank 0 asks the pool): their mean reward and the share
        that reaches `pass_reward` (pass@1 for a checker reward); the same figures on every rank."""
        sec, ps = self.section, self.held_out
        request = None
        if self.engine.rank == 0:
            request = RolloutRequest(
                prompts=[[self.tok.bos_id, *self.tok.encode(p.text)] for p in ps],
                seeds=[0] * len(ps),
                max_new_tokens=sec.rollout.sampling.max_new_tokens,
                top_k=1,
                reward_kind=sec.reward,
                rows_per_call=max(1, -(-len(ps) // sec.rollout.num_actors)),
                texts=[p.text for p in ps],
                columns=[p.columns for p in ps],
            )
        rewards = self.sample_on_rank0(request).rewards  # (H,) NaN = not scored
        scored = rewards[~torch.isnan(rewards)]
        result = {
            "held_out_reward": scored.mean().item() if len(scored) else math.nan,
            "held_out_accuracy": (rewards >= sec.prompts.pass_reward).float().mean().item(),
        }
        self.engine.metrics.update(result)
        return result

    def reward_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """Over the whole step (the same on every rank): the combined reward of the scored rows, the share
        scored, and each component's mean and std."""
        rewards = batch.rewards
        scored = ~torch.isnan(rewards)
        values = rewards[scored]
        out = {
            "reward_mean": values.mean().item() if len(values) else math.nan,
            "reward_std": values.std().item() if len(values) > 1 else 0.0,
            "scored": scored.float().mean().item(),
        }
        if batch.reward_components is not None:
            out.update(component_stats(dict(zip(batch.reward_names, batch.reward_components.unbind(1)))))
        return out

    # --------------------------------------------------------------- the loop
    def pretrain_discriminator(self) -> None:
        """SeqGAN: D learns real vs the initial policy's samples before the first policy update."""
        sec, st = self.section, self.state
        assert st.disc is not None and self.real is not None
        while st.d_pretrained < sec.discriminator.pretrain_steps:
            batch, windows = self.rollouts(-1 - st.d_pretrained)
            assert windows is not None
            mine = self.my_rows(batch)
            d_stats = st.disc.update(self.real.for_discriminator(windows), mine.tokens, mine.attention_mask)
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
        assert st.disc is not None and self.real is not None
        real = self.real.for_discriminator(windows)
        d_stats = st.disc.update(real, mine.tokens, mine.attention_mask, step=d_steps > 0)
        for _ in range(d_steps - 1):
            st.disc.update(real, mine.tokens, mine.attention_mask)
        st.disc_version += d_steps > 0
        return d_stats

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
        from genpt_dist.train.metrics import progress_line

        sec, engine, st = self.section, self.engine, self.state
        t_start = time.time()
        self.publish()
        if st.disc is not None:
            self.pretrain_discriminator()
        publish_s = self.publish()
        ahead, next_step = sec.rollout.max_staleness, engine.step
        while engine.step < sec.train.steps:
            t0 = time.time()
            # Steps up to `ahead` past this one are sampled by the weights published now, while this one trains.
            while next_step <= min(engine.step + ahead, sec.train.steps - 1):
                self.submit(next_step)
                next_step += 1
            batch, windows = self.take()
            rollout_s = time.time() - t0  # the wait for rollouts the overlap did not hide
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
            engine.step += 1
            st.policy_version += 1
            engine.tokens_seen += int(batch.gen_mask.sum())
            publish_s = self.publish()
            local = {
                "kl": stats["kl"],
                "entropy": stats["entropy"],
                "ratio_mean": stats.get("ratio_mean", 1.0),
                "clip_fraction": stats.get("clip_fraction", 0.0),
                "sample_len": mine.lengths.float().mean().item(),
                "pg_loss": stats["loss"],
                **d_stats,
            }
            engine.metrics.update(zip(local, all_reduce_mean(list(local.values()), engine.world)))
            engine.metrics.update(
                self.reward_metrics(batch),
                step=engine.step,
                rollout_s=rollout_s,
                publish_s=publish_s,
                tokens_seen=engine.tokens_seen,
                rollout_tokens_per_s=float(batch.gen_mask.sum()) / max(rollout_s, 1e-9),
                version_lag=st.policy_version - 1 - batch.policy_version,
                reissued=(self.group.reissued - self.reissued_before) if engine.rank == 0 else 0,
            )
            engine.log_metrics([*STEP_KEYS, *D_KEYS, *(k for k in engine.metrics if k.startswith("reward/"))])
            step, cadence = engine.step, engine.cadence
            if engine.rank == 0 and cadence.log(step):
                m = engine.metrics
                progress_line(
                    self.stage,
                    step,
                    sec.train.steps,
                    m["pg_loss"],
                    m["rollout_tokens_per_s"],
                    0.0,
                    time.time() - t_start,
                    start_step,
                )
                d = f" D acc real {m['d_acc_real']:.2f} fake {m['d_acc_fake']:.2f}" if d_stats else ""
                log.info(
                    "[%s] step %d reward %.3f kl %.4f entropy %.3f%s publish %.2fs",
                    self.stage,
                    step,
                    m["reward_mean"],
                    m["kl"],
                    m["entropy"],
                    d,
                    publish_s,
                )
            if cadence.evaluate(step):
                if engine.evaluate():
                    engine.log_metrics(VAL_KEYS)
                if self.held_out:
                    self.evaluate_held_out()
                    engine.log_metrics(HELD_OUT_KEYS)
            if cadence.checkpoint(step):
                engine.save_and_report()


def rl_worker(job: Job, rank: int, world: int, reporter: Reporter) -> None:
    RLWorker(job, rank, world, reporter).run()
