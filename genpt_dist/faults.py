"""Fault-injection hooks for the tests, read from the environment; inert unless a test sets them.

* `GENPT_TEST_CRASH_AT_STEP=k` with `GENPT_TEST_CRASH_MARKER=FILE`: the training rank
  `GENPT_TEST_CRASH_RANK` (default 1) exits at step k, once (the marker file records that it did),
  so Ray Train restarts the worker group and the run resumes from its last checkpoint.
* `GENPT_TEST_KILL_ACTOR_AT_STEP=k`: the RL stage kills rollout actor 0 just before it requests the
  rollouts of policy step k, so its rows are re-issued to another actor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def maybe_crash(step: int, rank: int) -> None:
    """Exit this process (no clean-up, as a lost node would) if a test asked for it at this step."""
    at, marker = os.environ.get("GENPT_TEST_CRASH_AT_STEP"), os.environ.get("GENPT_TEST_CRASH_MARKER")
    if at is None or marker is None or step != int(at):
        return
    if rank == int(os.environ.get("GENPT_TEST_CRASH_RANK", "1")) and not Path(marker).exists():
        Path(marker).write_text(str(step))
        log.warning("test hook: rank %d exits at step %d", rank, step)
        os._exit(1)


def kill_actor_at_step() -> int | None:
    """The policy step before whose rollouts a test kills rollout actor 0 (None: never)."""
    at = os.environ.get("GENPT_TEST_KILL_ACTOR_AT_STEP")
    return int(at) if at else None
