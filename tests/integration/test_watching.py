"""Every way real programs write files, replayed into a watched directory of a running `scpd run`
(real inotify, real sshd): each version arrives once, whole, and never half-written under its
final name; temporary names, filtered names, symlinks and FIFOs never arrive.

How writers differ, as inotify sees them (research/libraries.md section 3.2): a Python write
gives Created, Modified and Closed for one version; a rename gives only Moved; a tree moved,
copied or extracted into the watch gives Created for some files and no Closed at all; a
cross-filesystem `mv` writes the final name in place and then backdates its mtime.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import DaemonProcess, Setup, make_file, sha256, temp_files, wait_until, write_config

from tools.sshd import ThrowawaySshd

MiB = 1024 * 1024
ARRIVAL_TIMEOUT = 20.0
# settle is 300 ms in the harness config. A second send of a version would need one more
# settle period after the first; three of them with the tick on top leaves room for it.
QUIET_SECONDS = 1.0


@contextmanager
def running(setup: Setup) -> Iterator[DaemonProcess]:
    """`scpd run`, ready to watch; stopped at the end, which must be a clean exit."""
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10), daemon.log()
        yield daemon
    finally:
        returncode = daemon.stop()
    assert returncode == 0, daemon.log()


def landed(remote: Path, expected_sha256: str) -> bool:
    return remote.is_file() and sha256(remote) == expected_sha256


def wait_landed(daemon: DaemonProcess, remote: Path, expected_sha256: str) -> None:
    assert wait_until(lambda: landed(remote, expected_sha256), ARRIVAL_TIMEOUT), (
        f"{remote} did not arrive with sha256 {expected_sha256[:12]} within "
        f"{ARRIVAL_TIMEOUT:.0f}s\n{daemon.log()}")


def sends_of(daemon: DaemonProcess, rel_path: str) -> int:
    """How many times the daemon logged the `sent` event for rel_path (pool.py: "sent REL to
    TARGET:REMOTE (...)"; the harness's one target is `local`)."""
    needle = f" sent {rel_path} to local:"
    return sum(needle in line for line in daemon.log().splitlines())


def remote_names(remote_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(remote_dir)) for p in remote_dir.rglob("*") if p.is_file())


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_and_close(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on /dev/shm (tmpfs): another file system than the watched one."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    path = Path(tempfile.mkdtemp(prefix="scpd-test-", dir="/dev/shm"))
    try:
        if path.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm and the test's tmp_path are one file system here")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- 1, 6: in-place writers -------------------------------------------------------------------


def test_a_written_file_and_its_appended_version_each_arrive_once(setup: Setup):
    path = setup.watch_dir / "log.txt"
    remote = setup.remote_dir / "log.txt"
    with running(setup) as daemon:
        write_and_close(path, b"first line\n" * 1000)
        wait_landed(daemon, remote, sha256(path))

        subprocess.run(["sh", "-c", 'echo "appended line" >> "$1"', "sh", str(path)],
                       check=True)
        grown = sha256(path)
        wait_landed(daemon, remote, grown)
        time.sleep(QUIET_SECONDS)

        assert sha256(remote) == grown
        assert sends_of(daemon, "log.txt") == 2, daemon.log()
    assert remote_names(setup.remote_dir) == ["log.txt"]


def test_a_delivered_file_truncated_and_rewritten_shorter_arrives_again(setup: Setup):
    path = setup.watch_dir / "state.json"
    remote = setup.remote_dir / "state.json"
    with running(setup) as daemon:
        write_and_close(path, b'{"rows": [' + b"1, " * 5000 + b"1]}\n")
        wait_landed(daemon, remote, sha256(path))

        with open(path, "w") as f:  # truncates, as most editors and report generators do
            f.write('{"rows": []}\n')
        wait_landed(daemon, remote, sha256(path))
        time.sleep(QUIET_SECONDS)

        assert remote.read_bytes() == b'{"rows": []}\n'
        assert sends_of(daemon, "state.json") == 2, daemon.log()


# -- 2: temporary name, then rename -----------------------------------------------------------


def test_a_file_written_under_a_temporary_name_arrives_only_under_its_final_name(setup: Setup):
    cases = {".report.csv.tmp": "report.csv", "data.bin.part": "data.bin"}
    with running(setup) as daemon:
        expected = {}
        for temp_name, final_name in cases.items():
            data = os.urandom(2 * MiB)
            write_and_close(setup.watch_dir / temp_name, data)
            expected[final_name] = data
        # Closed for longer than settle: were the temporary names admitted, they would be sent
        # now, before the renames.
        time.sleep(QUIET_SECONDS)
        for temp_name, final_name in cases.items():
            os.rename(setup.watch_dir / temp_name, setup.watch_dir / final_name)

        for final_name, data in expected.items():
            wait_landed(daemon, setup.remote_dir / final_name, sha256_of(data))
        time.sleep(QUIET_SECONDS)

        assert remote_names(setup.remote_dir) == sorted(cases.values())
        for temp_name, final_name in cases.items():
            assert sends_of(daemon, final_name) == 1, daemon.log()
            assert sends_of(daemon, temp_name) == 0, daemon.log()
            assert f"queued {temp_name}" not in daemon.log()


# -- 3: cp, rsync and mv from another file system ---------------------------------------------


def _copy_with_cp(source: Path, watch_dir: Path) -> None:
    subprocess.run(["cp", str(source), str(watch_dir / source.name)], check=True)


def _copy_with_rsync(source: Path, watch_dir: Path) -> None:
    # rsync writes .NAME.XXXXXX beside the destination, sets its times, then renames it.
    subprocess.run(["rsync", "-t", str(source), f"{watch_dir}/"], check=True)


def _move_with_mv(source: Path, watch_dir: Path) -> None:
    # Across file systems mv copies into the final name itself, sets the source's (old)
    # times on it, then unlinks the source.
    subprocess.run(["mv", str(source), str(watch_dir / source.name)], check=True)


WRITERS = {"cp": _copy_with_cp, "rsync": _copy_with_rsync, "mv": _move_with_mv}


@pytest.mark.parametrize("tool", list(WRITERS))
def test_a_big_file_brought_from_another_file_system_arrives_once_and_whole(
        setup: Setup, shm_dir: Path, tool: str):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (tools/install-system-deps.sh installs it)")
    source = make_file(shm_dir / f"{tool}.bin", 24 * MiB)
    an_hour_ago_ns = time.time_ns() - 3600 * 10**9
    os.utime(source, ns=(an_hour_ago_ns, an_hour_ago_ns))  # old: "ready at once" if believed
    expected = sha256(source)
    remote = setup.remote_dir / source.name
    with running(setup) as daemon:
        WRITERS[tool](source, setup.watch_dir)

        wait_landed(daemon, remote, expected)
        time.sleep(QUIET_SECONDS)

        assert sha256(setup.watch_dir / source.name) == expected
        assert remote_names(setup.remote_dir) == [source.name]
        assert temp_files(setup.remote_dir) == []
        assert sends_of(daemon, source.name) == 1, daemon.log()
    assert (tool == "mv") == (not source.exists())


# -- 4: whole trees ---------------------------------------------------------------------------

TREE_DIRS = ["", "l1", "l1/l2", "l1/l2/l3", "side", "side/deep"]


def make_tree(root: Path) -> dict[str, str]:
    """Five files in each of TREE_DIRS (three levels deep): relative path -> sha256."""
    tree = {}
    for i, directory in enumerate(TREE_DIRS):
        for j in range(5):
            rel = f"{directory}/f{i}{j}.dat".lstrip("/")
            tree[rel] = sha256(make_file(root / rel, 1000 + 997 * (i * 5 + j)))
    return tree


def _bring_by_mv(staged: Path, watch_dir: Path, tmp_path: Path) -> None:
    subprocess.run(["mv", str(staged), str(watch_dir)], check=True)  # same fs: one rename


def _bring_by_cp_r(staged: Path, watch_dir: Path, tmp_path: Path) -> None:
    subprocess.run(["cp", "-r", str(staged), str(watch_dir)], check=True)


def _bring_by_tar_x(staged: Path, watch_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(staged.parent), staged.name],
                   check=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(watch_dir)], check=True)


