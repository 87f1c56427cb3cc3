"""The Watcher in-process, on real inotify: what it reports as its health, and a root that is
removed and made again (ext4 may hand the new directory the old inode number)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from scpd.config import Watch
from scpd.watcher import Watcher


class Recorder:
    def __init__(self) -> None:
        self.noted: list[str] = []
        self.rescans: list[str] = []

    def note(self, watch: Watch, path: str, rel_path: str, is_closed: bool) -> None:
        self.noted.append(rel_path)

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


@pytest.fixture
def watcher(root: Path, recorder: Recorder) -> Iterator[Watcher]:
    watch = Watch(name="outbox", path=root, targets=("local",))
    watcher = Watcher((watch,), recorder.note, recorder.forget, recorder.rescan)
    watcher.start()
    try:
        assert watcher.wait_until_watching(5)
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
