"""A crash of the remote mid-file (sshd and its sessions killed at one instant, as by a power
cut) leaves a hidden temporary file that no one removes on the remote. The next attempt at the
same file removes or overwrites it; nothing partial is ever under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import sha256, temp_files, wait_until, write_config

from tools.sshd import ThrowawaySshd

MiB = 1024 * 1024




@pytest.fixture
def own_sshd(tmp_path: Path):
    server = ThrowawaySshd(tmp_path / "own-sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("protocol", ["scp", "sftp"])
def test_temporary_file_left_by_a_remote_crash_is_cleared_by_the_next_attempt(
        tmp_path: Path, own_sshd: ThrowawaySshd, remote_dir: Path, protocol: str):
    known_hosts = own_sshd.write_known_hosts(tmp_path / "known_hosts")
    s = write_config(tmp_path, own_sshd, known_hosts, remote_dir,
                     target_extra=f'protocol = "{protocol}"\nconnections = 1\n'
                                  'bandwidth_limit = "1MiB/s"')
    # A hostile name: the removal of its stale temporary file is as much data as the send.
    marker = "scpd-remote-crash-test-ran-shell"
    name = f"-big $(touch {marker}); 'q' *.bin"
    local = s.watch_dir / name
    local.write_bytes(os.urandom(3 * MiB))
    # Another file's leftovers and an operator's hidden file: not this file's to remove.
    neighbour = remote_dir / ".other.bin.0badf00d.scpd-part"
    neighbour.write_bytes(b"x")
    keep = remote_dir / f".{name}.keep"
    keep.write_bytes(b"y")

    def own_temps() -> list[Path]:
        return [p for p in temp_files(remote_dir) if p.name.startswith(f".{name}")]

    daemon = s.start_daemon()
    try:
        assert wait_until(lambda: any(p.stat().st_size > 500_000 for p in own_temps()),
                          10.0), daemon.log()
        own_sshd.crash()
        left_by_crash = own_temps()
        assert daemon.wait_for_log("retrying in", 10.0), daemon.log()
        own_sshd.start()
        landed = wait_until(lambda: (remote_dir / name).is_file(), 15.0)
    finally:
        returncode = daemon.stop()

    assert len(left_by_crash) == 1, "the crash should have left the partial file behind"
    assert landed, daemon.log()
    assert sha256(remote_dir / name) == sha256(local)
    assert temp_files(remote_dir) == [neighbour]
    assert keep.read_bytes() == b"y"
    # The remote commands run in the login's home directory, where `touch` would have landed.
    assert not (Path.home() / marker).exists(), "a file name ran as shell"
    assert returncode == 0, daemon.log()
    assert "Traceback" not in daemon.log()
