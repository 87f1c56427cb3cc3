"""Which files a watch sends: excludes, includes, and the tree walk of a scan."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from scpd import scanner as scanner_module
from scpd.config import DEFAULT_EXCLUDES, Watch
from scpd.scanner import PathFilter, Rescanner, Scanner, ScanReport, WalkStats, walk
from scpd.settle import Settler
from scpd.store import Store
from tools.harness import wait_until


def scan(watch: Watch) -> list[tuple[str, str]]:
    return [(found.path, found.rel_path) for found in walk(watch)]


def make_watch(path: Path = Path("/watched"), name: str = "reports", **fields) -> Watch:
    return Watch(name=name, path=path, targets=("offsite",), **fields)


@pytest.mark.parametrize("rel_path", [
    ".secret.pdf",          # hidden file
    ".git/config",          # inside a hidden directory
    "2024/.cache/r.pdf",    # hidden directory deeper in the path
    "report.pdf.part",      # a download in progress
    "report.tmp",
    ".report.pdf.swp",
    "report.swp",           # an editor's swap file
    "report.pdf~",          # an editor's backup
    "2024/report.pdf~",
])
def test_path_filter_default_excludes_skip_work_files_and_hidden_names(rel_path: str) -> None:
    assert PathFilter(make_watch()).admits(rel_path) is False


@pytest.mark.parametrize("rel_path", ["report.pdf", "2024/05/report.csv", "report", "a.b.c.txt"])
def test_path_filter_default_excludes_admit_ordinary_files(rel_path: str) -> None:
    assert PathFilter(make_watch()).admits(rel_path) is True


def test_path_filter_exclude_adds_to_the_defaults() -> None:
    path_filter = PathFilter(make_watch(exclude=(*DEFAULT_EXCLUDES, "*.bak")))

    assert path_filter.admits("report.bak") is False
    assert path_filter.admits(".hidden") is False
    assert path_filter.admits("report.pdf") is True


def test_path_filter_without_default_excludes_admits_hidden_and_part_files() -> None:
    path_filter = PathFilter(make_watch(exclude=("*.bak",)))

    assert path_filter.admits(".hidden") is True
    assert path_filter.admits("data.part") is True
    assert path_filter.admits("report.bak") is False


def test_path_filter_include_admits_only_matching_names() -> None:
    path_filter = PathFilter(make_watch(include=("*.pdf", "*.csv")))

    assert path_filter.admits("report.pdf") is True
    assert path_filter.admits("2024/data.csv") is True
    assert path_filter.admits("notes.txt") is False
    assert path_filter.admits("report.PDF") is False  # matching is case-sensitive
    # include is about file names; a directory named like a match does not admit its files
    assert path_filter.admits("old.pdf/notes.txt") is False


def test_path_filter_excludes_win_over_include() -> None:
    path_filter = PathFilter(make_watch(include=("*.pdf",)))

    assert path_filter.admits(".draft.pdf") is False
    assert path_filter.admits(".trash/report.pdf") is False


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "watched"
    for rel in ["a.pdf", "sub/b.pdf", "sub/deeper/c.csv", ".hidden/d.pdf", ".e.pdf",
                "f.pdf.part", "sub/g.tmp"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / "link.pdf").symlink_to(root / "a.pdf")
    (root / "dirlink").symlink_to(root / "sub", target_is_directory=True)
    os.mkfifo(root / "pipe.pdf")
    return root


def test_scan_returns_admitted_regular_files_only(tree: Path) -> None:
    found = dict(scan(make_watch(tree)))

    assert found == {
        str(tree / "a.pdf"): "a.pdf",
        str(tree / "sub/b.pdf"): "sub/b.pdf",
        str(tree / "sub/deeper/c.csv"): "sub/deeper/c.csv",
    }  # no symlink (to a file or a directory), no FIFO, nothing hidden or temporary


def test_scan_stays_in_the_top_directory_when_not_recursive(tree: Path) -> None:
    assert [rel for _, rel in scan(make_watch(tree, recursive=False))] == ["a.pdf"]


def test_scan_applies_include(tree: Path) -> None:
    found = sorted(rel for _, rel in scan(make_watch(tree, include=("*.csv",))))

    assert found == ["sub/deeper/c.csv"]


def test_scan_without_default_excludes_finds_hidden_files(tree: Path) -> None:
    found = sorted(rel for _, rel in scan(make_watch(tree, exclude=())))

    assert found == [".e.pdf", ".hidden/d.pdf", "a.pdf", "f.pdf.part", "sub/b.pdf",
                     "sub/deeper/c.csv", "sub/g.tmp"]


def test_scan_with_follow_symlinks_reads_links_to_files_and_directories(tree: Path) -> None:
    (tree / "sub" / "loop").symlink_to(tree, target_is_directory=True)  # a link loop

    found = sorted(rel for _, rel in scan(make_watch(tree, follow_symlinks=True)))

    # sub/ is walked once: as itself or through dirlink, never twice, and the loop ends.
    walked_sub = "dirlink" if "dirlink/b.pdf" in found else "sub"
    assert found == sorted(["a.pdf", "link.pdf", f"{walked_sub}/b.pdf",
                            f"{walked_sub}/deeper/c.csv"])


def test_scan_with_follow_symlinks_skips_a_dangling_link(tree: Path) -> None:
    (tree / "dangling.pdf").symlink_to(tree / "gone.pdf")

    found = [rel for _, rel in scan(make_watch(tree, follow_symlinks=True))]

    assert "dangling.pdf" not in found and "a.pdf" in found


def test_walk_keeps_the_identity_of_every_directory_listed_when_asked(tree: Path) -> None:
    stats = WalkStats(directory_ids={})

    list(walk(make_watch(tree), stats=stats))

    assert stats.directories == 3  # the root, sub, sub/deeper (hidden ones excluded)
    assert sorted(stats.directory_ids.values()) == sorted(
        [str(tree), str(tree / "sub"), str(tree / "sub" / "deeper")])
    st = (tree / "sub").stat()
    assert stats.directory_ids[st.st_dev, st.st_ino] == str(tree / "sub")


def test_walk_of_a_missing_root_finds_nothing(tmp_path: Path) -> None:
    assert scan(make_watch(tmp_path / "not-yet")) == []


class RecordingScanner:
    """Stands in for Scanner: records each scan, and holds the first until released."""

    def __init__(self) -> None:
        self.scans: list[str] = []
        self.release = threading.Event()

    def scan(self, watch: Watch, *, keep_directory_ids: bool = False,
             should_stop=lambda: False) -> ScanReport:
        self.release.wait(5)
        self.scans.append(watch.name)
        return ScanReport(watch.name, 1, 0, 0, 0, 0.0, {} if keep_directory_ids else None)


def test_rescanner_merges_requests_for_a_watch_whose_scan_is_still_waiting(
        tmp_path: Path) -> None:
    watches = {name: make_watch(tmp_path, name=name) for name in ("reports", "logs")}
    scanner = RecordingScanner()
    checked: list[str] = []
    reasons: list[str] = []
    rescanner = Rescanner(scanner, watches.__getitem__, lambda name, why: reasons.append(why),
                          lambda name, ids: checked.append(name))
    rescanner.start()
    try:
        rescanner.request("reports", "start-up")  # runs, held until released
        assert wait_until(lambda: not rescanner._waiting, 5)
        for reason in ("overflow", "periodic", "overflow"):  # while the first one runs
            rescanner.request("reports", reason)
        rescanner.request("logs", "overflow")
        scanner.release.set()

        assert wait_until(lambda: len(scanner.scans) >= 3, 5)
    finally:
        rescanner.stop()
    # The one running may have passed a place already: one more scan, not three.
    assert scanner.scans == ["reports", "reports", "logs"]
    assert checked == ["reports", "reports", "logs"]  # inotify's coverage after each
    assert reasons == ["start-up", "overflow", "overflow"]  # the first of those merged


class FailingOnceScanner(RecordingScanner):
    """The first scan fails (a full state disk, say) after its walk began."""

    def scan(self, watch: Watch, **kwargs) -> ScanReport:
        if not self.scans:
            self.scans.append("failed")
            raise OSError(28, "No space left on device")
        return super().scan(watch, **kwargs)


def test_rescanner_tries_a_failed_scan_again_soon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a failed scan held back must not wait for the periodic scan (10 minutes).
    monkeypatch.setattr(scanner_module, "_RETRY_FAILED_SCAN_SECONDS", 0.2)
    watch = make_watch(tmp_path)
    scanner = FailingOnceScanner()
    scanner.release.set()
    reasons: list[str] = []
    rescanner = Rescanner(scanner, lambda name: watch, lambda name, why: reasons.append(why),
                          lambda name, ids: None)
    rescanner.start()
    try:
        rescanner.request("reports", "start-up")

        assert wait_until(lambda: scanner.scans == ["failed", "reports"], 5), scanner.scans
    finally:
        rescanner.stop()
    assert reasons == ["start-up", "retry of a failed"]


def test_a_scan_ends_early_when_asked_to_stop(tree: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state")
    queued: list[str] = []
    try:
        scanner = Scanner(store, Settler(), lambda batch: queued.extend(r.rel_path for r in batch))
        report = scanner.scan(make_watch(tree, settle_seconds=0.0), should_stop=lambda: True)
    finally:
        store.close()

    assert report.handed_on == 0 and queued == []
