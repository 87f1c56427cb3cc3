"""Host keys and key types against a real sshd: what OpenSSH users expect of known_hosts.

Strict by default; accept-new remembers a first key once, however many connections meet the
host together; a changed key is refused with both fingerprints and the command that fixes
the file. Hashed entries, [host]:port entries and every common key type work.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Setup, make_file, write_config

from tools.sshd import ThrowawaySshd


def fingerprint(public_key: Path) -> str:
    """OpenSSH's SHA256 fingerprint of a public key file, e.g. "SHA256:9x2...". """
    output = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)],
                            capture_output=True, text=True, check=True).stdout
    return output.split()[1]


def keygen(path: Path, key_type: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", path.name, "-f",
                    str(path)], check=True)
    return path


def test_unknown_host_is_refused_naming_its_fingerprint_and_how_to_add_it(
        setup: Setup, sshd: ThrowawaySshd, known_hosts: Path) -> None:
    known_hosts.write_text("")  # the default policy is strict
    make_file(setup.watch_dir / "a.txt", 10)

    result = setup.scpd("run", "--once", "--timeout", "3s")

    assert result.returncode == 1, result.stderr
    offered = fingerprint(sshd.host_key.with_suffix(".pub"))
    assert f"host [127.0.0.1]:{sshd.port} not found in known_hosts {known_hosts}" \
        in result.stderr
    assert f"ssh-ed25519 {offered}" in result.stderr
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in result.stderr
    assert list(setup.remote_dir.iterdir()) == []


def test_changed_key_names_both_fingerprints_and_the_fix(
        setup: Setup, sshd: ThrowawaySshd, known_hosts: Path, tmp_path: Path) -> None:
    impostor = ThrowawaySshd(tmp_path / "impostor")
    impostor.start()
    impostor.stop()
    impostor.write_known_hosts(known_hosts, port=sshd.port)  # the file trusts another key
    make_file(setup.watch_dir / "a.txt", 10)

    result = setup.scpd("run", "--once", "--timeout", "3s")

    assert result.returncode == 1, result.stderr
    expected = fingerprint(impostor.host_key.with_suffix(".pub"))
    offered = fingerprint(sshd.host_key.with_suffix(".pub"))
    host = f"[127.0.0.1]:{sshd.port}"
    assert f"host key for {host} does not match known_hosts: {known_hosts} holds " \
        f"ssh-ed25519 {expected}, the server offered ssh-ed25519 {offered}" in result.stderr
    assert "man-in-the-middle" in result.stderr
    assert f"ssh-keygen -R '{host}' -f {known_hosts}" in result.stderr
    assert list(setup.remote_dir.iterdir()) == []


def test_accept_new_records_a_first_key_once_for_all_connections(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path) -> None:
    known_hosts = tmp_path / "known_hosts"  # does not exist yet
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra='host_key_policy = "accept-new"\nconnections = 4')
    for index in range(8):
        make_file(s.watch_dir / f"f{index}.txt", 10)

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert known_hosts.read_text().splitlines() == [sshd.host_key_line()]
    accepted = [line for line in result.stderr.splitlines() if "accepted new host key" in line]
    assert len(accepted) == 1, result.stderr
    assert fingerprint(sshd.host_key.with_suffix(".pub")) in accepted[0]
    assert str(known_hosts) in accepted[0]
    assert len(list(remote_dir.iterdir())) == 8


def test_accept_new_keeps_a_file_without_a_final_newline_whole(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    other = "[192.0.2.1]:22 " + " ".join(sshd.host_key_line().split()[1:])
    known_hosts.write_text(other)  # no newline at the end, as an editor may leave it
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra='host_key_policy = "accept-new"')
    make_file(s.watch_dir / "a.txt", 10)

    first = s.scpd("run", "--once")
    second = s.scpd("run", "--once")  # reads the file it wrote

    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert known_hosts.read_text().splitlines() == [other, sshd.host_key_line()]


def test_hashed_known_hosts_entries_are_trusted(setup: Setup, known_hosts: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known_hosts)], check=True,
                   capture_output=True)
    assert known_hosts.read_text().startswith("|1|"), "ssh-keygen -H did not hash the entry"
    make_file(setup.watch_dir / "a.txt", 10)

    result = setup.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert (setup.remote_dir / "a.txt").exists()


@pytest.fixture(scope="module")
def multi_key_sshd(tmp_path_factory: pytest.TempPathFactory):
    """A server with ed25519, ecdsa and RSA host keys, as most servers have."""
    workdir = tmp_path_factory.mktemp("multi-key-sshd")
    extra = "\n".join(f"HostKey {keygen(workdir / f'host_{kind}', kind)}"
                      for kind in ("ecdsa", "rsa"))
    with ThrowawaySshd(workdir, extra_config=extra) as server:
        yield server


@pytest.mark.parametrize("host_key_type", ["ecdsa", "rsa"])
def test_a_known_hosts_line_of_any_common_type_is_enough(
        tmp_path: Path, multi_key_sshd: ThrowawaySshd, remote_dir: Path,
        host_key_type: str) -> None:
    # Only that type is listed: the client must ask the server for it, not fail on ed25519.
    public = (multi_key_sshd.workdir / f"host_{host_key_type}.pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{multi_key_sshd.port} {public[0]} {public[1]}\n")
    s = write_config(tmp_path, multi_key_sshd, known_hosts, remote_dir)
    make_file(s.watch_dir / "a.txt", 10)

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert (remote_dir / "a.txt").exists()


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_client_keys_of_every_common_type_log_in(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        key_type: str) -> None:
    key = keygen(tmp_path / f"id_{key_type}", key_type)
    authorized = sshd.authorized_keys.read_text()
    sshd.authorized_keys.write_text(authorized + key.with_suffix(".pub").read_text())
    try:
        s = write_config(tmp_path, sshd, known_hosts, remote_dir)
        s.config.write_text(s.config.read_text().replace(str(sshd.client_key), str(key)))
        make_file(s.watch_dir / "a.txt", 10)

        result = s.scpd("run", "--once")
    finally:
        sshd.authorized_keys.write_text(authorized)

    assert result.returncode == 0, result.stderr
    assert (remote_dir / "a.txt").exists()
