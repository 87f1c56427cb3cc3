"""Logging: journald with SCPD_* fields under systemd, plain lines on stderr elsewhere."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("scpd")

# Stable journal message IDs, so that operators can ask for exactly these events:
# journalctl MESSAGE_ID=<id>. Never change them: scripts and alerts depend on them.
MESSAGE_IDS = {
    "sent": "3b5858a5fe5f416c8958130dc8c7ec7c",    # a file delivered to a target
    "failed": "86f271290943418982e2d62a2c3c9dce",  # a delivery failed for good
}


class _StderrFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: a file named "x\n12:00:00 INFO sent ..." must not forge a
        # line of its own. (A traceback is added after this, on lines of its own.)
        record.message = printable(record.message)
        return super().formatMessage(record)


def setup(level: str = "info", target: str = "auto") -> None:
    """Route scpd's records at `level` (debug, info, warning, error). target "auto": to
    journald with structured fields under systemd, else plain lines on stderr. Under systemd
    means JOURNAL_STREAM is set: a journald that is not there would drop records silently,
    so the journal is used only when systemd says stderr is connected to it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if target == "journal" or (target == "auto" and os.environ.get("JOURNAL_STREAM")):
        handler: logging.Handler = _journal_handler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(getattr(logging, level.upper()))
    # paramiko logs every failed handshake with a traceback; scpd logs its own sorted error.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL + 1)


def _journal_handler() -> logging.Handler:
    from systemd.journal import JournalHandler

    class _BytesSafeJournalHandler(JournalHandler):
        """File names are bytes, and not all are UTF-8 (Python holds them with surrogate
        escapes), but systemd-python encodes strictly: such a record would be lost with a
        traceback. Fields go to journald as the raw bytes; the message shows \\x escapes."""

        def emit(self, record: logging.LogRecord) -> None:
            record.msg = printable(record.getMessage())
            record.args = None
            for key, value in list(vars(record).items()):
                if key.startswith("SCPD_") and isinstance(value, str) and not _is_utf8(value):
                    setattr(record, key, os.fsencode(value))
            super().emit(record)

    return _BytesSafeJournalHandler(SYSLOG_IDENTIFIER="scpd")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """Text as one line of valid UTF-8 that drives no terminal: bytes that are not UTF-8 (file
    names) and every unprintable character (controls C0 and C1, line and paragraph
    separators, bidirectional overrides) show as backslash escapes: \\n, \\x1b, \\u202e."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def human_bytes(n: float) -> str:
    """"512 B", "1.2 GiB": sizes in log lines and on the command line."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def event(level: int, name: str, message: str, *args: object, **fields: object) -> None:
    """Log one delivery event with its SCPD_* journal fields (SCPD_EVENT = name).

    fields: watch, target, path, remote_path, bytes, duration_ms, attempt, error.
    """
    logger = logging.getLogger(f"scpd.{name}")
    if not logger.isEnabledFor(level):
        return  # a scan may queue 100,000 files: skip building fields nobody reads
    extra = {"SCPD_EVENT": name}
    if name in MESSAGE_IDS:
        extra["MESSAGE_ID"] = MESSAGE_IDS[name]
    for key, value in fields.items():
        if value is not None:
            extra[f"SCPD_{key.upper()}"] = value
    logger.log(level, message, *args, extra=extra)
