"""Which files a watch sends: excludes, includes, and the tree scan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scpd.config import DEFAULT_EXCLUDES, Watch
from scpd.watcher import PathFilter, scan


def make_watch(path: Path = Path("/watched"), **fields) -> Watch:
    return Watch(name="reports", path=path, targets=("offsite",), **fields)


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


def test_scan_of_a_subdirectory_gives_paths_relative_to_the_watch_root(tree: Path) -> None:
    found = sorted(rel for _, rel in scan(make_watch(tree), str(tree / "sub")))

    assert found == ["sub/b.pdf", "sub/deeper/c.csv"]


def test_scan_without_default_excludes_finds_hidden_files(tree: Path) -> None:
    found = sorted(rel for _, rel in scan(make_watch(tree, exclude=())))

    assert found == [".e.pdf", ".hidden/d.pdf", "a.pdf", "f.pdf.part", "sub/b.pdf",
                     "sub/deeper/c.csv", "sub/g.tmp"]
