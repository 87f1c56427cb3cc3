"""The delivery promise (DESIGN.md section 4) where no fault is injected, against a real sshd
and scpd run as a subprocess: a file appended to, overwritten or replaced while it is sent (4.3,
exactly the bytes) and a restart after a clean run (4.4, not twice without cause)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import make_file, sha256, temp_files, wait_until, write_config

from tools.sshd import ThrowawaySshd

PROTOCOLS = ["scp", "sftp"]
MiB = 1024 * 1024
SENT_LINE = re.compile(r"\bsent (\S+) to \S+:")  # "sent NAME to TARGET:PATH (...)"


def sent_names(log: str) -> list[str]:
    return SENT_LINE.findall(log)


# -- 4.3: a file overwritten while it is sent ---------------------------------------------------


def append_to(path: Path, staging: Path) -> None:
    # Grows: scpd must send exactly the size it announced, then notice and discard it.
    with path.open("ab") as f:
        f.write(os.urandom(100_000))


def overwrite_in_place(path: Path, staging: Path) -> None:
    # Same inode, same size: only the mtime tells the new version from the old.
    data = os.urandom(path.stat().st_size)
    with path.open("r+b") as f:
        f.write(data)


def replace_by_rename(path: Path, staging: Path) -> None:
    # A new inode under the old name; the file scpd has open is the old one, unchanged.
    staging.mkdir(exist_ok=True)
    new = staging / path.name
    new.write_bytes(os.urandom(path.stat().st_size))
    os.replace(new, path)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("change", [append_to, overwrite_in_place, replace_by_rename],
                         ids=["append", "in_place", "os_replace"])
def test_file_changed_while_sent_lands_only_as_its_final_content(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        protocol: str, change):
    # 3 MiB at 2 MiB/s: the first send takes one and a half seconds, and the change falls
    # right after it started, so the first version can never complete before it.
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra=f'protocol = "{protocol}"\nbandwidth_limit = "2MiB/s"\n'
                                  "connections = 1")
    local = make_file(s.watch_dir / "data.bin", 3 * MiB)
    first_digest = sha256(local)
    final = remote_dir / "data.bin"
    seen: set[str] = set()  # every digest ever found under the final name

    def look() -> None:
        try:
            seen.add(sha256(final))
        except FileNotFoundError:
            pass

    def part_exists() -> bool:  # .data.bin[.<token>].scpd-part: scp adds an attempt token
        return any(remote_dir.glob(".data.bin*.scpd-part"))

    daemon = s.start_daemon()
    try:
        def has_started() -> bool:
            look()
            return part_exists() or bool(seen)

        assert wait_until(has_started, 10.0), f"no temporary file appeared\n{daemon.log()}"
        assert not seen, "the first version landed before the test could change it"
        change(local, tmp_path / "staging")
        final_digest = sha256(local)
        assert final_digest != first_digest

        def is_final_landed() -> bool:
            look()
            return final_digest in seen

        assert wait_until(is_final_landed, 20.0), daemon.log()
        look()
    finally:
        returncode = daemon.stop()
    assert seen == {final_digest}, "a version other than the final one was renamed into place"
    assert returncode == 0, daemon.log()
    assert "changed while it was sent" in daemon.log()
    assert sent_names(daemon.log()) == ["data.bin"], daemon.log()
    assert wait_until(lambda: not temp_files(remote_dir), 3.0), temp_files(remote_dir)
    assert "Traceback" not in daemon.log()


# -- 4.4: a restart after a clean run sends nothing again ---------------------------------------


def remote_identities(remote_dir: Path) -> dict[str, tuple[int, int]]:
    """(st_ino, st_mtime_ns) of every final file, by path relative to remote_dir. Both SCP
    and SFTP publish by renaming a new temporary file, so a resend changes the inode."""
    identities = {}
    for path in remote_dir.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            st = path.stat()
            identities[path.relative_to(remote_dir).as_posix()] = (st.st_ino, st.st_mtime_ns)
    return identities


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_restart_after_a_clean_run_sends_nothing_again_and_then_only_the_changed_file(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        protocol: str):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra=f'protocol = "{protocol}"')
    names = ([f"top-{i:02d}.bin" for i in range(12)] + [f"sub/mid-{i}.bin" for i in range(5)]
             + [f"sub/deeper/low-{i}.bin" for i in range(3)])
    for name in names:
        make_file(s.watch_dir / name, 10_000)

    first = s.scpd("run", "--once", "--timeout", "20s", timeout=40)
    assert first.returncode == 0, first.stderr
    assert sorted(sent_names(first.stderr)) == sorted(names), first.stderr
    before = remote_identities(remote_dir)
    assert sorted(before) == sorted(names)
    for name in names:
        assert sha256(remote_dir / name) == sha256(s.watch_dir / name), name

    again = s.scpd("run", "--once", "--timeout", "20s", timeout=40)
    assert again.returncode == 0, again.stderr
    assert sent_names(again.stderr) == [], again.stderr

    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10.0), daemon.log()
        time.sleep(2.0)  # the start-up scan and the 300 ms settle, several times over
        assert daemon.process.poll() is None, daemon.log()
    finally:
        returncode = daemon.stop()
    assert returncode == 0, daemon.log()
    assert sent_names(daemon.log()) == [], daemon.log()
    assert "Traceback" not in daemon.log()
    assert remote_identities(remote_dir) == before, "a file delivered before was sent again"

    changed = "sub/mid-2.bin"
    make_file(s.watch_dir / changed, 10_000)
    last = s.scpd("run", "--once", "--timeout", "20s", timeout=40)
    assert last.returncode == 0, last.stderr
    assert sent_names(last.stderr) == [changed], last.stderr
    after = remote_identities(remote_dir)
    assert sorted(after) == sorted(names)
    assert [name for name in names if after[name][0] != before[name][0]] == [changed]
    assert sha256(remote_dir / changed) == sha256(s.watch_dir / changed)
    assert temp_files(remote_dir) == []
