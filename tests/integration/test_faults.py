"""The delivery promise (DESIGN.md section 4) under faults, against a real sshd and scpd run as
a subprocess: the connection cut mid-file, sshd down while files arrive, the daemon killed
with SIGKILL mid-stream, a remote path that cannot exist, a full remote disk, slow links."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    make_file,
    require_private_mount_namespace,
    sha256,
    temp_files,
    wait_until,
    write_config,
)

from tools.faultproxy import FaultProxy
from tools.harness import private_tmpfs_launcher
from tools.sshd import ThrowawaySshd

PROTOCOLS = ["scp", "sftp"]
MiB = 1024 * 1024
POLL_SECONDS = 0.02


def final_files(remote_dir: Path) -> list[Path]:
    return sorted(p for p in remote_dir.iterdir() if not p.name.startswith("."))


def wait_for_no_temp_files(remote_dir: Path) -> list[Path]:
    # An SCP session cut by a fault removes its temporary file itself, on the remote side,
    # a moment after the cut: give it that moment.
    wait_until(lambda: not temp_files(remote_dir), 3.0)
    return temp_files(remote_dir)




def retry_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "retrying in" in line]


# -- a. the connection cut mid-file -------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("cut_after_bytes", [200_000, 1_000_000, 3_000_000])
def test_run_once_delivers_the_whole_file_when_the_connection_is_cut_mid_file(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path, protocol: str,
        cut_after_bytes: int):
    # The first few KB upstream are the SSH handshake; every offset here is inside the data.
    with FaultProxy(sshd.port, cut_after_bytes=cut_after_bytes) as proxy:
        known_hosts = sshd.write_known_hosts(tmp_path / "known_hosts_proxy", port=proxy.port)
        s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=proxy.port,
                         target_extra=f'protocol = "{protocol}"\nconnections = 1')
        local = make_file(s.watch_dir / "big.bin", 4 * MiB)

        result = s.scpd("run", "--once", "--timeout", "20s", timeout=40)

        assert result.returncode == 0, result.stderr
        assert proxy.has_cut, "the proxy never cut: the test proved nothing"
        assert proxy.connections >= 2
    assert retry_lines(result.stderr), result.stderr
    assert sha256(remote_dir / "big.bin") == sha256(local)
    assert wait_for_no_temp_files(remote_dir) == []
    assert "Traceback" not in result.stderr


# -- a'. a half-open connection, whose server side ends late -----------------------------------


@pytest.mark.parametrize("protocol", [
    "scp",
    "sftp",
])
def test_retry_survives_the_cut_session_ending_late_on_the_remote(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path, protocol: str):
    # A half-open connection: scpd gives up on it (io_timeout) and retries on a new one, but
    # the server learns that the old session is dead only later, while the retry writes to
    # the same remote directory. Whatever the old session does then must not spoil the retry.
    with FaultProxy(sshd.port, stall_after_bytes=1_000_000) as proxy:
        known_hosts = sshd.write_known_hosts(tmp_path / "known_hosts_proxy", port=proxy.port)
        s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=proxy.port,
                         target_extra=f'protocol = "{protocol}"\nconnections = 1\n'
                                      'bandwidth_limit = "2MiB/s"')
        s.config.write_text(s.config.read_text().replace('io_timeout = "5s"',
                                                         'io_timeout = "2s"'))
        local = make_file(s.watch_dir / "big.bin", 4 * MiB)

        run = s.start_daemon("--once", "--timeout", "20s")
        try:
            assert run.wait_for_log("retrying in", 10.0), run.log()
            assert wait_until(lambda: proxy.connections >= 2, 2.0), (
                f"the retry did not reconnect: it went on over the stalled connection\n"
                f"{run.log()}")
            # The retry is well into the file (4 MiB at 2 MiB/s), and not yet done with it.
            assert wait_until(lambda: proxy.upstream_bytes > 1_000_000 + 1_500_000, 10.0)
            assert proxy.end_stalled() == 1
            returncode = run.process.wait(30)
        finally:
            run.stop()

    assert returncode == 0, run.log()
    assert sha256(remote_dir / "big.bin") == sha256(local)
    assert wait_for_no_temp_files(remote_dir) == []


# -- b. sshd down while files arrive ------------------------------------------------------------


class DownSshd:
    """An sshd of this test's own (the session one stays up for the others), known to the
    config, then stopped: start() brings it back on the same port with the same host key."""

    def __init__(self, tmp_path: Path):
        self.server = ThrowawaySshd(tmp_path / "own-sshd")
        self.server.start()
        try:
            self.known_hosts = self.server.write_known_hosts(tmp_path / "known_hosts")
        finally:
            self.server.stop()


@pytest.fixture
def down_sshd(tmp_path: Path):
    down = DownSshd(tmp_path)
    try:
        yield down
    finally:
        down.server.stop()


def test_daemon_delivers_files_that_arrived_while_sshd_was_down(
        tmp_path: Path, remote_dir: Path, down_sshd: DownSshd):
    server = down_sshd.server
    s = write_config(tmp_path, server, down_sshd.known_hosts, remote_dir)  # retry 200ms .. 1s
    files = [make_file(s.watch_dir / f"file-{i}.bin", 50_000) for i in range(5)]

    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("retrying in", 5), daemon.log()
        time.sleep(2.0)
        assert daemon.process.poll() is None, daemon.log()
        assert final_files(remote_dir) == []

        server.start()
        landed = wait_until(lambda: all(
            (remote_dir / f.name).is_file() and sha256(remote_dir / f.name) == sha256(f)
            for f in files), 10.0)

        assert landed, f"{final_files(remote_dir)}\n{daemon.log()}"
        assert daemon.process.poll() is None, daemon.log()
    finally:
        returncode = daemon.stop(signal.SIGTERM)
    assert returncode == 0, daemon.log()
    assert temp_files(remote_dir) == []
    assert "Traceback" not in daemon.log()


def test_daemon_does_not_hammer_a_down_sshd_however_many_files_wait(
        tmp_path: Path, remote_dir: Path, down_sshd: DownSshd):
    s = write_config(tmp_path, down_sshd.server, down_sshd.known_hosts, remote_dir)
    for i in range(5):
        make_file(s.watch_dir / f"file-{i}.bin", 50_000)

    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("retrying in", 5), daemon.log()
        time.sleep(2.0)
        assert daemon.process.poll() is None, daemon.log()
        lines = retry_lines(daemon.log())
    finally:
        returncode = daemon.stop(signal.SIGTERM)
    assert returncode == 0, daemon.log()
    # Backoff from 200 ms doubling to a 1 s cap allows about five tries of a dead target in
    # two seconds, however many files wait for it. More is a hot loop against the server.
    assert 1 <= len(lines) <= 10, "\n".join(lines)


# -- c. kill -9 mid-stream ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kill_9_mid_stream_leaves_only_complete_files_and_run_once_delivers_the_rest(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        protocol: str):
    # Four connections: several transfers are in flight when the kill comes. The cap keeps
    # the kill mid-stream however fast this machine is.
    cap = 'bandwidth_limit = "8MiB/s"'
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra=f'protocol = "{protocol}"\nconnections = 4\n{cap}')
    rng = random.Random(9)
    # A hundred files: enough that the kill falls mid-stream, few enough that SCP, a remote
    # command or two per file, delivers the rest in a few seconds.
    files = [make_file(s.watch_dir / f"file-{i:03d}.bin", rng.randint(20_000, 200_000))
             for i in range(100)]
    digests = {f.name: sha256(f) for f in files}

    daemon = s.start_daemon()
    try:
        wait_until(lambda: len(final_files(remote_dir)) >= 30 or daemon.process.poll() is not None,
                   20.0)
    finally:
        daemon.stop(signal.SIGKILL)
    landed = final_files(remote_dir)

    assert 30 <= len(landed) < len(files), f"killed after {len(landed)} files\n{daemon.log()}"
    # Never partial: whatever is under a final name is the whole file.
    for remote in landed:
        assert sha256(remote) == digests[remote.name], f"{remote.name} is not complete"

    s.config.write_text(s.config.read_text().replace(cap, ""))
    result = s.scpd("run", "--once", "--timeout", "60s", timeout=90)

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in final_files(remote_dir)) == sorted(digests)
    for remote in final_files(remote_dir):
        assert sha256(remote) == digests[remote.name], f"{remote.name} differs"
    assert wait_for_no_temp_files(remote_dir) == []


# -- e. a remote path that cannot exist ---------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_remote_dir_under_a_regular_file_fails_at_once_with_one_clear_error(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, protocol: str):
    # Root bypasses permission bits, but not "Not a directory": a portable permanent error.
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a directory\n")
    s = write_config(tmp_path, sshd, known_hosts, blocker / "sub",
                     target_extra=f'protocol = "{protocol}"')
    make_file(s.watch_dir / "a.txt", 1000)

    started = time.monotonic()
    result = s.scpd("run", "--once", "--timeout", "5s", timeout=30)
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stderr
    assert elapsed < 3.0, f"took {elapsed:.1f}s: a permanent error must not be retried"
    assert "Traceback" not in result.stderr
    assert retry_lines(result.stderr) == [], result.stderr
    failed = [line for line in result.stderr.splitlines() if "failed a.txt" in line]
    assert len(failed) == 1, result.stderr
    assert str(blocker) in failed[0] or "Not a directory" in failed[0], failed[0]
    assert "Not a directory" in failed[0] or "No such file" in failed[0], failed[0]
    assert blocker.read_text() == "a file, not a directory\n"


# -- f. a stall where paramiko waits without a timeout ------------------------------------------


def bytes_until_session_open(sshd: ThrowawaySshd, tmp_path: Path) -> int:
    """Client-to-server bytes scpd's own connection sends up to an open session channel:
    the same for every connection of the same keys and algorithms."""
    from scpd import config as config_module
    from scpd.transport import load_credentials
    from scpd.transport.ssh import SshConnection

    with FaultProxy(sshd.port) as proxy:
        known_hosts = sshd.write_known_hosts(tmp_path / "kh-measure", port=proxy.port)
        s = write_config(tmp_path / "measure", sshd, known_hosts, tmp_path, port=proxy.port)
        target = config_module.load(s.config).targets["local"]
        connection = SshConnection(target, load_credentials(target))
        try:
            channel = connection.transport().open_session(timeout=5)
            try:
                return _settled_count(lambda: proxy.upstream_bytes)
            finally:
                channel.close()
        finally:
            connection.close()


def _settled_count(read: Callable[[], int], quiet_seconds: float = 0.3) -> int:
    """A counter's value once it has stopped changing for quiet_seconds (bounded: 5 s)."""
    value, since = read(), time.monotonic()
    deadline = since + 5.0
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        now_value = read()
        if now_value != value:
            value, since = now_value, time.monotonic()
        elif time.monotonic() - since >= quiet_seconds:
            return value
    raise AssertionError("the counter never settled")


