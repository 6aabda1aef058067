"""Rollouts of the adversarial stage: sample from the policy, score with the reference and the discriminator.

Three layers (STYLE rule 7):

* ``RolloutWorker``: a plain class (tested without Ray) holding the current policy, the frozen
  reference and the discriminator. ``generate(RolloutRequest) -> RolloutBatch`` samples with
  ``model.sampling.sample`` (KV cache), then computes reference log-probs and discriminator logits
  on the result and, when asked, SeqGAN Monte Carlo token rewards (``rl.reward``).
* ``RolloutActor``: the Ray actor around one worker. Published weights arrive as object refs
  wrapped in a list (so Ray does not resolve them for every request); the actor fetches and loads
  them only when the version differs from its own, so a restarted actor catches up by itself.
* ``RolloutGroup``: placement (a clear ``UserError`` when the cluster can never hold the actors),
  weight publishing (one ``ray.put`` per state), fan-out of a request's rows and re-issue of the
  rows of an actor that died, so that no row is lost or duplicated.

Reproducibility: rows are sampled in *calls* of ``rows_per_call`` consecutive rows (1 by default),
one batched ``sample`` call each, with a generator seeded from the rows' seeds only (the row's own
seed when a call holds one row; ``derive_seed`` of all of them otherwise). The group splits a
request only at call boundaries, so a row's tokens do not depend on how the rows were split across
actors or on re-issues. Monte Carlo completions of a call's rows are sampled in further batched
calls seeded by ``derive_seed(*seeds, MC, i)``. Reference log-probs and discriminator logits are
deterministic functions of the tokens, batched over the whole request (equal up to float rounding
under a different split).

Published states are packed (``pack_state``) into numpy arrays (the reading side maps them from
the object store without a copy), with tied weights stored once and bfloat16 kept as its raw bits.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import ray
import torch
from torch import Tensor

from genpt_dist.errors import UserError
from genpt_dist.rl.batch import RolloutBatch, RolloutRequest  # noqa: F401 (part of this module's API)
from genpt_dist.rl.weights import PackedState, pack_state, unpack_state  # noqa: F401
from genpt_dist.model.discriminator import Discriminator, DiscriminatorConfig
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.model.sampling import sample
from genpt_dist.rl.reinforce import derive_seed
from genpt_dist.rl.reward import mc_token_rewards, sequence_reward

log = logging.getLogger(__name__)

_MC_STREAM = 1  # tag of the Monte Carlo seed stream in derive_seed
_ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


# ------------------------------------------------------------------------------------- worker


class RolloutWorker:
    """Policy + frozen reference + discriminator; turns requests into rollout batches."""

    def __init__(self, model_config: dict, disc_config: dict, reference_state: Mapping[str, Any] | PackedState, *,
                 pad_id: int, eos_id: int, threads: int | None = 1, device: str = "cpu",
                 dtype: str = "float32", score_batch_size: int = 32) -> None:
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.pad_id, self.eos_id = pad_id, eos_id
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.score_batch_size = score_batch_size
        self.reference = GPT(GPTConfig(**model_config))
        self.reference.load_state_dict(unpack_state(reference_state))
        self.reference.to(self.device, self.dtype).eval().requires_grad_(False)
        self.policy = copy.deepcopy(self.reference)  # the starting policy is the pretrained model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # every actor (and restart) starts from the same untrained D
            self.disc = Discriminator(DiscriminatorConfig(**disc_config))
        self.disc.to(self.device, self.dtype).eval().requires_grad_(False)
        self.policy_version = -1
        self.disc_version = -1

    @property
    def versions(self) -> tuple[int, int]:
        """(policy version, discriminator version); -1 = the initial weights."""
        return self.policy_version, self.disc_version

    def load(self, policy_version: int | None, policy_state: Any | None,
             disc_version: int | None = None, disc_state: Any | None = None) -> None:
        """Load new weights (plain or packed state dicts); a None state leaves that model and its version."""
        if policy_state is not None:
            self.policy.load_state_dict(unpack_state(policy_state))
            self.policy_version = int(policy_version if policy_version is not None else self.policy_version + 1)
        if disc_state is not None:
            self.disc.load_state_dict(unpack_state(disc_state))
            self.disc_version = int(disc_version if disc_version is not None else self.disc_version + 1)

    # ----------------------------------------------------------------------------------- sampling

    def _sample(self, prompts: list[list[int]], max_new: int, req: RolloutRequest, seed: int):
        return sample(self.policy, prompts, max_new_tokens=max_new, top_k=req.top_k, top_p=req.top_p,
                      temperature=req.temperature, eos_id=self.eos_id, pad_id=self.pad_id, seed=seed)

    @staticmethod
    def _calls(req: RolloutRequest) -> list[range]:
        B, g = len(req), req.rows_per_call
        return [range(s, min(s + g, B)) for s in range(0, B, g)]

    @staticmethod
    def _call_seed(seeds: list[int]) -> int:
        return seeds[0] if len(seeds) == 1 else derive_seed(*seeds)

    def generate(self, req: RolloutRequest) -> RolloutBatch:
        """Sample every row, then score it; see the module docstring."""
        t0 = time.perf_counter()
        gen: list[list[int]] = [[] for _ in range(len(req))]
        lps: list[Tensor] = [torch.empty(0)] * len(req)
        sampled = 0
        for rows in self._calls(req):
            out = self._sample([req.prompts[i] for i in rows], req.max_new_tokens, req,
                               self._call_seed([req.seeds[i] for i in rows]))
            sampled += len(rows) * out.logprobs.size(1)
            P_c = out.prompt_width
            for j, i in enumerate(rows):
                n = int(out.new_lengths[j])
                gen[i] = out.tokens[j, P_c:P_c + n].tolist()
                lps[i] = out.logprobs[j, :n].float().cpu()
        tokens, attn, P = self._assemble([p + g for p, g in zip(req.prompts, gen)], [len(p) for p in req.prompts])
        B, N = tokens.size(0), tokens.size(1) - P
        lengths = torch.tensor([len(g) for g in gen], dtype=torch.long)  # (B,)
        gen_mask = attn[:, P:]  # (B, N)
        logprobs = torch.zeros(B, N)  # (B, N)
        for i, lp in enumerate(lps):
            logprobs[i, :lp.numel()] = lp
        ref_logprobs = self._ref_logprobs(tokens, attn)[:, P - 1:].masked_fill(gen_mask == 0, 0.0)  # (B, N)
        d_logits = self._disc_logits(tokens, attn)  # (B,)
        rewards = sequence_reward(d_logits, req.reward_kind)  # (B,)

        token_rewards, mc_tokens, mc_seconds = None, 0, 0.0
        if req.mc_rollouts > 0:
            t_mc = time.perf_counter()
            token_rewards, mc_tokens = self._mc_rewards(req, gen, rewards, gen_mask)
            mc_seconds = time.perf_counter() - t_mc
        return RolloutBatch(
            tokens=tokens, prompt_width=P, attention_mask=attn, logprobs=logprobs, ref_logprobs=ref_logprobs,
            gen_mask=gen_mask.clone(), lengths=lengths, d_logits=d_logits, rewards=rewards,
            token_rewards=token_rewards, policy_version=self.policy_version, disc_version=self.disc_version,
            seconds=time.perf_counter() - t0, actor="local", pad_id=self.pad_id, mc_seconds=mc_seconds,
            mc_tokens=mc_tokens, sampled_tokens=sampled,
        )

    def _assemble(self, seqs: list[list[int]], prompt_lens: list[int]) -> tuple[Tensor, Tensor, int]:
        """Rows prompt + generated laid out with the prompts right-aligned at column P.

        Returns tokens (B, P + N), attention mask (B, P + N) and P."""
        P = max(prompt_lens)
        N = max(len(s) - p for s, p in zip(seqs, prompt_lens))
        tokens = torch.full((len(seqs), P + N), self.pad_id, dtype=torch.long)  # (B, P + N)
        attn = torch.zeros((len(seqs), P + N), dtype=torch.long)  # (B, P + N)
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            tokens[i, P - p:P - p + len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, P - p:P - p + len(s)] = 1
        return tokens, attn, P

    # ------------------------------------------------------------------------------------ scoring

    def _score(self, fn: Any, tokens: Tensor, attn: Tensor) -> Tensor:
        """``fn(idx, mask)`` over micro-batches of ``score_batch_size`` rows; float32 on the CPU."""
        out = []
        with torch.inference_mode():
            for s in range(0, tokens.size(0), self.score_batch_size):
                sl = slice(s, s + self.score_batch_size)
                out.append(fn(tokens[sl].to(self.device), attn[sl].to(self.device)).float().cpu())
        return torch.cat(out)

    def _ref_logprobs(self, tokens: Tensor, attn: Tensor) -> Tensor:
        """(B, T-1) log-probs of tokens[:, 1:] under the reference."""
        return self._score(lambda x, m: self.reference.token_logprobs(x, attention_mask=m), tokens, attn)

    def _disc_logits(self, tokens: Tensor, attn: Tensor) -> Tensor:
        """(B,) discriminator logits."""
        return self._score(lambda x, m: self.disc(x, attention_mask=m), tokens, attn)

    def _mc_rewards(self, req: RolloutRequest, gen: list[list[int]], rewards: Tensor,
                    gen_mask: Tensor) -> tuple[Tensor, int]:
        """SeqGAN token rewards (B, N) and the MC cost in sampled token slots.

        For each row, prefixes ending at generated index t = stride-1, 2*stride-1, ... before its last
        token get ``mc_rollouts`` completions with the remaining budget ``max_new_tokens - t - 1``. A
        call's items are sampled together (prefixes left-padded); completions longer than their
        budget are cut, which gives exactly the budgeted distribution since sampling is autoregressive.
        """
        B, N = gen_mask.shape
        M, stride = req.mc_rollouts, req.mc_stride
        positions = torch.arange(stride - 1, max(N - 1, 0), stride)  # (n_pos,)
        scores = torch.zeros(B, positions.numel())  # (B, n_pos)
        cost = 0
        block = self.policy.config.block_size
        for rows in self._calls(req):
            items = [(i, j, int(t)) for j, t in enumerate(positions) for i in rows if t < len(gen[i]) - 1]
            if not items:
                continue
            # Split so that the longest prefix + the largest budget of a call fit the context.
            slack = block - max(len(req.prompts[i]) for i in rows) - req.max_new_tokens
            groups: list[list[tuple[int, int, int]]] = []
            for item in items:
                if groups and item[2] - groups[-1][0][2] <= slack:
                    groups[-1].append(item)
                else:
                    groups.append([item])
            seeds = [req.seeds[i] for i in rows]
            for k, group in enumerate(groups):
                prefixes = [req.prompts[i] + gen[i][:t + 1] for i, _, t in group for _ in range(M)]
                budgets = torch.tensor([req.max_new_tokens - t - 1 for _, _, t in group for _ in range(M)])
                out = self._sample(prefixes, int(budgets.max()), req, derive_seed(*seeds, _MC_STREAM, k))
                cost += len(prefixes) * out.logprobs.size(1)
                P_c, width = out.prompt_width, out.tokens.size(1)
                keep = torch.minimum(out.new_lengths.cpu(), budgets)  # (R,)
                plen = torch.tensor([len(p) for p in prefixes])  # (R,)
                col = torch.arange(width)[None, :]  # (1, W)
                mask = ((col >= P_c - plen[:, None]) & (col < P_c + keep[:, None])).long()  # (R, W)
                d = self._disc_logits(out.tokens.cpu(), mask)  # (R,)
                mean = sequence_reward(d, req.reward_kind).view(len(group), M).mean(dim=1)  # (items,)
                for (i, j, _), s in zip(group, mean.tolist()):
                    scores[i, j] = s
        return mc_token_rewards(scores, positions, rewards, gen_mask), cost


# -------------------------------------------------------------------------------------- actor


class WeightRefs(NamedTuple):
    """The published weights a request is to be served with; refs are boxed in lists so that Ray
    hands them over unresolved (the actor fetches only what it lacks)."""

    policy_version: int
    policy: list  # [ObjectRef of a PackedState] or [] (nothing published: keep the initial weights)
    disc_version: int
    disc: list  # same for the discriminator


class _RolloutActor:
    """Thin Ray wrapper: weight sync by version, then ``RolloutWorker.generate``."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name = name
        self.worker = RolloutWorker(*args, **kwargs)

    def ready(self) -> tuple[int, int]:
        return self.worker.versions

    def generate(self, request: RolloutRequest, weights: WeightRefs) -> RolloutBatch:
        t0 = time.perf_counter()
        have_p, have_d = self.worker.versions
        policy = ray.get(weights.policy[0]) if weights.policy and weights.policy_version != have_p else None
        disc = ray.get(weights.disc[0]) if weights.disc and weights.disc_version != have_d else None
        self.worker.load(weights.policy_version, policy, weights.disc_version, disc)
        del policy, disc  # release the object-store buffers
        sync = time.perf_counter() - t0
        batch = self.worker.generate(request)
        batch.actor, batch.sync_seconds, batch.seconds = self.name, sync, batch.seconds + sync
        return batch


