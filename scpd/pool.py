"""Per-target workers: claim a job, upload it, record the outcome; backoff; drain on stop."""

from __future__ import annotations

import logging
import os
import posixpath
import random
import shutil
import threading
import time
from collections.abc import Callable

from scpd import logs
from scpd.config import Config, RetryPolicy, Target, remote_dir_for
from scpd.errors import (
    ConnectError,
    FileChangedError,
    PermanentError,
    RetryableError,
    ScpdError,
    SourceVanished,
)
from scpd.fileversion import FileVersion
from scpd.settle import is_open_for_write_elsewhere
from scpd.store import Job, Store
from scpd.transport import Credentials, Throttle, TokenBucket, Upload, Uploader, open_uploader

log = logging.getLogger("scpd.pool")

_IDLE_WAIT_SECONDS = 5.0
# A connection with nothing to send for this long is closed: the target's sshd need not
# hold a session for a quiet watch. Reopening costs one login (about 30 ms here).
_IDLE_CLOSE_SECONDS = 60.0
# Files of one directory sent in one SCP session: enough that a flood of small files costs
# one round trip each. A batch lands at its end, so it is kept short (1 MiB: an eighth of a
# second at 8 MiB/s), and a worker never sits on files its neighbours could be sending.
_BATCH_FILES = 100
_BATCH_BYTES = 1024 * 1024


def backoff_seconds(policy: RetryPolicy, attempts: int, rand: Callable[[], float] = random.random
                    ) -> float:
    """Capped exponential backoff with jitter: the n-th retry waits between half and all of
    initial * 2**n (capped), so many jobs failing together do not retry in lockstep."""
    delay = min(policy.max_seconds, policy.initial_seconds * 2 ** min(attempts, 32))
    return delay * (0.5 + rand() / 2)


class OutcomeObserver:
    """Told of each outcome as the workers record it (scpd/metrics.py counts them); this one
    ignores them. Called from the workers' threads: implementations must be thread-safe,
    quick, and must not raise."""

    def delivered(self, target: str, size: int, seconds: float) -> None:
        """A file of `size` bytes landed, `seconds` after its transfer began."""

    def failed(self, target: str) -> None:
        """A file failed for good (an operator must act, or retries gave up)."""

    def retried(self, target: str) -> None:
        """An attempt at a file failed; the file goes back to the queue with a backoff."""


