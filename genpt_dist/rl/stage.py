"""`adversarial`: the SeqGAN-style REINFORCE stage, distributed.

Per policy update (step s), on N Ray Train workers with DeepSpeed engines for the policy (the
generator) and for the discriminator D:
1. Prompts: every rank cuts `prompts_per_step / N` windows from its share of the real shards;
   a prompt is <bos> + the first `prompt_len` tokens of a window (0: <bos> alone). Rank 0 gathers
   them, repeats each `samples_per_prompt` times and asks the rollout actor pool (`RolloutGroup`)
   for samples, each row seeded by (seed, step, row). The actors hold the latest published policy,
   the frozen reference (the `--init` model) and D, and return tokens, sampling log-probs, reference
   log-probs and D's sequence reward (optionally SeqGAN Monte Carlo per-token rewards). The batch is
   broadcast and every rank keeps its own prompts' rows.
   With `max_staleness >= 1` the request for step s+1 is sent before step s trains (one version
   stale, overlapping sampling with training).
2. Policy: advantages from the sequence rewards and the configured baseline (EMA, group mean,
   leave-one-out), whitened; the KL to the reference as a per-token reward penalty or a loss term;
   loss = token-mean of -A * log pi(a_t) (+ KL, - entropy), one engine step (`rl.reinforce`).
3. Discriminator: `d_steps` binary cross-entropy updates on real windows (<bos> + prompt_len +
   max_new_tokens real tokens; as many distinct ones as samples) vs this step's samples. Before the
   first policy update D is trained for `pretrain_steps` rounds on samples of the initial policy
   (SeqGAN does this).
4. Publish: full weights of both (ZeRO-3 parameters gathered) go to the object store once, stamped
   with a version; actors load them before their next rollout.
Checkpoints hold the policy and D engines, the baseline state, counters and versions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genpt_dist import storage
from genpt_dist.checkpoint import resolve, load_state_dict
from genpt_dist.config import Config
from genpt_dist.errors import UserError
from genpt_dist.model.discriminator import Discriminator, DiscriminatorConfig
from genpt_dist.rl.reinforce import (BaselineState, advantages, kl_per_token, reinforce_loss, rollout_seed,
                                     token_advantages)
from genpt_dist.rl.rollout import RolloutBatch, RolloutGroup, RolloutRequest
from genpt_dist.train.loop import Job, Trainer, _all_reduce_sum, run_worker
from genpt_dist.train.pretrain import ShardSource, check_init_matches

log = logging.getLogger(__name__)
DISC_DIR = "ds_disc"


def disc_model_config(cfg: Config, vocab_size: int, pad_id: int) -> DiscriminatorConfig:
    d, r = cfg.adversarial.discriminator, cfg.adversarial.rollout
    return DiscriminatorConfig(vocab_size=vocab_size, block_size=1 + r.prompt_len + r.max_new_tokens,
                               n_layer=d.n_layer, n_head=d.n_head, d_model=d.d_model, dropout=d.dropout,
                               pad_id=pad_id)


class AdversarialTrainer(Trainer):
    """The policy engine comes from `Trainer`; this adds D, the rollout pool and the RL loop."""

    def __init__(self, job: Job, make_source):
        super().__init__(job, make_source)
        adv = self.cfg.adversarial
        self.group: RolloutGroup = job.extra["rollout_group"]
        self.rows_per_rank = adv.prompts_per_step // self.world * adv.rollout.samples_per_prompt
        self.disc_cfg = disc_model_config(self.cfg, self.tok.vocab_size, self.tok.pad_id)
        self.baseline = BaselineState()
        self.policy_version, self.disc_version, self.d_pretrained = 0, 0, 0
        self.reissued_before = self.group.reissued if self.rank == 0 else 0

    def build_extra(self) -> None:
        """D gets its own DeepSpeed engine (ZeRO <= 2: it is small) and optimizer."""
        import deepspeed

        from genpt_dist.train.deepspeed import build_ds_config

        torch.manual_seed(self.cfg.train.seed + 1)
        disc = Discriminator(self.disc_cfg)
        ds_cfg = self.cfg.deepspeed.model_copy(update={"zero_stage": min(self.cfg.deepspeed.zero_stage, 2),
                                                       "offload_params": False})
        ds = build_ds_config(ds_cfg, self.cfg.train, self.cfg.optim, self.precision,
                             use_gpu=self.cfg.scaling.use_gpu)
        d = self.cfg.adversarial.discriminator
        opt = torch.optim.AdamW(disc.parameters(), lr=d.lr, betas=(0.9, 0.99), weight_decay=0.01)
        self.disc, _, _, _ = deepspeed.initialize(model=disc, optimizer=opt, config=ds, dist_init_required=False)

    # --------------------------------------------------------------- state
    def restore_extra(self, folder: Path, meta: dict[str, Any]) -> None:
        rl = meta["rl"]
        self.baseline = BaselineState(**rl["baseline"])
        self.policy_version, self.disc_version = rl["policy_version"], rl["disc_version"]
        self.d_pretrained = rl["d_pretrained"]
        self.disc.load_checkpoint(str(folder / DISC_DIR), tag="state")

    def save_extra(self, folder: Path) -> None:
        self.disc.save_checkpoint(str(folder / DISC_DIR), tag="state")

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["rl"] = {"baseline": dataclasses.asdict(self.baseline), "policy_version": self.policy_version,
                      "disc_version": self.disc_version, "d_pretrained": self.d_pretrained,
                      "discriminator": dataclasses.asdict(self.disc_cfg)}
        return meta

    # --------------------------------------------------------------- pieces
    def _real_windows(self) -> torch.Tensor:
        """(prompts_per_rank, 1 + P + N) real windows: <bos> + real tokens."""
        r = self.cfg.adversarial.rollout
        batch = next(self._real)
        width = r.prompt_len + r.max_new_tokens
        # A sample cut at a document start already begins with <bos>: its window is that <bos> + the tokens
        # after it (the targets; -100 = pad -> <pad> = 0), never <bos><bos>, which no rollout has.
        starts = batch.idx[:, :1] == self.tok.bos_id  # (B, 1)
        body = torch.where(starts, batch.targets[:, :width].clamp(min=self.tok.pad_id), batch.idx[:, :width])
        bos = torch.full((body.shape[0], 1), self.tok.bos_id, dtype=body.dtype)
        return torch.cat([bos, body], dim=1)

    def _disc_real(self, windows: torch.Tensor) -> torch.Tensor:
        """Real windows for a D update, one per generated row: this step's prompt windows and
        `samples_per_prompt - 1` fresh batches from the shards (not the prompt windows repeated, so D
        sees as many distinct real sequences as generated ones)."""
        extra = [self._real_windows() for _ in range(self.cfg.adversarial.rollout.samples_per_prompt - 1)]
        return torch.cat([windows, *extra])

    def _request(self, step: int, windows: list[list[int]]) -> RolloutRequest:
        r, adv = self.cfg.adversarial.rollout, self.cfg.adversarial
        prompts = [w[: 1 + r.prompt_len] for w in windows for _ in range(r.samples_per_prompt)]
        seeds = [rollout_seed(self.cfg.train.seed, step, i) for i in range(len(prompts))]
        # Rows are sampled in batched calls of whole prompt groups, one per actor where possible; tokens
        # depend on this grouping (fixed by the config), never on which actor serves a call.
        per_actor = max(1, adv.prompts_per_step // r.num_actors) * r.samples_per_prompt
        return RolloutRequest(prompts=prompts, seeds=seeds, max_new_tokens=r.max_new_tokens, top_k=r.top_k,
                              top_p=r.top_p, temperature=r.temperature, mc_rollouts=adv.mc_rollouts,
                              mc_stride=adv.mc_stride, reward_kind=adv.reward, rows_per_call=per_actor)

    def _gather_windows(self, windows: torch.Tensor) -> list[list[int]] | None:
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, windows.tolist())
        return [w for part in parts for w in part] if self.rank == 0 else None

    def _broadcast(self, batch: RolloutBatch | None) -> RolloutBatch:
        import torch.distributed as dist

        box = [batch]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _my_rows(self, batch: RolloutBatch) -> RolloutBatch:
        """This rank's rows: its own prompts' samples (groups never straddle ranks)."""
        lo, n = self.rank * self.rows_per_rank, len(batch.tokens)
        rows = slice(lo, lo + self.rows_per_rank)
        return dataclasses.replace(batch, **{
            f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).shape[:1] == (n,)})

    def publish(self) -> float:
        """Gather full weights (collective) and let rank 0 publish them to the rollout actors."""
        from genpt_dist.train.deepspeed import gather_full_state_dict

        t0 = time.perf_counter()
        policy = gather_full_state_dict(self.engine)
        disc = gather_full_state_dict(self.disc)
        if self.rank == 0:
            self.group.publish(self.policy_version, policy, self.disc_version, disc)
        return time.perf_counter() - t0

    def disc_update(self, real: torch.Tensor, fake: torch.Tensor, fake_mask: torch.Tensor,
                    update: bool = True) -> dict[str, float]:
        """One BCE step (or, with update=False, only its accuracy): real windows 1, samples 0."""
        pad = self.tok.pad_id
        width = max(real.shape[1], fake.shape[1])
        real = F.pad(real, (0, width - real.shape[1]), value=pad)
        fake = F.pad(fake * fake_mask + pad * (1 - fake_mask), (0, width - fake.shape[1]), value=pad)
        x = torch.cat([real, fake]).to(self.device)
        y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(self.device)
        with torch.set_grad_enabled(update):
            logits = self.disc(x, (x != pad).long()).float()
            loss = F.binary_cross_entropy_with_logits(logits, y)
        if update:
            self.disc.backward(loss)
            self.disc.step()
        pred = (logits.detach() > 0).float()
        return {"d_loss": loss.item(), "d_acc_real": (pred[: len(real)] == 1).float().mean().item(),
                "d_acc_fake": (pred[len(real):] == 0).float().mean().item()}

    def policy_update(self, rb: RolloutBatch) -> dict[str, float]:
        adv_cfg = self.cfg.adversarial
        P = rb.prompt_width
        tokens, am = rb.tokens.to(self.device), rb.attention_mask.to(self.device)
        logits, _ = self.engine(tokens, attention_mask=am)  # (B, P+N, V)
        logp_all = torch.log_softmax(logits[:, P - 1:-1].float(), dim=-1)  # (B, N, V)
        gen = tokens[:, P:]  # (B, N)
        logp = logp_all.gather(-1, gen.unsqueeze(-1)).squeeze(-1)  # (B, N)
        mask = rb.gen_mask.to(self.device).float()
        with torch.set_grad_enabled(adv_cfg.entropy_coef > 0):  # reported every step, in the loss with a coef
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, N) policy entropy per generated position
        seq_adv, self.baseline = advantages(rb.rewards.to(self.device), kind=adv_cfg.baseline,
                                            group_size=adv_cfg.rollout.samples_per_prompt, state=self.baseline,
                                            ema_decay=adv_cfg.ema_decay)
        # k3 as a loss term pulls towards the reference (k1's gradient averages to zero under pi);
        # k1 as a reward penalty is the unbiased per-token estimate.
        kl = kl_per_token(logp, rb.ref_logprobs.to(self.device), mask,
                          estimator="k3" if adv_cfg.kl_mode == "loss" else "k1")
        token_rewards = rb.token_rewards.to(self.device) if rb.token_rewards is not None else None
        adv = token_advantages(seq_adv, mask, token_rewards=token_rewards, rewards=rb.rewards.to(self.device),
                               kl=kl.detach(), kl_coef=adv_cfg.kl_coef, kl_mode=adv_cfg.kl_mode)
        if adv_cfg.normalize_advantages:
            from genpt_dist.rl.reward import normalize

            adv = normalize(adv, mask)
        loss, stats = reinforce_loss(logp, adv.detach(), mask, kl=kl, kl_coef=adv_cfg.kl_coef, kl_mode=adv_cfg.kl_mode,
                                     entropy=entropy, entropy_coef=adv_cfg.entropy_coef)
        self.engine.backward(loss)
        self.engine.step()
        return stats

    # --------------------------------------------------------------- the loop
    def run(self) -> None:
        import ray.train

        from genpt_dist.train.metrics import MetricsLog, progress_line

        adv = self.cfg.adversarial
        mlog = MetricsLog(self.job.run, self.step, enabled=self.rank == 0)
        self._real = self.source.train_batches()
        start_step, t_start = self.step, time.time()
        publish_s = self.publish()
        kill_at = int(os.environ.get("GENPT_TEST_KILL_ACTOR_AT_STEP", "-1"))

        def rollouts(step: int, windows: torch.Tensor) -> Any:
            gathered = self._gather_windows(windows)
            if self.rank != 0:
                return None
            if step == kill_at:  # test hook: an actor dies; its rows are re-issued to another
                self.group.kill_actor(0)
            return self.group.generate(self._request(step, gathered))

        while self.d_pretrained < adv.discriminator.pretrain_steps:  # SeqGAN: pre-train D first
            windows = self._real_windows()
            batch = self._broadcast(rollouts(-1 - self.d_pretrained, windows))
            mine = self._my_rows(batch)
            d_stats = self.disc_update(self._disc_real(windows), mine.tokens, mine.attention_mask)
            self.d_pretrained += 1
            if self.rank == 0 and self.d_pretrained % adv.log_every == 0:
                log.info("[adversarial] D pre-train %d/%d acc real %.2f fake %.2f", self.d_pretrained,
                         adv.discriminator.pretrain_steps, d_stats["d_acc_real"], d_stats["d_acc_fake"])
            self.disc_version += 1
        publish_s = self.publish()

        while self.step < adv.steps:
            t0 = time.time()
            windows = self._real_windows()
            batch = self._broadcast(rollouts(self.step, windows))
            mine = self._my_rows(batch)
            rollout_s = time.time() - t0
            stats = self.policy_update(mine)
            real = self._disc_real(windows)
            d_stats = self.disc_update(real, mine.tokens, mine.attention_mask, update=adv.discriminator.d_steps > 0)
            for _ in range(adv.discriminator.d_steps - 1):
                self.disc_update(real, mine.tokens, mine.attention_mask)
            self.step += 1
            self.policy_version += 1
            self.disc_version += adv.discriminator.d_steps > 0
            self.tokens_seen += int(batch.gen_mask.sum())
            publish_s = self.publish()
            local = [mine.rewards.mean().item(), mine.rewards.std().item() if len(mine.rewards) > 1 else 0.0,
                     stats["kl"], stats.get("entropy", 0.0), mine.lengths.float().mean().item(),
                     d_stats["d_acc_real"], d_stats["d_acc_fake"], d_stats["d_loss"], stats["loss"]]
            g = [v / self.world for v in _all_reduce_sum(local)]
            self.metrics.update(step=self.step, reward_mean=g[0], reward_std=g[1], kl=g[2], entropy=g[3],
                                sample_len=g[4], d_acc_real=g[5], d_acc_fake=g[6], d_loss=g[7], pg_loss=g[8],
                                rollout_tokens_per_s=float(batch.gen_mask.sum()) / max(rollout_s, 1e-9),
                                rollout_s=rollout_s, publish_s=publish_s,
                                version_lag=self.policy_version - 1 - batch.policy_version,
                                tokens_seen=self.tokens_seen,
                                reissued=(self.group.reissued - self.reissued_before) if self.rank == 0 else 0)
            last = self.step == adv.steps
            mlog.add({k: v for k, v in self.metrics.items() if isinstance(v, (int, float))})
            if self.rank == 0 and (self.step % adv.log_every == 0 or last):
                progress_line("adversarial", self.step, adv.steps, g[8], self.metrics["rollout_tokens_per_s"], 0.0,
                              time.time() - t_start, start_step)
                log.info("[adversarial] step %d reward %.3f kl %.4f entropy %.3f D acc real %.2f fake %.2f "
                         "publish %.2fs", self.step, g[0], g[2], g[3], g[5], g[6], publish_s)
            if self.step % adv.eval_every == 0 or last:
                self.metrics.update(self.evaluate())
                mlog.add({"step": self.step, **{k: self.metrics[k] for k in ("val_loss", "val_ppl", "val_bpb")}})
            if self.step % adv.checkpoint_every == 0 or last:
                mlog.flush()
                self.save_and_report()
        if start_step >= adv.steps:
            ray.train.report(dict(self.metrics))
        mlog.close()


def adversarial(data: str, init: str, run: str, cfg: Config, address: str | None = None) -> dict[str, Any]:
    """Driver: validate, start the rollout pool, run the workers, summarise."""
    from genpt_dist.data.manifest import load_manifest
    from genpt_dist.raycluster import init_ray, room_for
    from genpt_dist.train.launcher import fit, stage_config

    adv, r = cfg.adversarial, cfg.adversarial.rollout
    manifest = load_manifest(data)
    check_init_matches(init, manifest.tokenizer_sha256, manifest.url)
    ref = resolve(init)
    model_cfg = ref.model_config
    lo, hi = cfg.scaling.worker_range
    if adv.prompts_per_step % hi:
        raise UserError(f"adversarial.prompts_per_step={adv.prompts_per_step} must be a multiple of the "
                        f"{hi} workers")
    if 1 + r.prompt_len + r.max_new_tokens > model_cfg.block_size:
        raise UserError(f"<bos> + prompt_len {r.prompt_len} + max_new_tokens {r.max_new_tokens} exceeds the "
                        f"model's context of {model_cfg.block_size}")
    if r.prompt_len + r.max_new_tokens > manifest.seq_len:
        raise UserError(f"prompt_len + max_new_tokens = {r.prompt_len + r.max_new_tokens} exceeds the data's "
                        f"{manifest.seq_len}-token samples (real windows for D)")
    # Engine settings of this stage: rows per rank as the micro batch, the stage's LR and step count, and
    # as many val batches as cover pretraining's val rows, so the stages' val losses compare.
    rows = adv.prompts_per_step // hi
    eval_batches = math.ceil(cfg.train.eval_batches * cfg.train.micro_batch_size / rows)
    stage_cfg = stage_config(cfg, model_cfg, seq_len=manifest.seq_len,
                             train={"steps": adv.steps, "micro_batch_size": rows, "eval_batches": eval_batches},
                             optim={"lr": adv.lr, "warmup_steps": adv.warmup_steps, "min_lr_ratio": 1.0})
    init_ray(address)
    # The workers and the actors together: an autoscaling cluster gets one request for both and time to
    # add nodes before the actors are placed (RolloutGroup itself refuses what does not fit now).
    actors = (r.num_actors * r.cpus_per_actor, r.num_actors * r.gpus_per_actor, f"{r.num_actors} rollout actors")
    with room_for(lo, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu, extra_cpus=actors[0],
                  extra_gpus=actors[1], extra_what=actors[2]):
        tok = manifest.load_tokenizer()
        ref_state = load_state_dict(ref)
        disc_cfg = disc_model_config(stage_cfg, tok.vocab_size, tok.pad_id)
        group = RolloutGroup(r.num_actors, cpus_per_actor=r.cpus_per_actor, gpus_per_actor=r.gpus_per_actor,
                             max_restarts=r.max_restarts, model_config=dataclasses.asdict(model_cfg),
                             disc_config=dataclasses.asdict(disc_cfg), reference_state=ref_state,
                             pad_id=tok.pad_id, eos_id=tok.eos_id, threads=r.threads)
        try:
            run = storage.normalize(run)
            job = Job(stage="adversarial", config=stage_cfg.model_dump(mode="json"), data=manifest.url, run=run,
                      init=ref.url, extra={"rollout_group": group})
            metrics = fit(job, stage_cfg, run_worker, address=address, also_needs=actors,
                          make_source=ShardSource, trainer_cls=AdversarialTrainer)
        finally:
            group.shutdown()
    keys = ("step", "reward_mean", "kl", "d_acc_real", "d_acc_fake", "val_loss", "val_ppl", "val_bpb",
            "rollout_tokens_per_s", "publish_s", "checkpoint")
    return {"command": "adversarial", "run": run, "init": ref.url, **{k: metrics.get(k) for k in keys}}
