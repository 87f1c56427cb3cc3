"""sd_notify over $NOTIFY_SOCKET (stdlib only), and the watchdog ping interval."""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one notification ("READY=1", "STATUS=...", ...). False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False  # the manager went away; nothing useful to do about it here
    return True


def watchdog_interval_seconds() -> float | None:
    """Half of WATCHDOG_USEC when systemd asks this process for watchdog pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
