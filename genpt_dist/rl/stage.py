"""`adversarial`: the SeqGAN-style REINFORCE stage, distributed.

Per policy update (step s), on N Ray Train workers, each with the policy's `Engine` and the
discriminator D's learner (`rl.disc_learner`):
1. Prompts: every rank cuts `prompts_per_step / N` windows from its share of the real shards;
   a prompt is <bos> + the first `prompt_len` tokens of a window (0: <bos> alone). Rank 0 gathers
   them, repeats each `samples_per_prompt` times and asks the rollout actor pool (`RolloutGroup`)
   for samples, each row seeded by (seed, step, row). The actors hold the latest published policy,
   the frozen reference (the `--init` model) and D, and return tokens, sampling log-probs, reference
   log-probs and D's sequence reward (optionally SeqGAN Monte Carlo per-token rewards). The batch is
   broadcast and every rank keeps its own prompts' rows. The rollouts of step s are requested after
   step s-1's weights are published: strictly on-policy.
2. Policy: advantages from the sequence rewards and the configured baseline (EMA, group mean,
   leave-one-out), whitened over the rank's rows; the KL to the reference as a per-token reward
   penalty or a loss term; loss = token-mean of -A * log pi(a_t) (+ KL, - entropy) (`rl.reinforce`).
   The rank's rows go through the engine `adversarial.train.micro_batch_size` at a time, each micro
   loss weighted by its share of the rank's generated tokens, so the accumulated gradient is that of
   the token-mean over all of them; one optimizer step.
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
from typing import Any, Literal

import torch

from genpt_dist import faults, storage
from genpt_dist.checkpoint import CheckpointMeta, RLState, check_init_matches, load_state_dict, resolve
from genpt_dist.config import Config
from genpt_dist.errors import UserError
from genpt_dist.rl.disc_learner import DiscriminatorLearner, disc_model_config
from genpt_dist.rl.reinforce import (
    BaselineState,
    advantages,
    entropy_of_logprobs,
    kl_per_token,
    reinforce_loss,
    rollout_seed,
    token_advantages,
)
from genpt_dist.rl.reward import normalize
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
        self._real = source.train_batches()

    # --------------------------------------------------------------- pieces
    def real_windows(self) -> torch.Tensor:
        """(prompts_per_rank, 1 + P + N) real windows: <bos> + real tokens."""
        r = self.cfg.adversarial.rollout
        batch = next(self._real)
        width = r.prompt_len + r.sampling.max_new_tokens
        # A sample cut at a document start already begins with <bos>: its window is that <bos> + the tokens
        # after it (the targets; -100 = pad -> <pad> = 0), never <bos><bos>, which no rollout has.
        starts = batch.idx[:, :1] == self.tok.bos_id  # (B, 1)
        body = torch.where(starts, batch.targets[:, :width].clamp(min=self.tok.pad_id), batch.idx[:, :width])
        bos = torch.full((body.shape[0], 1), self.tok.bos_id, dtype=body.dtype)
        return torch.cat([bos, body], dim=1)

    def disc_real(self, windows: torch.Tensor) -> torch.Tensor:
        """Real windows for a D update, one per generated row: this step's prompt windows and
        `samples_per_prompt - 1` fresh batches from the shards (not the prompt windows repeated, so D
        sees as many distinct real sequences as generated ones)."""
        extra = [self.real_windows() for _ in range(self.cfg.adversarial.rollout.samples_per_prompt - 1)]
        return torch.cat([windows, *extra])

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

    def _policy_logprobs(self, rb: RolloutBatch, rows: slice, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, N) log pi of the sampled tokens of `rows` (with grad) and their (R, N) policy entropy."""
        device, P = self.engine.device, rb.prompt_width
        tokens, am = rb.tokens[rows].to(device), rb.attention_mask[rows].to(device)
        logits, _ = self.engine.engine(tokens, attention_mask=am)  # (R, P+N, V)
        logp_all = torch.log_softmax(logits[:, P - 1 : -1].float(), dim=-1)  # (R, N, V)
        logp = logp_all.gather(-1, tokens[:, P:].unsqueeze(-1)).squeeze(-1)  # (R, N)
        with torch.set_grad_enabled(
            with_entropy and torch.is_grad_enabled()
        ):  # measured always, in the loss with a coef
            entropy = entropy_of_logprobs(logp_all)  # (R, N)
        return logp, entropy

    def policy_update(self, rb: RolloutBatch) -> dict[str, float]:
        """Advantages over the rank's rows, then the token-mean loss accumulated over micro batches."""
        adv_cfg, device = self.cfg.adversarial, self.engine.device
        micro = adv_cfg.train.micro_batch_size
        chunks = [slice(lo, lo + micro) for lo in range(0, self.rows_per_rank, micro)]
        mask = rb.gen_mask.to(device).float()  # (B, N)
        ref = rb.ref_logprobs.to(device)  # (B, N)
        estimator: Literal["k1", "k3"] = "k3" if adv_cfg.kl_mode == "loss" else "k1"
        # k3 as a loss term pulls towards the reference (k1's gradient averages to zero under pi);
        # k1 as a reward penalty is the unbiased per-token estimate.
        kl_reward = None
        if adv_cfg.kl_mode == "reward" and adv_cfg.kl_coef > 0:  # advantages need the policy's current KL
            with torch.no_grad():
                logp = torch.cat([self._policy_logprobs(rb, c, False)[0] for c in chunks])  # (B, N)
            kl_reward = kl_per_token(logp, ref, mask, estimator="k1")
        seq_adv, self.state.baseline = advantages(
            rb.rewards.to(device),
            kind=adv_cfg.baseline,
            group_size=adv_cfg.rollout.samples_per_prompt,
            state=self.state.baseline,
            ema_decay=adv_cfg.ema_decay,
        )
        token_rewards = rb.token_rewards.to(device) if rb.token_rewards is not None else None
        adv = token_advantages(
            seq_adv,
            mask,
            token_rewards=token_rewards,
            rewards=rb.rewards.to(device),
            kl=kl_reward,
            kl_coef=adv_cfg.kl_coef,
            kl_mode=adv_cfg.kl_mode,
        )
        if adv_cfg.normalize_advantages:
            adv = normalize(adv, mask)
        total = mask.sum().clamp(min=1)
        stats: dict[str, float] = {}
        for rows in chunks:
            logp, entropy = self._policy_logprobs(rb, rows, adv_cfg.entropy_coef > 0)
            kl = kl_per_token(logp, ref[rows], mask[rows], estimator=estimator)
            loss, chunk_stats = reinforce_loss(
                logp,
                adv[rows].detach(),
                mask[rows],
                kl=kl,
                kl_coef=adv_cfg.kl_coef,
                kl_mode=adv_cfg.kl_mode,
                entropy=entropy,
                entropy_coef=adv_cfg.entropy_coef,
            )
            weight = float(mask[rows].sum() / total)  # this chunk's share of the rank's generated tokens
            self.engine.engine.backward(loss * (weight * len(chunks)))  # DeepSpeed divides by len(chunks)
            self.engine.engine.step()
            for k, v in chunk_stats.items():
                stats[k] = stats.get(k, 0.0) + weight * v
        return stats

    # --------------------------------------------------------------- the loop
    def pretrain_discriminator(self) -> None:
        """SeqGAN: D learns real vs the initial policy's samples before the first policy update."""
        adv, st = self.cfg.adversarial, self.state
        while st.d_pretrained < adv.discriminator.pretrain_steps:
            windows = self.real_windows()
            mine = self.my_rows(self.rollouts(-1 - st.d_pretrained, windows))
            d_stats = st.disc.update(self.disc_real(windows), mine.tokens, mine.attention_mask)
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
            windows = self.real_windows()
            batch = self.rollouts(engine.step, windows)
            mine = self.my_rows(batch)
            rollout_s = time.time() - t0
            stats = self.policy_update(mine)
            real = self.disc_real(windows)
            d_steps = adv.discriminator.d_steps
            d_stats = st.disc.update(real, mine.tokens, mine.attention_mask, step=d_steps > 0)
            for _ in range(d_steps - 1):
                st.disc.update(real, mine.tokens, mine.attention_mask)
            engine.step += 1
            st.policy_version += 1
            st.disc_version += d_steps > 0
            engine.tokens_seen += int(batch.gen_mask.sum())
            publish_s = self.publish()
            local = [
                mine.rewards.mean().item(),
                mine.rewards.std().item() if len(mine.rewards) > 1 else 0.0,
                stats["kl"],
                stats["entropy"],
                mine.lengths.float().mean().item(),
                d_stats["d_acc_real"],
                d_stats["d_acc_fake"],
                d_stats["d_loss"],
                stats["loss"],
            ]
            g = all_reduce_mean(local, engine.world)
            engine.metrics.update(
                step=engine.step,
                reward_mean=g[0],
                reward_std=g[1],
                kl=g[2],
                entropy=g[3],
                sample_len=g[4],
                d_acc_real=g[5],
                d_acc_fake=g[6],
                d_loss=g[7],
                pg_loss=g[8],
                rollout_tokens_per_s=float(batch.gen_mask.sum()) / max(rollout_s, 1e-9),
                rollout_s=rollout_s,
                publish_s=publish_s,
                version_lag=st.policy_version - 1 - batch.policy_version,
                tokens_seen=engine.tokens_seen,
                reissued=(self.group.reissued - self.reissued_before) if engine.rank == 0 else 0,
            )
            engine.log_metrics(STEP_KEYS)
            step, cadence = engine.step, engine.cadence
            if engine.rank == 0 and cadence.log(step):
                progress_line(
                    "adversarial",
                    step,
                    adv.train.steps,
                    g[8],
                    engine.metrics["rollout_tokens_per_s"],
                    0.0,
                    time.time() - t_start,
                    start_step,
                )
                log.info(
                    "[adversarial] step %d reward %.3f kl %.4f entropy %.3f D acc real %.2f fake %.2f publish %.2fs",
                    step,
                    g[0],
                    g[2],
                    g[3],
                    g[5],
                    g[6],
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
    from genpt_dist.raycluster import init_ray, room_for
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
