"""Where a file may go on the remote: below its remote_dir, never climbing out of it, never
longer than a remote takes; and the temporary names it is written under first."""

from __future__ import annotations

import posixpath

import pytest

from scpd.errors import PermanentError, RemotePathError
from scpd.transport.base import Upload, check_remote_path, directories_below, temp_name

BASE = "/srv/incoming/host"


def upload(rel_path: str, base: str = BASE) -> Upload:
    """What the pool makes of a job: remote_dir joined with the path relative to the watch."""
    return Upload("/var/reports/x", posixpath.join(base, rel_path), base=base)


def test_directories_below_lists_each_level_between_remote_dir_and_the_file() -> None:
    assert directories_below(BASE, f"{BASE}/2026/11/report.csv") == [
        f"{BASE}/2026", f"{BASE}/2026/11"]
    assert directories_below(BASE, f"{BASE}/report.csv") == []


@pytest.mark.parametrize("base", ["/srv/incoming/host/", "incoming", "/"])
def test_directories_below_takes_a_remote_dir_with_a_slash_relative_or_the_root(
        base: str) -> None:
    root = base.rstrip("/") or "/"

    assert directories_below(base, posixpath.join(base, "a/b/f")) == [
        posixpath.join(root, "a"), posixpath.join(root, "a", "b")]


def test_directories_below_without_a_remote_dir_checks_nothing() -> None:
    assert directories_below(None, "/anywhere/at/all") == []


@pytest.mark.parametrize("rel_path", [
    "../escaped.txt",
    "../../etc/cron.d/job",
    "sub/../../escaped.txt",
    "sub/..",
    "..",
])
def test_a_relative_path_with_dot_dot_cannot_reach_outside_remote_dir(rel_path: str) -> None:
    item = upload(rel_path)

    with pytest.raises(RemotePathError) as refused:
        check_remote_path(item, posixpath.join(posixpath.dirname(item.remote_path), ".t"))

    assert '".."' in str(refused.value)
    assert "outside remote_dir" in str(refused.value)
    assert isinstance(refused.value, PermanentError)  # failed, not retried


def test_an_absolute_relative_path_cannot_replace_remote_dir() -> None:
    item = upload("/etc/passwd")  # posixpath.join drops the base before an absolute part

    with pytest.raises(RemotePathError, match="not below remote_dir"):
        check_remote_path(item, "/etc/.passwd.t.scpd-part")


def test_a_remote_dir_that_is_only_a_prefix_of_the_path_does_not_count() -> None:
    item = Upload("/var/reports/x", "/srv/incoming/hostile/x", base="/srv/incoming/host")

    with pytest.raises(RemotePathError, match="not below remote_dir"):
        check_remote_path(item, "/srv/incoming/hostile/.x.t.scpd-part")


def test_names_that_only_look_like_dots_are_names() -> None:
    item = upload("...txt/..a/b..")

    check_remote_path(item, posixpath.join(posixpath.dirname(item.remote_path), ".t"))


def test_a_remote_path_over_path_max_is_refused_before_sending_with_its_reason() -> None:
    rel_path = "/".join(["d" * 200] * 21) + "/f.txt"  # 4.2 KB below remote_dir
    item = upload(rel_path)

    with pytest.raises(RemotePathError) as refused:
        check_remote_path(item, item.remote_path + ".t")

    message = str(refused.value)
    assert "File name too long" in message
    assert f"{len(item.remote_path)} bytes" in message
    assert "at most 4095" in message
    assert len(message) < 400  # the path is shortened, not printed whole


def test_a_temporary_name_over_path_max_is_refused_too() -> None:
    item = upload("x" * (4095 - len(BASE) - 1))  # the final path: 4095 bytes, the most
    temp = item.remote_path + ".t"

    with pytest.raises(RemotePathError, match="File name too long.* 4097 bytes"):
        check_remote_path(item, temp)


def test_a_remote_path_of_exactly_path_max_minus_one_bytes_passes() -> None:
    rel_path = "x" * (4095 - len(BASE) - 1)
    item = upload(rel_path)

    check_remote_path(item, item.remote_path)


def test_each_attempt_gets_a_temporary_name_of_its_own() -> None:
    names = {temp_name("report.csv", is_per_attempt=True) for _ in range(50)}

    assert len(names) == 50
    assert all(name.startswith(".report.csv.") and name.endswith(".scpd-part")
               for name in names)
