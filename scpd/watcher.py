"""watchdog wiring: events name candidate paths for the settler, and whatever events cannot
be trusted to tell (lost events, a root that came back) asks for a scan.

Known gaps of inotify and what covers each (research: libraries.md section 3):
- files inside a directory created, copied or moved in, before its watch existed: watchdog
  7.1 walks each new directory once it is watched and reports what it finds (the tests of
  cp -r, tar -x and mv of a tree hold it to that);
- kernel queue overflow (watchdog only logs it): a scan of every inotify watch, once
  watchdog has rebuilt its watches (the canary tells when);
- watches the kernel would not add (max_user_watches; watchdog skips them silently): after
  each full scan, `check_coverage` compares its directories with what inotify holds, and
  a hook on watchdog's add_callback hears of any watch refused later; such a watch is
  scanned, and polled instead;
- a missing, deleted or replaced root: `check_roots`, called about once a second;
- a dead inotify reader thread, which no thread check shows: the canary, a file written in
  scpd's own directory that must come back as an event.

Callbacks from watchdog's threads only leave notes, acted on by check_roots: they may run
while watchdog holds a lock that the main loop, under this module's lock, waits for.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

from scpd import inotify
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

    def _admitted(self, path: str | bytes) -> str | None:
        """Its path relative to the watch root, if the watch sends it."""
        rel = os.path.relpath(os.fsdecode(path), self.watched_root)
        if rel in (".", "..") or rel.startswith("../") or not self.filter.admits(rel):
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
    observed: ObservedWatch  # watchdog shares one emitter among equal ObservedWatch keys
    handler: _Handler
    root_id: tuple[int, int]  # (st_dev, st_ino) of the root when it was scheduled


class _OverflowListener(logging.Handler):
    """watchdog tells of a kernel queue overflow only in a log record: listen for it."""

    def __init__(self, on_overflow: Callable[[], None]):
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg):
            self.on_overflow()


class _Canary(FileSystemEventHandler):
    """Files scpd creates in its own directory, watched by the same inotify instance as the
    watches. watchdog's one reader thread handles events in order, so hearing of a canary
    proves that it lives and has handled everything before it (a rebuild after overflow).
    An overflow may drop a canary like any event: later ones replace it, and the overflow
    record itself, also handled by the reader, is a sign of life."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._numbers = itertools.count(1)
        self._heard = 0
        self._unheard: dict[int, float] = {}  # number -> when sent
        self._sign_of_life_at = time.monotonic()
        self._write_failed = False
        self._condition = threading.Condition()

    def dispatch(self, event: FileSystemEvent) -> None:
        name = os.path.basename(os.fsdecode(event.src_path))
        if name.startswith("canary-") and name[7:].isdigit():
            with self._condition:
                self._heard = max(self._heard, int(name[7:]))
                self._unheard = {n: at for n, at in self._unheard.items() if n > self._heard}
                self._sign_of_life_at = time.monotonic()
                self._condition.notify_all()

    def note_sign_of_life(self) -> None:
        with self._condition:
            self._sign_of_life_at = time.monotonic()

    def send(self) -> int | None:
        """The canary's number; None if it could not be written (a full state disk)."""
        number = next(self._numbers)
        path = self.directory / f"canary-{number}"
        try:
            path.touch()
            path.unlink()
        except OSError as exc:
            if not self._write_failed:  # once, not at every health check
                log.warning("cannot write the inotify canary %s: %s", path,
                            exc.strerror or exc)
            self._write_failed = True
            return None
        self._write_failed = False
        with self._condition:
            self._unheard[number] = time.monotonic()
        return number

    def wait(self, timeout: float) -> bool:
        """Send canaries (again every half second: one may be lost) until one is heard."""
        deadline = time.monotonic() + timeout
        first = self.send()
        if first is None:
            return False
        while (left := deadline - time.monotonic()) > 0:
            with self._condition:
                # Any canary sent since `first` heard: all that came before it is handled.
                if self._condition.wait_for(lambda: self._heard >= first, min(0.5, left)):
                    return True
            if self.send() is None:
                return False
        return False

    def is_stuck(self, deadline_seconds: float) -> bool:
        """A canary has waited longer than the deadline, and the reader showed no sign of
        life meanwhile."""
        now = time.monotonic()
        with self._condition:
            oldest = min(self._unheard.values(), default=None)
            return (oldest is not None and now - oldest > deadline_seconds
                    and now - self._sign_of_life_at > deadline_seconds)


