"""Retry backoff: capped, doubling, and jittered so failed jobs do not retry in lockstep."""

from __future__ import annotations

import random

import pytest

from scpd.config import RetryPolicy
from scpd.pool import backoff_seconds

POLICY = RetryPolicy(initial_seconds=1.0, max_seconds=300.0)


def no_jitter() -> float:
    return 1.0  # the top of the jitter range: the full delay


def test_backoff_doubles_from_the_initial_delay() -> None:
    delays = [backoff_seconds(POLICY, attempts, rand=no_jitter) for attempts in range(9)]

    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_backoff_starts_at_the_configured_initial_delay() -> None:
    policy = RetryPolicy(initial_seconds=0.5, max_seconds=60.0)

    assert backoff_seconds(policy, 0, rand=no_jitter) == 0.5
    assert backoff_seconds(policy, 1, rand=no_jitter) == 1.0


@pytest.mark.parametrize("attempts", [9, 10, 50, 1000, 10**9])
def test_backoff_is_capped_at_the_maximum(attempts: int) -> None:
    assert backoff_seconds(POLICY, attempts, rand=no_jitter) == 300.0


def test_backoff_defaults_are_one_second_doubling_to_five_minutes() -> None:
    policy = RetryPolicy()  # DESIGN 4.6

    assert backoff_seconds(policy, 0, rand=no_jitter) == 1.0
    assert backoff_seconds(policy, 100, rand=no_jitter) == 300.0


@pytest.mark.parametrize("attempts", [0, 3, 20])
@pytest.mark.parametrize("rand_value", [0.0, 0.25, 0.5, 0.999999])
def test_backoff_jitter_stays_between_half_and_all_of_the_delay(attempts: int,
                                                                rand_value: float) -> None:
    delay = min(300.0, 2.0**attempts)

    wait = backoff_seconds(POLICY, attempts, rand=lambda: rand_value)

    assert delay / 2 <= wait <= delay
    assert wait == pytest.approx(delay * (0.5 + rand_value / 2))


def test_backoff_jitter_spreads_jobs_that_failed_together() -> None:
    rng = random.Random(7)

    waits = [backoff_seconds(POLICY, 4, rand=rng.random) for _ in range(200)]

    assert all(8.0 <= w <= 16.0 for w in waits)
    assert max(waits) - min(waits) > 6.0  # not in lockstep

