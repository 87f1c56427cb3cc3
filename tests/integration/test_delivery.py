"""A file in a watched directory lands on a real OpenSSH server, byte-identical, with its times
and mode: through `run --once` and through the running daemon, over SCP and SFTP."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import Setup, sha256, wait_until, write_config

from tools.sshd import ThrowawaySshd, free_port

PROTOCOLS = ["scp", "sftp"]


def make_file(path: Path, size: int, *, mode: int = 0o640, mtime_ns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    path.chmod(mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def assert_landed(local: Path, remote: Path, *, mtime_resolution_ns: int = 1000) -> None:
    assert remote.is_file(), f"{remote} did not arrive"
    assert sha256(remote) == sha256(local)
    # SCP's T record carries microseconds; SFTPv3 attributes carry whole seconds only.
    assert (remote.stat().st_mtime_ns // mtime_resolution_ns
            == local.stat().st_mtime_ns // mtime_resolution_ns)
    assert (remote.stat().st_mode & 0o7777) == (local.stat().st_mode & 0o7777)


def no_temp_files(remote_dir: Path) -> list[Path]:
    return [p for p in remote_dir.rglob("*.scpd-part")]


MTIME_RESOLUTION_NS = {"scp": 1000, "sftp": 1_000_000_000}


@pytest.fixture(params=PROTOCOLS)
def protocol_setup(request, tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path,
                   remote_dir: Path) -> Setup:
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra=f'protocol = "{request.param}"')
    s.mtime_resolution_ns = MTIME_RESOLUTION_NS[request.param]
    return s


def test_run_once_delivers_root_and_subdirectory_files_with_times_and_mode(
        protocol_setup: Setup):
    s = protocol_setup
    top = make_file(s.watch_dir / "report.csv", 10_000, mode=0o640,
                    mtime_ns=1_600_000_000_123_456_789)
    nested = make_file(s.watch_dir / "2026" / "11" / "big.bin", 3_000_000, mode=0o600,
                       mtime_ns=1_700_000_000_987_654_321)

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert_landed(top, s.remote_dir / "report.csv", mtime_resolution_ns=s.mtime_resolution_ns)
    assert_landed(nested, s.remote_dir / "2026" / "11" / "big.bin",
                  mtime_resolution_ns=s.mtime_resolution_ns)
    assert no_temp_files(s.remote_dir) == []
    assert "sent 2026/11/big.bin" in result.stderr


def test_run_once_does_not_send_an_unchanged_file_twice(setup: Setup):
    make_file(setup.watch_dir / "a.txt", 100, mtime_ns=1_600_000_000_000_000_000)
    assert setup.scpd("run", "--once").returncode == 0
    (setup.remote_dir / "a.txt").unlink()  # would come back if it were sent again

    second = setup.scpd("run", "--once")

    assert second.returncode == 0, second.stderr
    assert "sent" not in second.stderr
    assert not (setup.remote_dir / "a.txt").exists()


def test_run_once_sends_a_changed_file_again(setup: Setup):
    path = make_file(setup.watch_dir / "a.txt", 100, mtime_ns=1_600_000_000_000_000_000)
    assert setup.scpd("run", "--once").returncode == 0
    make_file(path, 200, mtime_ns=1_600_000_100_000_000_000)

    assert setup.scpd("run", "--once").returncode == 0

    assert_landed(path, setup.remote_dir / "a.txt")


ODD_NAMES = [
    "with space.txt",
    "quote's \"double\".txt",
    "$(touch pwned).txt",
    "semi;colon&amp|pipe.txt",
    "-leading-dash.txt",
    "ünïcödé 文字.txt",
    "back\\slash*star?.txt",
    os.fsdecode(b"latin1-caf\xe9.txt"),  # not UTF-8: file names are bytes
    "new\nline.txt",
]


def test_odd_file_names_arrive_intact_and_are_never_shell(protocol_setup: Setup):
    s = protocol_setup
    # A name run as shell would create "pwned" in the remote login's working directory: its
    # home, as the test sshd logs in this same user.
    pwned = Path.home() / "pwned"
    assert not pwned.exists()
    files = [make_file(s.watch_dir / name, 64, mode=0o644) for name in ODD_NAMES]

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    for local in files:
        assert_landed(local, s.remote_dir / local.name,
                      mtime_resolution_ns=s.mtime_resolution_ns)
    assert not pwned.exists()
    assert sorted(p.name for p in s.remote_dir.iterdir()) == sorted(ODD_NAMES)


@pytest.mark.parametrize("mtime_ns", [-86_400 * 10**9, 2**32 * 10**9],
                         ids=["before 1970", "after 2106"])
def test_a_date_the_protocol_cannot_carry_holds_up_neither_file_nor_batch(
        protocol_setup: Setup, mtime_ns: int):
    s = protocol_setup
    odd = make_file(s.watch_dir / "odd-date.txt", 100, mtime_ns=mtime_ns)
    neighbours = [make_file(s.watch_dir / f"n{i}.txt", 100, mtime_ns=1_600_000_000 * 10**9)
                  for i in range(3)]

    result = s.scpd("run", "--once", "--timeout", "10s")

    assert result.returncode == 0, result.stderr
    assert (s.remote_dir / "odd-date.txt").read_bytes() == odd.read_bytes()
    for local in neighbours:
        assert_landed(local, s.remote_dir / local.name,
                      mtime_resolution_ns=s.mtime_resolution_ns)
    carried = abs(os.stat(s.remote_dir / "odd-date.txt").st_mtime_ns - mtime_ns) < 10**9
    if carried:  # SCP's 64-bit times carry 2106 and later
        assert mtime_ns > 0 and "without them" not in result.stderr, result.stderr
    else:
        assert "odd-date.txt: its times" in result.stderr and "sent without them" in \
            result.stderr, result.stderr
    assert "retrying" not in result.stderr, result.stderr


def test_hidden_and_temporary_files_are_not_sent(setup: Setup):
    make_file(setup.watch_dir / "keep.txt", 10)
    for name in [".hidden", "x.part", "x.tmp", ".x.swp", "x~", ".git/config"]:
        make_file(setup.watch_dir / name, 10)

    assert setup.scpd("run", "--once").returncode == 0

    assert sorted(p.name for p in setup.remote_dir.rglob("*")) == ["keep.txt"]


def test_remote_dir_placeholders_are_filled(tmp_path: Path, sshd: ThrowawaySshd,
                                           known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir)
    text = s.config.read_text().replace(f'remote_dir = "{remote_dir}"',
                                        f'remote_dir = "{remote_dir}/{{hostname}}/{{watch}}"')
    s.config.write_text(text)
    local = make_file(s.watch_dir / "a.txt", 10)

    assert s.scpd("run", "--once").returncode == 0

    assert_landed(local, remote_dir / os.uname().nodename / "outbox" / "a.txt")


def test_daemon_delivers_a_file_written_while_it_runs(protocol_setup: Setup):
    s = protocol_setup
    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10)
        local = s.watch_dir / "sub" / "late.bin"
        local.parent.mkdir()
        written_at = time.monotonic()
        make_file(local, 200_000)
        remote = s.remote_dir / "sub" / "late.bin"
        wait_until(remote.exists, 10)
        landed_after = time.monotonic() - written_at
        assert_landed(local, remote, mtime_resolution_ns=s.mtime_resolution_ns)
        assert landed_after < 5, f"took {landed_after:.1f}s"
    finally:
        returncode = daemon.stop()
    assert returncode == 0, daemon.log()
    assert no_temp_files(s.remote_dir) == []


def test_run_once_exits_75_when_the_target_is_down(tmp_path: Path, sshd: ThrowawaySshd,
                                                   known_hosts: Path, remote_dir: Path):
    closed_port = free_port()
    s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=closed_port)
    make_file(s.watch_dir / "a.txt", 10)

    result = s.scpd("run", "--once", "--timeout", "2s")

    assert result.returncode == 75, result.stderr
    assert "cannot connect" in result.stderr
    assert "still owed" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_host_key_is_refused_and_nothing_is_sent(setup: Setup, known_hosts: Path):
    known_hosts.write_text("")  # strict policy, host not listed
    make_file(setup.watch_dir / "a.txt", 10)
    result = setup.scpd("run", "--once", "--timeout", "3s")
    assert result.returncode == 1, result.stderr
    assert "not found in known_hosts" in result.stderr
    assert list(setup.remote_dir.iterdir()) == []
    assert "Traceback" not in result.stderr


def test_changed_host_key_is_refused(setup: Setup, known_hosts: Path, tmp_path: Path):
    other = ThrowawaySshd(tmp_path / "other-sshd")
    other.start()
    other.stop()
    other.write_known_hosts(known_hosts, port=_port_of(setup))
    make_file(setup.watch_dir / "a.txt", 10)

    result = setup.scpd("run", "--once", "--timeout", "3s")

    assert result.returncode == 1, result.stderr
    assert "does not match known_hosts" in result.stderr
    assert list(setup.remote_dir.iterdir()) == []


def test_check_connects_and_reports_each_step(setup: Setup):
    result = setup.scpd("check")

    assert result.returncode == 0, result.stderr
    assert "  ok       host key ssh-ed25519 SHA256:" in result.stdout
    assert "  ok       login as " in result.stdout
    assert "  ok       scp available" in result.stdout
    assert (f"  ok       {setup.remote_dir} writable (probe file created and removed)"
            in result.stdout)
    assert "target local: ok (" in result.stdout


def test_check_exits_69_when_a_target_is_unusable(setup: Setup, known_hosts: Path):
    known_hosts.write_text("")

    result = setup.scpd("check")

    assert result.returncode == 69
    assert "target local: FAILED" in result.stdout
    assert result.stderr.startswith("scpd: target local is unusable:")


def _port_of(s: Setup) -> int:
    for line in s.config.read_text().splitlines():
        if line.startswith("port = "):
            return int(line.split("=")[1])
    raise AssertionError("no port in config")


def test_overlapping_watches_each_deliver_to_their_own_targets(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir)
    inner_remote = tmp_path / "inner-remote"
    text = s.config.read_text()
    second_target = text.split("[targets.local]")[1].split("[[watch]]")[0].replace(
        f'remote_dir = "{remote_dir}"', f'remote_dir = "{inner_remote}"')
    s.config.write_text(text.replace("[[watch]]", f"[targets.inner]{second_target}[[watch]]")
                        + f'\n[[watch]]\nname = "reports"\npath = "{s.watch_dir}/reports"\n'
                          'targets = ["inner"]\nsettle = "300ms"\n')
    local = make_file(s.watch_dir / "reports" / "q3.pdf", 1000)

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert_landed(local, remote_dir / "reports" / "q3.pdf")
    assert_landed(local, inner_remote / "q3.pdf")


def test_a_remote_directory_in_the_way_is_refused_not_filled(protocol_setup: Setup):
    s = protocol_setup
    (s.remote_dir / "data").mkdir()
    make_file(s.watch_dir / "data", 100)

    result = s.scpd("run", "--once", "--timeout", "5s")

    assert result.returncode == 1, result.stderr
    assert "Is a directory" in result.stderr
    assert list((s.remote_dir / "data").iterdir()) == []


def test_check_names_an_unwritable_remote_dir_over_sftp(protocol_setup: Setup, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    text = protocol_setup.config.read_text()
    protocol_setup.config.write_text(text.replace(f'remote_dir = "{protocol_setup.remote_dir}"',
                                                  f'remote_dir = "{blocker}/incoming"'))

    result = protocol_setup.scpd("check")

    assert result.returncode == 69, result.stderr
    assert "target local: FAILED" in result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert "internal error" not in result.stderr


def test_accept_new_with_an_unwritable_known_hosts_fails_with_the_reason(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    s = write_config(tmp_path, sshd, blocker / "known_hosts", remote_dir,
                     target_extra='host_key_policy = "accept-new"')
    make_file(s.watch_dir / "a.txt", 10)

    result = s.scpd("run", "--once", "--timeout", "3s")

    assert result.returncode == 1, result.stderr
    assert "cannot record the new host key" in result.stderr
    assert not (remote_dir / "a.txt").exists()


def test_sighup_reloads_the_config_and_keeps_the_queue(setup: Setup, tmp_path: Path):
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10), daemon.log()
        second = tmp_path / "second-outbox"
        second.mkdir()
        setup.config.write_text(setup.config.read_text() + f"""
