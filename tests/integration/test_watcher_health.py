"""The Watcher in-process, on real inotify: what it reports as its health, and a root that is
removed and made again (ext4 may hand the new directory the old inode number), also when two
watches share it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from scpd import watcher as watcher_module
from scpd.config import Watch
from scpd.watcher import Watcher


class Recorder:
    def __init__(self) -> None:
        self.noted: list[str] = []
        self.noted_by: dict[str, list[str]] = {}
        self.rescans: list[str] = []

    def note(self, watch: Watch, path: str, rel_path: str, is_closed: bool) -> None:
        self.noted.append(rel_path)
        self.noted_by.setdefault(watch.name, []).append(rel_path)

    def forget(self, watch_name: str, path: str) -> None:
        pass

    def rescan(self, watch_name: str, reason: str) -> None:
        self.rescans.append(reason)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "outbox"
    root.mkdir()
    return root


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def started(watches: tuple[Watch, ...], recorder: Recorder, state_dir: Path) -> Watcher:
    watcher = Watcher(watches, recorder.note, recorder.forget, recorder.rescan,
                      state_dir / "watch-canary")
    watcher.start()
    return watcher


@pytest.fixture
def watcher(root: Path, recorder: Recorder, tmp_path: Path) -> Iterator[Watcher]:
    watcher = started((Watch(name="outbox", path=root, targets=("local",)),), recorder,
                      tmp_path / "state")
    try:
        yield watcher
    finally:
        watcher.stop()


def test_watcher_is_healthy_while_its_threads_run_and_says_so_when_one_ends(
        watcher: Watcher) -> None:
    assert watcher.is_alive()

    watcher._inotify.stop()  # the dispatch thread ends, as after an uncaught error in it
    watcher._inotify.join(5)

    assert not watcher.is_alive()


def test_watcher_watches_a_root_removed_and_made_again_at_once(
        watcher: Watcher, root: Path, recorder: Recorder) -> None:
    shutil.rmtree(root)
    root.mkdir()  # no pause: the one-second root check never sees it missing

    assert wait_until(lambda: watcher.is_alive() and "appeared" in recorder.rescans, 5)
    (root / "late.csv").write_text("written into the new root\n")

    assert wait_until(lambda: "late.csv" in recorder.noted, 5), recorder.noted
    assert watcher.is_alive()


def test_watcher_says_so_when_the_inotify_reader_stops_handling_events(
        watcher: Watcher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher_module, "_CANARY_DEADLINE_SECONDS", 0.5)
    assert watcher.is_alive() and watcher.wait_for_events_so_far(5)

    # The thread that reads inotify ends (as after watchdog's KeyError crashes); the
    # observer and emitter threads it feeds go on running.
    watcher._inotify._inotify_fd.stop()

    assert wait_until(lambda: not watcher.is_alive(), 5)
    assert not watcher.wait_for_events_so_far(0.5)


def test_two_watches_of_one_root_both_hear_of_it_after_it_is_made_again(
        root: Path, recorder: Recorder, tmp_path: Path) -> None:
    watches = (Watch(name="pdfs", path=root, targets=("local",), include=("*.pdf",)),
               Watch(name="csvs", path=root, targets=("local",), include=("*.csv",)))
    watcher = started(watches, recorder, tmp_path / "state")
    try:
        shutil.rmtree(root)
        root.mkdir()
        assert wait_until(lambda: watcher.is_alive() and recorder.rescans.count("appeared") == 2,
                          5), recorder.rescans
        (root / "a.pdf").write_text("pdf\n")
        (root / "b.csv").write_text("csv\n")

        assert wait_until(lambda: "a.pdf" in recorder.noted_by.get("pdfs", ())
                          and "b.csv" in recorder.noted_by.get("csvs", ()), 5), recorder.noted_by
    finally:
        watcher.stop()


def test_watcher_makes_its_canary_directory_again_when_it_is_removed(
        watcher: Watcher, tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "state" / "watch-canary")  # ends the canary's emitter

    assert wait_until(lambda: watcher.is_alive() and watcher.wait_for_events_so_far(1), 5)
    assert (tmp_path / "state" / "watch-canary").is_dir()
