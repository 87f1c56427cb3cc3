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


def test_target_gate_paused_admits_one_probe_per_period(monkeypatch) -> None:
    from scpd import pool

    clock = [1000.0]
    monkeypatch.setattr(pool.time, "monotonic", lambda: clock[0])
    gate = pool._TargetGate()

    assert gate.admit() == 0.0
    assert gate.pause("authentication failed", probe_seconds=60.0) is True
    assert gate.pause("authentication failed", probe_seconds=60.0) is False  # said once
    assert gate.admit() == 60.0
    clock[0] += 60.0
    assert gate.admit() == 0.0  # the probe
    assert gate.admit() == 60.0  # every other worker waits for the probe's outcome
    assert gate.open() == "authentication failed"
    assert gate.admit() == 0.0 and gate.paused_reason is None


def test_target_gate_connection_failures_hold_back_then_open(monkeypatch) -> None:
    from scpd import pool

    clock = [1000.0]
    monkeypatch.setattr(pool.time, "monotonic", lambda: clock[0])
    gate = pool._TargetGate()

    delay = gate.close(POLICY)
    assert 0.5 <= delay <= 1.0 and gate.admit() == pytest.approx(delay)
    clock[0] += delay
    assert gate.admit() == 0.0 and gate.admit() == 0.0  # not paused: every worker may go
    assert gate.open() is None