RolloutActor = ray.remote(_RolloutActor)


# -------------------------------------------------------------------------------------- group


@dataclass
class _Chunk:
    request: RolloutRequest
    weights: WeightRefs
    actor: int
    attempts: int = 0


def _check_fits(num_actors: int, cpus: float, gpus: float) -> None:
    """Refuse actors the cluster can never place, instead of waiting forever for them."""
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    hint = "(lower adversarial.rollout.num_actors or its cpus_per_actor / gpus_per_actor)"
    for res, per in (("CPU", cpus), ("GPU", gpus)):
        if per <= 0:
            continue
        need, have = num_actors * per, total.get(res, 0.0)
        if have < need:
            raise UserError(f"{num_actors} rollout actors x {per:g} {res}s need {need:g} {res}s; "
                            f"the Ray cluster has {have:g} {hint}")
        biggest = max((n.get(res, 0.0) for n in nodes), default=0.0)
        if biggest < per:
            raise UserError(f"a rollout actor needs {per:g} {res}s on one node; the largest node has "
                            f"{biggest:g} {hint}")


class RolloutGroup:
    """A pool of rollout actors: placement, weight publishing, fan-out and re-issue after failures."""

    def __init__(self, num_actors: int, *, cpus_per_actor: float, gpus_per_actor: float, max_restarts: int,
                 model_config: dict, disc_config: dict, reference_state: Mapping[str, Any], pad_id: int,
                 eos_id: int, threads: int = 1, dtype: str = "float32", ready_timeout_s: float = 300.0) -> None:
        if num_actors < 1:
            raise UserError(f"num_actors must be >= 1, got {num_actors}")
        _check_fits(num_actors, cpus_per_actor, gpus_per_actor)
        # Put once and shared by every actor; the group owns it, so restarted actors can read it again
        # (Ray logs that restarts depend on it: keep the driver's RolloutGroup alive).
        self._reference_ref = ray.put(pack_state(reference_state))
        options = dict(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=max_restarts,
                       max_task_retries=0, scheduling_strategy="SPREAD")
        device = "cuda" if gpus_per_actor > 0 else "cpu"
        self._actors = [
            RolloutActor.options(**options).remote(
                f"rollout-{i}", model_config, disc_config, self._reference_ref, pad_id=pad_id, eos_id=eos_id,
                threads=threads, device=device, dtype=dtype)
            for i in range(num_actors)
        ]
        self._weights = WeightRefs(-1, [], -1, [])
        self._chunks: dict[Any, _Chunk] = {}
        self.reissued = 0  # chunks re-issued after an actor failure
        self.restart_wait_s = 60.0  # how long a re-issue waits for a restarting actor once all have failed
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise UserError(f"{num_actors} rollout actors were not placed within {ready_timeout_s:g} s; "
                            f"available resources: {ray.available_resources()}") from None

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    def publish(self, policy_version: int, policy_state: Mapping[str, Any] | None,
                disc_version: int | None = None, disc_state: Mapping[str, Any] | None = None) -> float:
        """Put new weights into the object store (once each) for the next requests; returns seconds.

        States are torch state dicts (CPU or GPU, any dtype) or numpy; a None state keeps the last one.
        """
        t0 = time.perf_counter()
        w = self._weights
        if policy_state is not None:
            w = w._replace(policy_version=int(policy_version), policy=[ray.put(pack_state(policy_state))])
        if disc_state is not None:
            w = w._replace(disc_version=int(disc_version), disc=[ray.put(pack_state(disc_state))])
        self._weights = w
        return time.perf_counter() - t0

    @property
    def versions(self) -> tuple[int, int]:
        """The latest published (policy, disc) versions."""
        return self._weights.policy_version, self._weights.disc_version

    def actor_versions(self) -> list[tuple[int, int]]:
        """(policy, disc) versions each actor holds now (blocks)."""
        return ray.get([a.ready.remote() for a in self._actors])

    def _submit(self, chunk: _Chunk) -> Any:
        ref = self._actors[chunk.actor].generate.remote(chunk.request, chunk.weights)
        self._chunks[ref] = chunk
        return ref

    def generate_refs(self, request: RolloutRequest) -> list[Any]:
        """Split the rows (at call boundaries) across the actors; returns one ObjectRef per chunk.

        Pass the refs to ``collect`` (which re-issues chunks of dead actors), not to ``ray.get``."""
        calls = -(-len(request) // request.rows_per_call)
        per, extra = divmod(calls, self.num_actors)
        refs, start = [], 0
        for a in range(self.num_actors):
            n = (per + (a < extra)) * request.rows_per_call
            if n and start < len(request):
                stop = min(start + n, len(request))
                refs.append(self._submit(_Chunk(request.rows(start, stop), self._weights, a)))
                start = stop
        return refs

    def collect(self, refs: list[Any]) -> RolloutBatch:
        """Wait for the chunks of ``generate_refs``; a chunk whose actor died is re-issued to another."""
        chunks = [self._chunks.pop(ref) for ref in refs]
        results: list[RolloutBatch | None] = [None] * len(refs)
        waiting = {ref: k for k, ref in enumerate(refs)}
        limit = 2 * self.num_actors + 1
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            for ref in ready:
                k = waiting.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except _ACTOR_ERRORS as exc:
                    chunk = chunks[k]
                    chunk.attempts += 1
                    if chunk.attempts > limit:
                        raise RuntimeError(f"rollout chunk failed on {chunk.attempts} actors; last: {exc}") from exc
                    chunk.actor = (chunk.actor + 1) % self.num_actors
                    if chunk.attempts >= self.num_actors:  # every actor failed it once: wait for a restart
                        self._ping(chunk.actor, time.perf_counter() + self.restart_wait_s)
                    log.warning("rollout actor died (%s); re-issuing %d rows to rollout-%d",
                                type(exc).__name__, len(chunk.request), chunk.actor)
                    new = self._submit(chunk)
                    self._chunks.pop(new)
                    waiting[new] = k
                    self.reissued += 1
        return RolloutBatch.concat([r for r in results if r is not None])

    def generate(self, request: RolloutRequest) -> RolloutBatch:
        """Sample the request on the pool (blocking); rows come back in request order, each once."""
        return self.collect(self.generate_refs(request))

    def kill_actor(self, i: int) -> None:
        """Kill actor i as a crash would (Ray restarts it within max_restarts); for tests."""
        ray.kill(self._actors[i], no_restart=False)

    def _ping(self, i: int, deadline: float) -> bool:
        """Whether actor i answers before ``deadline`` (perf_counter); waits out a restart."""
        while True:
            try:
                ray.get(self._actors[i].ready.remote(), timeout=max(deadline - time.perf_counter(), 0.0))
                return True
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                if time.perf_counter() >= deadline:
                    return False
                time.sleep(0.2)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                return False

    def actors_alive(self, timeout_s: float = 30.0) -> int:
        """How many actors answer within timeout_s (an actor that is restarting counts once it is back)."""
        deadline = time.perf_counter() + timeout_s
        return sum(self._ping(i, deadline) for i in range(self.num_actors))

    def shutdown(self) -> None:
        """Kill the actors for good and drop the published weights."""
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
        self._chunks.clear()
        self._weights = WeightRefs(-1, [], -1, [])
