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
from pathlib import Path

from scpd import logs
from scpd.config import Config, RetryPolicy, Target, remote_dir_for
from scpd.errors import (
    FileChangedError,
    PermanentError,
    RetryableError,
    ScpdError,
    SourceVanished,
)
from scpd.fileversion import FileVersion
from scpd.store import Job, Store
from scpd.transport import Credentials, Throttle, TokenBucket, Uploader, open_uploader

log = logging.getLogger("scpd.pool")

_IDLE_WAIT_SECONDS = 5.0


def backoff_seconds(policy: RetryPolicy, attempts: int, rand: Callable[[], float] = random.random
                    ) -> float:
    """Capped exponential backoff with jitter: the n-th retry waits between half and all of
    initial * 2**n (capped), so many jobs failing together do not retry in lockstep."""
    delay = min(policy.max_seconds, policy.initial_seconds * 2 ** min(attempts, 32))
    return delay * (0.5 + rand() / 2)


class Pool:
    """`connections` workers per target, each with its own SSH connection."""

    def __init__(self, config: Config, store: Store, credentials: dict[str, Credentials]):
        self.config = config
        self.store = store
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
        self.bytes_sent = 0
        self._bytes_lock = threading.Lock()

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

    def busy_count(self) -> int:
        return sum(1 for worker in self._workers if worker.job is not None)

    def count_bytes(self, n: int) -> None:
        with self._bytes_lock:
            self.bytes_sent += n

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Let in-flight uploads finish for up to grace_seconds, then cut them: a cut upload
        leaves no file under its final name and its job goes back to pending."""
        self._stopping.set()
        for name in self._wakeups:
            self.wake(name)
        deadline = time.monotonic() + grace_seconds
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            if worker.is_alive():
                worker.uploader.close()
        for worker in self._workers:
            worker.join(5.0)
            worker.uploader.close()

    def after_delivery(self, job: Job, sent: FileVersion) -> None:
        """on_success: delete or move the source once every target of its watch has it."""
        watch = self.config.watch(job.watch)
        if watch.on_success == "keep":
            return
        with self._post_action_lock:
            if not self.store.is_delivered_everywhere(watch.name, job.rel_path, sent,
                                                      watch.targets):
                return
            source = watch.path / job.rel_path
            try:
                if FileVersion.of(os.lstat(source)) != sent:
                    return  # changed since it was sent; the new version is on its way
                if watch.on_success == "delete":
                    source.unlink()
                    log.info("deleted %s (delivered to every target)", source)
                else:
                    assert watch.archive_dir is not None
                    destination = watch.archive_dir / job.rel_path
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(source, destination)
                    log.info("moved %s to %s (delivered to every target)", source, destination)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("on_success = %s failed for %s: %s (the file stays in place)",
                          watch.on_success, source, exc.strerror or exc)


class _Worker(threading.Thread):
    def __init__(self, pool: Pool, target: Target, uploader: Uploader, index: int):
        super().__init__(name=f"scpd-{target.name}-{index}", daemon=True)
        self.pool = pool
        self.target = target
        self.uploader = uploader
        self.job: Job | None = None

    def run(self) -> None:
        store = self.pool.store
        while not self.pool.is_stopping:
            job = store.claim(self.target.name, self.pool.watch_names)
            if job is None:
                self.pool.wait_for_work(self.target.name, self._idle_seconds())
                continue
            self.job = job
            try:
                self._deliver(job)
            except Exception:
                # A bug must not kill the worker or lose the job: log it and retry later.
                log.exception("internal error delivering %s; will retry", job.rel_path)
                store.mark_retry(job, "internal error", time.time() + self.target.retry.max_seconds)
            finally:
                self.job = None

    def _idle_seconds(self) -> float:
        due = self.pool.store.next_due_at(self.target.name, self.pool.watch_names)
        if due is None:
            return _IDLE_WAIT_SECONDS
        return min(_IDLE_WAIT_SECONDS, max(0.01, due - time.time()))

    def _deliver(self, job: Job) -> None:
        pool, target = self.pool, self.target
        watch = pool.config.watch(job.watch)
        local = watch.path / job.rel_path
        remote = posixpath.join(remote_dir_for(target, watch), job.rel_path)
        fields = dict(watch=watch.name, target=target.name, path=str(local), remote_path=remote,
                      attempt=job.attempts + 1)
        started = time.monotonic()
        try:
            sent = self.uploader.upload(local, remote)
        except ScpdError as error:
            self._record_failure(job, error, local, fields)
            return
        duration_ms = int((time.monotonic() - started) * 1000)
        pool.count_bytes(sent.size)
        is_done = pool.store.mark_delivered(job, sent)
        logs.event(logging.INFO, "sent", "sent %s to %s:%s (%s in %d ms)", job.rel_path,
                   target.name, remote, _human_bytes(sent.size), duration_ms,
                   bytes=sent.size, duration_ms=duration_ms, **fields)
        if is_done:
            pool.after_delivery(job, sent)

    def _record_failure(self, job: Job, error: ScpdError, local: Path, fields: dict) -> None:
        store, target = self.pool.store, self.target
        if isinstance(error, SourceVanished):
            store.drop(job)
            logs.event(logging.INFO, "dropped", "dropped %s: %s", job.rel_path, error,
                       error=str(error), **fields)
        elif self.pool.is_stopping and isinstance(error, RetryableError | FileChangedError):
            store.release(job)  # cut by the stop itself; the next start sends it
        elif isinstance(error, FileChangedError):
            # Its new version is queued once it settles; until then do not resend.
            watch = self.pool.config.watch(job.watch)
            store.mark_retry(job, str(error), time.time() + max(1.0, watch.settle_seconds))
            logs.event(logging.INFO, "retry", "%s changed while it was sent; will send the new"
                       " version", local, error=str(error), **fields)
        elif isinstance(error, RetryableError) and not self._should_give_up(job):
            delay = backoff_seconds(target.retry, job.attempts)
            store.mark_retry(job, str(error), time.time() + delay)
            logs.event(logging.WARNING, "retry", "%s to %s: %s; retrying in %.1fs",
                       job.rel_path, target.name, error, delay, error=str(error), **fields)
        else:
            store.mark_failed(job, str(error))
            hint = " (an operator must act; then: scpd retry)" if isinstance(
                error, PermanentError) else " (gave up)"
            logs.event(logging.ERROR, "failed", "failed %s to %s: %s%s", job.rel_path,
                       target.name, error, hint, error=str(error), **fields)

    def _should_give_up(self, job: Job) -> bool:
        limit = self.target.retry.give_up_after_seconds
        return (limit is not None and job.first_failure_at is not None
                and time.time() - job.first_failure_at > limit)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
