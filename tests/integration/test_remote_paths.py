"""Where files land on a real sshd, and where they never do (DESIGN.md sections 4 and 6): not
through a symbolic link planted at a temporary name or below remote_dir, not under a path the
remote cannot take (failed at once, not retried forever), every hostile name byte-exact over
SFTP too, and an SFTP-only server that is told apart from a broken one."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Setup, make_file, sha256, temp_files, wait_until, write_config
from test_pool import (
    ShellMarker,
    SshdLog,
    assert_landed_exactly,
    final_files,
    make_hostile_files,
    old_file,
)

from tools.sshd import ThrowawaySshd

OLD_NS = 1_500_000_000_000_000_000
OUTSIDE_BYTES = b"outside remote_dir: scpd must never write here\n"


@pytest.fixture(scope="module")
def sftp_only_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    """A server that runs internal-sftp whatever the client asks (an SFTP-only account)."""
    server = ThrowawaySshd(tmp_path_factory.mktemp("sshd-sftp-only"),
                           extra_config="ForceCommand internal-sftp\n")
    try:
        yield server.start()
    finally:
        server.stop()


# scp: the agent, renames over SFTP; scp-mv: the agent, renames by mv; sftp: no shell at all.
WAYS = ["scp", "scp-mv", "sftp"]


@pytest.fixture(params=WAYS)
def way(request, tmp_path: Path, sshd: ThrowawaySshd, scp_only_sshd: ThrowawaySshd,
        remote_dir: Path) -> Setup:
    server = scp_only_sshd if request.param == "scp-mv" else sshd
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    protocol = "sftp" if request.param == "sftp" else "scp"
    return write_config(tmp_path, server, known_hosts, remote_dir,
                        target_extra=f'protocol = "{protocol}"\nconnections = 1')


def outside_file(path: Path) -> Path:
    """A file outside remote_dir with known bytes, mode and times, to see it untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(OUTSIDE_BYTES)
    path.chmod(0o600)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return path


def assert_untouched(path: Path) -> None:
    st = path.lstat()
    assert path.read_bytes() == OUTSIDE_BYTES, f"{path} was written through a link"
    assert st.st_mode & 0o7777 == 0o600, f"{path} got its mode changed through a link"
    assert st.st_mtime_ns == OLD_NS, f"{path} got its times changed through a link"


