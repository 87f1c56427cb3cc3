"""Bandwidth caps: the rate holds over a long transfer, and bursts stay within a quarter second."""

from __future__ import annotations

import bisect

import pytest

from scpd.config import parse_rate
from scpd.transport.throttle import Throttle, TokenBucket

CHUNK = 32 * 1024


class FakeTime:
    """A clock that moves only when the code under test sleeps (or a test says so)."""

    def __init__(self) -> None:
        self.now = 5000.0
        self.slept = 0.0
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds
        self.sleeps += 1


@pytest.fixture
def time_() -> FakeTime:
    return FakeTime()


def bucket(rate: float, time_: FakeTime) -> TokenBucket:
    return TokenBucket(rate, clock=time_.clock, sleep=time_.sleep)


def bytes_before_first_sleep(throttle: Throttle | TokenBucket, time_: FakeTime,
                             chunk: int) -> int:
    """How much a sender gets through before it is first made to wait.

    take() comes before the send, so the chunk whose take() slept went out after the wait."""
    sent = 0
    while True:
        sleeps = time_.sleeps
        throttle.take(chunk)
        if time_.sleeps != sleeps:
            return sent
        sent += chunk


@pytest.mark.parametrize("rate_text", ["500KB/s", "10MiB/s", "80Mbit/s"])
def test_token_bucket_holds_the_rate_over_a_long_transfer(time_: FakeTime,
                                                          rate_text: str) -> None:
    rate = parse_rate(rate_text)
    limiter = bucket(rate, time_)
    total = int(rate * 120)  # two minutes' worth

    for _ in range(total // CHUNK):
        limiter.take(CHUNK)

    sent = total // CHUNK * CHUNK
    assert time_.slept == pytest.approx(sent / rate, rel=0.01)


def test_token_bucket_holds_the_cap_within_5_percent_over_any_10_seconds(
        time_: FakeTime) -> None:
    rate = parse_rate("1MB/s")
    limiter = bucket(rate, time_)
    start = time_.now
    sent_at = []  # when each chunk went on the wire: right after its take() returned
    while time_.now - start < 60:
        limiter.take(CHUNK)
        sent_at.append(time_.now)

    window = 10.0
    for i, t in enumerate(sent_at):
        if t + window > sent_at[-1]:
            break
        in_window = (bisect.bisect_left(sent_at, t + window) - i) * CHUNK
        assert in_window <= rate * window * 1.05, f"window at {t - start:.1f}s"
        assert in_window >= rate * window * 0.95, f"window at {t - start:.1f}s"


def test_token_bucket_first_burst_is_at_most_a_quarter_second(time_: FakeTime) -> None:
    rate = parse_rate("4MB/s")
    limiter = bucket(rate, time_)

    burst = bytes_before_first_sleep(limiter, time_, 1000)

    assert 0 < burst <= rate / 4


def test_token_bucket_does_not_save_up_idle_time_beyond_an_eighth_of_a_second(
        time_: FakeTime) -> None:
    rate = parse_rate("4MB/s")
    limiter = bucket(rate, time_)
    limiter.take(int(rate))  # a busy second
    time_.now += 3600  # then an idle hour

    burst = bytes_before_first_sleep(limiter, time_, 1000)

    assert burst <= rate / 8
    assert burst >= rate / 8 - 1000  # the eighth of a second is available again


def test_throttle_the_slowest_of_several_caps_governs(time_: FakeTime) -> None:
    own = bucket(parse_rate("10MiB/s"), time_)
    shared = bucket(parse_rate("1MB/s"), time_)
    throttle = Throttle([own, shared])
    total = 60 * 1_000_000

    for _ in range(total // CHUNK):
        throttle.take(CHUNK)

    assert time_.slept == pytest.approx(total / 1_000_000, rel=0.01)


def test_throttle_without_caps_never_sleeps(time_: FakeTime) -> None:
    throttle = Throttle([])

    throttle.take(10**9)

    assert throttle.chunk_bytes(CHUNK) == CHUNK
    assert time_.sleeps == 0


@pytest.mark.parametrize("rates", [["10MiB/s"], ["10MiB/s", "500KB/s"], ["80Mbit/s", "64KB/s"]])
def test_throttle_chunk_bytes_never_exceeds_the_smallest_burst(time_: FakeTime,
                                                               rates: list[str]) -> None:
    throttle = Throttle([bucket(parse_rate(r), time_) for r in rates])

    chunk = throttle.chunk_bytes(1024 * 1024)

    assert 0 < chunk <= min(parse_rate(r) for r in rates) / 4


def test_throttle_chunk_bytes_never_exceeds_the_burst_of_a_very_low_cap(
        time_: FakeTime) -> None:
    low = bucket(parse_rate("2KB/s"), time_)

    assert Throttle([low]).chunk_bytes(1024 * 1024) <= low.burst_bytes / 2


@pytest.mark.parametrize("rate_text", ["100KB/s", "1MB/s", "50MB/s", "100MB/s"])
def test_what_goes_out_never_exceeds_the_cap_by_a_quarter_second(time_: FakeTime,
                                                                 rate_text: str) -> None:
    # What the contract measures: over any stretch of time, bytes sent minus cap x time.
    rate = parse_rate(rate_text)
    throttle = Throttle([bucket(rate, time_)])
    chunk = throttle.chunk_bytes(256 * 1024)
    sends = []  # (when a chunk went out, bytes out before it)
    total = 0
    while time_.now - 5000.0 < 20:
        throttle.take(chunk)
        sends.append((time_.now, total))
        total += chunk

    worst = 0.0
    for j, (t_end, before_end) in enumerate(sends):
        for t_start, before_start in sends[max(0, j - 400):j + 1]:
            sent = before_end + chunk - before_start
            worst = max(worst, sent - rate * (t_end - t_start))

    assert worst <= rate / 4
