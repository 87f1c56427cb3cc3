"""Prometheus metrics for `[daemon] metrics_listen`: what the pool delivered, failed and
retried, counted as it happens; the queue, read at each scrape; served over HTTP by
prometheus_client's own server from a registry of scpd's own.

Imported only when metrics_listen is set: prometheus_client adds about 20 ms to the start.
The labels are target names and job states, nothing else: no file, path, host or watch.
"""

from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from scpd.config import Config, ListenAddress
from scpd.errors import ConfigError, ScpdError
from scpd.pool import OutcomeObserver
from scpd.store import JobState, Store

log = logging.getLogger("scpd.metrics")

# Per file, from a small one on a LAN (milliseconds) to a large one over a slow or capped
# link (half an hour); past that, +Inf.
DURATION_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                            30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
QUEUE_STATES = (JobState.PENDING, JobState.SENDING, JobState.FAILED)
_STOP_SECONDS = 2.0  # serve_forever() looks at its stop flag every half second

# Counters and histograms also exported as *_created gauges: one more series per target and
# name, which Prometheus does not use (it detects counter resets itself).
disable_created_metrics()


class Metrics(OutcomeObserver):
    """The daemon's metrics: fed by the pool (OutcomeObserver), read by the HTTP server.
    One per daemon; a reload calls use() and serve() again, the counts carry on."""

    def __init__(self, config: Config):
        # Not the process-wide default registry: two daemons in one test process, or a
        # metrics endpoint stopped and started on reload, must not collide.
        self.registry = CollectorRegistry()
        _ProcessCollector(registry=self.registry)  # process_*: CPU, RSS, open fds, start
        PlatformCollector(registry=self.registry)  # python_info
        GCCollector(registry=self.registry)  # python_gc_*
        self._files = Counter(
            "scpd_files_delivered", "Files delivered to the target (every version that landed).",
            ["target"], registry=self.registry)
        self._bytes = Counter(
            "scpd_delivered_bytes", "Bytes of the files delivered to the target.",
            ["target"], registry=self.registry)
        self._failures = Counter(
            "scpd_delivery_failures",
            "Files that failed for good (an operator must act, then: scpd retry).",
            ["target"], registry=self.registry)
        self._retries = Counter(
            "scpd_delivery_retries",
            "Attempts at a file that failed and will be retried after a backoff.",
            ["target"], registry=self.registry)
        self._durations = Histogram(
            "scpd_transfer_duration_seconds",
            "Time from the start of a file's transfer (or of the file before it in its batch)"
            " to its landing, as in the sent log line.",
            ["target"], buckets=DURATION_BUCKETS_SECONDS, registry=self.registry)
        self._queue = QueueCollector(config.state_dir)
        self.registry.register(self._queue)
        self._endpoint: _Endpoint | None = None
        self._targets: set[str] = set()
        self.use(config)

    # -- OutcomeObserver: called from the workers' threads ---------------------------------

    def delivered(self, target: str, size: int, seconds: float) -> None:
        self._files.labels(target).inc()
        self._bytes.labels(target).inc(size)
        self._durations.labels(target).observe(seconds)

    def failed(self, target: str) -> None:
        self._failures.labels(target).inc()

    def retried(self, target: str) -> None:
        self._retries.labels(target).inc()

    # -- the daemon's side ------------------------------------------------------------------

    def use(self, config: Config) -> None:
        """Report the targets and watches of this config (at start and after a reload). Every
        target's series exist from the start, at 0, so that rate() and alerts see them; those
        of a target no longer configured go."""
        families = (self._files, self._bytes, self._failures, self._retries, self._durations)
        for family in families:
            for name in self._targets - set(config.targets):
                family.remove(name)
            for name in config.targets:
                family.labels(name)
        self._targets = set(config.targets)
        self._queue.use(config)

    @property
    def address(self) -> ListenAddress | None:
        """Where the metrics are served now, if anywhere."""
        return self._endpoint.address if self._endpoint is not None else None

    def serve(self, address: ListenAddress) -> None:
        """Serve the metrics at http://ADDRESS/metrics, moving from where they were served.
        Raises ConfigError (daemon.metrics_listen) if scpd cannot listen there; the metrics
        are then served where they were before, if they still can be."""
        if self.address == address:
            return
        before = self.address
        self.stop_serving()  # first: the new address may overlap the old (0.0.0.0 and :9308)
        try:
            self._endpoint = _Endpoint(address, self.registry)
        except ConfigError:
            if before is not None:
                try:
                    self._endpoint = _Endpoint(before, self.registry)
                except ConfigError as exc:
                    log.error("metrics are no longer served: %s", exc)
            raise
        log.info("serving metrics on http://%s/metrics", address)

    def stop_serving(self) -> None:
        if self._endpoint is not None:
            endpoint, self._endpoint = self._endpoint, None
            endpoint.close()

    def close(self) -> None:
        self.stop_serving()


