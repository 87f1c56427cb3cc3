"""The inotify canary: proof that watchdog's reader handles events, robust to a canary lost in
a kernel queue overflow (here, events are handed to it by the test, not by inotify)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from watchdog.events import FileCreatedEvent

from scpd.watcher import _Canary


def hear(canary: _Canary, number: int) -> None:
    canary.dispatch(FileCreatedEvent(str(canary.directory / f"canary-{number}")))


def test_a_lost_canary_is_replaced_by_the_next_one_heard(tmp_path: Path) -> None:
    canary = _Canary(tmp_path)
    canary.send()  # lost in an overflow: never heard
    time.sleep(0.05)

    assert canary.is_stuck(0.01)

    hear(canary, canary.send())

    assert not canary.is_stuck(0.01)


def test_an_overflow_handled_by_the_reader_is_a_sign_of_life(tmp_path: Path) -> None:
    canary = _Canary(tmp_path)
    canary.send()
    time.sleep(0.05)

    canary.note_sign_of_life()

    assert not canary.is_stuck(0.04)


def test_wait_sends_again_until_a_canary_is_heard(tmp_path: Path) -> None:
    canary = _Canary(tmp_path)
    # The reader hears nothing for a while (an overflow drops the first canary), then hears
    # whatever canary is sent next.
    def reader() -> None:
        time.sleep(0.7)
        hear(canary, 2)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert canary.wait(timeout=5)
    finally:
        thread.join()
    assert canary.send() == 3  # the wait sent a second canary after half a second


def test_wait_gives_up_at_its_timeout_when_nothing_is_heard(tmp_path: Path) -> None:
    started = time.monotonic()

    assert not _Canary(tmp_path).wait(timeout=0.3)
    assert time.monotonic() - started < 2


def test_a_canary_that_cannot_be_written_is_no_proof(tmp_path: Path) -> None:
    canary = _Canary(tmp_path / "missing")

    assert canary.send() is None
    assert not canary.wait(timeout=1)
