"""Readiness: when a noticed file is complete enough to send. Pure logic, injectable clocks.

A file is ready when nobody holds it open for writing (a read-lease probe) and either its
writer closed it (close_write), or its size and mtime stayed the same for `settle` seconds, or
its mtime is already older than `settle` (files found by a scan, moved in, or hard-linked).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
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


@dataclass(slots=True)
class _Candidate:
    watch: str
    rel_path: str
    settle_seconds: float
    is_closed: bool
    follow_symlinks: bool = False
    version: FileVersion | None = None
    changed_at: float = 0.0
    due_at: float = 0.0  # when to look at it next
    notes: int = 0  # events about it so far: one arriving while it is looked at voids the look


@dataclass(frozen=True, slots=True)
class ReadyFile:
    watch: str
    path: str
    rel_path: str
    version: FileVersion


_Key = tuple[str, str]  # (watch, path): a file under two overlapping watches is owed to both

# A file is looked at when it is due, not on every tick; and a tick looks at no more than
# this many (about a quarter second): a tree of 100,000 files moved in is queued in seconds
# while the main loop still answers systemd.
_MAX_LOOKS_PER_TAKE = 20_000


class Settler:
    """Collects noticed paths (from any thread) and hands out those that are ready."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 lstat: Callable[[str], os.stat_result] = os.lstat,
                 stat_followed: Callable[[str], os.stat_result] = os.stat,
                 is_being_written: Callable[[str], bool] = is_open_for_write_elsewhere):
        self._clock = clock
        self._wall_clock = wall_clock
        self._lstat = lstat
        self._stat_followed = stat_followed
        self._is_being_written = is_being_written
        self._lock = threading.Lock()
        self._candidates: dict[_Key, _Candidate] = {}
        self._due: list[tuple[float, int, _Key]] = []  # heap; stale entries are skipped
        self._order = itertools.count()
        self._closed_noted = threading.Event()

    def note(self, watch: str, path: str, rel_path: str, settle_seconds: float,
             *, is_closed: bool = False, follow_symlinks: bool = False) -> None:
        now = self._clock()
        with self._lock:
            candidate = self._candidates.get((watch, path))
            if candidate is None:
                self._candidates[watch, path] = _Candidate(
                    watch, rel_path, settle_seconds, is_closed, follow_symlinks, due_at=now)
                self._push(now, (watch, path))
            else:
                candidate.notes += 1
                if is_closed and not candidate.is_closed:
                    candidate.is_closed = True
                    candidate.due_at = now
                    self._push(now, (watch, path))
        if is_closed:
            self._closed_noted.set()

    def wait_for_closed(self, seconds: float) -> None:
        """Sleep up to `seconds`, less if a file is closed after writing meanwhile: it is
        likely ready now, and a tick's wait would be most of its way to the remote."""
        self._closed_noted.wait(seconds)
        self._closed_noted.clear()

    def offer(self, watch: str, path: str, rel_path: str, settle_seconds: float,
              st: os.stat_result, *, follow_symlinks: bool = False) -> ReadyFile | None:
        """A file found by a scan: ready now if its mtime is older than `settle` and nobody
        writes to it; else it becomes a candidate like a noticed one."""
        with self._lock:
            is_candidate = (watch, path) in self._candidates
        if not is_candidate and self._wall_clock() - st.st_mtime_ns / 1e9 >= settle_seconds \
                and not self._is_being_written(_real(path, follow_symlinks)):
            return ReadyFile(watch, path, rel_path, FileVersion.of(st))
        self.note(watch, path, rel_path, settle_seconds, follow_symlinks=follow_symlinks)
        return None

    def forget(self, watch: str, path: str) -> None:
        with self._lock:
            self._candidates.pop((watch, path), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._candidates)

    def take_ready(self) -> list[ReadyFile]:
        """Ready files, removed from the candidates. Vanished or non-regular paths are dropped."""
        now = self._clock()
        due: list[tuple[_Key, _Candidate, float, int]] = []
        with self._lock:
            while self._due and self._due[0][0] <= now and len(due) < _MAX_LOOKS_PER_TAKE:
                due_at, _, key = heapq.heappop(self._due)
                candidate = self._candidates.get(key)
                if candidate is not None and candidate.due_at == due_at:
                    due.append((key, candidate, due_at, candidate.notes))
        ready: list[ReadyFile] = []
        for key, candidate, looked_for_at, notes in due:
            verdict = self._judge(key[1], candidate, now)
            with self._lock:
                if self._candidates.get(key) is not candidate:
                    continue  # forgotten (deleted) while we looked
                if candidate.notes != notes and verdict is not _GONE:
                    verdict = now  # it changed while we looked: look again, not hand out
                if isinstance(verdict, float):
                    # A close noted while we looked keeps its earlier due time.
                    moved = candidate.due_at != looked_for_at
                    candidate.due_at = min(verdict, candidate.due_at) if moved else verdict
                    self._push(candidate.due_at, key)
                    continue
                del self._candidates[key]
            if verdict is not _GONE:
                ready.append(ReadyFile(candidate.watch, key[1], candidate.rel_path, verdict))
        return ready

    def _push(self, due_at: float, key: _Key) -> None:
        heapq.heappush(self._due, (due_at, next(self._order), key))

    def _judge(self, path: str, candidate: _Candidate, now: float):
        """The file's version if ready, _GONE if it is no file to send, else when to look
        again."""
        try:
            st = (self._stat_followed if candidate.follow_symlinks else self._lstat)(path)
        except OSError:
            return _GONE
        if not stat.S_ISREG(st.st_mode):
            return _GONE
        version = FileVersion.of(st)
        if version != candidate.version:
            candidate.version, candidate.changed_at = version, now
            if not candidate.is_closed and not self._is_old(st, candidate):
                return now + self._quiet_left(st, candidate)
        quiet = now - candidate.changed_at >= candidate.settle_seconds
        if not (candidate.is_closed or quiet or self._is_old(st, candidate)):
            return now + min(candidate.changed_at + candidate.settle_seconds - now,
                             self._quiet_left(st, candidate))
        if self._is_being_written(_real(path, candidate.follow_symlinks)):
            candidate.is_closed = False  # that close was not the last writer's
            return now + candidate.settle_seconds
        return version

    def _is_old(self, st: os.stat_result, candidate: _Candidate) -> bool:
        return self._wall_clock() - st.st_mtime_ns / 1e9 >= candidate.settle_seconds

    def _quiet_left(self, st: os.stat_result, candidate: _Candidate) -> float:
        """Until the mtime is `settle` old; never longer than `settle` (an mtime in the
        future), never zero (a clock a hair behind would spin)."""
        age = self._wall_clock() - st.st_mtime_ns / 1e9
        return min(candidate.settle_seconds, max(candidate.settle_seconds - age, 0.05))


def _real(path: str, follow_symlinks: bool) -> str:
    return os.path.realpath(path) if follow_symlinks else path


_GONE = object()
