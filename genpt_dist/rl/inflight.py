"""The rollout requests in flight: steps sent to the rollout pool and not yet trained on, oldest first.

Policy step s (0-based: the update made after s others) trains on rollouts of the weights published
after s updates or earlier. With `max_staleness = k` the requests of every step up to s + k go out
before step s trains, so the actors sample while the workers update: step s + k is sampled by the
weights of s updates, k versions behind the update that uses it (one-step-off at k = 1). At k = 0 a
step is requested only once the weights before it are published: strictly on-policy. Nothing is
requested past the run's last step, so the queue is empty when the run ends.

`InFlightRollouts` keeps the bookkeeping only. What `submit(step)` returns (rank 0's chunk refs, this
rank's real windows) is opaque to it, so it is tested without Ray.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class InFlight(Generic[T]):
    """One step's request, sent and not yet trained on."""

    step: int  # the policy step whose update the rollouts feed
    version: int  # updates made when it was sent: the policy version its rows are sampled by
    handle: T  # what `submit(step)` returned

    @property
    def lag(self) -> int:
        """Versions between the sampling weights and the update that uses the rows (<= max_staleness)."""
        return self.step - self.version


class InFlightRollouts(Generic[T]):
    """Sends each step's request `max_staleness` steps ahead of its update and hands them back in order."""

    def __init__(self, submit: Callable[[int], T], *, max_staleness: int, steps: int, first_step: int = 0):
        """`submit(step)` sends step `step`'s request and returns its handle; `steps` is the run's step count
        (the last step is steps - 1); `first_step` the first step this run trains (a resumed run's step)."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self._submit, self.max_staleness, self.steps = submit, max_staleness, steps
        self.next_step = first_step  # the next step to send
        self._queue: collections.deque[InFlight[T]] = collections.deque()

    def __len__(self) -> int:
        """Steps sent and not yet taken."""
        return len(self._queue)

    def take(self, step: int) -> InFlight[T]:
        """Step `step`'s request, sent now or earlier. First every step up to `step + max_staleness` (none past
        the last) is sent, by the weights of `step` updates, the latest published. Steps are taken in order."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} is outside the run's {self.steps} steps")
        expected = self._queue[0].step if self._queue else self.next_step
        if step != expected:
            raise ValueError(f"step {step} taken out of order: step {expected} is next")
        while self.next_step <= min(step + self.max_staleness, self.steps - 1):
            self._queue.append(InFlight(self.next_step, step, self._submit(self.next_step)))
            self.next_step += 1
        return self._queue.popleft()
