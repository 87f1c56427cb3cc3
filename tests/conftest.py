"""Fixtures shared by every test, and guards against leaked threads and processes.

Fixtures:
    sshd         session-wide ThrowawaySshd on 127.0.0.1 (tools/sshd.py), stopped at the end
    known_hosts  a known_hosts file holding that sshd's host key line
    remote_dir   a fresh directory per test, on this machine, reachable through that sshd

Every test also runs under two guards. A test fails (as an error in teardown) if, about two
seconds after it ends, it has left behind a non-daemon thread or a child process it started.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.sshd import ThrowawaySshd

GRACE_SECONDS = 2.0

# The session sshd is a child of this process that outlives every test; the process guard
# must not count it. A test may restart it, so the guard asks for its pid each time.
_session_sshd: ThrowawaySshd | None = None


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    global _session_sshd
    server = ThrowawaySshd(tmp_path_factory.mktemp("sshd"))
    _session_sshd = server
    try:
        yield server.start()
    finally:
        server.stop()
        _session_sshd = None


@pytest.fixture
def known_hosts(sshd: ThrowawaySshd, tmp_path: Path) -> Path:
    return sshd.write_known_hosts(tmp_path / "known_hosts")


@pytest.fixture
def remote_dir(tmp_path: Path) -> Path:
    # sshd runs on this machine as this user, so any directory we can write, it serves.
    path = tmp_path / "remote"
    path.mkdir()
    return path


# -- guards ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + GRACE_SECONDS
    for thread in threading.enumerate():
        if thread not in before:
            thread.join(max(0.0, deadline - time.monotonic()))
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    daemons = [t.name for t in left if t.daemon]
    if daemons:
        # Daemon threads (paramiko transports, watchdog observers) do not block interpreter
        # exit, so they only warn; a leaked one still usually means a missing close().
        warnings.warn(f"test left daemon threads running: {daemons}", stacklevel=1)
    if non_daemons := [t.name for t in left if not t.daemon]:
        pytest.fail(f"test left non-daemon threads running: {non_daemons}", pytrace=False)


@pytest.fixture(autouse=True)
def _no_leaked_child_processes() -> Iterator[None]:
    before = set(_live_children())
    yield
    deadline = time.monotonic() + GRACE_SECONDS
    while (left := _leaked_children(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        for pid in left:  # so that one leak does not linger into the rest of the session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shown = ", ".join(f"{pid} ({command})" for pid, command in left.items())
        pytest.fail(f"test left child processes running (now killed): {shown}", pytrace=False)


def _leaked_children(before: set[int]) -> dict[int, str]:
    session_pid = _session_sshd.pid if _session_sshd is not None else None
    return {
        pid: command
        for pid, command in _live_children().items()
        if pid not in before and pid != session_pid
    }


def _live_children() -> dict[int, str]:
    """Child processes of this one that have not exited, by pid, with their command line.

    Zombies (exited, not yet reaped) do not count: they hold no resources a test cares about.
    """
    me = os.getpid()
    children = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses; the rest follows the last ')'.
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) != me or state == "Z":
            continue
        try:
            command = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        children[int(entry.name)] = command.replace(b"\0", b" ").decode(errors="replace").strip()
    return children