TREE_WRITERS = {"mv": _bring_by_mv, "cp -r": _bring_by_cp_r, "tar -x": _bring_by_tar_x}


@pytest.mark.parametrize("how", list(TREE_WRITERS))
def test_a_tree_brought_in_arrives_whole_and_its_new_directories_are_watched(
        setup: Setup, tmp_path: Path, how: str):
    staged = tmp_path / "staging" / "tree"
    tree = {f"tree/{rel}": digest for rel, digest in make_tree(staged).items()}
    with running(setup) as daemon:
        TREE_WRITERS[how](staged, setup.watch_dir, tmp_path)

        assert wait_until(lambda: all(landed(setup.remote_dir / rel, digest)
                                      for rel, digest in tree.items()), ARRIVAL_TIMEOUT), (
            f"missing: {sorted(set(tree) - set(remote_names(setup.remote_dir)))}\n"
            f"{daemon.log()}")
        later = {}
        for rel in ["tree/l1/l2/l3/later.txt", "tree/side/deep/later.txt"]:
            write_and_close(setup.watch_dir / rel, os.urandom(5000))
            later[rel] = sha256(setup.watch_dir / rel)
        for rel, digest in later.items():
            wait_landed(daemon, setup.remote_dir / rel, digest)
        time.sleep(QUIET_SECONDS)

        assert remote_names(setup.remote_dir) == sorted({**tree, **later})
        sent_twice = {rel: n for rel in {**tree, **later} if (n := sends_of(daemon, rel)) != 1}
        assert sent_twice == {}, daemon.log()


