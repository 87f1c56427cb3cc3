"""watchdog wiring: events name candidate paths for the settler, and whatever events cannot
be trusted to tell (lost events, a root that came back) asks for a scan.

Known gaps of inotify and what covers each (research: libraries.md section 3):
- files inside a directory created, copied or moved in, before its watch existed: watchdog
  7.1 walks each new directory once it is watched and reports what it finds (the tests of
  cp -r, tar -x and mv of a tree hold it to that);
- kernel queue overflow (watchdog only logs it): a scan of every inotify watch;
- watches the kernel would not add (max_user_watches; watchdog skips them silently):
  `unwatched_dirs` compares a scan's directories with what inotify holds, and the daemon
  polls such a watch instead;
- a missing, deleted or replaced root: `check_roots`, called about once a second.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from scpd.config import Watch
from scpd.scanner import PathFilter

log = logging.getLogger("scpd.watcher")

# Only what can make a file ready. Leaving out IN_OPEN and IN_CLOSE_NOWRITE also keeps the
# daemon's own reads from coming back to it as events. (New directories are watched whatever
# the filter says; the files in them come as FileCreated or FileMoved.)
_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
           FileDeletedEvent]

# (watch, absolute path, path relative to the watch root, is_closed)
NoteFn = Callable[[Watch, str, str, bool], None]
ForgetFn = Callable[[str, str], None]  # (watch name, absolute path)
RescanFn = Callable[[str, str], None]  # (watch name, reason)

_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


class _Handler(FileSystemEventHandler):
    """Trivial on purpose: an exception escaping a handler kills watchdog's dispatch thread."""

    def __init__(self, watch: Watch, watched_root: str, note: NoteFn, forget: ForgetFn):
        self.watch = watch
        self.root = os.fspath(watch.path)
        self.watched_root = watched_root  # the root as watchdog reports it (links resolved)
        self.filter = PathFilter(watch)
        self.note = note
        self.forget = forget

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:
            log.exception("error handling %r; the next scan will find the file", event)

    def _dispatch(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileDeletedEvent):
            if (rel := self._admitted(event.src_path)) is not None:
                self.forget(self.watch.name, os.path.join(self.root, rel))
        elif isinstance(event, FileMovedEvent):
            if (rel := self._admitted(event.src_path)) is not None:
                self.forget(self.watch.name, os.path.join(self.root, rel))
            self._note(event.dest_path, is_closed=True)  # a rename is complete
        else:
            self._note(event.src_path, isinstance(event, FileClosedEvent))

    def _relative(self, path: str | bytes) -> str | None:
        rel = os.path.relpath(os.fsdecode(path), self.watched_root)
        return None if rel == ".." or rel.startswith("../") else rel

    def _admitted(self, path: str | bytes) -> str | None:
        rel = self._relative(path)
        if rel is None or rel == "." or not self.filter.admits(rel):
            return None
        if not self.watch.recursive and "/" in rel:
            return None
        return rel

    def _note(self, path: str | bytes, is_closed: bool) -> None:
        if (rel := self._admitted(path)) is not None:
            self.note(self.watch, os.path.join(self.root, rel), rel, is_closed)


@dataclass
class _Scheduled:
    observer: BaseObserver
    observed: ObservedWatch
    root_id: tuple[int, int]  # (st_dev, st_ino) of the root when it was scheduled


class _OverflowListener(logging.Handler):
    """watchdog tells of a kernel queue overflow only in a log record: listen for it."""

    def __init__(self, on_overflow: Callable[[], None]):
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg):
            self.on_overflow()


