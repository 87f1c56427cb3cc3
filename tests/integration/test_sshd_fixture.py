"""The throwaway sshd that the integration tests rely on, checked with OpenSSH's own client."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.sshd import ThrowawaySshd


def _ssh(
    server: ThrowawaySshd, known_hosts: Path, command: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh",
            "-F", "/dev/null",  # no user or system ssh_config may change what is tested
            "-i", str(server.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-p", str(server.port),
            f"{server.user}@127.0.0.1",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_sshd_accepts_the_client_key_under_strict_host_key_checking(
    sshd: ThrowawaySshd, known_hosts: Path
) -> None:
    result = _ssh(sshd, known_hosts, "echo ok")

    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
    assert f"Accepted publickey for {sshd.user}" in sshd.log_text()


def test_sshd_restarts_on_the_same_port_with_the_same_host_key(tmp_path: Path) -> None:
    with ThrowawaySshd(tmp_path / "sshd") as server:
        port, host_key_line, first_pid = server.port, server.host_key_line(), server.pid
        known_hosts = server.write_known_hosts(tmp_path / "known_hosts")

        server.stop()
        assert not server.is_running
        assert _ssh(server, known_hosts, "true").returncode == 255  # nobody listening
        server.start()

        assert (server.port, server.host_key_line()) == (port, host_key_line)
        assert server.pid != first_pid
        result = _ssh(server, known_hosts, "echo ok")
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