class _Endpoint:
    """prometheus_client's HTTP server: a thread, and a thread per scrape."""

    def __init__(self, address: ListenAddress, registry: CollectorRegistry):
        self.address = address
        try:
            self._server, self._thread = start_http_server(address.port, address.host,
                                                           registry=registry)
        except OSError as exc:  # socket.gaierror too: a name that does not resolve
            raise ConfigError("daemon.metrics_listen",
                              f"cannot listen on {address}: {_bind_problem(exc, address)}"
                              ) from None
        self._thread.name = "scpd-metrics"

    def close(self) -> None:
        self._server.shutdown()  # serve_forever() returns within half a second
        self._server.server_close()
        self._thread.join(_STOP_SECONDS)


class _ProcessCollector(ProcessCollector):
    """prometheus_client's, but with the boot time from the clock where /proc/stat is hidden
    (the shipped unit's ProcSubset=pid): without it, it would report nothing at all."""

    def _boot_time(self) -> float:
        try:
            return super()._boot_time()
        except OSError:
            return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _bind_problem(exc: OSError, address: ListenAddress) -> str:
    """What went wrong, and what to do."""
    if isinstance(exc, socket.gaierror):
        return (f"{address.host} does not resolve ({exc.strerror}): give an IP address, like"
                " 127.0.0.1")
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return (f"{reason}: another process listens there (ss -ltnp 'sport = :{address.port}'"
                " names it); stop it or choose another port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{reason}: no interface of this machine has that address"
    if exc.errno == errno.EACCES:
        return f"{reason}: ports below 1024 need privileges; choose a port above 1023"
    return reason


class QueueCollector:
    """The queue's gauges, read at each scrape: jobs per target and state, the age of the
    oldest file owed, whether the target is paused; the numbers of `scpd status`.

    collect() runs in the HTTP server's thread for that scrape. It reads through a read-only
    connection of its own, opened per scrape: the daemon's connection is shared by the
    workers under one lock, which a scrape would hold for as long as it reads; a WAL reader
    beside it never waits for the workers' writes, nor holds them up."""

    def __init__(self, state_dir: Path):
        self._state_dir = state_dir
        # (targets, watches) as one tuple: a reload swaps it whole, a scrape reads it once.
        self._view: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

    def use(self, config: Config) -> None:
        self._view = (tuple(config.targets), tuple(w.name for w in config.watches))

    def describe(self) -> Iterator[Metric]:
        # What register() checks for clashes, without reading the queue.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        targets, watches = self._view
        try:
            summaries = read_summaries(self._state_dir, watches)
        except (OSError, sqlite3.Error, ScpdError) as exc:
            # The other metrics are still worth a scrape; a traceback in the journal is not.
            log.warning("metrics: cannot read the queue in %s: %s", self._state_dir, exc)
            return
        jobs, oldest, paused = self._families()
        for name in targets:
            summary = summaries.get(name) or Store.empty_summary()
            for state in QUEUE_STATES:
                jobs.add_metric([name, state.value], summary[state.value])
            oldest.add_metric([name], summary["oldest_pending_age_s"] or 0.0)
            paused.add_metric([name], 1.0 if summary["paused"] else 0.0)
        yield from (jobs, oldest, paused)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("scpd_queue_jobs",
                              "Files in the queue for the target, by state (pending: waiting,"
                              " also for a backoff; sending: on the wire; failed: for good).",
                              labels=["target", "state"]),
            GaugeMetricFamily("scpd_oldest_pending_age_seconds",
                              "Age of the oldest file owed to the target (pending or sending),"
                              " 0 when none is.", labels=["target"]),
            GaugeMetricFamily("scpd_target_paused",
                              "1 while the target is paused (it refused scpd for a reason no"
                              " retry fixes: host key, login), else 0.", labels=["target"]),
        )


def read_summaries(state_dir: Path, watches: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """Store.summaries() over a read-only connection made for this call, in this thread;
    nothing if there is no queue yet."""
    store = Store.open_read_only(state_dir)
    if store is None:
        return {}
    try:
        # Gauges of what is owed only: the delivered jobs (most of a queue) cost 0.15 s.
        return store.summaries(watches, now=time.time(), with_delivered=False)
    finally:
        store.close()
