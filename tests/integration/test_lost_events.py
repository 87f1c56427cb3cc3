"""When inotify cannot be trusted to tell, a scan does: kernel queue overflow, watches the
kernel would not add, a queue that forgot a file, and watches that poll instead."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import DaemonProcess, Setup, sha256, wait_until, write_config

from tools.sshd import ThrowawaySshd, free_port


def overflow_file_count() -> int:
    """Enough files to overflow the kernel's inotify queue: each makes three events (create,
    modify, close_write); the queue holds max_queued_events (16384 by default)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 60_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to overflow it")
    return limit // 3 + 2000


@contextmanager
def running(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    try:
        if not daemon.wait_for_log("scpd ready", 20):
            pytest.fail(f"scpd did not start:\n{daemon.log()}")
        yield daemon
    finally:
        daemon.stop()


def queued_paths(setup: Setup) -> set[str]:
    with sqlite3.connect(setup.state_dir / "queue.sqlite3", timeout=10) as db:
        return {os.fsdecode(row[0]) for row in db.execute("SELECT rel_path FROM jobs")}


def test_a_kernel_queue_overflow_is_followed_by_a_scan_that_misses_nothing(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    # The target refuses connections: nothing is sent, so the queue shows what was noticed.
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir, port=free_port())
    count = overflow_file_count()
    with running(setup.start_daemon()) as daemon:
        daemon.process.send_signal(signal.SIGSTOP)  # its inotify reader stops reading
        try:
            for i in range(count):
                (setup.watch_dir / f"f{i:05d}.csv").write_bytes(b"x" * 100)
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        expected = {f"f{i:05d}.csv" for i in range(count)}

        assert wait_until(lambda: queued_paths(setup) >= expected, 30), (
            f"{len(expected - queued_paths(setup))} files never queued\n{daemon.log()[-3000:]}")
    assert "inotify queue overflowed and events were lost; rescanning" in daemon.log()
    assert "overflow scan of watch outbox" in daemon.log()


def test_directories_inotify_cannot_watch_make_the_watch_poll_with_the_sysctl_named(
        setup: Setup):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    for i in range(40):
        (setup.watch_dir / f"d{i:02d}" / "sub").mkdir(parents=True)
    edit_watch(setup, 'poll_interval = "200ms"')
    # The watch limit is per user namespace: lower this one's, not the machine's. 81
    # directories against a limit of 30: watchdog leaves the rest unwatched, silently.
    script = 'echo 30 > /proc/sys/user/max_inotify_watches && exec "$@"'
    daemon = DaemonProcess(["unshare", "-U", "-r", "sh", "-c", script, "sh", sys.executable,
                            "-m", "scpd", "run", "-c", str(setup.config)])
    with running(daemon):
        assert daemon.wait_for_log("polling it every 0.2s instead", 20), daemon.log()
        deep = setup.watch_dir / "d39" / "sub" / "late.csv"
        deep.write_bytes(os.urandom(1000))

        assert wait_until(lambda: (setup.remote_dir / "d39/sub/late.csv").exists(), 20), \
            daemon.log()
    assert sha256(setup.remote_dir / "d39/sub/late.csv") == sha256(deep)
    assert "inotify watches only" in daemon.log()
    assert "sysctl -w fs.inotify.max_user_watches=" in daemon.log()


def test_the_periodic_scan_queues_a_file_the_queue_forgot(setup: Setup):
    edit_watch(setup, 'rescan_interval = "1s"')
    report = setup.watch_dir / "report.csv"
    report.write_bytes(os.urandom(2000))
    with running(setup.start_daemon()) as daemon:
        remote = setup.remote_dir / "report.csv"
        assert wait_until(remote.exists, 20), daemon.log()
        remote.unlink()
        with sqlite3.connect(setup.state_dir / "queue.sqlite3", timeout=10) as db:
            db.execute("DELETE FROM jobs")  # as if its event had never come

        assert wait_until(remote.exists, 20), daemon.log()
    assert sha256(remote) == sha256(report)
    assert "periodic scan of watch outbox" in daemon.log()


def test_a_polled_watch_delivers_new_and_changed_files(setup: Setup):
    edit_watch(setup, 'poll = true\npoll_interval = "200ms"')
    with running(setup.start_daemon()) as daemon:
        nested = setup.watch_dir / "2026" / "11" / "report.csv"
        nested.parent.mkdir(parents=True)
        nested.write_bytes(b"first version\n")
        remote = setup.remote_dir / "2026/11/report.csv"
        assert wait_until(lambda: remote.exists() and sha256(remote) == sha256(nested), 20), \
            daemon.log()

        with nested.open("ab") as f:
            f.write(b"appended\n")

        assert wait_until(lambda: sha256(remote) == sha256(nested), 20), daemon.log()


def edit_watch(setup: Setup, lines: str) -> None:
    text = setup.config.read_text()
    setup.config.write_text(text.replace('settle = "300ms"', f'settle = "300ms"\n{lines}'))
