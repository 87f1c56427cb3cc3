"""What the kernel says about inotify, read where it tells the truth: its limits under
/proc/sys, and the watches this process really holds under /proc/self/fdinfo (watchdog skips
directories it could not watch without a word)."""

from __future__ import annotations

import os
from collections.abc import Iterable

_MAX_WATCHES_FILES = ("/proc/sys/fs/inotify/max_user_watches",
                      "/proc/sys/user/max_inotify_watches")  # the second: per user namespace
_MAX_INSTANCES_FILES = ("/proc/sys/fs/inotify/max_user_instances",
                        "/proc/sys/user/max_inotify_instances")


def limit(*, instances: bool = False) -> int | None:
    """The lower of the machine's and this user namespace's limit, if readable."""
    values = []
    for name in _MAX_INSTANCES_FILES if instances else _MAX_WATCHES_FILES:
        try:
            with open(name, encoding="ascii") as f:
                values.append(int(f.read()))
        except (OSError, ValueError):
            continue
    return min(values, default=None)


def limit_hint(needed: int | None = None, *, instances: bool = False) -> str:
    """What to raise, as the exact sysctl command."""
    key = "fs.inotify.max_user_instances" if instances else "fs.inotify.max_user_watches"
    current = limit(instances=instances)
    if current is None:
        return f" (raise {key})"
    wanted = max(2 * current, 2 * (needed or 0), 128)
    return f" ({key} is {current}; raise it with `sysctl -w {key}={wanted}` and in /etc/sysctl.d/)"


def watched_inodes() -> set[int]:
    """Inode numbers of every directory this process's inotify instances watch.

    Inode numbers only: the device fdinfo names is the kernel's superblock device, which on
    btrfs differs from the st_dev that stat reports. (Two watched file systems sharing an
    inode number could hide one missing watch; a missing watch is never invented.)
    """
    watched: set[int] = set()
    for fd in _inotify_fds():
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("inotify wd:"):
                for part in line.split():
                    if part.startswith("ino:"):
                        watched.add(int(part[4:], 16))
    return watched


def _inotify_fds() -> Iterable[str]:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                yield fd
        except OSError:
            continue
