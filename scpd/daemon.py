"""Composition root: builds the parts, owns signals and the main loop."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scpd import config as config_module
from scpd import logs, sdnotify
from scpd.config import Config, Watch
from scpd.pool import Pool
from scpd.scanner import Rescanner, Scanner
from scpd.settle import ReadyFile, Settler
from scpd.store import JobState, Store, lock_state_dir
from scpd.transport import Credentials, load_credentials
from scpd.watcher import Watcher

if TYPE_CHECKING:
    from scpd.metrics import Metrics

log = logging.getLogger("scpd.daemon")

_TICK_SECONDS = 0.1
_ROOT_CHECK_SECONDS = 1.0  # how soon a watch root that appears, or is replaced, is watched
_QUEUED_LINES_AT_INFO = 100  # per batch of ready files
_CANARY_DIR = "watch-canary"
_STATUS_SECONDS = 1.0  # STATUS= at most this often, and only when it changed
_STATUS_NAME_CHARS = 40
_STOP_GRACE_SECONDS = 5.0  # in-flight uploads may finish; the unit allows 10 s in all

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_OWED = 75


@dataclass
class _Flags:
    """Set by signal handlers, acted on by the main loop (handlers do nothing else)."""

    stop_requests: int = 0
    should_reload: bool = False


class Daemon:
    def __init__(self, config: Config, *, log_level_override: str | None = None):
        """log_level_override: the command line's -v or -q, which a reload keeps."""
        self.config = config
        self._log_level_override = log_level_override
        self._lock_fd = lock_state_dir(config.state_dir)
        self.store = Store.open(config.state_dir)
        self.credentials = _load_all_credentials(config)
        self.settler = Settler()
        self.scanner = Scanner(self.store, self.settler, self._queue_found)
        self.pool = Pool(config, self.store, self.credentials, self._renote)
        self.metrics: Metrics | None = None  # run_forever's, when metrics_listen is set
        self.watcher: Watcher | None = None
        self.rescanner: Rescanner | None = None
        self._next_rescan_at: dict[str, float] = {}
        self.flags = _Flags()
        self._workers_ended = True
        self._rate_sample = (time.monotonic(), 0)  # (when, pool.bytes_on_wire()): the rate

    # -- the two ways to run ------------------------------------------------------------------

    def run_forever(self) -> int:
        self._install_signal_handlers()
        self._apply_metrics(self.config)  # before READY=1: a port in use fails the start
        if self.metrics is not None:
            self.pool.observer = self.metrics
        interrupted = self.store.requeue_interrupted()
        if interrupted:
            log.info("%d transfers were cut by the last stop; queued again", interrupted)
        self._start_watching()
        self.pool.start()
        sdnotify.notify(f"READY=1\nSTATUS={self._status_line()}")
        log.info("scpd ready: watching %s", ", ".join(str(w.path) for w in self.config.watches))
        self._main_loop()
        sdnotify.notify("STOPPING=1")
        log.info("stopping: letting transfers in flight finish")
        self._shutdown(grace_seconds=0.0 if self.flags.stop_requests > 1
                       else _STOP_GRACE_SECONDS)
        self.close()
        return EXIT_OK

    def run_once(self, timeout_seconds: float) -> int:
        """Scan, deliver everything owed, exit: 0 all delivered, 75 some owed, 1 some failed."""
        self._install_signal_handlers()
        self.store.requeue_interrupted()
        self.store.make_all_due()  # an explicit request ignores saved backoff
        for watch in self.config.watches:
            if watch.path.is_dir():
                self.scanner.scan(watch, should_stop=lambda: self.flags.stop_requests > 0)
            else:
                log.warning("watch %s: %s does not exist; nothing to send from it",
                            watch.name, watch.path)
        self.pool.start()
        deadline = time.monotonic() + timeout_seconds
        while self.flags.stop_requests == 0 and time.monotonic() < deadline:
            self._enqueue_ready()
            self.pool.cut_stalled()
            # Files owed only to paused targets cannot go in this run: no use waiting.
            if not len(self.settler) and not self._owed_count(skip=self.pool.paused_targets()):
                break
            self.settler.wait_for_closed(_TICK_SECONDS)
        self._shutdown(grace_seconds=0.0 if self.flags.stop_requests else _STOP_GRACE_SECONDS)
        exit_code = self._report_once(timeout_seconds)
        self.close()
        return exit_code

    def _report_once(self, timeout_seconds: float) -> int:
        """Say what run --once left undone; its exit code."""
        counts = self._counts()
        failed = sum(c[JobState.FAILED] for c in counts.values())
        owed = self._owed_count(counts) + len(self.settler)
        paused = {name: (reason, n) for name, reason in self.pool.paused_targets().items()
                  if (n := self._owed_count(counts, only=name))}
        for name, (reason, n) in paused.items():
            log.error("target %s is paused (%s): %d file(s) not sent", name, reason, n)
        if failed:
            log.error("%d file(s) failed for good; see the errors above, then: scpd retry",
                      failed)
        if failed or paused:
            return EXIT_FAILED
        if owed:
            log.warning("%d file(s) still owed after %.0fs; they are queued for the next run",
                        owed, timeout_seconds)
            return EXIT_OWED
        return EXIT_OK

    # -- the loop -----------------------------------------------------------------------------

    def _main_loop(self) -> None:
        ping_every = sdnotify.watchdog_interval_seconds()
        next_ping = next_status = next_root_check = 0.0
        last_status = ""
        while not self.flags.stop_requests:
            self._enqueue_ready()
            self.pool.cut_stalled()
            if self.flags.should_reload:
                self.flags.should_reload = False
                self._reload()
            now = time.monotonic()
            if now >= next_root_check and self.watcher is not None:
                self.watcher.check_roots()
                self._request_due_rescans(now)
                next_root_check = now + _ROOT_CHECK_SECONDS
            if ping_every and now >= next_ping and self._is_healthy():
                sdnotify.notify("WATCHDOG=1")
                next_ping = now + ping_every
            if now >= next_status:
                self._wake_on_changes_from_elsewhere()  # `scpd retry`: acted on in a second
                if (status := self._status_line()) != last_status:
                    sdnotify.notify(f"STATUS={status}")
                    last_status = status
                next_status = now + _STATUS_SECONDS
            self.settler.wait_for_closed(_TICK_SECONDS)

    def _wake_on_changes_from_elsewhere(self) -> None:
        """Another process (`scpd retry`) changed the queue: failed jobs may be due again, a
        pause lifted. Idle workers would look only after up to 5 s: wake them now."""
        if self.store.has_changed_elsewhere():
            for target in self.config.targets:
                self.pool.wake(target)

    def _enqueue_ready(self) -> None:
        ready = self.settler.take_ready()
        if ready:
            self._queue_ready(ready)

    def _queue_found(self, ready_files: list[ReadyFile]) -> None:
        # A scan reports its count at info level; a line per file would be 100,000 lines.
        self._queue_ready(ready_files, lines_at_info=0)

    def _queue_ready(self, ready_files: list[ReadyFile],
                     lines_at_info: int = _QUEUED_LINES_AT_INFO) -> None:
        """Into the queue, one transaction for the lot (from the main loop and from scans).
        The first `lines_at_info` queued files get an info line, the rest a debug line and a
        count: a burst of 100,000 would flood the journal (which drops lines past its rate
        limit anyway)."""
        targets = {watch.name: watch.targets for watch in self.config.watches}
        # A scan or event of the config before a reload may name a watch no longer there.
        ready_files = [ready for ready in ready_files if ready.watch in targets]
        items = [(ready, target) for ready in ready_files for target in targets[ready.watch]]
        queued = self.store.enqueue_many(
            [(ready.watch, target, ready.rel_path, ready.version) for ready, target in items])
        queued_files, woken_targets, lines = set(), set(), 0
        for (ready, target), is_queued in zip(items, queued, strict=True):
            if is_queued:
                queued_files.add(ready)
                woken_targets.add(target)
                lines += 1
                logs.event(logging.INFO if lines <= lines_at_info else logging.DEBUG, "queued",
                           "queued %s for %s", ready.rel_path, target, watch=ready.watch,
                           target=target, path=ready.path, bytes=ready.version.size)
        if lines_at_info and lines > lines_at_info:
            log.info("queued %d more file(s) (named at debug level)", lines - lines_at_info)
        for target in woken_targets:
            self.pool.wake(target)
        for ready in ready_files:
            if ready not in queued_files:
                # Delivered everywhere before a crash cut short its on_success action.
                self.pool.after_delivery(ready.watch, ready.rel_path, ready.version)

    def _renote(self, watch_name: str, rel_path: str) -> None:
        watch = self.config.watch(watch_name)
        self._note(watch, str(watch.path / rel_path), rel_path, False)

    def _note(self, watch: Watch, path: str, rel_path: str, is_closed: bool) -> None:
        self.settler.note(watch.name, path, rel_path, watch.settle_seconds, is_closed=is_closed,
                          follow_symlinks=watch.follow_symlinks)

    def _start_watching(self) -> None:
        # Watch first, then scan: a file written in between is seen by one or the other.
        self.rescanner = Rescanner(self.scanner, self.config.watch, self._before_scan,
                                   self._after_scan)
        self.rescanner.start()
        self.watcher = Watcher(self.config.watches, self._note, self.settler.forget,
                               self._request_rescan, self.config.state_dir / _CANARY_DIR)
        self.watcher.start()  # every watch is in place when it returns
        now = time.monotonic()
        for watch in self.config.watches:
            self._request_rescan(watch.name, "start-up")
            self._next_rescan_at[watch.name] = now + watch.rescan_interval_seconds

    def _stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.rescanner is not None:
            self.rescanner.stop()

    def _request_rescan(self, watch_name: str, reason: str) -> None:
        if self.rescanner is not None:
            self.rescanner.request(watch_name, reason)

    def _request_due_rescans(self, now: float) -> None:
        """The periodic scan: the last safety net under the event stream."""
        for watch in self.config.watches:
            if now >= self._next_rescan_at.get(watch.name, 0.0):
                self._request_rescan(watch.name, "periodic")
                self._next_rescan_at[watch.name] = now + watch.rescan_interval_seconds

    def _before_scan(self, watch_name: str, reason: str) -> None:
        # After an overflow watchdog rebuilds its watches; a scan racing the rebuild could
        # list a directory not yet watched again and miss a file written there meanwhile.
        # Every scan waits (a millisecond, mostly): an overflow's request may have been
        # merged into a scan waiting for another reason.
        if self.watcher is not None:
            self.watcher.wait_for_events_so_far()

    def _after_scan(self, watch_name: str,
                         directory_ids: dict[tuple[int, int], str]) -> None:
        if self.watcher is not None:
            self.watcher.check_coverage(watch_name, directory_ids)

    def _reload(self) -> None:
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")
        try:
            new_config = config_module.load(self.config.path)
            if new_config.state_dir != self.config.state_dir:
                raise config_module.ConfigErrors([config_module.ConfigError(
                    "daemon.state_dir", "cannot change on reload (restart scpd instead)")])
            credentials = _load_all_credentials(new_config)
            self._apply_metrics(new_config)  # last: a port it cannot have fails the reload
        except Exception as exc:  # noqa: BLE001 -- any bad new config keeps the old one running
            log.error("reload failed, keeping the running config: %s", exc)
            sdnotify.notify("READY=1")
            return
        self._stop_watching()
        self.pool.stop(_STOP_GRACE_SECONDS)
        if self.metrics is not None:  # after the old workers' last counts, not before
            self.metrics.use(new_config)
        self.config, self.credentials = new_config, credentials
        logs.setup(self._log_level_override or new_config.log_level, new_config.log_target)
        self.settler = Settler()
        self.scanner = Scanner(self.store, self.settler, self._queue_found)
        self.pool = Pool(new_config, self.store, credentials, self._renote, self.metrics)
        self._rate_sample = (time.monotonic(), 0)
        self._start_watching()
        self.pool.start()
        log.info("config reloaded from %s (queue kept)", new_config.path)
        sdnotify.notify(f"READY=1\nSTATUS={self._status_line()}")

    def _shutdown(self, grace_seconds: float) -> None:
        self._stop_watching()
        # A second SIGTERM or SIGINT cuts the grace period short.
        self._workers_ended = self.pool.stop(grace_seconds,
                                             lambda: self.flags.stop_requests > 1)

    def _apply_metrics(self, config: Config) -> None:
        """Serve metrics where config.metrics_listen says (moving them on a reload), or stop.
        Raises ConfigError if scpd cannot listen there; what was served is served still."""
        if config.metrics_listen is None:
            if self.metrics is not None:
                self.metrics.close()
                log.info("metrics no longer served (daemon.metrics_listen removed)")
            self.metrics = None
            return
        if self.metrics is None:
            from scpd.metrics import Metrics  # prometheus_client: ~20 ms, only when wanted

            metrics = Metrics(config)
            metrics.serve(config.metrics_listen)
            self.metrics = metrics
        else:
            self.metrics.serve(config.metrics_listen)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self._workers_ended:  # else the process exit ends them; the queue stays consistent
            self.store.close()
        os.close(self._lock_fd)

    # -- reporting ----------------------------------------------------------------------------

    def _watch_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.config.watches)

    def _counts(self) -> dict[str, dict[str, int]]:
        """{target: {state: n}} of what is owed or failed: the delivered jobs, most of a
        long-lived queue, are not counted (they cost 0.1 s a second at a million jobs)."""
        return self.store.counts(self._watch_names(),
                                 (JobState.PENDING, JobState.SENDING, JobState.FAILED))

    def _owed_count(self, counts: dict[str, dict[str, int]] | None = None, *,
                    skip: Collection[str] = (), only: str | None = None) -> int:
        """Files queued or being sent, to every target but `skip` (or to `only`)."""
        counts = self._counts() if counts is None else counts
        return sum(c[JobState.PENDING] + c[JobState.SENDING] for target, c in counts.items()
                   if target not in skip and only in (None, target))

    def _status_line(self) -> str:
        counts = self._counts()
        now, sent = time.monotonic(), self.pool.bytes_on_wire()
        last_at, last_sent = self._rate_sample
        self._rate_sample = (now, sent)
        return status_line(
            queued=sum(c[JobState.PENDING] for c in counts.values()),
            sending=self.pool.sending_count(),
            on_wire=self.pool.files_on_wire(),
            bytes_per_second=(sent - last_sent) / (now - last_at) if now > last_at else 0.0,
            failed=sum(c[JobState.FAILED] for c in counts.values()),
            paused=len(self.pool.paused_targets()))

    def _is_healthy(self) -> bool:
        return (self.pool.is_healthy()
                and (self.watcher is None or self.watcher.is_alive())
                and (self.rescanner is None or self.rescanner.is_alive()))

    def _install_signal_handlers(self) -> None:
        def on_stop(signum, frame):
            self.flags.stop_requests += 1

        def on_hup(signum, frame):
            self.flags.should_reload = True

        # The lease probe (settle.py) may make the kernel send SIGIO, whose default kills.
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