def test_stall_inside_the_exec_request_is_cut_and_the_file_still_lands(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path):
    # paramiko's exec_command waits for the server's reply with no timeout at all: stall the
    # link in the middle of that request and only scpd's stall guard can get the worker back.
    (tmp_path / "measure").mkdir()
    stall_at = bytes_until_session_open(sshd, tmp_path) + 40
    with FaultProxy(sshd.port, stall_after_bytes=stall_at) as proxy:
        known_hosts = sshd.write_known_hosts(tmp_path / "known_hosts_proxy", port=proxy.port)
        s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=proxy.port,
                         target_extra="connections = 1")
        s.config.write_text(s.config.read_text().replace('io_timeout = "5s"',
                                                         'io_timeout = "1s"'))
        local = make_file(s.watch_dir / "a.bin", 100_000)

        result = s.scpd("run", "--once", "--timeout", "20s")

    assert proxy.has_stalled
    assert result.returncode == 0, result.stderr
    assert "no progress" in result.stderr
    assert sha256(remote_dir / "a.bin") == sha256(local)


# -- g. the remote disk is full ------------------------------------------------------------------


@pytest.fixture
def full_disk_sshd(tmp_path: Path):
    """An sshd of its own whose remote directory is a 1 MiB tmpfs, mounted in a private mount
    namespace so that the machine never sees it (it vanishes with the sshd)."""
    require_private_mount_namespace()
    small = tmp_path / "small"
    small.mkdir()
    server = ThrowawaySshd(tmp_path / "full-sshd", launcher=private_tmpfs_launcher(small, "1m"))
    server.start()
    try:
        yield server, small
    finally:
        server.stop()