_CANARY_DEADLINE_SECONDS = 10.0  # a reader that has not handled a canary by then is stuck


class Watcher:
    """inotify for every watch (one watchdog Observer), or a PollingObserver per watch that
    polls. start(), then check_roots() about once a second, stop() at the end."""

    def __init__(self, watches: tuple[Watch, ...], note: NoteFn, forget: ForgetFn,
                 rescan: RescanFn, canary_dir: Path):
        self.watches = {watch.name: watch for watch in watches}
        self._note = note
        self._forget = forget
        self._rescan = rescan
        self._canary = _Canary(canary_dir)
        self._inotify: BaseObserver | None = None
        try:
            self._inotify = Observer()
        except OSError as exc:
            log.error("inotify is not available (%s); polling every watch instead%s",
                      exc.strerror or exc, inotify.limit_hint(instances=True))
        self._pollers: dict[str, PollingObserver] = {}
        self._scheduled: dict[str, _Scheduled] = {}
        self._lost: set[str] = set()  # not watched since: scanned once watched again
        self._polled = {watch.name for watch in watches if watch.poll or self._inotify is None}
        self._overflow_listener = _OverflowListener(self._on_overflow)
        self._lock = threading.RLock()  # the main loop and the rescan thread both reschedule
        self._stopped = False
        self._canary_watch: ObservedWatch | None = None
        self._refused_paths: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._overflowed = threading.Event()
        self._hook_watch_refusals()

    def start(self) -> None:
        overflow_logger = logging.getLogger(_OVERFLOW_LOGGER)
        if not overflow_logger.isEnabledFor(logging.WARNING):
            overflow_logger.setLevel(logging.WARNING)  # the overflow record must be made
        overflow_logger.addHandler(self._overflow_listener)
        if self._inotify is not None:
            self._inotify.start()
            self._watch_canary()
        self.check_roots(is_start=True)  # watchdog adds the watches before schedule() returns

    def stop(self) -> None:
        with self._lock:
            self._stopped = True  # a scan finishing late must not reschedule anything
            observers = self._observers()
        logging.getLogger(_OVERFLOW_LOGGER).removeHandler(self._overflow_listener)
        for observer in observers:
            observer.stop()
        for observer in observers:
            if observer.is_alive():
                observer.join(timeout=5)

    def is_alive(self) -> bool:
        """Every observer and emitter thread runs (once roots that went away, which end their
        emitter, are let go), and the inotify reader handles events: for the systemd
        watchdog."""
        self.check_roots()
        with self._lock:
            threads_run = all(o.is_alive() and all(e.is_alive() for e in list(o.emitters))
                              for o in self._observers())
            has_canary = self._canary_watch is not None
        if not has_canary:
            return threads_run
        is_stuck = self._canary.is_stuck(_CANARY_DEADLINE_SECONDS)
        self._canary.send()  # heard by the next check, or the reader is stuck
        return threads_run and not is_stuck

    def wait_for_events_so_far(self, timeout: float = 60.0) -> bool:
        """Until inotify's reader has handled every event queued before this call (then a
        scan cannot race watchdog rebuilding its watches after an overflow)."""
        with self._lock:
            has_canary = self._canary_watch is not None
        if not has_canary:
            return True  # no inotify, or no watch left for the canary: nothing to wait for
        return self._canary.wait(timeout)

    def _watch_canary(self) -> None:
        """(Re)schedule the canary's directory on the inotify observer; without a watch for
        it, health comes from the threads alone."""
        assert self._inotify is not None
        try:
            self._canary.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._canary_watch = self._inotify.schedule(
                self._canary, str(self._canary.directory), event_filter=[FileCreatedEvent])
        except OSError as exc:
            log.error("cannot watch %s, scpd's inotify canary (%s); the watchdog ping then"
                      " relies on threads alone%s", self._canary.directory,
                      exc.strerror or exc, inotify.limit_hint())
            self._canary_watch = None

    def check_roots(self, *, is_start: bool = False) -> None:
        """(Re)watch every root that exists now; let go of those that vanished or were
        replaced. A root that comes back is scanned: its files got no events."""
        with self._lock:
            if self._stopped:
                return
            self._let_go_of_stale_roots()
            self._watch_present_roots(is_start)
            self._rescan_where_watches_were_refused()
            self._rescan_after_overflow()
            if self._canary_watch is not None and self._inotify.is_alive() and not any(
                    e.watch == self._canary_watch and e.is_alive()
                    for e in list(self._inotify.emitters)):
                # Its directory was removed (which ends the emitter): make it again.
                with contextlib.suppress(KeyError):
                    self._inotify.unschedule(self._canary_watch)
                self._watch_canary()

    def _let_go_of_stale_roots(self) -> None:
        # All are let go before any is scheduled again: two watches of one directory share
        # an emitter, and a new one must not pass for the other's old one.
        for name, scheduled in list(self._scheduled.items()):
            root_id = _identity(self.watches[name].path)
            # A root deleted and made again may get the same inode number back; its watch
            # died with the old one (watchdog ends that emitter), so that is checked too.
            if root_id == scheduled.root_id and _is_running(scheduled):
                continue
            if root_id is None:
                log.warning("watch %s: %s was removed; watching it again when it is back",
                            name, self.watches[name].path)
            self._unschedule(name)
            self._lost.add(name)

    def _watch_present_roots(self, is_start: bool) -> None:
        for watch in self.watches.values():
            if watch.name in self._scheduled:
                continue
            root_id = _identity(watch.path)
            if root_id is None:
                if is_start:
                    log.warning("watch %s: %s does not exist; watching it when it appears",
                                watch.name, watch.path)
                self._lost.add(watch.name)
                continue
            if not self._schedule(watch, root_id):
                self._lost.add(watch.name)
                continue
            if watch.name in self._lost and not is_start:
                log.info("watch %s: %s is there; watching it", watch.name, watch.path)
                self._rescan(watch.name, "appeared")
            self._lost.discard(watch.name)

    def check_coverage(self, watch_name: str, directories: dict[tuple[int, int], str]) -> None:
        """After a full scan of a watch: if inotify holds no watch on some of its directories
        (the kernel's limit ran out; watchdog skips those silently), poll the watch instead."""
        with self._lock:
            if self._stopped or watch_name in self._polled or watch_name not in self._scheduled:
                return
        unwatched = _unwatched(directories)
        if unwatched:
            # A directory made during the scan, or an overflow's rebuild, may be getting its
            # watch now: look again once watchdog has handled what happened so far.
            self.wait_for_events_so_far(timeout=10)
            time.sleep(0.2)
            unwatched = _unwatched(directories)
        if not unwatched:
            return
        watch = self.watches[watch_name]
        log.error("watch %s: inotify watches only %d of its %d directories (for example not"
                  " %s); polling it every %gs instead%s", watch_name,
                  len(directories) - len(unwatched), len(directories), unwatched[0],
                  watch.poll_interval_seconds, inotify.limit_hint(len(directories)))
        with self._lock:
            if self._stopped:
                return
            self._polled.add(watch_name)
            self._unschedule(watch_name)
            self._watch_present_roots(is_start=False)
        self._rescan(watch_name, "unwatched directories")

    def _hook_watch_refusals(self) -> None:
        """watchdog swallows the error of a watch the kernel refuses (max_user_watches
        reached) for any directory but a root, and the directory then gets no events at
        all. Hear of it where it happens, on watchdog's inotify reader (watchdog is pinned
        below 8; if it changes this, the coverage check after each full scan remains)."""
        reader = getattr(self._inotify, "_inotify_fd", None)
        add_callback = getattr(reader, "add_callback", None)
        if add_callback is None:
            log.debug("cannot hook watchdog's add_callback; relying on the coverage checks")
            return

        def add_callback_or_say_why_not(path: bytes, *args, **kwargs):
            try:
                return add_callback(path, *args, **kwargs)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._on_watch_refused(os.fsdecode(path))
                raise

        reader.add_callback = add_callback_or_say_why_not

    def _on_watch_refused(self, path: str) -> None:
        # On watchdog's reader thread, which may hold the lock of a watch group the main loop
        # is unscheduling under self._lock: taking self._lock here could deadlock. Leave a
        # note for check_roots, within the second.
        self._refused_paths.put(path)

    def _rescan_where_watches_were_refused(self) -> None:
        """The scans that follow refused watches; their coverage check polls the watch."""
        names: set[str] = set()
        while not self._refused_paths.empty():
            path = self._refused_paths.get_nowait() + "/"
            names.update(name for name, scheduled in self._scheduled.items()
                         if name not in self._polled
                         and path.startswith(scheduled.handler.watched_root.rstrip("/") + "/"))
        for name in names:
            self._rescan(name, "inotify watch limit")

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
                      inotify.limit_hint(instances=exc.errno == errno.EMFILE))
            self._polled.add(watch.name)
            return self._schedule(watch, root_id)
        self._scheduled[watch.name] = _Scheduled(observer, observed, handler, root_id)
        return True

    def _observer_for(self, watch: Watch) -> BaseObserver:
        if watch.name not in self._polled and self._inotify is not None:
            return self._inotify
        if watch.name not in self._pollers:
            poller = PollingObserver(timeout=watch.poll_interval_seconds)
            poller.start()
            self._pollers[watch.name] = poller
        return self._pollers[watch.name]

    def _sharing(self, scheduled: _Scheduled) -> list[str]:
        """Our watches on the same watchdog emitter (two watches of one directory)."""
        return [name for name, other in self._scheduled.items()
                if other.observer is scheduled.observer and other.observed == scheduled.observed]

    def _unschedule(self, watch_name: str) -> None:
        scheduled = self._scheduled.pop(watch_name, None)
        if scheduled is None:
            return
        try:
            if self._sharing(scheduled):  # the emitter still serves another watch
                scheduled.observer.remove_handler_for_watch(scheduled.handler,
                                                            scheduled.observed)
            else:
                scheduled.observer.unschedule(scheduled.observed)
        except KeyError:
            pass  # already dropped by watchdog

    def _observers(self) -> list[BaseObserver]:
        return [o for o in (self._inotify, *self._pollers.values()) if o is not None]

    def _on_overflow(self) -> None:
        # On watchdog's reader thread, before it rebuilds its watches: like any callback from
        # there, only leave a note (see _on_watch_refused); check_roots asks for the scans,
        # which wait for the rebuild (wait_for_events_so_far).
        self._canary.note_sign_of_life()
        self._overflowed.set()

    def _rescan_after_overflow(self) -> None:
        if not self._overflowed.is_set():
            return
        self._overflowed.clear()
        for name in self._scheduled:
            if name not in self._polled:
                log.warning("watch %s: the kernel's inotify queue overflowed and events were"
                            " lost; rescanning", name)
                self._rescan(name, "overflow")


def _is_running(scheduled: _Scheduled) -> bool:
    return any(e.watch == scheduled.observed and e.is_alive()
               for e in list(scheduled.observer.emitters))


def _identity(path: os.PathLike[str] | str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _unwatched(directories: dict[tuple[int, int], str]) -> list[str]:
    watched = inotify.watched_inodes()
    return [path for dir_id, path in directories.items()
            if dir_id[1] not in watched and _identity(path) == dir_id]
