"""Token buckets for bandwidth caps, shared by every worker that draws on the same cap."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


class TokenBucket:
    """A cap of `rate_bytes_per_second`, with bursts of at most an eighth of a second's worth:
    with reads of at most half that (Throttle.chunk_bytes), what goes out over any stretch of
    time exceeds the cap by less than the quarter second the contract allows.

    take() reserves bytes under the lock (the balance may go negative) and sleeps for the
    debt outside it, so several threads sharing one bucket together hold the rate exactly.
    """

    def __init__(self, rate_bytes_per_second: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate_bytes_per_second = float(rate_bytes_per_second)
        self.burst_bytes = self.rate_bytes_per_second / 8
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst_bytes
        self._last = clock()

    def take(self, nbytes: int) -> None:
        with self._lock:
            now = self._clock()
            refill = (now - self._last) * self.rate_bytes_per_second
            self._tokens = min(self.burst_bytes, self._tokens + refill) - nbytes
            self._last = now
            debt = -self._tokens
        if debt > 0:
            self._sleep(debt / self.rate_bytes_per_second)


class Throttle:
    """All the buckets one transfer must draw from (the target's cap and the daemon's)."""

    def __init__(self, buckets: Sequence[TokenBucket]):
        self.buckets = tuple(buckets)
        # Bytes let through so far (the status line's rate). One uploader's throttle is
        # taken from by its one worker thread only, so a plain int is enough.
        self.bytes_taken = 0

    def chunk_bytes(self, preferred: int) -> int:
        """Reads no larger than half a bucket's burst keep bursts within the cap's promise
        (a chunk is sent after its take(): the one after a full burst adds to it)."""
        smallest = min((b.burst_bytes / 2 for b in self.buckets), default=preferred)
        return max(1, min(preferred, int(smallest)))

    def take(self, nbytes: int) -> None:
        for bucket in self.buckets:
            bucket.take(nbytes)
        self.bytes_taken += nbytes
