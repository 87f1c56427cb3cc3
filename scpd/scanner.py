"""The tree scan: at start-up, after lost events, on a schedule, and for directories that
appear. It is how scpd knows it missed nothing, so it must stay cheap at 100,000 files.

A scan walks the tree, skips every file whose version the queue already has (delivered or
queued) for every target, hands files that are ready on sight straight to the queue, and
leaves young ones to the settler.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from scpd.config import Watch
from scpd.fileversion import FileVersion
from scpd.settle import ReadyFile, Settler
from scpd.store import Store

log = logging.getLogger("scpd.scanner")

_BATCH = 500  # ready files per queue transaction: one commit per batch, not per file

QueueReadyFn = Callable[[list[ReadyFile]], None]


class PathFilter:
    """include/exclude of one watch. Excludes apply to every path component (so hidden
    directories are skipped too); include, when given, admits only matching file names.
    Each list is one compiled pattern: a scan asks this 100,000 times."""

    def __init__(self, watch: Watch):
        self._excluded = _compile(watch.exclude)
        self._included = _compile(watch.include) if watch.include else None

    def admits_dir(self, name: str) -> bool:
        return self._excluded is None or self._excluded.match(name) is None

    def admits_name(self, name: str) -> bool:
        """A file name, in a directory already admitted."""
        return self.admits_dir(name) and (
            self._included is None or self._included.match(name) is not None)

    def admits(self, rel_path: str) -> bool:
        *directories, name = rel_path.split("/")
        return all(self.admits_dir(part) for part in directories) and self.admits_name(name)


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """Shell globs (case-sensitive, as fnmatchcase) as one regular expression."""
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns))


@dataclass(frozen=True, slots=True)
class FoundFile:
    path: str
    rel_path: str
    stat: os.stat_result


@dataclass
class WalkStats:
    directories: int = 0
    files: int = 0
    skipped: int = 0  # symlinks not followed, FIFOs, sockets, devices
    # (st_dev, st_ino) -> path of every directory listed, when asked for (None: not kept)
    directory_ids: dict[tuple[int, int], str] | None = None


def walk(watch: Watch, start_dir: str | None = None,
         stats: WalkStats | None = None) -> Iterator[FoundFile]:
    """Every admitted regular file under the watch (or under one of its directories).

    Symlinks and special files are skipped (debug log), unless the watch follows symlinks:
    then a link to a file is found with its target's stat, and a link to a directory is
    walked, each directory once (a link loop ends there).
    """
    stats = stats if stats is not None else WalkStats()
    path_filter = PathFilter(watch)
    root = os.fspath(watch.path)
    start = start_dir or root
    rel_start = os.path.relpath(start, root)
    try:
        start_st = os.stat(start)
    except OSError:
        return
    stack = [(start, "" if rel_start == "." else rel_start + "/", start_st)]
    seen_dirs = {(start_st.st_dev, start_st.st_ino)}  # a link back to the root ends there
    while stack:
        directory, rel_prefix, dir_st = stack.pop()
        try:
            with os.scandir(directory) as entries:
                listing = list(entries)
        except FileNotFoundError:
            continue  # removed since it was listed
        except OSError as exc:
            log.warning("cannot list %s: %s; its files are not sent", directory, exc.strerror)
            continue
        stats.directories += 1
        if stats.directory_ids is not None:
            stats.directory_ids[dir_st.st_dev, dir_st.st_ino] = directory
        for entry in listing:
            rel = rel_prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) and watch.follow_symlinks:
                    st = entry.stat(follow_symlinks=True)
            except OSError:
                continue  # vanished while listing, or a dangling link
            if stat.S_ISDIR(st.st_mode):
                if not watch.recursive or not path_filter.admits_dir(entry.name):
                    continue
                if watch.follow_symlinks and not _first_visit(seen_dirs, st):
                    continue
                stack.append((entry.path, rel + "/", st))
            elif not path_filter.admits_name(entry.name):
                continue
            elif stat.S_ISREG(st.st_mode):
                stats.files += 1
                yield FoundFile(entry.path, rel, st)
            else:
                stats.skipped += 1
                log.debug("skipping %s: %s (only regular files are sent)", entry.path,
                          describe_file_type(st.st_mode, watch.follow_symlinks))


def _first_visit(seen: set[tuple[int, int]], st: os.stat_result) -> bool:
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def describe_file_type(mode: int, follow_symlinks: bool = False) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link" + ("" if follow_symlinks else " (follow_symlinks = false)")
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


@dataclass(frozen=True)
class ScanReport:
    watch: str
    directories: int
    files: int
    handed_on: int  # new or changed: queued, or left to settle
    skipped: int
    seconds: float
    directory_ids: dict[tuple[int, int], str] | None = None


class Scanner:
    """One scan of a watch (or a directory of it) against the queue."""

    def __init__(self, store: Store, settler: Settler, queue_ready: QueueReadyFn):
        self.store = store
        self.settler = settler
        self.queue_ready = queue_ready

    def scan(self, watch: Watch, start_dir: str | None = None, *,
             keep_directory_ids: bool = False) -> ScanReport:
        started = time.monotonic()
        stats = WalkStats(directory_ids={} if keep_directory_ids else None)
        batch: list[ReadyFile] = []
        handed_on = 0
        for found in walk(watch, start_dir, stats):
            if self._is_settled_already(watch, found):
                continue
            handed_on += 1
            ready = self.settler.offer(watch.name, found.path, found.rel_path,
                                       watch.settle_seconds, found.stat,
                                       follow_symlinks=watch.follow_symlinks)
            if ready is not None:
                batch.append(ready)
                if len(batch) >= _BATCH:
                    self.queue_ready(batch)
                    batch = []
        if batch:
            self.queue_ready(batch)
        return ScanReport(watch.name, stats.directories, stats.files, handed_on, stats.skipped,
                          time.monotonic() - started, stats.directory_ids)

    def _is_settled_already(self, watch: Watch, found: FoundFile) -> bool:
        """This version is delivered or queued for every target: nothing to do. (With an
        on_success action, a file still here may be one a crash kept from being moved.)"""
        return watch.on_success == "keep" and self.store.owes_nothing(
            watch.name, found.rel_path, FileVersion.of(found.stat), watch.targets)


class Rescanner(threading.Thread):
    """Runs scans one after another, off the main loop: a large tree takes seconds, and the
    main loop must keep answering systemd meanwhile. Requests for a watch already waiting
    are merged."""

    def __init__(self, scanner: Scanner, watch_of: Callable[[str], Watch],
                 after_full_scan: Callable[[str, dict[tuple[int, int], str]], None]):
        super().__init__(name="scpd-rescan", daemon=True)
        self.scanner = scanner
        self.watch_of = watch_of
        self.after_full_scan = after_full_scan  # (watch name, directory ids -> paths)
        self._requests: queue.SimpleQueue[tuple[str, str | None, str] | None] = \
            queue.SimpleQueue()
        self._waiting: set[tuple[str, str | None]] = set()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def request(self, watch_name: str, reason: str, start_dir: str | None = None) -> None:
        with self._lock:
            if self._is_covered(watch_name, start_dir):
                return
            self._waiting.add((watch_name, start_dir))
            self._idle.clear()
        self._requests.put((watch_name, start_dir, reason))

    def _is_covered(self, watch_name: str, start_dir: str | None) -> bool:
        """A waiting scan of the same tree or of a tree holding it will find its files.
        (A running one may have passed the place already.) A tree moved in brings one
        event per directory: this keeps it to one scan."""
        if (watch_name, start_dir) in self._waiting or (watch_name, None) in self._waiting:
            return True
        return start_dir is not None and any(
            name == watch_name and waiting is not None
            and start_dir.startswith(waiting.rstrip("/") + "/")
            for name, waiting in self._waiting)

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def stop(self) -> None:
        self._requests.put(None)
        self.join(timeout=10)

    def run(self) -> None:
        while (item := self._requests.get()) is not None:
            watch_name, start_dir, reason = item
            with self._lock:
                self._waiting.discard((watch_name, start_dir))
            try:
                self._scan(self.watch_of(watch_name), start_dir, reason)
            except Exception:  # noqa: BLE001 -- the next scan must still run
                log.exception("scan of watch %s failed; the next one retries", watch_name)
            with self._lock:
                if not self._waiting:
                    self._idle.set()

    def _scan(self, watch: Watch, start_dir: str | None, reason: str) -> None:
        if start_dir is None and not os.path.isdir(watch.path):
            return  # the watcher reports a missing root
        report = self.scanner.scan(watch, start_dir, keep_directory_ids=start_dir is None)
        if report.directory_ids is not None:
            self.after_full_scan(watch.name, report.directory_ids)
        level = logging.INFO if report.handed_on or start_dir is None else logging.DEBUG
        skipped = (f", {report.skipped} skipped (links or special files; debug log names them)"
                   if report.skipped else "")
        log.log(level, "%s scan of watch %s: %d file(s) in %d dir(s), %d new or changed%s,"
                " %.1fs", reason, watch.name, report.files, report.directories,
                report.handed_on, skipped, report.seconds)
