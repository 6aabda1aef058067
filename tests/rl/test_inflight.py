"""The in-flight rollout requests without Ray: what is sent when, in which order, by which weights."""

from __future__ import annotations

import pytest

from genpt_dist.rl.inflight import InFlightRollouts


class Pool:
    """Records each step sent and the policy version published at the time (what samples it)."""

    def __init__(self) -> None:
        self.version = 0  # updates made so far: the weights the actors would sample with now
        self.sent: list[tuple[int, int]] = []  # (step, version it was sent under)

    def submit(self, step: int) -> str:
        self.sent.append((step, self.version))
        return f"handle-{step}"


def run(max_staleness: int, steps: int, first_step: int = 0) -> tuple[Pool, list[tuple[int, int, str, int]]]:
    """The stage's loop over the queue: take step s, train it, publish; per step (step, version, handle, len)."""
    pool = Pool()
    pool.version = first_step
    q = InFlightRollouts(pool.submit, max_staleness=max_staleness, steps=steps, first_step=first_step)
    taken = []
    for s in range(first_step, steps):
        got = q.take(s)
        taken.append((got.step, got.version, got.handle, len(q)))
        pool.version += 1  # the update of step s is published
    return pool, taken


def test_on_policy_sends_each_step_after_the_weights_before_it():
    pool, taken = run(max_staleness=0, steps=4)
    assert pool.sent == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert [(s, v, h) for s, v, h, _ in taken] == [(s, s, f"handle-{s}") for s in range(4)]
    assert all(n == 0 for *_, n in taken)  # nothing waits in the queue


@pytest.mark.parametrize("k", [1, 2, 3])
def test_staleness_k_sends_k_steps_ahead_and_lags_at_most_k(k):
    steps = 8
    pool, taken = run(max_staleness=k, steps=steps)
    # The first take sends steps 0..k by the initial weights; each later one sends one step, k ahead.
    assert pool.sent[: k + 1] == [(s, 0) for s in range(k + 1)]
    assert pool.sent[k + 1 :] == [(s, s - k) for s in range(k + 1, steps)]
    lags = [s - v for s, v in pool.sent]
    assert max(lags) == k and lags[k:] == [k] * (steps - k)
    assert [s for s, *_ in taken] == list(range(steps))  # handed back in order
    assert [h for _, _, h, _ in taken] == [f"handle-{s}" for s in range(steps)]
    assert [v for _, v, _, _ in taken] == [v for _, v in pool.sent]  # the version it was sent under


def test_nothing_is_sent_past_the_last_step_and_the_queue_drains():
    pool, taken = run(max_staleness=3, steps=5)
    assert [s for s, _ in pool.sent] == [0, 1, 2, 3, 4]
    assert [n for *_, n in taken] == [3, 3, 2, 1, 0]  # in flight after each take


def test_more_staleness_than_steps_sends_every_step_at_once():
    pool, taken = run(max_staleness=10, steps=3)
    assert pool.sent == [(0, 0), (1, 0), (2, 0)]
    assert [n for *_, n in taken] == [2, 1, 0]


def test_a_resumed_run_starts_at_its_step():
    pool, taken = run(max_staleness=1, steps=6, first_step=4)
    assert pool.sent == [(4, 4), (5, 4)]
    assert [s for s, *_ in taken] == [4, 5]


def test_lag_is_step_minus_version():
    q = InFlightRollouts(lambda s: s, max_staleness=2, steps=4)
    first = q.take(0)
    assert first.lag == 0 and len(q) == 2
    assert q.take(1).lag == 1 and q.take(2).lag == 2


def test_steps_are_taken_in_order_and_within_the_run():
    q = InFlightRollouts(lambda s: s, max_staleness=1, steps=3)
    with pytest.raises(ValueError, match="out of order"):
        q.take(1)
    q.take(0)
    with pytest.raises(ValueError, match="out of order"):
        q.take(0)
    with pytest.raises(ValueError, match="outside"):
        q.take(3)
    with pytest.raises(ValueError, match="max_staleness"):
        InFlightRollouts(lambda s: s, max_staleness=-1, steps=3)
