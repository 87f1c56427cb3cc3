"""Readiness: a file is handed on only once its writer is done with it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from scpd.fileversion import FileVersion
from scpd.settle import Settler, is_open_for_write_elsewhere

SETTLE = 2.0
PATH = "/watched/report.pdf"


class FakeClock:
    """Monotonic and wall clocks that move together, only when told to."""

    def __init__(self) -> None:
        self.monotonic = 1000.0
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds


class FakeFiles:
    """lstat over a dict of path -> (mode, size, mtime), with mtimes from the wall clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.files: dict[str, tuple[int, int, float]] = {}
        self.open_for_write: set[str] = set()

    def write(self, path: str, size: int, *, age: float = 0.0,
              mode: int = stat.S_IFREG | 0o644) -> None:
        self.files[path] = (mode, size, self.clock.wall - age)

    def remove(self, path: str) -> None:
        del self.files[path]

    def lstat(self, path: str) -> os.stat_result:
        try:
            mode, size, mtime = self.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None
        mtime_ns = round(mtime * 1e9)
        return os.stat_result((mode, 42, 1, 1, 0, 0, size, mtime, mtime, mtime),
                              {"st_mtime_ns": mtime_ns})

    def is_being_written(self, path: str) -> bool:
        return path in self.open_for_write


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def files(clock: FakeClock) -> FakeFiles:
    return FakeFiles(clock)


@pytest.fixture
def settler(clock: FakeClock, files: FakeFiles) -> Settler:
    return Settler(clock=lambda: clock.monotonic, wall_clock=lambda: clock.wall,
                   lstat=files.lstat, is_being_written=files.is_being_written)


def ready_paths(settler: Settler) -> list[str]:
    return [ready.path for ready in settler.take_ready()]


def test_settler_holds_a_recent_file_until_it_has_been_quiet_for_settle_seconds(
        settler: Settler, clock: FakeClock, files: FakeFiles) -> None:
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE)

    assert ready_paths(settler) == []
    clock.advance(1.5)
    assert ready_paths(settler) == []
    clock.advance(0.5)

    [ready] = settler.take_ready()

    assert (ready.watch, ready.path, ready.rel_path) == ("reports", PATH, "report.pdf")
    assert ready.version == FileVersion.of(files.lstat(PATH))
    assert len(settler) == 0
    assert ready_paths(settler) == []  # handed out once


def test_settler_hands_out_a_closed_file_at_once(settler: Settler, files: FakeFiles) -> None:
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE, is_closed=True)

    assert ready_paths(settler) == [PATH]


def test_settler_a_later_close_event_makes_a_noted_file_ready(
        settler: Settler, files: FakeFiles) -> None:
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE)
    assert ready_paths(settler) == []

    settler.note("reports", PATH, "report.pdf", SETTLE, is_closed=True)

    assert ready_paths(settler) == [PATH]


def test_settler_hands_out_a_file_older_than_settle_at_once(
        settler: Settler, files: FakeFiles) -> None:
    # Found by a scan, or moved in: nobody has touched it for longer than settle.
    files.write(PATH, 10, age=SETTLE + 60)
    settler.note("reports", PATH, "report.pdf", SETTLE)

    assert ready_paths(settler) == [PATH]


def test_settler_never_hands_out_a_file_still_open_for_writing(
        settler: Settler, clock: FakeClock, files: FakeFiles) -> None:
    files.write(PATH, 10, age=3600)
    files.open_for_write.add(PATH)
    settler.note("reports", PATH, "report.pdf", SETTLE, is_closed=True)

    for _ in range(5):
        assert ready_paths(settler) == []
        clock.advance(60)
    assert len(settler) == 1  # still watched, not forgotten

    files.open_for_write.discard(PATH)  # the last writer closes it
    clock.advance(SETTLE)
    assert ready_paths(settler) == [PATH]


def test_settler_a_change_of_size_restarts_the_quiet_period(
        settler: Settler, clock: FakeClock, files: FakeFiles) -> None:
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE)
    assert ready_paths(settler) == []

    clock.advance(1.5)
    files.write(PATH, 20)
    assert ready_paths(settler) == []
    clock.advance(1.5)  # 3 s since noted, but only 1.5 s since the last change
    assert ready_paths(settler) == []
    clock.advance(0.5)

    [ready] = settler.take_ready()
    assert ready.version.size == 20


def test_settler_drops_a_path_that_vanished(
        settler: Settler, clock: FakeClock, files: FakeFiles) -> None:
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE)
    assert ready_paths(settler) == []

    files.remove(PATH)
    clock.advance(SETTLE)  # looked at again when due

    assert ready_paths(settler) == []
    assert len(settler) == 0