def status_of(s: Setup) -> dict:
    result = s.scpd("status", "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["targets"]["local"]


def uploader_for(s: Setup):
    from scpd import config as config_module
    from scpd.transport import Throttle, load_credentials, open_uploader

    target = config_module.load(s.config).targets["local"]
    return open_uploader(target, load_credentials(target), Throttle([]))


def sftp_setup(tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path
               ) -> Setup:
    return write_config(tmp_path, sshd, known_hosts, remote_dir,
                        target_extra='protocol = "sftp"\nconnections = 1')


# -- 1. SFTP's temporary file: a name of the attempt's own, created, never followed -------------


def test_sftp_never_writes_through_links_planted_at_the_predictable_temporary_names(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = sftp_setup(tmp_path, sshd, known_hosts, remote_dir)
    victim = outside_file(tmp_path / "elsewhere" / "victim")
    would_be_made = tmp_path / "elsewhere" / "made-through-a-dangling-link"
    # The names scpd once used for every attempt: .NAME.scpd-part
    (remote_dir / ".report.csv.scpd-part").symlink_to(victim)
    (remote_dir / ".other.csv.scpd-part").symlink_to(would_be_made)
    report = make_file(s.watch_dir / "report.csv", 5000)
    other = make_file(s.watch_dir / "other.csv", 3000)

    result = s.scpd("run", "--once", "--timeout", "20s")

    assert result.returncode == 0, result.stderr
    assert_untouched(victim)
    assert not would_be_made.exists()
    for local in (report, other):
        landed = remote_dir / local.name
        assert not landed.is_symlink() and landed.is_file(), landed
        assert sha256(landed) == sha256(local)


def test_sftp_refuses_a_link_at_its_temporary_name_instead_of_following_it(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        monkeypatch):
    from scpd.errors import TransferInterrupted
    from scpd.transport import sftp

    # Were the name guessed after all, the exclusive create refuses it (O_EXCL also
    # refuses a symbolic link, dangling or not). The server gives no reason (a generic
    # failure): retried, and the next attempt takes a new name.
    monkeypatch.setattr(sftp, "temp_name", lambda name, is_per_attempt: f".{name}.guessed")
    s = sftp_setup(tmp_path, sshd, known_hosts, remote_dir)
    victim = outside_file(tmp_path / "elsewhere" / "victim")
    would_be_made = tmp_path / "elsewhere" / "made-through-a-dangling-link"
    (remote_dir / ".a.bin.guessed").symlink_to(victim)
    (remote_dir / ".b.bin.guessed").symlink_to(would_be_made)
    uploader = uploader_for(s)
    try:
        for name in ("a.bin", "b.bin"):
            local = make_file(s.watch_dir / name, 4000)
            with pytest.raises(TransferInterrupted):
                uploader.upload(local, str(remote_dir / name), base=str(remote_dir))
    finally:
        uploader.close()

    assert_untouched(victim)
    assert not would_be_made.exists()
    assert not (remote_dir / "a.bin").exists() and not (remote_dir / "b.bin").exists()


def test_sftp_removes_a_stale_temporary_file_even_when_the_local_file_is_gone(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    from scpd.errors import SourceVanished

    # The job of a vanished file is dropped, and its record of the temp with it: the temp
    # must go first, or nothing would ever remove it.
    s = sftp_setup(tmp_path, sshd, known_hosts, remote_dir)
    stale = remote_dir / ".gone.txt.0badc0de.scpd-part"
    stale.write_bytes(b"half of an earlier attempt")
    uploader = uploader_for(s)
    try:
        with pytest.raises(SourceVanished):
            uploader.upload(s.watch_dir / "gone.txt", str(remote_dir / "gone.txt"),
                            stale_temp_path=str(stale), base=str(remote_dir))
    finally:
        uploader.close()

    assert not stale.exists()


def test_sftp_removes_the_temporary_file_of_the_attempt_before_and_never_reuses_it(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = sftp_setup(tmp_path, sshd, known_hosts, remote_dir)
    stale = remote_dir / ".f.bin.0123abcd.scpd-part"  # what a cut attempt left
    stale.write_bytes(b"half a file")
    local = make_file(s.watch_dir / "f.bin", 70_000)
    told: list[tuple[str, bool]] = []  # (temporary path, did it exist when told)
    uploader = uploader_for(s)
    try:
        for _ in range(2):
            uploader.upload(local, str(remote_dir / "f.bin"), base=str(remote_dir),
                            stale_temp_path=str(stale),
                            note_temp=lambda temp: told.append((temp, Path(temp).exists())))
    finally:
        uploader.close()

    assert not stale.exists()
    assert sha256(remote_dir / "f.bin") == sha256(local)
    assert [existed for _, existed in told] == [False, False]  # told before it was written
    temps = [temp for temp, _ in told]
    assert len(set(temps)) == 2 and str(stale) not in temps
    assert all(Path(temp).parent == remote_dir and Path(temp).name.startswith(".f.bin.")
               for temp in temps)
    assert temp_files(remote_dir) == []


# -- 2. a symbolic link below remote_dir --------------------------------------------------------


def test_a_symbolic_link_below_remote_dir_is_never_written_through(way: Setup, tmp_path: Path):
    s, remote = way, way.remote_dir
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (remote / "sub").symlink_to(outside)  # a link to a directory outside remote_dir
    (remote / "deep").mkdir()
    (remote / "deep" / "er").symlink_to(outside)  # the same, one level down
    (remote / "dangling").symlink_to(tmp_path / "not-yet")  # mkdir -p would make its target
    refused = ["sub/f.txt", "sub/new/g.txt", "deep/er/h.txt", "dangling/i.txt"]
    delivered = ["top.txt", "deep/j.txt", "ok/k.txt"]
    for index, name in enumerate(refused + delivered):
        old_file(s.watch_dir / name, 1000 + index, index)

    result = s.scpd("run", "--once", "--timeout", "20s", timeout=40)

    assert result.returncode == 1, result.stderr  # failed for good, not still owed
    assert list(outside.iterdir()) == [], "a file was written outside remote_dir"
    assert not (tmp_path / "not-yet").exists()
    for name in delivered:
        assert sha256(remote / name) == sha256(s.watch_dir / name), name
    failed = [line for line in result.stderr.splitlines() if "failed " in line]
    for name, link in zip(refused, ["sub", "sub", "deep/er", "dangling"], strict=True):
        line = next((line for line in failed if f"failed {name} to" in line), None)
        assert line is not None, (name, result.stderr)
        assert f"{remote / link} is a symbolic link" in line, line
    assert "retrying" not in result.stderr, result.stderr
    status = status_of(s)
    assert (status["failed"], status["pending"], status["delivered"]) == (4, 0, 3), status
    assert wait_until(lambda: temp_files(remote) == [], 3.0), temp_files(remote)


@pytest.mark.parametrize("protocol", ["scp", "sftp"])
def test_a_remote_dir_that_is_itself_a_symbolic_link_is_followed(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        protocol: str):
    mount = tmp_path / "mnt" / "incoming"
    mount.mkdir(parents=True)
    remote_dir.rmdir()
    remote_dir.symlink_to(mount)  # operators point remote_dir at a mount
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra=f'protocol = "{protocol}"')
    names = ["top.txt", "2026/11/nested.txt"]
    for index, name in enumerate(names):
        old_file(s.watch_dir / name, 500 + index, index)

    result = s.scpd("run", "--once", "--timeout", "20s")

    assert result.returncode == 0, result.stderr
    for name in names:
        assert sha256(mount / name) == sha256(s.watch_dir / name), name


def test_a_symbolic_link_under_the_final_name_is_replaced_not_followed(way: Setup,
                                                                       tmp_path: Path):
    victim = outside_file(tmp_path / "elsewhere" / "victim")
    (way.remote_dir / "f.txt").symlink_to(victim)
    local = old_file(way.watch_dir / "f.txt", 2000)

    result = way.scpd("run", "--once", "--timeout", "20s")

    assert result.returncode == 0, result.stderr
    assert_untouched(victim)
    landed = way.remote_dir / "f.txt"
    assert not landed.is_symlink() and sha256(landed) == sha256(local)


# -- 3. a remote path the remote cannot take ----------------------------------------------------


def nested_names(total_bytes: int, *, letter: str = "d") -> str:
    """A relative path of exactly total_bytes, in names of at most 201 bytes."""
    names = []
    while total_bytes > 201:
        names.append(letter * 200)
        total_bytes -= 201
    return "/".join([*names, letter * total_bytes])


def test_a_remote_path_over_path_max_fails_for_good_at_once(way: Setup, tmp_path: Path):
    # A deep local tree (its path stays under the local PATH_MAX) below a remote_dir a few
    # hundred bytes longer than the watch: the remote path is over 4095 bytes.
    s = way
    deep = nested_names(3800)
    local = s.watch_dir / deep / "f.txt"
    assert len(os.fsencode(local)) < 4095
    long_remote = s.remote_dir / ("r" * 250) / ("r" * 250)
    s.config.write_text(s.config.read_text().replace(
        f'remote_dir = "{s.remote_dir}"', f'remote_dir = "{long_remote}"'))
    assert len(os.fsencode(long_remote / deep / "f.txt")) > 4095
    old_file(local, 100)
    old_file(s.watch_dir / "short.txt", 100)

    started = time.monotonic()
    result = s.scpd("run", "--once", "--timeout", "20s", timeout=40)
    took = time.monotonic() - started

    assert result.returncode == 1, result.stderr
    line = next(line for line in result.stderr.splitlines() if "failed ddd" in line)
    assert "File name too long" in line and "at most 4095" in line, line
    assert "retrying" not in result.stderr, result.stderr
    assert took < 15, f"{took:.1f}s: retried instead of failed"
    assert sha256(long_remote / "short.txt") == sha256(s.watch_dir / "short.txt")
    assert not (long_remote / "ddd").exists() and not (long_remote / ("d" * 200)).exists()


def test_a_name_longer_than_the_remote_allows_fails_for_good_with_its_reason(
        way: Setup, tmp_path: Path):
    # A remote_dir under 4095 bytes whose last name is over NAME_MAX (255): the remote says
    # "File name too long" after a path of 4 KB, longer than a line scpd used to read.
    s = way
    prefix_bytes = 4040 - len(os.fsencode(s.remote_dir)) - 1 - 301
    long_remote = s.remote_dir / nested_names(prefix_bytes, letter="p") / ("x" * 300)
    assert len(os.fsencode(long_remote)) == 4040
    s.config.write_text(s.config.read_text().replace(
        f'remote_dir = "{s.remote_dir}"', f'remote_dir = "{long_remote}"'))
    old_file(s.watch_dir / "f.txt", 100)

    result = s.scpd("run", "--once", "--timeout", "20s", timeout=40)

    assert result.returncode == 1, result.stderr
    line = next(line for line in result.stderr.splitlines() if "failed f.txt" in line)
    assert "File name too long" in line, line
    assert "retrying" not in result.stderr, result.stderr
    assert len(line) < 2000, "the 4 KB path is shortened in the message"


# -- 4. the hostile names over SFTP -------------------------------------------------------------


def test_hostile_names_over_sftp_land_byte_exact_and_run_nothing(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = sftp_setup(tmp_path, sshd, known_hosts, remote_dir)
    files = make_hostile_files(s.watch_dir)
    ran_nothing = ShellMarker(tmp_path)
    log = SshdLog(sshd)

    result = s.scpd("run", "--once", "--timeout", "20s", timeout=40)

    assert result.returncode == 0, result.stderr
    assert log.logins() == 1 and log.sftp_sessions() == 1, log.text()
    assert log.sessions() == 0, "SFTP ran a command on the remote"
    assert_landed_exactly(files, remote_dir, mtime_unit_ns=10**9)  # SFTPv3: whole seconds
    ran_nothing.check()
    assert temp_files(remote_dir) == []
    assert "retrying" not in result.stderr and "failed" not in result.stderr, result.stderr


# -- 5. an SFTP-only server (ForceCommand internal-sftp) ----------------------------------------


def sftp_only_setup(tmp_path: Path, server: ThrowawaySshd, remote_dir: Path, protocol: str
                    ) -> Setup:
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    return write_config(tmp_path, server, known_hosts, remote_dir,
                        target_extra=f'protocol = "{protocol}"')


def test_an_sftp_only_server_takes_files_over_sftp(
        tmp_path: Path, sftp_only_sshd: ThrowawaySshd, remote_dir: Path):
    s = sftp_only_setup(tmp_path, sftp_only_sshd, remote_dir, "sftp")
    names = ["a.txt", "sub/b.txt"]
    for index, name in enumerate(names):
        old_file(s.watch_dir / name, 1000 + index, index)

    checked = s.scpd("check")
    result = s.scpd("run", "--once", "--timeout", "20s")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert result.returncode == 0, result.stderr
    assert sorted(final_files(remote_dir)) == sorted(names)
    for name in names:
        assert sha256(remote_dir / name) == sha256(s.watch_dir / name)


def test_check_with_scp_against_an_sftp_only_server_names_the_fix(
        tmp_path: Path, sftp_only_sshd: ThrowawaySshd, remote_dir: Path):
    s = sftp_only_setup(tmp_path, sftp_only_sshd, remote_dir, "scp")

    result = s.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert 'protocol = "sftp"' in result.stdout, result.stdout
    assert result.stderr.startswith("scpd: ") and 'protocol = "sftp"' in result.stderr
    assert "Traceback" not in result.stderr


def test_scp_against_an_sftp_only_server_pauses_the_target_once_instead_of_failing_files(
        tmp_path: Path, sftp_only_sshd: ThrowawaySshd, remote_dir: Path):
    s = sftp_only_setup(tmp_path, sftp_only_sshd, remote_dir, "scp")
    names = [f"d{d}/f{i}.txt" for d in range(2) for i in range(3)] + ["top.txt"]
    for index, name in enumerate(names):
        old_file(s.watch_dir / name, 100 + index, index)

    once = s.scpd("run", "--once", "--timeout", "20s", timeout=40)
    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("target local paused: ", 10.0), daemon.log()
        time.sleep(3.0)  # a few probe periods (retry_max: 1s)
        log = daemon.log()
        status = status_of(s)
    finally:
        returncode = daemon.stop()

    # run --once does not wait out its timeout on a target that cannot work
    assert once.returncode == 1, once.stderr
    assert "target local is paused" in once.stderr, once.stderr
    assert "failed " not in once.stderr and "retrying" not in once.stderr, once.stderr
    # the daemon: one pause, said once, with the reason and the fix; no file failed
    paused = [line for line in log.splitlines() if "target local paused: " in line]
    assert len(paused) == 1, log
    assert "remote did not speak SCP" in paused[0] and 'protocol = "sftp"' in paused[0]
    assert "failed " not in log and "retrying" not in log, log
    assert status["paused"] is True, status
    assert status["failed"] == 0 and status["delivered"] == 0, status
    assert status["pending"] + status["sending"] == len(names), status
    assert final_files(remote_dir) == {}
    assert returncode == 0, log