def status_line(*, queued: int, sending: int, on_wire: list[tuple[str, int, int]],
                bytes_per_second: float, failed: int, paused: int) -> str:
    """What `systemctl status` shows, e.g.
    "12 queued, 1 sending report.pdf 41% 9.8 MB/s, 0 failed".
    on_wire: (path, bytes sent, size) of the files going out now; the one with most still to
    send is named (with several connections busy, that is the one an operator waits for)."""
    current = ""
    if on_wire:
        path, done, size = max(on_wire, key=lambda f: f[2] - f[1])
        percent = 100 * done // size if size else 100
        current = f" {_printable_name(os.path.basename(path))} {percent}%"
    line = f"{queued} queued, {sending} sending{current} {_human_rate(bytes_per_second)}, " \
        f"{failed} failed"
    return line + (f", {paused} target(s) paused" if paused else "")


def _printable_name(name: str) -> str:
    """A file name fit for one STATUS= line: a newline in it would start another
    notification field (a file named "x\nSTOPPING=1" must not stop the service), and
    undecodable bytes could not be encoded. Long names keep both ends."""
    name = logs.printable(name)
    if len(name) > _STATUS_NAME_CHARS:
        keep = (_STATUS_NAME_CHARS - 3) // 2
        name = f"{name[:keep]}...{name[-keep:]}"
    return name


def _human_rate(bytes_per_second: float) -> str:
    if bytes_per_second < 100e3:  # a tight cap would read "0.0 MB/s"
        return f"{bytes_per_second / 1e3:.1f} kB/s"
    return f"{bytes_per_second / 1e6:.1f} MB/s"


def _load_all_credentials(config: Config) -> dict[str, Credentials]:
    return {name: load_credentials(target) for name, target in config.targets.items()}
