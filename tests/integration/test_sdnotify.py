"""The running daemon speaks sd_notify as a Type=notify, NotifyAccess=main service must.

A datagram socket stands in for systemd's notify socket. SO_PASSCRED gives the sender's pid
with every message, so the tests also check what NotifyAccess=main checks: each message
comes from the daemon's main process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import DaemonProcess, Setup, make_file, write_config

from tools.sshd import ThrowawaySshd

START_SECONDS = 20.0  # imports and the first scan; READY=1 usually comes in well under 2 s
WATCHDOG_USEC = 1_000_000  # so a ping is due every 0.5 s
STOP_SECONDS = 10.0  # DESIGN 5 and TimeoutStopSec=10s in the unit


@dataclass(frozen=True)
class Notification:
    pid: int | None
    fields: dict[str, str]
    received_at: float  # time.monotonic()


class NotifyListener:
    """What systemd's notify socket receives, message by message."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
        self.directory = tempfile.mkdtemp(prefix="scpd-notify-")
        self.path = os.path.join(self.directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[Notification] = []

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.directory)

    def receive(self, timeout_seconds: float) -> Notification | None:
        self.sock.settimeout(max(timeout_seconds, 0.001))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = next((struct.unpack("3i", payload)[0] for level, kind, payload in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        notification = Notification(pid, fields, time.monotonic())
        self.received.append(notification)
        return notification

    def wait_for(self, is_wanted: Callable[[Notification], bool], timeout_seconds: float,
                 what: str) -> Notification:
        deadline = time.monotonic() + timeout_seconds
        while (left := deadline - time.monotonic()) > 0:
            notification = self.receive(left)
            if notification is not None and is_wanted(notification):
                return notification
        raise AssertionError(f"no {what} within {timeout_seconds}s; received: "
                             f"{[n.fields for n in self.received]}")

    def collect(self, seconds: float) -> list[Notification]:
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            if (notification := self.receive(left)) is not None:
                got.append(notification)
        return got


def has(key: str, value: str | None = None) -> Callable[[Notification], bool]:
    return lambda n: key in n.fields and (value is None or n.fields[key] == value)


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    notify = NotifyListener()
    try:
        yield notify
    finally:
        notify.close()


@contextmanager
def running_daemon(setup: Setup, listener: NotifyListener, **env: str
                   ) -> Iterator[DaemonProcess]:
    """`scpd run` under a stand-in systemd, up to its READY=1; always gone afterwards."""
    daemon = setup.start_daemon(env={"NOTIFY_SOCKET": listener.path,
                                     "WATCHDOG_USEC": str(WATCHDOG_USEC), **env})
    try:
        try:
            listener.wait_for(has("READY", "1"), START_SECONDS, "READY=1")
        except AssertionError as exc:
            daemon.stop(signal.SIGKILL)
            raise AssertionError(f"{exc}\nscpd stderr:\n{daemon.log()}") from None
        yield daemon
    finally:
        daemon.stop(signal.SIGKILL)  # a no-op when it has exited already


def assert_all_from(daemon: DaemonProcess, listener: NotifyListener) -> None:
    senders = {n.pid for n in listener.received}
    assert senders == {daemon.pid}, f"senders {senders}, daemon pid {daemon.pid}"


def test_daemon_sends_ready_with_status_then_watchdog_pings(
        setup: Setup, listener: NotifyListener) -> None:
    with running_daemon(setup, listener) as daemon:
        ready = next(n for n in listener.received if has("READY", "1")(n))
        if "STATUS" in ready.fields:
            status = ready
        else:
            status = listener.wait_for(has("STATUS"), 1.0, "STATUS= within 1 s of READY=1")
        later = listener.collect(2.2)

    assert status.received_at - ready.received_at <= 1.0
    # DESIGN 5: the status line says what is queued, what is sending, and the rate.
    assert re.fullmatch(r"\d+ queued, \d+ sending [\d.]+ [kM]B/s, \d+ failed",
                        status.fields["STATUS"]), status.fields["STATUS"]
    pings = [n for n in later if has("WATCHDOG", "1")(n)]
    assert len(pings) >= 2, [n.fields for n in later]
    assert_all_from(daemon, listener)


def test_status_names_the_file_in_progress_its_percent_and_the_rate(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        listener: NotifyListener) -> None:
    # A 3 MB file under a 1 MB/s cap takes three seconds: long enough for several updates.
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir,
                         target_extra='bandwidth_limit = "1MB/s"')
    with running_daemon(setup, listener):
        make_file(setup.watch_dir / "report.pdf", 3_000_000)
        # Received as sent (not queued up meanwhile), so that their spacing can be checked.
        deadline = time.monotonic() + 15
        while not (remote_dir / "report.pdf").exists() and time.monotonic() < deadline:
            listener.collect(0.1)
        assert (remote_dir / "report.pdf").exists(), "report.pdf did not land within 15 s"
        listener.collect(1.5)  # the line after the transfer

    lines = [n.fields["STATUS"] for n in listener.received if "STATUS" in n.fields]
    progress = [re.fullmatch(r"0 queued, 1 sending report\.pdf (\d+)% ([\d.]+) MB/s, 0 failed",
                             line) for line in lines]
    percents = [int(match[1]) for match in progress if match]
    assert len(percents) >= 2 and percents == sorted(percents), lines
    rates = [float(match[2]) for match in progress if match and int(match[1]) > 0]
    assert rates and all(0.5 <= rate <= 1.3 for rate in rates[1:]), lines  # after the first
    assert re.fullmatch(r"0 queued, 0 sending [\d.]+ [kM]B/s, 0 failed", lines[-1]), lines
    updates = [n.received_at for n in listener.received if "STATUS" in n.fields]
    assert all(b - a >= 0.9 for a, b in pairwise(updates[1:])), updates  # at most 1/s


def test_daemon_sends_reloading_then_ready_on_sighup_and_keeps_pinging(
        setup: Setup, listener: NotifyListener) -> None:
    with running_daemon(setup, listener) as daemon:
        daemon.process.send_signal(signal.SIGHUP)
        listener.wait_for(has("RELOADING", "1"), 10.0, "RELOADING=1 after SIGHUP")
        listener.wait_for(has("READY", "1"), 10.0, "READY=1 after RELOADING=1")
        listener.wait_for(has("WATCHDOG", "1"), 2.0, "WATCHDOG=1 after the reload")
        assert daemon.process.poll() is None, f"scpd exited on SIGHUP:\n{daemon.log()}"

    assert_all_from(daemon, listener)


def test_daemon_sends_stopping_on_sigterm_and_exits_0_within_10_seconds(
        setup: Setup, listener: NotifyListener) -> None:
    with running_daemon(setup, listener) as daemon:
        signalled_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        listener.wait_for(has("STOPPING", "1"), STOP_SECONDS, "STOPPING=1")
        try:
            returncode = daemon.process.wait(
                max(0.0, STOP_SECONDS - (time.monotonic() - signalled_at)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"scpd still running {STOP_SECONDS}s after SIGTERM:\n{daemon.log()}")

    assert returncode == 0, daemon.log()
    assert_all_from(daemon, listener)


def test_daemon_sends_no_watchdog_pings_meant_for_another_process(
        setup: Setup, listener: NotifyListener) -> None:
    # systemd sets WATCHDOG_PID to the main pid; a child that inherited the variables,
    # or a process started by one, must not ping on the service's behalf.
    with running_daemon(setup, listener, WATCHDOG_PID="1"):
        listener.collect(1.5)

    received = [n.fields for n in listener.received]
    assert not [fields for fields in received if "WATCHDOG" in fields], received
