"""Rollouts of the adversarial stage on Ray: the actor around a ``RolloutWorker`` and the pool of actors.

Three layers, so that the sampling and scoring logic is tested without Ray and the actor stays thin:

* ``RolloutWorker`` (``rl.rollout_worker``): a plain class, tested without Ray, that samples from the
  policy and scores with the reference and the discriminator; its module says how seeds make a row's
  tokens independent of how a request is split.
* ``RolloutActor``: the Ray actor around one worker. Published weights arrive as object refs
  wrapped in a list (so Ray does not resolve them for every request); the actor fetches and loads
  them only when the version differs from its own, so a restarted actor catches up by itself.
* ``RolloutGroup``: placement (a clear ``UserError`` when the cluster can never hold the actors),
  weight publishing (one ``ray.put`` per state), fan-out of a request's rows (split only at call
  boundaries) and re-issue of the rows of an actor that died, so that no row is lost or duplicated.

Published states are packed (``pack_state``) into numpy arrays (the reading side maps them from
the object store without a copy), with tied weights stored once and bfloat16 kept as its raw bits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import ray

from genpt_dist.errors import UserError
from genpt_dist.rl.batch import RolloutBatch, RolloutRequest  # noqa: F401 (part of this module's API)
from genpt_dist.rl.inputs import RewardInputs
from genpt_dist.rl.rollout_worker import RolloutWorker
from genpt_dist.rl.weights import PackedState, pack_state, unpack_state  # noqa: F401

log = logging.getLogger(__name__)

_ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


# -------------------------------------------------------------------------------------- actor


class WeightRefs(NamedTuple):
    """The published weights a request is to be served with; refs are boxed in lists so that Ray
    hands them over unresolved (the actor fetches only what it lacks)."""

    policy_version: int
    policy: list  # [ObjectRef of a PackedState] or [] (nothing published: keep the initial weights)
    disc_version: int
    disc: list  # same for the discriminator
    previous_version: int = -2  # the policy version published before `policy` (kept for the trust region)
    previous: list | None = None  # [ObjectRef of its PackedState], or None when the group keeps none


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
        if weights.previous and self.worker.lacks_previous(weights.previous_version):  # a restart, a resume
            self.worker.load_previous(weights.previous_version, ray.get(weights.previous[0]))
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
            raise UserError(
                f"{num_actors} rollout actors x {per:g} {res}s need {need:g} {res}s; "
                f"the Ray cluster has {have:g} {hint}"
            )
        biggest = max((n.get(res, 0.0) for n in nodes), default=0.0)
        if biggest < per:
            raise UserError(
                f"a rollout actor needs {per:g} {res}s on one node; the largest node has {biggest:g} {hint}"
            )


class RolloutGroup:
    """A pool of rollout actors: placement, weight publishing, fan-out and re-issue after failures."""

    def __init__(
        self,
        num_actors: int,
        *,
        cpus_per_actor: float,
        gpus_per_actor: float,
        max_restarts: int,
        model_config: dict,
        disc_config: dict,
        reference_state: Mapping[str, Any],
        pad_id: int,
        eos_id: int,
        threads: int = 1,
        dtype: str = "float32",
        ready_timeout_s: float = 300.0,
        rewards: RewardInputs | None = None,
        tokenizer_json: str | None = None,
        keep_previous: bool = False,
    ) -> None:
        """`keep_previous`: the actors keep the policy version before the latest one, and the group keeps it
        published too (one more copy in the object store), so a restarted actor gets it back."""
        if num_actors < 1:
            raise UserError(f"num_actors must be >= 1, got {num_actors}")
        _check_fits(num_actors, cpus_per_actor, gpus_per_actor)
        # Put once and shared by every actor; the group owns it, so restarted actors can read it again
        # (Ray logs that restarts depend on it: keep the driver's RolloutGroup alive).
        self._reference_ref = ray.put(pack_state(reference_state))
        options = dict(
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
            max_restarts=max_restarts,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        device = "cuda" if gpus_per_actor > 0 else "cpu"
        self._actors = [
            RolloutActor.options(**options).remote(
                f"rollout-{i}",
                model_config,
                disc_config,
                self._reference_ref,
                pad_id=pad_id,
                eos_id=eos_id,
                threads=threads,
                device=device,
                dtype=dtype,
                rewards=rewards,
                tokenizer_json=tokenizer_json,
                keep_previous=keep_previous,
            )
            for i in range(num_actors)
        ]
        self._keep_previous = keep_previous
        self._weights = WeightRefs(-1, [], -1, [])
        self._chunks: dict[Any, _Chunk] = {}
        self.reissued = 0  # chunks re-issued after an actor failure
        self.restart_wait_s = 60.0  # how long a re-issue waits for a restarting actor once all have failed
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise UserError(
                f"{num_actors} rollout actors were not placed within {ready_timeout_s:g} s; "
                f"available resources: {ray.available_resources()}"
            ) from None

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    def publish(
        self,
        policy_version: int,
        policy_state: Mapping[str, Any] | None,
        disc_version: int | None = None,
        disc_state: Mapping[str, Any] | None = None,
    ) -> float:
        """Put new weights into the object store (once each) for the next requests; returns seconds.

        States are torch state dicts (CPU or GPU, any dtype) or numpy; a None state keeps the last one.
        """
        t0 = time.perf_counter()
        w = self._weights
        if policy_state is not None:
            if self._keep_previous and int(policy_version) != w.policy_version:
                w = w._replace(previous_version=w.policy_version, previous=w.policy)
            w = w._replace(policy_version=int(policy_version), policy=[ray.put(pack_state(policy_state))])
        if disc_state is not None:
            if disc_version is None:
                raise ValueError("publish: a disc_state needs its disc_version")
            w = w._replace(disc_version=int(disc_version), disc=[ray.put(pack_state(disc_state))])
        self._weights = w
        return time.perf_counter() - t0

    def previous_policy(self) -> tuple[int, Mapping[str, Any]] | None:
        """(version, state dict) of the policy published before the latest one, if the group keeps one."""
        w = self._weights
        if not w.previous:
            return None
        return w.previous_version, unpack_state(ray.get(w.previous[0]))

    def set_previous_policy(self, version: int, state: Mapping[str, Any]) -> None:
        """Publish the policy of the version before the latest (a resumed run's, from its checkpoint)."""
        if self._keep_previous:
            self._weights = self._weights._replace(previous_version=int(version), previous=[ray.put(pack_state(state))])

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
                except ray.exceptions.RayTaskError as exc:  # the worker raised: a bad reward is the user's
                    if isinstance(exc.cause, UserError):
                        raise exc.cause from None
                    raise
                except _ACTOR_ERRORS as exc:
                    chunk = chunks[k]
                    chunk.attempts += 1
                    if chunk.attempts > limit:
                        raise RuntimeError(f"rollout chunk failed on {chunk.attempts} actors; last: {exc}") from exc
                    chunk.actor = (chunk.actor + 1) % self.num_actors
                    if chunk.attempts >= self.num_actors:  # every actor failed it once: wait for a restart
                        self._ping(chunk.actor, time.perf_counter() + self.restart_wait_s)
                    log.warning(
                        "rollout actor died (%s); re-issuing %d rows to rollout-%d",
                        type(exc).__name__,
                        len(chunk.request),
                        chunk.actor,
                    )
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