# -- 5: a slow writer -------------------------------------------------------------------------


def test_a_slow_writer_is_never_seen_half_written_on_the_remote(setup: Setup):
    chunks = [os.urandom(256 * 1024) for _ in range(8)]
    whole = b"".join(chunks)
    path = setup.watch_dir / "slow.bin"
    remote = setup.remote_dir / "slow.bin"
    seen_early: list[int] = []  # sizes found under the final name before the writer closed
    with running(setup) as daemon:
        with open(path, "wb") as f:
            for i, chunk in enumerate(chunks):
                f.write(chunk)
                f.flush()
                # 0.2 s between chunks (all of them: well past the 300 ms settle), and once a
                # stall of twice settle: only "still open for writing" can hold the file back.
                pause_until = time.monotonic() + (0.6 if i == 3 else 0.2)
                while time.monotonic() < pause_until:
                    if remote.exists():
                        content = remote.read_bytes()
                        if content != whole:
                            seen_early.append(len(content))
                    time.sleep(0.02)
        closed_log = daemon.log()

        wait_landed(daemon, remote, sha256_of(whole))
        time.sleep(QUIET_SECONDS)

        assert seen_early == [], f"partial versions on the remote: {seen_early} bytes"
        assert sends_of(daemon, "slow.bin") == 1, daemon.log()
        assert "queued slow.bin" not in closed_log, "queued while its writer still had it open"


# -- 8: filters -------------------------------------------------------------------------------


def test_include_and_exclude_admit_only_matching_files(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     watch_extra='include = ["*.csv"]\nexclude = ["*.bak"]')
    refused = ["notes.txt", "report.csv.bak", "old.bak/report.csv", ".hidden.csv",
               ".cache/report.csv", "dl.part/report.csv", "work.tmp/report.csv",
               "edit.swp/report.csv", "backup~/report.csv", "csv", "report.CSV"]
    admitted = ["a.csv", "sub/b.csv"]
    with running(s) as daemon:
        for rel in refused + admitted[:-1]:
            make_file(s.watch_dir / rel, 100)
        sentinel = make_file(s.watch_dir / admitted[-1], 100)  # written last

        wait_landed(daemon, s.remote_dir / admitted[-1], sha256(sentinel))
        wait_landed(daemon, s.remote_dir / "a.csv", sha256(s.watch_dir / "a.csv"))
        time.sleep(QUIET_SECONDS)

        assert remote_names(s.remote_dir) == sorted(admitted)