def in_sshd_namespace(server: ThrowawaySshd, *command: str) -> str:
    """Run a command in the sshd's mount namespace: what the remote side sees."""
    import subprocess

    return subprocess.run(["nsenter", "-t", str(server.pid), "-m", "--", *command],
                          capture_output=True, text=True, check=False).stdout


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_full_remote_disk_is_retried_and_never_reported_delivered(
        tmp_path: Path, full_disk_sshd, protocol: str):
    server, small = full_disk_sshd
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    s = write_config(tmp_path, server, known_hosts, small / "in",
                     target_extra=f'protocol = "{protocol}"')
    make_file(s.watch_dir / "big.bin", 1_500_000)
    make_file(s.watch_dir / "small.bin", 100_000)

    result = s.scpd("run", "--once", "--timeout", "2s")

    assert result.returncode == 75, result.stderr  # still owed: not failed, not delivered
    assert "No space left on device" in result.stderr or "Failure" in result.stderr
    assert "sent big.bin" not in result.stderr
    remote_names = in_sshd_namespace(server, "ls", "-a", str(small / "in")).split()
    assert "small.bin" in remote_names, "the remote view is empty: nsenter failed?"
    assert "big.bin" not in remote_names, "a partial file is under its final name"
    assert not [n for n in remote_names if n.endswith(".scpd-part")]
    local_status = s.scpd("status", "--json").stdout
    assert '"pending": 1' in local_status


