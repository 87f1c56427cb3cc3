"""Readiness: when a noticed file is complete enough to send. Pure logic, injectable clocks.

A file is ready when nobody holds it open for writing (a read-lease probe) and either its
writer closed it (close_write), or its size and mtime stayed the same for `settle` seconds, or
its mtime is already older than `settle` (files found by a scan, moved in, or hard-linked).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scpd.fileversion import FileVersion

F_SETLEASE = 1024  # from <fcntl.h>; Python's fcntl module does not export it


def is_open_for_write_elsewhere(path: str) -> bool:
    """True if another process has the file open for writing.

    The kernel refuses a read lease while any writer holds the file. Where leases cannot be
    taken (not the owner without CAP_LEASE, NFS) this answers False: a close_write event, or
    the quiet period, then decides alone. A writer opening the file inside the short window
    the lease is held makes the kernel send SIGIO, which the daemon ignores.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    finally:
        os.close(fd)


@dataclass
class _Candidate:
    watch: str
    rel_path: str
    settle_seconds: float
    is_closed: bool
    version: FileVersion | None = None
    changed_at: float = 0.0


@dataclass(frozen=True)
class ReadyFile:
    watch: str
    path: str
    rel_path: str
    version: FileVersion


class Settler:
    """Collects noticed paths (from any thread) and hands out those that are ready."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 lstat: Callable[[str], os.stat_result] = os.lstat,
                 is_being_written: Callable[[str], bool] = is_open_for_write_elsewhere):
        self._clock = clock
        self._wall_clock = wall_clock
        self._lstat = lstat
        self._is_being_written = is_being_written
        self._lock = threading.Lock()
        # Keyed by (watch, path): a file under two overlapping watches is owed to both.
        self._candidates: dict[tuple[str, str], _Candidate] = {}

    def note(self, watch: str, path: str, rel_path: str, settle_seconds: float,
             *, is_closed: bool = False) -> None:
        with self._lock:
            candidate = self._candidates.get((watch, path))
            if candidate is None:
                self._candidates[watch, path] = _Candidate(watch, rel_path, settle_seconds,
                                                           is_closed)
            else:
                candidate.is_closed = candidate.is_closed or is_closed

    def forget(self, watch: str, path: str) -> None:
        with self._lock:
            self._candidates.pop((watch, path), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._candidates)

    def take_ready(self) -> list[ReadyFile]:
        """Ready files, removed from the candidates. Vanished or non-regular paths are dropped."""
        now = self._clock()
        with self._lock:
            items = list(self._candidates.items())
        ready: list[ReadyFile] = []
        for key, candidate in items:
            path = key[1]
            verdict = self._judge(path, candidate, now)
            if verdict is None:
                continue
            with self._lock:
                if self._candidates.get(key) is candidate:
                    del self._candidates[key]
            if verdict is not _GONE:
                ready.append(ReadyFile(candidate.watch, path, candidate.rel_path, verdict))
        return ready

    def _judge(self, path: str, candidate: _Candidate, now: float):
        try:
            st = self._lstat(path)
        except OSError:
            return _GONE
        if not stat.S_ISREG(st.st_mode):
            return _GONE
        version = FileVersion.of(st)
        if version != candidate.version:
            candidate.version, candidate.changed_at = version, now
            if not candidate.is_closed and not self._is_old(st, candidate):
                return None
        quiet = now - candidate.changed_at >= candidate.settle_seconds
        if not (candidate.is_closed or quiet or self._is_old(st, candidate)):
            return None
        if self._is_being_written(path):
            candidate.is_closed = False  # that close was not the last writer's
            return None
        return version

    def _is_old(self, st: os.stat_result, candidate: _Candidate) -> bool:
        return self._wall_clock() - st.st_mtime_ns / 1e9 >= candidate.settle_seconds


_GONE = object()
