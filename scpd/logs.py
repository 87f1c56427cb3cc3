"""Logging: journald with SCPD_* fields under systemd, plain lines on stderr elsewhere."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("scpd")


class _StderrFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")


def setup(*, verbose: bool = False) -> None:
    """Route scpd's records. Under systemd (JOURNAL_STREAM set) they go to journald with
    structured fields; a journald that is not there would drop them silently, so the journal
    is used only when systemd says stderr is connected to it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.environ.get("JOURNAL_STREAM"):
        from systemd.journal import JournalHandler

        handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="scpd")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    # paramiko logs every failed handshake with a traceback; scpd logs its own sorted error.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL + 1)


def event(level: int, name: str, message: str, *args: object, **fields: object) -> None:
    """Log one delivery event with its SCPD_* journal fields (SCPD_EVENT = name).

    fields: watch, target, path, remote_path, bytes, duration_ms, attempt, error.
    """
    extra = {"SCPD_EVENT": name}
    for key, value in fields.items():
        if value is not None:
            extra[f"SCPD_{key.upper()}"] = value
    logging.getLogger(f"scpd.{name}").log(level, message, *args, extra=extra)
