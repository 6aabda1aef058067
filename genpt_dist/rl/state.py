"""What the RL stage keeps in a checkpoint besides the policy engine.

`RLPart` (a `train.engine.CheckpointPart`): the discriminator's engine when D is a reward, the
advantage baseline's state and the version counters, in meta.json's `rl` record, and (rank 0, when the
update clips against the previous policy) that policy's weights in `previous_policy.safetensors`, so
that a resumed run's first update has the same trust region as an uninterrupted one. `PromptSource` (the
engine's `DataSource` when prompts come from a file): the prompt loader's position, and the real
text's when a discriminator trains on it, in meta.json's `loader` record, so a resumed run continues
with the same prompts in the same order.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from genpt_dist.errors import UserError
from genpt_dist.meta import CheckpointMeta, RLState
from genpt_dist.rl.disc_learner import DiscriminatorLearner
from genpt_dist.rl.prompts import Prompt, PromptLoader
from genpt_dist.rl.reinforce import BaselineState
from genpt_dist.tokenizer import Tokenizer
from genpt_dist.train.sources import Batch, ShardSource

PREVIOUS_POLICY = "previous_policy.safetensors"  # the policy version before the checkpoint's, when kept

PreviousPolicy = tuple[int, Mapping[str, Any]]  # (version, state dict)


class RLPart:
    """The RL stage's checkpoint part: D's engine (when D is a reward), the baseline, the counters and the
    previous policy (`previous_source`: where rank 0 reads it when saving; `previous`: what a restore read)."""

    def __init__(
        self, disc: DiscriminatorLearner | None, previous_source: Callable[[], PreviousPolicy | None] | None = None
    ):
        self.disc = disc
        self.baseline = BaselineState()
        self.policy_version, self.disc_version, self.d_pretrained = 0, 0, 0
        self.previous_source = previous_source
        self.previous: PreviousPolicy | None = None

    def engines(self) -> list[Any]:
        return [self.disc.engine] if self.disc is not None else []

    def save(self, folder: Path, rank: int) -> None:
        from safetensors.torch import save_file

        if self.disc is not None:
            self.disc.save(folder)
        previous = self.previous_source() if self.previous_source is not None else None
        if previous is not None:
            version, state = previous
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # tied weights apart
            save_file(tensors, str(folder / PREVIOUS_POLICY), metadata={"version": str(version)})

    def load(self, folder: Path, meta: CheckpointMeta) -> None:
        if meta.rl is None:
            raise UserError(f"checkpoint of stage {meta.stage!r} has no RL state to resume the RL stage from")
        self.baseline = BaselineState(**meta.rl.baseline)
        self.policy_version, self.disc_version = meta.rl.policy_version, meta.rl.disc_version
        self.d_pretrained = meta.rl.d_pretrained
        if self.disc is not None:
            self.disc.load(folder)
        if (folder / PREVIOUS_POLICY).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / PREVIOUS_POLICY), framework="pt") as f:
                version = int((f.metadata() or {})["version"])
                self.previous = version, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)

    def meta_fields(self) -> dict[str, Any]:
        return {
            "rl": RLState(
                baseline=dataclasses.asdict(self.baseline),
                policy_version=self.policy_version,
                disc_version=self.disc_version,
                d_pretrained=self.d_pretrained,
                discriminator=self.disc.config_dict() if self.disc is not None else None,
            )
        }


class PromptSource:
    """The engine's data source when prompts come from a file: the prompt loader's position (and the real
    text's, when a discriminator trains on it) in checkpoints; val batches from the real text, if any."""

    def __init__(
        self, prompts: PromptLoader, tokenizer: Tokenizer, real: ShardSource | None, fingerprint: str, batch_size: int
    ):
        self.prompts, self.real, self.tokenizer = prompts, real, tokenizer
        self.data_fingerprint, self.batch_size = fingerprint, batch_size
        self._in_flight: collections.deque[dict[str, int]] = collections.deque()  # loader states before each

    def draw(self) -> list[Prompt]:
        """The next global batch of prompts, in flight until `consumed` (its step trained)."""
        self._in_flight.append(self.prompts.state_dict())
        return self.prompts.next_batch()

    def consumed(self) -> None:
        """The oldest batch in flight has been trained on."""
        self._in_flight.popleft()

    def train_batches(self) -> Iterator[Batch]:
        return self.real.train_batches() if self.real is not None else iter(())

    def eval_batches(self) -> Iterable[Batch]:
        return self.real.eval_batches() if self.real is not None else []

    def state_dict(self) -> dict[str, Any]:
        """The position of the first batch not yet trained on: a resumed run re-draws the batches that were in
        flight (sampled ahead for stale rollouts) and continues the same prompt order."""
        prompts = self._in_flight[0] if self._in_flight else self.prompts.state_dict()
        return {"prompts": dict(prompts), "real": self.real.state_dict() if self.real else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        if self.real is not None and state.get("real") is not None:
            self.real.load_state_dict(state["real"])
