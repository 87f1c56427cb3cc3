"""Plain stderr lines: one record is one line, whatever a file name holds."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from scpd import logs


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    captured = io.StringIO()
    monkeypatch.setattr("sys.stderr", captured)
    logs.setup("info", "stderr")
    try:
        yield captured
    finally:
        logging.getLogger().handlers.clear()


def test_a_newline_in_a_file_name_cannot_forge_a_log_line(stderr: io.StringIO) -> None:
    name = "x.csv\n12:00:00 ERROR   target offsite is paused"

    logs.event(logging.INFO, "sent", "sent %s to %s", name, "offsite", path=name)

    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(r"sent x.csv\n12:00:00 ERROR   target offsite is paused to offsite")


def test_terminal_escapes_and_undecodable_bytes_show_as_escapes(stderr: io.StringIO) -> None:
    logging.getLogger("scpd.test").warning("cannot read %s", "\x1b[2Jcaf\udce9")

    assert stderr.getvalue().rstrip("\n").endswith(r"cannot read \x1b[2Jcaf\xe9")


def test_a_traceback_still_follows_on_lines_of_its_own(stderr: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("scpd.test").exception("internal error delivering %s", "a\nb")

    lines = stderr.getvalue().splitlines()
    assert lines[0].endswith(r"internal error delivering a\nb")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"