def test_default_excludes_are_never_sent(setup: Setup):
    refused = [".hidden", "x.part", "x.tmp", ".x.swp", "x.swp", "x~", ".git/config",
               ".dir/inside.txt", "d.tmp/inside.txt"]
    with running(setup) as daemon:
        for rel in refused:
            make_file(setup.watch_dir / rel, 100)
        sentinel = make_file(setup.watch_dir / "keep.txt", 100)  # written last

        wait_landed(daemon, setup.remote_dir / "keep.txt", sha256(sentinel))
        time.sleep(QUIET_SECONDS)

        assert remote_names(setup.remote_dir) == ["keep.txt"]


# -- 9: symlinks and FIFOs --------------------------------------------------------------------


def test_symlinks_and_fifos_are_skipped_and_a_fifo_blocks_nothing(setup: Setup, tmp_path: Path):
    outside = make_file(tmp_path / "outside" / "target.txt", 1000)
    make_file(tmp_path / "outside" / "dir" / "inside.txt", 1000)
    w = setup.watch_dir
    # Present at start (found by the scan) ...
    os.symlink(outside, w / "link-at-start.txt")
    os.mkfifo(w / "fifo-at-start")
    first = make_file(w / "first.txt", 100)
    with running(setup) as daemon:
        wait_landed(daemon, setup.remote_dir / "first.txt", sha256(first))
        # ... and made while it runs (seen by inotify).
        os.symlink(outside, w / "link.txt")
        os.symlink(outside.parent / "dir", w / "dirlink")
        os.mkfifo(w / "fifo")
        sentinel = make_file(w / "sentinel.txt", 100)

        wait_landed(daemon, setup.remote_dir / "sentinel.txt", sha256(sentinel))
        time.sleep(QUIET_SECONDS)

        assert remote_names(setup.remote_dir) == ["first.txt", "sentinel.txt"]
        assert not (setup.remote_dir / "dirlink").exists()
    # running() asserted a clean stop: no thread of the daemon sits in open() on a FIFO.


def test_follow_symlinks_sends_the_target_of_a_link_as_a_regular_file(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir, watch_extra="follow_symlinks = true")
    at_start = make_file(tmp_path / "outside" / "at-start.csv", 3000)
    later = make_file(tmp_path / "outside" / "later.csv", 5000)
    os.symlink(at_start, s.watch_dir / "at-start.csv")
    os.symlink(tmp_path / "outside" / "missing.csv", s.watch_dir / "dangling.csv")
    os.mkfifo(s.watch_dir / "fifo")
    with running(s) as daemon:
        os.symlink(later, s.watch_dir / "later.csv")
        sentinel = make_file(s.watch_dir / "sentinel.txt", 100)

        for local in (at_start, later, sentinel):
            wait_landed(daemon, s.remote_dir / local.name, sha256(local))
        time.sleep(QUIET_SECONDS)

        for name in ("at-start.csv", "later.csv"):
            assert not (s.remote_dir / name).is_symlink()
        assert remote_names(s.remote_dir) == ["at-start.csv", "later.csv", "sentinel.txt"]


# -- 10: a watch root that comes and goes -----------------------------------------------------


def test_a_missing_watch_root_is_watched_once_it_appears_and_after_it_is_recreated(
        setup: Setup):
    root = setup.watch_dir
    root.rmdir()  # write_config made it
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10), daemon.log()
        assert daemon.process.poll() is None, daemon.log()
        warnings = [line for line in daemon.log().splitlines()
                    if "WARNING" in line and str(root) in line]
        assert warnings, f"no warning naming {root}:\n{daemon.log()}"

        os.mkdir(root)
        first = make_file(root / "first.txt", 1000)
        wait_landed(daemon, setup.remote_dir / "first.txt", sha256(first))

        shutil.rmtree(root)
        os.mkdir(root)
        second = make_file(root / "second.txt", 1000)
        wait_landed(daemon, setup.remote_dir / "second.txt", sha256(second))
    finally:
        returncode = daemon.stop()
    assert returncode == 0, daemon.log()