class Pool:
    """`connections` workers per target, each with its own SSH connection."""

    def __init__(self, config: Config, store: Store, credentials: dict[str, Credentials],
                 renote: Callable[[str, str], None], observer: OutcomeObserver | None = None):
        """renote(watch, rel_path): hand a file back to the settler (it changed since queued).
        observer: told of every delivery, failure and retry (metrics)."""
        self.config = config
        self.store = store
        self.renote = renote
        self.observer = observer or OutcomeObserver()
        self._stopping = threading.Event()
        self._wakeups = {name: threading.Condition() for name in config.targets}
        self._post_action_lock = threading.Lock()
        self.watch_names = tuple(w.name for w in config.watches)
        shared = [TokenBucket(config.rate_bytes_per_second)] if config.rate_bytes_per_second \
            else []
        self._workers: list[_Worker] = []
        for target in config.targets.values():
            own = [TokenBucket(target.rate_bytes_per_second)] if target.rate_bytes_per_second \
                else []
            for index in range(target.connections):
                uploader = open_uploader(target, credentials[target.name],
                                         Throttle(own + shared))
                self._workers.append(_Worker(self, target, uploader, index))
        self._gates = {name: _TargetGate() for name in config.targets}
        self._pause_lock = threading.Lock()  # a pause in the gate and in the store, as one
        # A new pool (start, reload) tries every target afresh: the operator may have fixed it.
        store.resume_targets()

    def target_down(self, target: Target) -> float:
        """A connection to the target failed: hold all its workers back. The delay grows with
        consecutive failures of the target, not of one job, so a dead host is not dialled once
        per queued file. Returns the delay."""
        return self._gates[target.name].close(target.retry)

    def pause_target(self, target: Target, error: ScpdError, attempt_started_at: float) -> None:
        """The target refused us for a reason no retry fixes (auth, host key): its jobs wait
        instead of failing one by one, and it is probed again every retry_max."""
        gate, probe_seconds = self._gates[target.name], target.retry.max_seconds
        with self._pause_lock:
            if gate.was_resumed_after(attempt_started_at):
                return  # refused before an operator's fix: the next attempt tells
            self.store.pause_target(target.name, logs.printable(str(error)))
            is_new = gate.pause(str(error), probe_seconds)
        if is_new:
            logs.event(logging.ERROR, "paused",
                       "target %s paused: %s; its files wait. Fix it, then: scpd retry --target"
                       " %s (or reload scpd); until then it is tried again every %.0fs",
                       target.name, error, target.name, probe_seconds, target=target.name,
                       error=str(error))
        else:
            log.warning("target %s still paused: %s", target.name, error)

    def note_reached(self, target: Target, connected_at: float) -> None:
        """Host key and login worked on a connection made at connected_at: a pause that began
        before it is over (a connection older than the pause proves nothing)."""
        with self._pause_lock:
            reason = self._gates[target.name].resume(connected_after=connected_at)
            if reason is not None:
                self.store.resume_targets(target.name)
        if reason is not None:
            logs.event(logging.INFO, "resumed", "target %s works again: resumed (it was paused:"
                       " %s)", target.name, reason, target=target.name)
            self.wake(target.name)

    def target_up(self, target: Target) -> None:
        self._gates[target.name].succeeded()

    def admit(self, target: Target) -> tuple[float, bool]:
        """(0 if a worker of the target may send now, else the seconds to wait; whether it goes
        as the probe of a paused target)."""
        gate = self._gates[target.name]
        if gate.paused_reason is not None:
            with self._pause_lock:
                # `scpd retry` cleared the pause: the operator says it is fixed.
                reason = None if target.name in self.store.paused_targets() else gate.resume()
            if reason is not None:
                logs.event(logging.INFO, "resumed", "target %s resumed by an operator (it was"
                           " paused: %s)", target.name, reason, target=target.name)
                self.wake(target.name)
        return gate.admit()

    def paused_targets(self) -> dict[str, str]:
        """{target name: reason} of the targets paused now."""
        return {name: gate.paused_reason for name, gate in self._gates.items()
                if gate.paused_reason is not None}

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def wake(self, target: str) -> None:
        condition = self._wakeups[target]
        with condition:
            condition.notify_all()

    def wait_for_work(self, target: str, seconds: float) -> None:
        condition = self._wakeups[target]
        with condition:
            if not self._stopping.is_set():
                condition.wait(seconds)

    def is_healthy(self) -> bool:
        return all(worker.is_alive() for worker in self._workers)

    def cut_stalled(self) -> None:
        """Close the connection of any transfer that showed no sign of life for too long.

        Channel timeouts bound most waits, but a few paramiko waits (exec, subsystem start)
        have none: on a half-open connection they would block a worker for good."""
        now = time.monotonic()
        for worker in self._workers:
            limit = worker.target.io_timeout_seconds + worker.target.connect_timeout_seconds
            jobs, is_connecting = worker.jobs, worker.is_connecting_ahead
            if (jobs or is_connecting) and now - worker.uploader.progress_at > limit:
                doing = f"sending {jobs[0].rel_path}" if jobs else "connecting"
                log.warning("%s: no progress for %.0fs %s; cutting the connection",
                            worker.target.name, limit, doing)
                worker.uploader.progress_at = now  # once per stall
                worker.uploader.close()

    def sending_count(self) -> int:
        """Files in flight: the batches workers hold now."""
        return sum(len(worker.jobs) for worker in self._workers)

    def bytes_on_wire(self) -> int:
        """Bytes of file content sent so far, delivered or not (for the rate)."""
        return sum(worker.uploader.throttle.bytes_taken for worker in self._workers)

    def files_on_wire(self) -> list[tuple[str, int, int]]:
        """(local path, bytes read so far, size) of each file whose bytes are going out now:
        one per busy connection."""
        return [(local.path, local.bytes_read, local.version.size) for worker in self._workers
                if (local := worker.uploader.sending) is not None]

    def stop(self, grace_seconds: float = 5.0,
             should_abort: Callable[[], bool] = lambda: False) -> bool:
        """Let in-flight uploads finish for up to grace_seconds (or until should_abort()), then
        cut them: a cut upload leaves no file under its final name and its job goes back to
        pending. True if every worker has ended."""
        self._stopping.set()
        for name in self._wakeups:
            self.wake(name)
        deadline = time.monotonic() + grace_seconds
        while self.sending_count() and time.monotonic() < deadline and not should_abort():
            time.sleep(0.05)
        for worker in self._workers:
            worker.uploader.retire()
        deadline = time.monotonic() + 3.0
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    def after_delivery(self, watch_name: str, rel_path: str, version: FileVersion) -> None:
        """on_success: delete or move the source once every target of its watch has this
        version, and no one is writing to it."""
        watch = self.config.watch(watch_name)
        if watch.on_success == "keep":
            return
        with self._post_action_lock:
            if not self.store.is_delivered_everywhere(watch.name, rel_path, version,
                                                      watch.targets):
                return
            source = watch.path / rel_path
            try:
                real = os.path.realpath(source) if watch.follow_symlinks else source
                if FileVersion.of(os.stat(real, follow_symlinks=False)) != version or \
                        is_open_for_write_elsewhere(str(real)):
                    return  # being changed: the new version is on its way
                if watch.on_success == "delete":
                    source.unlink()
                    log.info("deleted %s (delivered to every target)", source)
                else:
                    assert watch.archive_dir is not None
                    destination = watch.archive_dir / rel_path
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(source, destination)
                    log.info("moved %s to %s (delivered to every target)", source, destination)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("on_success = %s failed for %s: %s (the file stays in place)",
                          watch.on_success, source, exc.strerror or exc)


