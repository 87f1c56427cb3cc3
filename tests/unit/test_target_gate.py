"""The per-target gate: backoff after connection failures, and a pause that only a new
connection (or an operator) lifts."""

from __future__ import annotations

import pytest

from scpd import pool
from scpd.config import RetryPolicy

POLICY = RetryPolicy(initial_seconds=1.0, max_seconds=300.0)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(pool.time, "monotonic", lambda: now[0])
    return now


def test_a_paused_target_admits_one_probe_per_period(clock: list[float]) -> None:
    gate = pool._TargetGate()

    assert gate.admit() == (0.0, False)
    assert gate.pause("authentication failed", probe_seconds=60.0) is True
    assert gate.pause("authentication failed", probe_seconds=60.0) is False  # said once
    assert gate.admit() == (60.0, False)
    clock[0] += 60.0
    assert gate.admit() == (0.0, True)  # the probe
    assert gate.admit() == (60.0, False)  # every other worker waits for its outcome


def test_only_a_connection_made_after_the_pause_lifts_it(clock: list[float]) -> None:
    gate = pool._TargetGate()
    old_connection = clock[0]
    clock[0] += 1.0
    gate.pause("host key does not match", probe_seconds=60.0)
    clock[0] += 1.0

    assert gate.resume(connected_after=old_connection) is None
    assert gate.paused_reason == "host key does not match"
    assert gate.resume(connected_after=clock[0]) == "host key does not match"
    assert gate.paused_reason is None and gate.admit() == (0.0, False)


def test_a_refusal_from_before_an_operator_resumed_is_not_a_new_pause(clock: list[float]) -> None:
    gate = pool._TargetGate()
    gate.pause("authentication failed", probe_seconds=60.0)
    probe_started = clock[0]
    clock[0] += 1.0

    assert gate.resume() == "authentication failed"  # scpd retry --target
    assert gate.was_resumed_after(probe_started) is True
    assert gate.was_resumed_after(clock[0]) is False


def test_a_success_forgets_connection_failures_but_not_a_pause(clock: list[float]) -> None:
    gate = pool._TargetGate()
    delay = gate.close(POLICY)
    assert 0.5 <= delay <= 1.0 and gate.admit() == (pytest.approx(delay), False)

    gate.succeeded()
    assert gate.admit() == (0.0, False)

    gate.pause("authentication failed", probe_seconds=60.0)
    gate.succeeded()  # a transfer on a connection older than the pause
    assert gate.admit() == (60.0, False)