class Watcher:
    """inotify for every watch (one watchdog Observer), or a PollingObserver per watch that
    polls. start(), then check_roots() about once a second, stop() at the end."""

    def __init__(self, watches: tuple[Watch, ...], note: NoteFn, forget: ForgetFn,
                 rescan: RescanFn):
        self.watches = {watch.name: watch for watch in watches}
        self._note = note
        self._forget = forget
        self._rescan = rescan
        self._inotify: BaseObserver | None = None
        try:
            self._inotify = Observer()
        except OSError as exc:
            log.error("inotify is not available (%s); polling every watch instead%s",
                      exc.strerror or exc, inotify_limit_hint(instances=True))
        self._pollers: dict[str, PollingObserver] = {}
        self._scheduled: dict[str, _Scheduled] = {}
        self._missing: set[str] = set()
        self._polled = {watch.name for watch in watches if watch.poll or self._inotify is None}
        self._overflow_listener = _OverflowListener(self._on_overflow)
        self._lock = threading.RLock()  # the main loop and the rescan thread both reschedule

    def start(self) -> None:
        overflow_logger = logging.getLogger(_OVERFLOW_LOGGER)
        if not overflow_logger.isEnabledFor(logging.WARNING):
            overflow_logger.setLevel(logging.WARNING)  # the overflow record must be made
        overflow_logger.addHandler(self._overflow_listener)
        if self._inotify is not None:
            self._inotify.start()
        self.check_roots(is_start=True)

    def stop(self) -> None:
        logging.getLogger(_OVERFLOW_LOGGER).removeHandler(self._overflow_listener)
        for observer in self._observers():
            observer.stop()
        for observer in self._observers():
            if observer.is_alive():
                observer.join(timeout=5)

    def is_alive(self) -> bool:
        """Every observer thread and every emitter thread is running (once roots that went
        away, which end their emitter, are let go)."""
        self.check_roots()
        return all(o.is_alive() and all(e.is_alive() for e in o.emitters)
                   for o in self._observers())

    def _observers(self) -> list[BaseObserver]:
        with self._lock:
            return [o for o in (self._inotify, *self._pollers.values()) if o is not None]

    def wait_until_watching(self, timeout: float) -> bool:
        """Until every inotify emitter has added its watches (it does so on its own thread):
        a start-up scan begun earlier could list a directory before it is watched, and miss
        a file written there in between."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # watchdog 7 publishes `_inotify` once its recursive watches are in place; if a
            # later release drops the attribute, this stops waiting rather than hang.
            if all(getattr(e, "_inotify", True) is not None or not e.is_alive()
                   for o in self._observers() if not isinstance(o, PollingObserver)
                   for e in o.emitters):
                return True
            time.sleep(0.01)
        return False

    def check_roots(self, *, is_start: bool = False) -> None:
        """(Re)watch every root that exists now; let go of those that vanished or were
        replaced. A root that comes back is scanned: its files got no events."""
        with self._lock:
            self._check_roots(is_start)

    def _check_roots(self, is_start: bool) -> None:
        for watch in self.watches.values():
            root_id = _identity(watch.path)
            scheduled = self._scheduled.get(watch.name)
            # A root deleted and made again may get the same inode number back; its watch
            # died with the old one (watchdog ends that emitter), so that is checked too.
            if scheduled is not None and scheduled.root_id == root_id and _is_running(scheduled):
                continue
            if scheduled is not None:
                self._unschedule(watch.name)
                if root_id is None:
                    log.warning("watch %s: %s was removed; watching it again when it is back",
                                watch.name, watch.path)
            if root_id is None:
                if is_start:
                    log.warning("watch %s: %s does not exist; watching it when it appears",
                                watch.name, watch.path)
                self._missing.add(watch.name)
                continue
            was_lost = watch.name in self._missing or scheduled is not None
            if not self._schedule(watch, root_id):
                continue
            if was_lost and not is_start:
                log.info("watch %s: %s is there; watching it%s", watch.name, watch.path,
                         " again" if scheduled is not None else "")
                self._rescan(watch.name, "appeared")
            self._missing.discard(watch.name)

    def check_coverage(self, watch_name: str, directories: dict[tuple[int, int], str]) -> None:
        """After a full scan of a watch: if inotify holds no watch on some of its directories
        (the kernel's limit ran out; watchdog skips those silently), poll the watch instead."""
        with self._lock:
            if watch_name in self._polled or watch_name not in self._scheduled:
                return
        unwatched = _unwatched(directories)
        if unwatched:
            time.sleep(0.5)  # a directory made during the scan may be getting its watch now
            unwatched = _unwatched(directories)
        if not unwatched:
            return
        watch = self.watches[watch_name]
        log.error("watch %s: inotify watches only %d of its %d directories (for example not"
                  " %s); polling it every %gs instead%s", watch_name,
                  len(directories) - len(unwatched), len(directories), unwatched[0],
                  watch.poll_interval_seconds, inotify_limit_hint(len(directories)))
        with self._lock:
            self._polled.add(watch_name)
            self._unschedule(watch_name)
            self._check_roots(is_start=False)
        self._rescan(watch_name, "unwatched directories")

    def _schedule(self, watch: Watch, root_id: tuple[int, int]) -> bool:
        watched_root = os.path.realpath(watch.path)
        observer = self._observer_for(watch)
        handler = _Handler(watch, watched_root, self._note, self._forget)
        try:
            observed = observer.schedule(handler, watched_root, recursive=watch.recursive,
                                         event_filter=_EVENTS,
                                         follow_symlink=watch.follow_symlinks)
        except FileNotFoundError:
            return False  # gone again; the next check tries again
        except OSError as exc:
            if watch.name in self._polled:
                log.error("watch %s: cannot poll %s: %s", watch.name, watch.path,
                          exc.strerror or exc)
                return False
            log.error("watch %s: inotify cannot watch %s (%s); polling it every %gs instead%s",
                      watch.name, watch.path, exc.strerror or exc, watch.poll_interval_seconds,
                      inotify_limit_hint(instances=exc.errno == errno.EMFILE))
            self._polled.add(watch.name)
            return self._schedule(watch, root_id)
        self._scheduled[watch.name] = _Scheduled(observer, observed, root_id)
        return True

    def _observer_for(self, watch: Watch) -> BaseObserver:
        if watch.name not in self._polled and self._inotify is not None:
            return self._inotify
        if watch.name not in self._pollers:
            poller = PollingObserver(timeout=watch.poll_interval_seconds)
            poller.start()
            self._pollers[watch.name] = poller
        return self._pollers[watch.name]

    def _unschedule(self, watch_name: str) -> None:
        scheduled = self._scheduled.pop(watch_name, None)
        if scheduled is not None:
            try:
                scheduled.observer.unschedule(scheduled.observed)
            except KeyError:
                pass  # already dropped by watchdog

    def _on_overflow(self) -> None:
        # Called on watchdog's inotify thread: only ask for scans, which run elsewhere.
        with self._lock:
            names = list(self._scheduled)
        for name in names:
            if name not in self._polled:
                log.warning("watch %s: the kernel's inotify queue overflowed and events were"
                            " lost; rescanning", name)
                self._rescan(name, "overflow")


def _is_running(scheduled: _Scheduled) -> bool:
    return any(e.watch == scheduled.observed and e.is_alive()
               for e in scheduled.observer.emitters)


def _identity(path: os.PathLike[str] | str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None


def _unwatched(directories: dict[tuple[int, int], str]) -> list[str]:
    watched = inotify_watched_inodes()
    return [path for dir_id, path in directories.items()
            if dir_id not in watched and _identity(path) == dir_id]


# -- the kernel's inotify limits --------------------------------------------------------------

_MAX_WATCHES_FILES = ("/proc/sys/fs/inotify/max_user_watches",
                      "/proc/sys/user/max_inotify_watches")  # the second: per user namespace


_MAX_INSTANCES_FILES = ("/proc/sys/fs/inotify/max_user_instances",
                        "/proc/sys/user/max_inotify_instances")


def inotify_limit(files: tuple[str, ...] = _MAX_WATCHES_FILES) -> int | None:
    """The lowest of the machine's and this user namespace's limit, if readable."""
    limits = []
    for name in files:
        try:
            with open(name, encoding="ascii") as f:
                limits.append(int(f.read()))
        except (OSError, ValueError):
            continue
    return min(limits, default=None)


def inotify_limit_hint(needed: int | None = None, *, instances: bool = False) -> str:
    """What to raise, as the exact sysctl command."""
    key = "fs.inotify.max_user_instances" if instances else "fs.inotify.max_user_watches"
    limit = inotify_limit(_MAX_INSTANCES_FILES if instances else _MAX_WATCHES_FILES)
    if limit is None:
        return f" (raise {key})"
    wanted = max(2 * limit, 2 * (needed or 0), 128)
    return (f" ({key} is {limit}; raise it with `sysctl -w {key}={wanted}`"
            f" and in /etc/sysctl.d/)")


def inotify_watched_inodes() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every inode this process's inotify instances watch, from
    /proc/self/fdinfo: what the kernel really holds, whatever watchdog believes."""
    watched: set[tuple[int, int]] = set()
    for fd in _inotify_fds():
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("inotify wd:"):
                fields = dict(part.split(":", 1) for part in line.split()[1:] if ":" in part)
                sdev = int(fields["sdev"], 16)  # the kernel's dev_t: major << 20 | minor
                watched.add((os.makedev(sdev >> 20, sdev & 0xFFFFF), int(fields["ino"], 16)))
    return watched


def _inotify_fds() -> Iterable[str]:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                yield fd
        except OSError:
            continue