def test_settler_drops_a_path_that_is_not_a_regular_file(
        settler: Settler, files: FakeFiles) -> None:
    files.write(PATH, 0, age=3600, mode=stat.S_IFIFO | 0o644)
    settler.note("reports", PATH, "report.pdf", SETTLE, is_closed=True)

    assert ready_paths(settler) == []
    assert len(settler) == 0


def test_settler_forget_removes_a_noted_path(
        settler: Settler, clock: FakeClock, files: FakeFiles) -> None:
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE)

    settler.forget("reports", PATH)
    settler.forget("reports", "/never/noted")  # harmless

    assert len(settler) == 0
    clock.advance(SETTLE * 10)
    assert ready_paths(settler) == []


def test_is_open_for_write_elsewhere_sees_another_process_writing(tmp_path: Path) -> None:
    path = tmp_path / "growing.csv"
    path.write_bytes(b"")
    assert is_open_for_write_elsewhere(str(path)) is False

    writer = subprocess.Popen(
        ["sh", "-c", 'exec 3>>"$1"; echo opened; exec sleep 30', "sh", str(path)],
        stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"opened\n"
        assert is_open_for_write_elsewhere(str(path)) is True
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()

    assert is_open_for_write_elsewhere(str(path)) is False


def test_is_open_for_write_elsewhere_answers_false_for_a_missing_file(tmp_path: Path) -> None:
    assert is_open_for_write_elsewhere(str(tmp_path / "nope")) is False


class CountingFiles(FakeFiles):
    """FakeFiles that counts how often a path is looked at."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.looks = 0

    def lstat(self, path: str) -> os.stat_result:
        self.looks += 1
        return super().lstat(path)


def test_settler_looks_at_a_young_file_when_it_is_due_not_on_every_take(
        clock: FakeClock) -> None:
    files = CountingFiles(clock)
    settler = Settler(clock=lambda: clock.monotonic, wall_clock=lambda: clock.wall,
                      lstat=files.lstat, is_being_written=files.is_being_written)
    for i in range(100):
        files.write(f"/watched/{i}.csv", 10)
        settler.note("reports", f"/watched/{i}.csv", f"{i}.csv", SETTLE)
    assert ready_paths(settler) == []
    first_looks = files.looks

    for _ in range(19):  # the main loop ticks every 0.1 s until the files are quiet
        clock.advance(0.1)
        assert ready_paths(settler) == []

    assert first_looks == 100
    assert files.looks == 100  # nothing was due: no stat at all
    clock.advance(0.1)
    assert len(ready_paths(settler)) == 100


def test_settler_offer_hands_an_old_scanned_file_over_at_once(
        settler: Settler, files: FakeFiles) -> None:
    files.write(PATH, 10, age=SETTLE + 1)

    ready = settler.offer("reports", PATH, "report.pdf", SETTLE, files.lstat(PATH))

    assert ready is not None and ready.version.size == 10
    assert len(settler) == 0  # never held


@pytest.mark.parametrize("is_young", [True, False], ids=["young", "being-written"])
def test_settler_offer_keeps_a_young_or_busy_file_as_a_candidate(
        settler: Settler, clock: FakeClock, files: FakeFiles, is_young: bool) -> None:
    files.write(PATH, 10, age=0 if is_young else SETTLE + 1)
    if not is_young:
        files.open_for_write.add(PATH)

    assert settler.offer("reports", PATH, "report.pdf", SETTLE, files.lstat(PATH)) is None
    assert len(settler) == 1

    files.open_for_write.discard(PATH)
    clock.advance(SETTLE)
    assert ready_paths(settler) == [PATH]


def test_settler_a_close_while_waiting_for_quiet_is_not_delayed(
        settler: Settler, files: FakeFiles) -> None:
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE)
    assert ready_paths(settler) == []  # due again in SETTLE seconds

    settler.note("reports", PATH, "report.pdf", SETTLE, is_closed=True)

    assert ready_paths(settler) == [PATH]  # no clock advance needed


def test_settler_an_event_arriving_while_a_file_is_looked_at_voids_that_look(
        clock: FakeClock, files: FakeFiles) -> None:
    settler: Settler

    def probe_while_the_writer_strikes(path: str) -> bool:
        # Between the look's stat and its verdict the writer appends and closes again.
        files.write(PATH, 20)
        settler.note("reports", PATH, "report.pdf", SETTLE, is_closed=True)
        return False

    settler = Settler(clock=lambda: clock.monotonic, wall_clock=lambda: clock.wall,
                      lstat=files.lstat, is_being_written=probe_while_the_writer_strikes)
    files.write(PATH, 10)
    settler.note("reports", PATH, "report.pdf", SETTLE, is_closed=True)

    assert settler.take_ready() == []  # the 10-byte version it saw is already stale
    settler._is_being_written = files.is_being_written
    [ready] = settler.take_ready()
    assert ready.version.size == 20