def remote_sha256(server: ThrowawaySshd, path: Path) -> str | None:
    """The sha256 of a file as the remote sees it, None if it is not there."""
    out = in_sshd_namespace(server, "sha256sum", str(path)).split()
    return out[0] if out else None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_full_remote_disk_is_retried_until_space_is_made_then_delivered_whole(
        tmp_path: Path, full_disk_sshd, protocol: str):
    server, small = full_disk_sshd
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    remote = small / "in"
    s = write_config(tmp_path, server, known_hosts, remote,
                     target_extra=f'protocol = "{protocol}"\nconnections = 1')
    big = make_file(s.watch_dir / "big.bin", 1_500_000)
    big_digest = sha256(big)
    seen: set[str] = set()  # every digest ever found under the final name

    def look() -> str | None:
        digest = remote_sha256(server, remote / "big.bin")
        if digest is not None:
            seen.add(digest)
        return digest

    daemon = s.start_daemon()
    try:
        def is_retried_twice() -> bool:
            look()
            return len([line for line in retry_lines(daemon.log()) if "big.bin" in line]) >= 2

        assert wait_until(is_retried_twice, 10.0, poll=0.1), daemon.log()
        assert daemon.process.poll() is None, daemon.log()
        assert "sent big.bin" not in daemon.log()
        assert not seen, "a partial big.bin is under its final name on the full disk"

        in_sshd_namespace(server, "mount", "-n", "-o", "remount,size=8m", str(small))
        assert "size=8192k" in in_sshd_namespace(server, "findmnt", "-n", "-o", "OPTIONS",
                                                 str(small)), "the remount did not happen"

        # Backoff is capped at 1 s: the next try, after the space is made, must succeed.
        assert wait_until(lambda: look() == big_digest, 10.0, poll=0.1), (
            f"{in_sshd_namespace(server, 'ls', '-la', str(remote))}\n{daemon.log()}")
    finally:
        returncode = daemon.stop(signal.SIGTERM)
    assert returncode == 0, daemon.log()
    assert seen == {big_digest}, "a version other than the whole file was under its final name"
    assert "sent big.bin" in daemon.log()
    remote_names = in_sshd_namespace(server, "ls", "-a", str(remote)).split()
    assert not [n for n in remote_names if n.endswith(".scpd-part")], remote_names
    assert "Traceback" not in daemon.log()


# -- h. a slow link -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_slow_link_is_not_mistaken_for_a_stall(tmp_path: Path, sshd: ThrowawaySshd,
                                                remote_dir: Path, protocol: str):
    # 600 KB at 100 KB/s with io_timeout 1s: the remote acknowledges the whole file only
    # seconds after the last byte left scpd; the link moving all along is not a stall.
    with FaultProxy(sshd.port, rate_bytes_per_second=100_000) as proxy:
        known_hosts = sshd.write_known_hosts(tmp_path / "known_hosts_proxy", port=proxy.port)
        s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=proxy.port,
                         target_extra=f'protocol = "{protocol}"\nconnections = 1')
        text = s.config.read_text().replace('io_timeout = "5s"', 'io_timeout = "1s"')
        s.config.write_text(text.replace('connect_timeout = "3s"', 'connect_timeout = "1s"'))
        local = make_file(s.watch_dir / "slow.bin", 600_000)

        result = s.scpd("run", "--once", "--timeout", "30s")

    assert result.returncode == 0, result.stderr
    assert sha256(remote_dir / "slow.bin") == sha256(local)
    assert "retrying" not in result.stderr and "no progress" not in result.stderr
    assert proxy.connections == 1


