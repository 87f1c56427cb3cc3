"""watchdog wiring and the tree scan: both only name candidate paths; settle.py decides.

Watch first, then scan, so that nothing written between the two is missed.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Callable, Iterator

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from scpd.config import Watch

log = logging.getLogger("scpd.watcher")

# Only what can make a file ready. Leaving out IN_OPEN and IN_CLOSE_NOWRITE also keeps the
# daemon's own reads from coming back to it as events.
_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
           FileDeletedEvent, DirCreatedEvent, DirMovedEvent]

# (watch, absolute path, path relative to the watch root, is_closed)
NoteFn = Callable[[Watch, str, str, bool], None]
ForgetFn = Callable[[str, str], None]  # (watch name, absolute path)


class PathFilter:
    """include/exclude of one watch. Excludes apply to every path component (so hidden
    directories are skipped too); include, when given, admits only matching file names."""

    def __init__(self, watch: Watch):
        self.include = watch.include
        self.exclude = watch.exclude

    def admits_dir(self, name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def admits(self, rel_path: str) -> bool:
        parts = rel_path.split("/")
        if not all(self.admits_dir(part) for part in parts):
            return False
        return not self.include or any(fnmatch.fnmatchcase(parts[-1], p) for p in self.include)


def scan(watch: Watch, start_dir: str | None = None) -> Iterator[tuple[str, str]]:
    """Every admitted regular file under the watch (or under one of its directories):
    (absolute path, path relative to the watch root)."""
    path_filter = PathFilter(watch)
    root = os.fspath(watch.path)
    stack = [start_dir or root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            log.warning("cannot list %s: %s; its files are not sent", directory, exc.strerror)
            continue
        for entry in entries:
            rel = os.path.relpath(entry.path, root)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue  # vanished while listing
            if stat.S_ISDIR(mode):
                if watch.recursive and path_filter.admits_dir(entry.name):
                    stack.append(entry.path)
            elif stat.S_ISREG(mode):
                if path_filter.admits(rel):
                    yield entry.path, rel
            elif path_filter.admits(rel):
                log.info("skipping %s: not a regular file (symlinks and special files are not"
                         " sent)", entry.path)


class _Handler(FileSystemEventHandler):
    """Trivial on purpose: an exception escaping a handler kills watchdog's dispatch thread."""

    def __init__(self, watch: Watch, note: NoteFn, forget: ForgetFn):
        self.watch = watch
        self.root = os.fspath(watch.path)
        self.filter = PathFilter(watch)
        self.note = note
        self.forget = forget

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:
            log.exception("error handling %r; the start-up scan will find the file", event)

    def _dispatch(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileDeletedEvent):
            self.forget(self.watch.name, os.fsdecode(event.src_path))
        elif isinstance(event, DirCreatedEvent | DirMovedEvent):
            # Files written into a new directory before its watch existed get no event.
            self._scan_dir(os.fsdecode(event.dest_path or event.src_path))
        elif isinstance(event, FileMovedEvent):
            self.forget(self.watch.name, os.fsdecode(event.src_path))
            self._note(os.fsdecode(event.dest_path), is_closed=True)  # a rename is complete
        else:
            self._note(os.fsdecode(event.src_path), isinstance(event, FileClosedEvent))

    def _note(self, path: str, is_closed: bool) -> None:
        rel = os.path.relpath(path, self.root)
        if rel.startswith("../") or not self.filter.admits(rel):
            return
        if not self.watch.recursive and "/" in rel:
            return
        self.note(self.watch, path, rel, is_closed)

    def _scan_dir(self, directory: str) -> None:
        rel_dir = os.path.relpath(directory, self.root)
        if not self.watch.recursive or not self.filter.admits(rel_dir):
            return
        for path, _ in scan(self.watch, directory):
            self._note(path, is_closed=False)


class Watcher:
    """One watchdog observer for all watches; start() before the scan, stop() at the end."""

    def __init__(self, watches: tuple[Watch, ...], note: NoteFn, forget: ForgetFn):
        self.watches = watches
        self._observer = Observer()
        for watch in watches:
            self._observer.schedule(_Handler(watch, note, forget), os.fspath(watch.path),
                                    recursive=watch.recursive, event_filter=_EVENTS)

    def start(self) -> None:
        self._observer.start()

    def is_alive(self) -> bool:
        return self._observer.is_alive()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