class _TargetGate:
    """Whether a target's workers may go: held back after connection failures (for a delay
    that grows with consecutive failures), or paused by a refusal no retry fixes, when one
    worker per probe period may try it, on a new connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures = 0
        self._closed_until = 0.0
        self.paused_reason: str | None = None
        self._paused_at = 0.0  # time.monotonic() values
        self._resumed_at = 0.0
        self._probe_seconds = 0.0

    def close(self, policy: RetryPolicy) -> float:
        with self._lock:
            delay = backoff_seconds(policy, self._failures)
            self._failures += 1
            self._closed_until = max(self._closed_until, time.monotonic() + delay)
            return delay

    def succeeded(self) -> None:
        """A transfer worked: connection failures are forgotten (a pause is not)."""
        with self._lock:
            self._failures = 0
            if self.paused_reason is None:
                self._closed_until = 0.0

    def pause(self, reason: str, probe_seconds: float) -> bool:
        """True if this pauses the target, False if it was paused already."""
        with self._lock:
            now, was_paused = time.monotonic(), self.paused_reason is not None
            self.paused_reason, self._probe_seconds = reason, probe_seconds
            self._paused_at = self._paused_at if was_paused else now
            self._closed_until = now + probe_seconds
            return not was_paused

    def resume(self, connected_after: float | None = None) -> str | None:
        """Lift the pause; with connected_after, only if that connection was made after the
        pause began. Returns the reason the pause had, None if none was lifted."""
        with self._lock:
            if self.paused_reason is None or (connected_after is not None
                                              and connected_after <= self._paused_at):
                return None
            reason, self.paused_reason = self.paused_reason, None
            self._resumed_at = time.monotonic()
            self._failures = 0
            self._closed_until = 0.0
            return reason

    def was_resumed_after(self, moment: float) -> bool:
        with self._lock:
            return self._resumed_at > moment

    def admit(self) -> tuple[float, bool]:
        """(0 if the caller may send now, else the seconds to wait; whether it is the probe).
        A paused target admits one caller per probe period."""
        with self._lock:
            now = time.monotonic()
            if self._closed_until > now:
                return self._closed_until - now, False
            if self.paused_reason is None:
                return 0.0, False
            self._closed_until = now + self._probe_seconds
            return 0.0, True


class _Worker(threading.Thread):
    def __init__(self, pool: Pool, target: Target, uploader: Uploader, index: int):
        super().__init__(name=f"scpd-{target.name}-{index}", daemon=True)
        self.pool = pool
        self.target = target
        self.uploader = uploader
        self.jobs: list[Job] = []  # the batch in hand
        self.is_connecting_ahead = False  # the stall guard watches this too

    def run(self) -> None:
        store = self.pool.store
        self._prepare()
        idle_since = time.monotonic()
        while not self.pool.is_stopping:
            held, is_probe = self.pool.admit(self.target)
            if held > 0:
                self.pool.wait_for_work(self.target.name, min(held, _IDLE_WAIT_SECONDS))
                continue
            jobs = store.claim_batch(self.target.name, self.pool.watch_names,
                                     max_files=_BATCH_FILES, max_bytes=_BATCH_BYTES)
            if not jobs:
                if time.monotonic() - idle_since > _IDLE_CLOSE_SECONDS:
                    self.uploader.close()  # reopened by the next file
                    idle_since = time.monotonic()
                self.pool.wait_for_work(self.target.name, self._idle_seconds())
                continue
            if is_probe:  # a paused target is proven by a new connection, not an old one
                self.uploader.close()
            self.uploader.progress_at = time.monotonic()
            self.jobs = jobs
            if self.pool.is_stopping:  # stop() began after the claim: leave it for next time
                for job in jobs:
                    store.release(job)
                self.jobs = []
                break
            delivered: list[tuple[Job, FileVersion]] = []
            try:
                delivered = self._deliver(jobs)
            except Exception:
                # A bug must not kill the worker or lose the jobs: log it and retry later, on
                # a new connection (the old one may be mid-protocol).
                log.exception("internal error delivering %s; will retry", jobs[0].rel_path)
                self.uploader.close()
                for job in store.still_sending(jobs):
                    store.mark_retry(job, "internal error",
                                     time.time() + self.target.retry.max_seconds)
                    self.pool.observer.retried(self.target.name)
            finally:
                self.jobs = []
                idle_since = time.monotonic()
            for job, version in delivered:  # not transfers: the stall guard does not watch
                self.pool.after_delivery(job.watch, job.rel_path, version)

    def _prepare(self) -> None:
        """Log in before the first file, which then goes at once. A refused login pauses
        the target now (and says so); an unreachable target is backed off quietly: the
        first file to send finds out, and says so."""
        started = self.uploader.progress_at = time.monotonic()
        self.is_connecting_ahead = True
        try:
            self.uploader.prepare()
        except PermanentError as error:
            if error.is_target_level:  # said now, and not tried again at once by each file
                self.pool.pause_target(self.target, error, started)
            else:
                log.debug("%s: could not prepare the first upload: %s", self.target.name,
                          error)
        except ConnectError as error:
            self.pool.target_down(self.target)  # the first file waits the backoff
            log.debug("%s: could not connect ahead of the first file: %s", self.target.name,
                      error)
        except ScpdError as error:
            log.debug("%s: could not connect ahead of the first file: %s", self.target.name,
                      error)
        except Exception:
            # A bug must not kill the worker: the first file tries again, and says why.
            log.exception("internal error connecting to %s ahead of the first file",
                          self.target.name)
            self.uploader.close()
        finally:
            self.is_connecting_ahead = False

    def _idle_seconds(self) -> float:
        due = self.pool.store.next_due_at(self.target.name, self.pool.watch_names)
        if due is None:
            return _IDLE_WAIT_SECONDS
        return min(_IDLE_WAIT_SECONDS, max(0.01, due - time.time()))

    def _deliver(self, jobs: list[Job]) -> list[tuple[Job, FileVersion]]:
        """Send the batch's files; the (job, version) of each job now done."""
        pool, target = self.pool, self.target
        uploads, fields = [], []
        for job in jobs:
            watch = pool.config.watch(job.watch)
            local = watch.path / job.rel_path
            # Filled in once: the host name could change between two calls.
            base = remote_dir_for(target, watch)
            remote = posixpath.join(base, job.rel_path)
            # A followed link is read through its target: the transport never follows links.
            source = os.path.realpath(local) if watch.follow_symlinks else local
            uploads.append(Upload(source, remote, job.version, job.remote_temp,
                                  base=base))
            fields.append(dict(watch=watch.name, target=target.name, path=str(local),
                               remote_path=remote, attempt=job.attempts + 1))
        done: list[tuple[Job, FileVersion]] = []
        started = time.monotonic()
        since = [started]  # the previous outcome: a file's duration starts there
        refused = [False]  # the target refused us as a whole (e.g. SCP asked of SFTP-only)

        def record(outcomes: list[tuple[int, FileVersion | ScpdError]]) -> None:
            done.extend(self._record_outcomes(jobs, fields, outcomes, started, since[0]))
            since[0] = time.monotonic()
            refused[0] = refused[0] or any(
                isinstance(o, PermanentError) and o.is_target_level for _, o in outcomes)

        try:
            self.uploader.upload_batch(
                uploads, record,
                lambda temps: pool.store.note_remote_temps([(jobs[i], t) for i, t in temps]))
        finally:
            # A connection made since a pause ends it, whatever became of the files; unless
            # the target refused us on it: a login alone then proves nothing.
            if not refused[0]:
                pool.note_reached(target, self.uploader.connected_at)
        return done

    def _record_outcomes(self, jobs: list[Job], fields: list[dict],
                         outcomes: list[tuple[int, FileVersion | ScpdError]],
                         started_at: float, since: float) -> list[tuple[Job, FileVersion]]:
        """Record outcomes known together (indexes into jobs); the (job, version) of the
        jobs now done. started_at: when the batch began; since: the previous outcomes."""
        sent = [(i, v) for i, v in outcomes if not isinstance(v, ScpdError)]
        done = self._record_successes([jobs[i] for i, _ in sent], [v for _, v in sent],
                                      [fields[i] for i, _ in sent], since)
        # One error object for several files (a lost connection): one failure.
        failed_together: dict[int, tuple[ScpdError, list[int]]] = {}
        for index, outcome in outcomes:
            if isinstance(outcome, ScpdError):
                failed_together.setdefault(id(outcome), (outcome, []))[1].append(index)
        for error, indices in failed_together.values():
            self._record_failure([jobs[i] for i in indices], error,
                                 [fields[i] for i in indices], started_at)
        return done

    def _record_successes(self, jobs: list[Job], versions: list[FileVersion],
                          fields: list[dict], since: float) -> list[tuple[Job, FileVersion]]:
        """Record what landed, in one transaction; the (job, version) of the jobs now done
        (not those whose newer version was queued meanwhile). since: when their transfer
        began (the batch, or the file before them)."""
        if not jobs:
            return []
        pool, target = self.pool, self.target
        seconds = time.monotonic() - since
        duration_ms = int(seconds * 1000)
        pool.target_up(target)
        is_done = pool.store.mark_delivered_many(list(zip(jobs, versions, strict=True)))
        done = []
        for job, version, its_fields, job_is_done in zip(jobs, versions, fields, is_done,
                                                         strict=True):
            logs.event(logging.INFO, "sent", "sent %s to %s:%s (%s in %d ms)", job.rel_path,
                       target.name, its_fields["remote_path"], logs.human_bytes(version.size),
                       duration_ms, bytes=version.size, duration_ms=duration_ms, **its_fields)
            pool.observer.delivered(target.name, version.size, seconds)
            if job_is_done:
                done.append((job, version))
        return done

    def _record_failure(self, jobs: list[Job], error: ScpdError, fields: list[dict],
                        started_at: float) -> None:
        """jobs: those that failed with this one error (a lost connection fails a whole
        batch at once: the target is then backed off once, and logged once); fields: the
        log fields of each."""
        store, target = self.pool.store, self.target
        if isinstance(error, SourceVanished):
            for job, its_fields in zip(jobs, fields, strict=True):
                store.drop(job)
                logs.event(logging.INFO, "dropped", "dropped %s: %s", job.rel_path, error,
                           error=str(error), **its_fields)
        elif self.pool.is_stopping and isinstance(error, RetryableError | FileChangedError):
            for each in jobs:
                store.release(each)  # cut by the stop itself; the next start sends it
        elif isinstance(error, PermanentError) and error.is_target_level:
            for each in jobs:
                store.release(each)  # not the file's fault: it waits for the target
            self.pool.pause_target(target, error, started_at)
        elif isinstance(error, FileChangedError):
            # Not sent again until it settles: the settler queues the new version, which makes
            # the job due at once; the deferral only matters if that never happens.
            for job in jobs:
                watch = self.pool.config.watch(job.watch)
                store.defer(job, time.time() + max(1.0, 2 * watch.settle_seconds))
                self.pool.renote(job.watch, job.rel_path)
            log.info("%s: %s; its new version is sent once it settles", target.name, error)
        elif isinstance(error, RetryableError):
            self._record_retry(jobs, error, fields)
        else:
            for job, its_fields in zip(jobs, fields, strict=True):
                self._record_failed(job, error, its_fields)

    def _record_retry(self, jobs: list[Job], error: RetryableError, fields: list[dict]
                      ) -> None:
        store, target = self.pool.store, self.target
        gate_delay = self.pool.target_down(target) if isinstance(error, ConnectError) else None
        retried = []
        for job, its_fields in zip(jobs, fields, strict=True):
            if self._should_give_up(job):
                self._record_failed(job, error, its_fields)
                continue
            delay = gate_delay if gate_delay is not None else \
                backoff_seconds(target.retry, job.attempts)
            store.mark_retry(job, logs.printable(str(error)), time.time() + delay)
            self.pool.observer.retried(target.name)
            retried.append((job, delay, its_fields))
        if retried:
            job, delay, its_fields = retried[0]
            more = f" and {len(retried) - 1} more" if len(retried) > 1 else ""
            logs.event(logging.WARNING, "retry", "%s%s to %s: %s; retrying in %.1fs",
                       job.rel_path, more, target.name, error, delay, error=str(error),
                       **its_fields)

    def _record_failed(self, job: Job, error: ScpdError, fields: dict) -> None:
        # Printable: a name in it may hold bytes that are not UTF-8, which SQLite refuses.
        self.pool.store.mark_failed(job, logs.printable(str(error)))
        self.pool.observer.failed(self.target.name)
        hint = " (an operator must act; then: scpd retry)" if isinstance(
            error, PermanentError) else " (gave up)"
        logs.event(logging.ERROR, "failed", "failed %s to %s: %s%s", job.rel_path,
                   self.target.name, error, hint, error=str(error), **fields)

    def _should_give_up(self, job: Job) -> bool:
        limit = self.target.retry.give_up_after_seconds
        return (limit is not None and job.first_failure_at is not None
                and time.time() - job.first_failure_at > limit)
