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
from scpd.settle import ReadyFile, Settler
from scpd.store import Store

log = logging.getLogger("scpd.scanner")

_BATCH = 500  # files per queue read and per queue transaction, not one each
_RETRY_FAILED_SCAN_SECONDS = 30

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


def walk(watch: Watch, stats: WalkStats | None = None) -> Iterator[FoundFile]:
    """Every admitted regular file under the watch.

    Symlinks and special files are skipped (debug log), unless the watch follows symlinks:
    then a link to a file is found with its target's stat, and a link to a directory is
    walked, each directory once (a link loop ends there).
    """
    stats = stats if stats is not None else WalkStats()
    path_filter = PathFilter(watch)
    root = os.fspath(watch.path)
    try:
        root_st = os.stat(root)
    except OSError:
        return
    stack = [(root, "", root_st)]
    seen_dirs = {(root_st.st_dev, root_st.st_ino)}  # a link back to the root ends there
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
    """What a watched entry that is not sent is, and for a link why not."""
    if stat.S_ISLNK(mode) and not follow_symlinks:
        return "a symbolic link (follow_symlinks = false)"
    return file_type_name(mode)


def file_type_name(mode: int) -> str:
    """What a file that is not a regular one is: "a FIFO", "a socket", ..."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
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
    """One scan of a watch against the queue."""

    def __init__(self, store: Store, settler: Settler, queue_ready: QueueReadyFn):
        self.store = store
        self.settler = settler
        self.queue_ready = queue_ready

    def scan(self, watch: Watch, *, keep_directory_ids: bool = False,
             should_stop: Callable[[], bool] = lambda: False) -> ScanReport:
        """should_stop: asked at every file; a stopping daemon does not finish a long scan
        (the next start-up scan does its work)."""
        started = time.monotonic()
        stats = WalkStats(directory_ids={} if keep_directory_ids else None)
        found_files: list[FoundFile] = []
        handed_on = 0
        for found in walk(watch, stats):
            if should_stop():
                found_files = []
                break
            found_files.append(found)
            if len(found_files) == _BATCH:
                handed_on += self._hand_on(watch, found_files)
                found_files = []
        handed_on += self._hand_on(watch, found_files)
        return ScanReport(watch.name, stats.directories, stats.files, handed_on, stats.skipped,
                          time.monotonic() - started, stats.directory_ids)

    def _hand_on(self, watch: Watch, found_files: list[FoundFile]) -> int:
        """Files whose version is not yet queued or delivered everywhere: ready ones to the
        queue (one transaction), young ones to the settler. Returns how many."""
        held = self._held_versions(watch, found_files)
        ready_files: list[ReadyFile] = []
        handed_on = 0
        for found in found_files:
            version = (found.stat.st_size, found.stat.st_mtime_ns)
            held_by_target = held.get(found.rel_path, {})
            if all(held_by_target.get(target) == version for target in watch.targets):
                continue
            handed_on += 1
            ready = self.settler.offer(watch.name, found.path, found.rel_path,
                                       watch.settle_seconds, found.stat,
                                       follow_symlinks=watch.follow_symlinks)
            if ready is not None:
                ready_files.append(ready)
        if ready_files:
            self.queue_ready(ready_files)
        return handed_on

    def _held_versions(self, watch: Watch, found_files: list[FoundFile]
                       ) -> dict[str, dict[str, tuple[int, int]]]:
        # With an on_success action, a file still here may be one a crash kept from being
        # moved or deleted: hand it on, and the queue's no-op leads to the action.
        if watch.on_success != "keep" or not found_files:
            return {}
        return self.store.held_versions(watch.name, [f.rel_path for f in found_files],
                                        watch.targets)


class Rescanner(threading.Thread):
    """Runs scans one after another, off the main loop: a large tree takes seconds, and the
    main loop must keep answering systemd meanwhile. A request for a watch whose scan is
    still waiting is merged into it."""

    def __init__(self, scanner: Scanner, watch_of: Callable[[str], Watch],
                 before_scan: Callable[[str, str], None],
                 after_scan: Callable[[str, dict[tuple[int, int], str]], None]):
        super().__init__(name="scpd-rescan", daemon=True)
        self.scanner = scanner
        self.watch_of = watch_of
        self.before_scan = before_scan  # (watch name, reason)
        self.after_scan = after_scan  # (watch name, directory ids -> paths)
        self._requests: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def request(self, watch_name: str, reason: str) -> None:
        with self._lock:
            if watch_name in self._waiting:
                return
            self._waiting.add(watch_name)
        self._requests.put((watch_name, reason))

    def stop(self) -> None:
        """Waiting scans are dropped and a running one ends at its next file: the next
        start-up scan does their work."""
        self._stopping.set()
        self._requests.put(None)
        self.join(timeout=3)

    def run(self) -> None:
        while (item := self._requests.get()) is not None:
            watch_name, reason = item
            with self._lock:
                self._waiting.discard(watch_name)
            if self._stopping.is_set():
                continue
            try:
                self._scan(self.watch_of(watch_name), reason)
            except Exception:  # noqa: BLE001 -- the next scan must still run
                log.exception("scan of watch %s failed; trying again in %ds", watch_name,
                              _RETRY_FAILED_SCAN_SECONDS)
                self._retry_later(watch_name)

    def _retry_later(self, watch_name: str) -> None:
        # What the failed scan held back (a batch not queued) must not wait for the periodic
        # scan; and a failing disk must not be hammered.
        timer = threading.Timer(_RETRY_FAILED_SCAN_SECONDS, self.request,
                                (watch_name, "retry of a failed"))
        timer.daemon = True
        timer.start()

    def _scan(self, watch: Watch, reason: str) -> None:
        if not os.path.isdir(watch.path):
            return  # the watcher reports a missing root
        self.before_scan(watch.name, reason)
        report = self.scanner.scan(watch, keep_directory_ids=True,
                                   should_stop=self._stopping.is_set)
        if self._stopping.is_set():
            return
        assert report.directory_ids is not None
        self.after_scan(watch.name, report.directory_ids)
        skipped = (f", {report.skipped} skipped (links or special files; debug log names them)"
                   if report.skipped else "")
        log.info("%s scan of watch %s: %d file(s) in %d dir(s), %d new or changed%s, %.1fs",
                 reason, watch.name, report.files, report.directories, report.handed_on,
                 skipped, report.seconds)
