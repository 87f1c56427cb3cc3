"""When inotify cannot be trusted to tell, a scan does: kernel queue overflow, watches the
kernel would not add, a queue that forgot a file, and watches that poll instead."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import sys
import time
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


def test_files_written_while_watchdog_rebuilds_its_watches_after_an_overflow_are_queued(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    # After an overflow watchdog removes and re-adds the watch of every directory; a scan
    # running meanwhile lists directories not yet watched again, and a file written into
    # one of them then gets neither an event nor a scan. So the scan waits for the rebuild.
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir, port=free_port())
    directories = [setup.watch_dir / f"a{i:03d}" / f"b{j:02d}"
                   for i in range(100) for j in range(40)]
    for directory in directories:
        directory.mkdir(parents=True)
    (setup.watch_dir / "flood").mkdir()
    count = overflow_file_count()
    expected = {f"flood/f{i:05d}.csv" for i in range(count)}
    with running(setup.start_daemon()) as daemon:
        daemon.process.send_signal(signal.SIGSTOP)
        try:
            for i in range(count):
                (setup.watch_dir / "flood" / f"f{i:05d}.csv").write_bytes(b"x")
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        # While the rebuild runs, and after: bottom-up, against its order.
        deadline = time.monotonic() + 4
        for late in (f"late{n}.csv" for n in range(100)):
            for directory in reversed(directories):
                if time.monotonic() > deadline:
                    break
                (directory / late).write_bytes(b"y")
                expected.add(f"{directory.relative_to(setup.watch_dir)}/{late}")
                time.sleep(0.0005)

        assert wait_until(lambda: queued_paths(setup) >= expected, 30), (
            f"never queued: {sorted(expected - queued_paths(setup))[:5]}\n{daemon.log()[-3000:]}")
    assert "overflow scan of watch outbox" in daemon.log()


def test_directories_inotify_cannot_watch_make_the_watch_poll_with_the_sysctl_named(
        setup: Setup):
    for i in range(40):
        (setup.watch_dir / f"d{i:02d}" / "sub").mkdir(parents=True)
    # 81 directories against a limit of 30: watchdog leaves the rest unwatched, silently.
    with running(daemon_with_watch_limit(setup, 30)) as daemon:
        assert daemon.wait_for_log("polling it every 0.2s instead", 20), daemon.log()
        deep = setup.watch_dir / "d39" / "sub" / "late.csv"
        deep.write_bytes(os.urandom(1000))

        assert wait_until(lambda: (setup.remote_dir / "d39/sub/late.csv").exists(), 20), \
            daemon.log()
    assert sha256(setup.remote_dir / "d39/sub/late.csv") == sha256(deep)
    assert "inotify watches only" in daemon.log()
    assert "sysctl -w fs.inotify.max_user_watches=" in daemon.log()


def test_the_watch_limit_running_out_later_is_noticed_and_the_watch_polled(setup: Setup):
    for i in range(10):
        (setup.watch_dir / f"d{i:02d}").mkdir()
    with running(daemon_with_watch_limit(setup, 30)) as daemon:
        assert daemon.wait_for_log("start-up scan of watch outbox", 20), daemon.log()
        for i in range(10, 50):  # 51 directories now, against 30 watches: no event, no error
            (setup.watch_dir / f"d{i:02d}").mkdir()
        late = setup.watch_dir / "d49" / "late.csv"
        late.write_bytes(os.urandom(1000))

        assert wait_until(lambda: (setup.remote_dir / "d49/late.csv").exists(), 20), \
            daemon.log()
    assert "inotify watch limit scan of watch outbox" in daemon.log()
    assert "polling it every 0.2s instead" in daemon.log()


def test_reloads_during_a_long_scan_leave_no_stray_watcher_behind(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    # A scan still running when SIGHUP replaces the watcher must not act on the old one
    # (it once started a poller nobody stopped, which later queued files of a watch the
    # config no longer had, and the daemon died).
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir, port=free_port())
    an_hour_ago = time.time() - 3600  # ready on sight: the scan queues them, slowly
    for d in range(300):
        directory = setup.watch_dir / f"d{d:03d}"
        directory.mkdir()
        for f in range(100):
            (directory / f"f{f:03d}.csv").write_bytes(b"x")
            os.utime(directory / f"f{f:03d}.csv", (an_hour_ago, an_hour_ago))
    # -v: a debug line per file queued makes the scan last long enough to be cut.
    daemon = DaemonProcess([sys.executable, "-m", "scpd", "-v", "run", "-c", str(setup.config)])
    with running(daemon):
        threads_before = len(os.listdir(f"/proc/{daemon.pid}/task"))
        for reloads, name in enumerate(("renamed", "renamed-again"), start=1):
            text = setup.config.read_text()
            setup.config.write_text(re.sub(r'name = "[^"]*"\npath', f'name = "{name}"\npath',
                                           text))
            daemon.process.send_signal(signal.SIGHUP)  # while the start-up scan runs
            assert wait_until(lambda n=reloads: daemon.log().count("config reloaded") == n,
                              30), daemon.log()
        assert daemon.wait_for_log("start-up scan of watch renamed-again", 30), daemon.log()
        (setup.watch_dir / "after.csv").write_bytes(b"after the reloads")

        assert wait_until(lambda: "after.csv" in queued_paths(setup), 20), daemon.log()
        assert daemon.process.poll() is None
        assert len(os.listdir(f"/proc/{daemon.pid}/task")) <= threads_before
    assert "inotify watches only" not in daemon.log()
    assert "Traceback" not in daemon.log()


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


def daemon_with_watch_limit(setup: Setup, max_watches: int) -> DaemonProcess:
    """scpd in a user namespace of its own, whose inotify watch limit is lowered (the limit is
    per user namespace: the machine's is left alone); its polled watches poll every 200 ms."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    edit_watch(setup, 'poll_interval = "200ms"')
    script = f'echo {max_watches} > /proc/sys/user/max_inotify_watches && exec "$@"'
    return DaemonProcess(["unshare", "-U", "-r", "sh", "-c", script, "sh", sys.executable,
                          "-m", "scpd", "run", "-c", str(setup.config)])


def edit_watch(setup: Setup, lines: str) -> None:
    text = setup.config.read_text()
    setup.config.write_text(text.replace('settle = "300ms"', f'settle = "300ms"\n{lines}'))