# -- i. a cut session that the remote finishes late --------------------------------------------


def test_a_cut_session_ending_late_never_puts_an_old_version_over_a_newer_one(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path, monkeypatch):
    # The link stalls right after the whole of version 1 reached the remote, before scpd saw
    # the acknowledgement. scpd retries, the file has changed, version 2 lands. Then the old
    # session ends on the server: whatever it does, the remote must keep version 2.
    from scpd import config as config_module
    from scpd.errors import RetryableError
    from scpd.transport import Throttle, load_credentials, open_uploader
    from scpd.transport.scp import ScpUploader

    local = tmp_path / "f.bin"
    final = str(remote_dir / "f.bin")

    def uploader_through(proxy: FaultProxy):
        known_hosts = sshd.write_known_hosts(tmp_path / f"kh{proxy.port}", port=proxy.port)
        s = write_config(tmp_path / f"c{proxy.port}", sshd, known_hosts, remote_dir,
                         port=proxy.port)
        s.config.write_text(s.config.read_text().replace('io_timeout = "5s"',
                                                         'io_timeout = "1s"'))
        target = config_module.load(s.config).targets["local"]
        return open_uploader(target, load_credentials(target), Throttle([]))

    def write(data: bytes) -> None:
        local.write_bytes(data)
        os.utime(local, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000 + data[0]))

    # Measure how many bytes go upstream up to the final record of the file.
    write(b"1" * 100_000)
    measured: list[int] = []
    original = ScpUploader._recv_last_ack
    with FaultProxy(sshd.port) as proxy:
        def spy(self, channel):
            time.sleep(0.3)  # let the last record through the proxy before reading the count
            measured.append(proxy.upstream_bytes)
            return original(self, channel)

        monkeypatch.setattr(ScpUploader, "_recv_last_ack", spy)
        (tmp_path / f"c{proxy.port}").mkdir()
        uploader = uploader_through(proxy)
        uploader.upload(local, final)
        uploader.close()
        monkeypatch.setattr(ScpUploader, "_recv_last_ack", original)
    os.unlink(final)

    version_1, version_2 = b"1" * 100_000, b"2" * 100_000
    write(version_1)
    with FaultProxy(sshd.port, stall_after_bytes=measured[0]) as proxy:
        (tmp_path / f"c{proxy.port}").mkdir()
        uploader = uploader_through(proxy)
        with pytest.raises(RetryableError):
            uploader.upload(local, final)
        assert proxy.has_stalled
        write(version_2)
        uploader.upload(local, final)
        assert Path(final).read_bytes() == version_2
        assert proxy.end_stalled() == 1  # the server learns the old session is over
        time.sleep(1.5)  # what a late rename would need; there must be none
        uploader.close()

    assert Path(final).read_bytes() == version_2
    assert wait_for_no_temp_files(remote_dir) == []


# -- j. an sftp channel closed by the server while the connection lives on ----------------------


def test_sftp_opens_a_new_channel_when_the_server_closed_the_old_one(
        tmp_path: Path, remote_dir: Path):
    server = ThrowawaySshd(tmp_path / "sshd-channel-timeout",
                           extra_config="ChannelTimeout session:*=1s\n")
    server.start()
    try:
        known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
        s = write_config(tmp_path, server, known_hosts, remote_dir,
                         target_extra='protocol = "sftp"\nconnections = 1')
        daemon = s.start_daemon()
        try:
            assert daemon.wait_for_log("scpd ready", 10), daemon.log()
            first = make_file(s.watch_dir / "a.bin", 1000)
            assert wait_until(lambda: (remote_dir / "a.bin").exists(), 10), daemon.log()
            time.sleep(2.5)  # idle: the server closes the sftp channel after 1 s
            second = make_file(s.watch_dir / "b.bin", 1000)
            assert wait_until(lambda: (remote_dir / "b.bin").exists(), 10), daemon.log()
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        server.stop()
    assert sha256(remote_dir / "a.bin") == sha256(first)
    assert sha256(remote_dir / "b.bin") == sha256(second)