[[watch]]
name = "second"
path = "{second}"
targets = ["local"]
settle = "300ms"
""")
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("config reloaded", 10), daemon.log()
        local = make_file(second / "new.txt", 100)
        remote = setup.remote_dir / "new.txt"
        assert wait_until(remote.exists, 10), "did not land within 10 s"
        assert_landed(local, remote)
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_sighup_with_a_broken_config_keeps_the_running_one(setup: Setup):
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10), daemon.log()
        good = setup.config.read_text()
        setup.config.write_text(good.replace("port = ", 'port = "x"\n#'))
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("reload failed, keeping the running config", 10)
        assert "targets.local.port" in daemon.log()
        local = make_file(setup.watch_dir / "still.txt", 100)
        remote = setup.remote_dir / "still.txt"
        assert wait_until(remote.exists, 10), "did not land within 10 s"
        assert_landed(local, remote)
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_sighup_applies_a_new_log_level(setup: Setup):
    quiet = setup.config.read_text().replace("[daemon]", '[daemon]\nlog_level = "warning"')
    setup.config.write_text(quiet)
    daemon = setup.start_daemon()
    try:
        make_file(setup.watch_dir / "before.txt", 10)
        assert wait_until((setup.remote_dir / "before.txt").exists, 10), daemon.log()
        setup.config.write_text(quiet.replace('log_level = "warning"', 'log_level = "info"'))
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("config reloaded", 10), daemon.log()
        make_file(setup.watch_dir / "after.txt", 10)
        assert daemon.wait_for_log("sent after.txt", 10), daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "before.txt" not in daemon.log()  # its info lines were below the level then
