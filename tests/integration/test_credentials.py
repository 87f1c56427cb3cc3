"""Credentials against a real sshd, and secrets that never reach a log line.

The password test needs an sshd that checks a password it knows: sshd runs in a private
mount namespace where /etc/shadow is a copy with a throwaway password for the login user,
so the machine's own shadow file is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    make_file,
    make_password_sshd,
    require_private_mount_namespace,
    run_scpd,
    write_config,
)

from tools.sshd import ThrowawaySshd

PASSWORD = "Hunter2-throwaway-$(touch PWNED)"  # noqa: S105 -- a stand-in to look for in logs


@pytest.fixture(scope="module")
def password_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    require_private_mount_namespace()
    with make_password_sshd(tmp_path_factory.mktemp("password-sshd"), PASSWORD) as server:
        yield server


def password_config(tmp_path: Path, server: ThrowawaySshd, remote_dir: Path) -> Path:
    """A config that logs in with the password only (no key anywhere)."""
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    setup = write_config(tmp_path, server, known_hosts, remote_dir)
    text = setup.config.read_text().replace(
        f'identity_file = "{server.client_key}"', f'password_file = "{password_file}"')
    setup.config.write_text(text)
    return setup.config


def test_a_password_file_logs_in_and_the_password_is_in_no_output(
        tmp_path: Path, password_sshd: ThrowawaySshd, remote_dir: Path) -> None:
    config = password_config(tmp_path, password_sshd, remote_dir)
    make_file(tmp_path / "outbox" / "a.txt", 100)

    outputs = [run_scpd("-v", "check", "-c", str(config)),
               run_scpd("-v", "run", "--once", "-c", str(config)),
               run_scpd("status", "--json", "-c", str(config))]

    assert [r.returncode for r in outputs] == [0, 0, 0], [r.stderr for r in outputs]
    assert (remote_dir / "a.txt").exists()
    assert json.loads(outputs[2].stdout)  # status printed something to look through
    for result in outputs:
        assert PASSWORD not in result.stdout + result.stderr
    assert not list(Path(os.path.expanduser("~")).glob("PWNED*")), "the password ran as shell"


def test_a_wrong_password_is_refused_without_showing_it(
        tmp_path: Path, password_sshd: ThrowawaySshd, remote_dir: Path) -> None:
    config = password_config(tmp_path, password_sshd, remote_dir)
    (tmp_path / "password").write_text("not-" + PASSWORD)
    make_file(tmp_path / "outbox" / "a.txt", 100)

    result = run_scpd("-v", "run", "--once", "--timeout", "3s", "-c", str(config))

    assert result.returncode == 1, result.stderr
    assert "authentication failed" in result.stderr
    assert PASSWORD not in result.stderr and "not-" + PASSWORD not in result.stderr
    assert not (remote_dir / "a.txt").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620], ids=oct)
def test_a_key_others_can_reach_is_refused_with_the_chmod_to_run(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        mode: int) -> None:
    key = tmp_path / "my key"
    key.write_bytes(sshd.client_key.read_bytes())
    key.chmod(mode)
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir)
    setup.config.write_text(setup.config.read_text().replace(str(sshd.client_key), str(key)))

    result = setup.scpd("check", "--offline")

    assert result.returncode == 78, result.stderr
    assert "targets.local.identity_file" in result.stderr
    assert f"chmod 600 '{key}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def encrypted_copy(key: Path, path: Path, passphrase: str) -> Path:
    path.write_bytes(key.read_bytes())
    path.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", passphrase, "-f", str(path)], check=True,
                   capture_output=True)
    return path


def test_an_encrypted_key_is_opened_with_its_passphrase_file(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path) -> None:
    key = encrypted_copy(sshd.client_key, tmp_path / "id_encrypted", PASSWORD)
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSWORD + "\n")
    passphrase_file.chmod(0o600)
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir)
    setup.config.write_text(setup.config.read_text().replace(
        f'identity_file = "{sshd.client_key}"',
        f'identity_file = "{key}"\npassphrase_file = "{passphrase_file}"'))
    make_file(setup.watch_dir / "a.txt", 100)

    result = setup.scpd("-v", "run", "--once")

    assert result.returncode == 0, result.stderr
    assert (remote_dir / "a.txt").exists()
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize(("passphrase_line", "expected"), [
    ("", "protected by a passphrase: set passphrase_file"),
    ("wrong", "wrong passphrase?"),
])
def test_an_encrypted_key_without_its_passphrase_is_a_config_error(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        passphrase_line: str, expected: str) -> None:
    key = encrypted_copy(sshd.client_key, tmp_path / "id_encrypted", PASSWORD)
    replacement = f'identity_file = "{key}"'
    if passphrase_line:
        passphrase_file = tmp_path / "passphrase"
        passphrase_file.write_text(passphrase_line)
        passphrase_file.chmod(0o600)
        replacement += f'\npassphrase_file = "{passphrase_file}"'
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir)
    setup.config.write_text(setup.config.read_text().replace(
        f'identity_file = "{sshd.client_key}"', replacement))

    result = setup.scpd("check")

    assert result.returncode == 78, result.stderr
    assert "targets.local.identity_file" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr


def test_a_passphrase_file_for_a_key_without_one_says_so(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path) -> None:
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSWORD)
    passphrase_file.chmod(0o600)
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir)
    setup.config.write_text(setup.config.read_text().replace(
        f'identity_file = "{sshd.client_key}"',
        f'identity_file = "{sshd.client_key}"\npassphrase_file = "{passphrase_file}"'))

    result = setup.scpd("check", "--offline")

    assert result.returncode == 78, result.stderr
    assert "is not encrypted: remove passphrase_file" in result.stderr


def test_a_key_of_a_type_ssh_cannot_use_is_a_config_error(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path) -> None:
    key = tmp_path / "ed448.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed448", "-out", str(key)], check=True,
                   capture_output=True)
    key.chmod(0o600)
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir)
    setup.config.write_text(setup.config.read_text().replace(str(sshd.client_key), str(key)))

    result = setup.scpd("check", "--offline")

    assert result.returncode == 78, result.stderr
    assert "targets.local.identity_file" in result.stderr
    assert "use an ed25519, ecdsa or RSA key" in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def test_use_agent_logs_in_with_a_key_only_the_agent_holds(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        ssh_agent: dict[str, str]) -> None:
    subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env={**os.environ, **ssh_agent},
                   check=True, capture_output=True)
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir)
    setup.config.write_text(setup.config.read_text().replace(
        f'identity_file = "{sshd.client_key}"', "use_agent = true"))
    make_file(setup.watch_dir / "a.txt", 100)

    without_agent = setup.scpd("run", "--once", "--timeout", "3s",
                               env={"SSH_AUTH_SOCK": str(tmp_path / "no-agent")})
    with_agent = setup.scpd("run", "--once", env=ssh_agent)

    assert without_agent.returncode == 1, without_agent.stderr
    assert "use_agent = true, but the ssh-agent at" in without_agent.stderr
    assert "offers no key" in without_agent.stderr
    assert with_agent.returncode == 0, with_agent.stderr
    assert (remote_dir / "a.txt").exists()
