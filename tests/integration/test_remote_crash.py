"""A crash of the remote mid-file (sshd and its sessions killed at one instant, as by a power
cut) leaves a hidden temporary file that no one removes on the remote. The next attempt at the
same file removes or overwrites it; nothing partial is ever under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import sha256, wait_until, write_config

from tools.sshd import ThrowawaySshd

MiB = 1024 * 1024


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".scpd-part"))


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
    local = s.watch_dir / "big.bin"
    local.write_bytes(os.urandom(3 * MiB))
    # Another file's leftovers and an operator's hidden file: not this file's to remove.
    neighbour = remote_dir / ".other.bin.0badf00d.scpd-part"
    neighbour.write_bytes(b"x")
    keep = remote_dir / ".big.bin.keep"
    keep.write_bytes(b"y")

    def partial_temp() -> bool:
        temps = [remote_dir / n for n in temp_files(remote_dir) if n.startswith(".big.bin")]
        return any(p.stat().st_size > 500_000 for p in temps)

    daemon = s.start_daemon()
    try:
        assert wait_until(partial_temp, 10.0), daemon.log()
        own_sshd.crash()
        left_by_crash = [n for n in temp_files(remote_dir) if n.startswith(".big.bin")]
        assert daemon.wait_for_log("retrying in", 10.0), daemon.log()
        own_sshd.start()
        landed = wait_until(lambda: (remote_dir / "big.bin").is_file(), 15.0)
    finally:
        returncode = daemon.stop()

    assert len(left_by_crash) == 1, "the crash should have left the partial file behind"
    assert landed, daemon.log()
    assert sha256(remote_dir / "big.bin") == sha256(local)
    assert temp_files(remote_dir) == [neighbour.name]
    assert keep.read_bytes() == b"y"
    assert returncode == 0, daemon.log()
    assert "Traceback" not in daemon.log()
