"""`scpd check` against real sshds: one line per step with its verdict, and for a failing step
the reason and the fix, later steps skipped; exit 0 when every target is usable, else 69."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Setup, make_password_sshd, require_private_mount_namespace, write_config

from tools.harness import target_block
from tools.sshd import ThrowawaySshd, free_port

PROTOCOLS = ["scp", "sftp"]
WRITABLE_OK = "writable (probe file created and removed)"


# -- reading the report ------------------------------------------------------------------------


def steps(stdout: str, target: str = "local") -> list[tuple[str, str]]:
    """(verdict, text) of each step line of one target's block; a fix line as ("fix", text)."""
    block, is_inside = [], False
    for line in stdout.splitlines():
        if line.startswith(f"target {target} (") and line.endswith("):"):
            is_inside = True
        elif line.startswith("target "):
            is_inside = False
        elif is_inside:
            verdict, _, text = line.strip().partition(" ")
            block.append(("fix", line.strip()[5:]) if verdict == "fix:" else
                         (verdict, text.strip()))
    return block


def verdicts(stdout: str, target: str = "local") -> list[str]:
    return [verdict for verdict, _ in steps(stdout, target) if verdict != "fix"]


def failure(stdout: str, target: str = "local") -> tuple[str, list[str]]:
    """The text of the one FAILED step, and its fix lines."""
    block = steps(stdout, target)
    failed = [index for index, (verdict, _) in enumerate(block) if verdict == "FAILED"]
    assert len(failed) == 1, stdout
    fixes = []
    for verdict, text in block[failed[0] + 1:]:
        if verdict != "fix":
            break
        fixes.append(text)
    return block[failed[0]][1], fixes


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    """No traceback, no control character, and one line on stderr per unusable target."""
    assert "Traceback" not in result.stdout + result.stderr
    assert "internal error" not in result.stderr
    for line in (result.stdout + result.stderr).splitlines():
        assert line.isprintable(), repr(line)
    if result.returncode == 69:
        assert result.stderr.startswith("scpd: target local is unusable: "), result.stderr


def fingerprint(public_key: Path) -> str:
    """"SHA256:..." of a .pub file, as ssh-keygen -l shows it."""
    return subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True,
                          text=True, check=True).stdout.split()[1]


def new_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f",
                    str(path)], check=True)
    return path


def with_protocol(tmp_path: Path, server: ThrowawaySshd, remote_dir: Path, protocol: str,
                  *, known_hosts: Path | None = None, extra: str = "") -> Setup:
    known_hosts = known_hosts or server.write_known_hosts(tmp_path / "known_hosts")
    return write_config(tmp_path, server, known_hosts, remote_dir,
                        target_extra=f'protocol = "{protocol}"\n{extra}')


def replace_in_config(s: Setup, old: str, new: str) -> None:
    text = s.config.read_text()
    assert old in text
    s.config.write_text(text.replace(old, new))


# -- every step ok -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_check_reports_every_step_ok_for_a_usable_target(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path, protocol: str):
    s = with_protocol(tmp_path, sshd, remote_dir, protocol, known_hosts=known_hosts)

    result = s.scpd("check")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert_clean(result)
    assert f"target local ({sshd.user}@127.0.0.1:{sshd.port}):" in result.stdout
    host_key = fingerprint(sshd.host_key.with_suffix(".pub"))
    client_key = fingerprint(sshd.client_key.with_suffix(".pub"))
    block = steps(result.stdout)
    assert [verdict for verdict, _ in block] == ["ok"] * 5, result.stdout
    texts = [text for _, text in block]
    assert texts[0].startswith(f"TCP 127.0.0.1:{sshd.port} reachable (")
    assert texts[0].endswith(" ms)")
    assert texts[1] == f"host key ssh-ed25519 {host_key} matches {known_hosts}"
    assert texts[2] == (f"login as {sshd.user} with key {sshd.client_key}"
                        f" (ssh-ed25519 {client_key})")
    assert texts[3] == ("sftp subsystem available" if protocol == "sftp"
                        else "scp available (/usr/bin/scp)")
    assert texts[4] == f"{remote_dir} {WRITABLE_OK}"
    assert "target local: ok (" in result.stdout
    assert list(remote_dir.iterdir()) == []  # the probe file is gone


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_check_makes_a_missing_remote_dir_and_says_so(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path, protocol: str):
    missing = remote_dir / "new" / "sub"
    s = with_protocol(tmp_path, sshd, missing, protocol, known_hosts=known_hosts)

    result = s.scpd("check")

    assert result.returncode == 0, result.stdout + result.stderr
    assert ("ok", f"{missing} writable (made it; probe file created and removed)"
            ) in steps(result.stdout)
    assert missing.is_dir() and list(missing.iterdir()) == []


def test_check_reports_each_target_and_exits_69_when_one_is_unusable(
        tmp_path: Path, setup: Setup, sshd: ThrowawaySshd, known_hosts: Path):
    closed_port = free_port()
    setup.config.write_text(setup.config.read_text() + target_block(
        "down", closed_port, sshd.user, sshd.client_key, known_hosts, tmp_path / "down"))

    result = setup.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert verdicts(result.stdout, "local") == ["ok"] * 5, result.stdout
    assert verdicts(result.stdout, "down") == ["FAILED", "skipped", "skipped", "skipped"]
    assert "target local: ok (" in result.stdout
    assert f"target down: FAILED (TCP 127.0.0.1:{closed_port})" in result.stdout
    assert result.stderr.startswith(f"scpd: target down is unusable: cannot connect to"
                                    f" 127.0.0.1:{closed_port}: Connection refused (")
    assert len(result.stderr.splitlines()) == 1, result.stderr


# -- TCP ---------------------------------------------------------------------------------------


def test_check_names_host_port_and_what_to_look_at_when_nothing_listens(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    port = free_port()
    s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=port)

    result = s.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    assert text == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert len(fixes) == 1
    for needle in (f"127.0.0.1 port {port}", "sshd", f"port = {port}", "firewall"):
        assert needle in fixes[0], fixes
    assert verdicts(result.stdout) == ["FAILED", "skipped", "skipped", "skipped", "skipped"]
    assert [text for _, text in steps(result.stdout)][-4:] == [
        "host key", f"login as {sshd.user}", "scp on the remote", f"{remote_dir} writable"]
    assert f"target local: FAILED (TCP 127.0.0.1:{port})" in result.stdout


# -- host key ----------------------------------------------------------------------------------


def test_check_with_an_unknown_host_key_shows_its_fingerprint_and_the_keyscan_line(
        setup: Setup, sshd: ThrowawaySshd, known_hosts: Path):
    known_hosts.write_text("")  # strict (the default): nothing known

    result = setup.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    offered = fingerprint(sshd.host_key.with_suffix(".pub"))
    assert text == (f"host [127.0.0.1]:{sshd.port} not found in known_hosts {known_hosts}"
                    f" (it offered ssh-ed25519 {offered})")
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in fixes[0], fixes
    assert verdicts(result.stdout) == ["ok", "FAILED", "skipped", "skipped", "skipped"]
    assert known_hosts.read_text() == ""  # strict: nothing recorded


def test_check_with_a_changed_host_key_shows_both_fingerprints_and_ssh_keygen_r(
        setup: Setup, sshd: ThrowawaySshd, known_hosts: Path, tmp_path: Path):
    other = ThrowawaySshd(tmp_path / "other-sshd")
    other.start()
    other.stop()
    other.write_known_hosts(known_hosts, port=sshd.port)  # another server's key for this one

    result = setup.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    expected = fingerprint(other.host_key.with_suffix(".pub"))
    offered = fingerprint(sshd.host_key.with_suffix(".pub"))
    assert (f"does not match known_hosts: {known_hosts} holds ssh-ed25519 {expected},"
            f" the server offered ssh-ed25519 {offered}") in text
    assert "man-in-the-middle" in text
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known_hosts}" in fixes[0], fixes
    assert verdicts(result.stdout) == ["ok", "FAILED", "skipped", "skipped", "skipped"]


def test_check_with_accept_new_records_the_key_and_says_so(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path):
    known_hosts = tmp_path / "known_hosts"  # not there yet
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra='host_key_policy = "accept-new"')

    result = s.scpd("check")

    assert result.returncode == 0, result.stdout + result.stderr
    offered = fingerprint(sshd.host_key.with_suffix(".pub"))
    assert ("ok", f"host key ssh-ed25519 {offered} was new: recorded in {known_hosts}"
                  ' (host_key_policy = "accept-new")') in steps(result.stdout)
    assert known_hosts.read_text() == sshd.host_key_line() + "\n"


# -- login -------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_pub_file", [True, False], ids=["with-pub", "without-pub"])
def test_check_with_a_key_the_server_does_not_know_says_where_its_public_half_goes(
        setup: Setup, sshd: ThrowawaySshd, tmp_path: Path, has_pub_file: bool):
    key = new_key(tmp_path / "stranger key")
    public_line = " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])
    key_fingerprint = fingerprint(key.with_name(key.name + ".pub"))
    if not has_pub_file:
        key.with_name(key.name + ".pub").unlink()
    replace_in_config(setup, f'identity_file = "{sshd.client_key}"', f'identity_file = "{key}"')

    result = setup.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    assert text == f"login as {sshd.user} refused for key {key} (ssh-ed25519 {key_fingerprint})"
    assert f"~{sshd.user}/.ssh/authorized_keys on 127.0.0.1" in fixes[0], fixes
    copy_id = (f"ssh-copy-id -i {shlex.quote(str(key) + '.pub')} -p {sshd.port}"
               f" {sshd.user}@127.0.0.1")
    assert any(copy_id in fix for fix in fixes) == has_pub_file, fixes
    assert fixes[-1] == f"or append this line to that file: {public_line}"
    assert verdicts(result.stdout) == ["ok", "ok", "FAILED", "skipped", "skipped"]
    assert "target local: FAILED (login as" in result.stdout


def test_check_with_a_password_against_a_key_only_server_names_what_it_allows(
        setup: Setup, sshd: ThrowawaySshd, tmp_path: Path):
    password_file = tmp_path / "password"
    password_file.write_text("not-the-password\n")
    password_file.chmod(0o600)
    replace_in_config(setup, f'identity_file = "{sshd.client_key}"',
                      f'password_file = "{password_file}"')

    result = setup.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    assert text == (f"login as {sshd.user} refused: 127.0.0.1 takes no password login"
                    " (it allows: publickey)")
    assert "identity_file" in fixes[0]
    assert "not-the-password" not in result.stdout + result.stderr


def test_check_with_a_wrong_password_says_password_refused(
        tmp_path: Path, remote_dir: Path, password_sshd: ThrowawaySshd):
    s = write_config(tmp_path, password_sshd, password_sshd.write_known_hosts(
        tmp_path / "known_hosts"), remote_dir)
    password_file = tmp_path / "password"
    password_file.write_text("wrong-password\n")
    password_file.chmod(0o600)
    replace_in_config(s, f'identity_file = "{password_sshd.client_key}"',
                      f'password_file = "{password_file}"')

    result = s.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    assert text == f"password refused for {password_sshd.user}"
    assert str(password_file) in fixes[0] and "PasswordAuthentication" in fixes[0]
    assert "wrong-password" not in result.stdout + result.stderr


def test_check_with_use_agent_lists_the_agent_keys_the_server_refused(
        setup: Setup, sshd: ThrowawaySshd, tmp_path: Path, ssh_agent: dict[str, str]):
    stranger = new_key(tmp_path / "stranger")
    subprocess.run(["ssh-add", "-q", str(stranger)], env={**os.environ, **ssh_agent},
                   check=True, capture_output=True)
    replace_in_config(setup, f'identity_file = "{sshd.client_key}"', "use_agent = true")

    refused = setup.scpd("check", env=ssh_agent)
    subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env={**os.environ, **ssh_agent},
                   check=True, capture_output=True)
    accepted = setup.scpd("check", env=ssh_agent)

    assert refused.returncode == 69, refused.stdout + refused.stderr
    assert_clean(refused)
    text, fixes = failure(refused.stdout)
    assert text == (f"login as {sshd.user} refused for the ssh-agent's keys ssh-ed25519"
                    f" {fingerprint(stranger.with_suffix('.pub'))} stranger")
    assert "ssh-add -L" in fixes[-1]
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert ("ok", f"login as {sshd.user} with the ssh-agent's key ssh-ed25519"
                  f" {fingerprint(sshd.client_key.with_suffix('.pub'))} client_ed25519"
            ) in steps(accepted.stdout)


def test_check_with_use_agent_and_no_agent_says_nothing_was_offered(
        setup: Setup, sshd: ThrowawaySshd, tmp_path: Path):
    replace_in_config(setup, f'identity_file = "{sshd.client_key}"', "use_agent = true")

    result = setup.scpd("check", env={"SSH_AUTH_SOCK": str(tmp_path / "no-agent")})

    assert result.returncode == 69, result.stdout + result.stderr
    text, fixes = failure(result.stdout)
    assert text.startswith("nothing to log in with: use_agent = true, but the ssh-agent at")
    assert "ssh-add" in fixes[0]


# -- remote_dir --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_only_sshd(tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[ThrowawaySshd, Path]]:
    """An sshd that sees a directory as a read-only bind mount of itself, in a private mount
    namespace (root ignores modes, not a read-only mount); the machine never sees it."""
    require_private_mount_namespace()
    workdir = tmp_path_factory.mktemp("read-only-sshd")
    frozen = workdir / "frozen"
    frozen.mkdir()
    q = shlex.quote(str(frozen))
    launcher = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount -n --bind {q} {q} && mount -n -o remount,bind,ro {q} {q} && exec "$@"',
                "sh"]
    with ThrowawaySshd(workdir / "sshd", launcher=launcher) as server:
        yield server, frozen


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_check_names_a_read_only_remote_dir_and_what_the_remote_said(
        tmp_path: Path, read_only_sshd: tuple[ThrowawaySshd, Path], protocol: str):
    server, frozen = read_only_sshd
    s = with_protocol(tmp_path, server, frozen, protocol)

    result = s.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    assert verdicts(result.stdout) == ["ok", "ok", "ok", "ok", "FAILED"]
    assert text.startswith(f"{frozen} is not writable for {server.user}"), text
    if protocol == "scp":  # the shell's words; SFTPv3 has no code for a read-only file system
        assert text.endswith(": Read-only file system)"), text
        assert "mounted read-only" in fixes[0]
    else:
        assert "Failure" in text and "read-only mount" in fixes[0], fixes
    assert f"target local: FAILED ({frozen} writable)" in result.stdout


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_check_names_a_remote_dir_that_cannot_be_made(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, protocol: str):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    s = with_protocol(tmp_path, sshd, blocker / "incoming", protocol, known_hosts=known_hosts)

    result = s.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    assert text.startswith(f"{blocker}/incoming cannot be created (remote: "), text
    assert "or point remote_dir at one" in fixes[0]


def test_check_accepts_a_remote_dir_that_is_a_symbolic_link(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    link = tmp_path / "link"
    link.symlink_to(remote_dir)
    for protocol in PROTOCOLS:
        s = with_protocol(tmp_path, sshd, link, protocol, known_hosts=known_hosts)

        result = s.scpd("check")

        assert result.returncode == 0, result.stdout + result.stderr
        assert ("ok", f"{link} {WRITABLE_OK}") in steps(result.stdout)


def test_check_escapes_control_characters_so_each_line_stays_one_line(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir)
    # TOML's escapes: the config holds an escape sequence and a tab in remote_dir
    replace_in_config(s, f'remote_dir = "{remote_dir}"',
                      f'remote_dir = "{remote_dir}/a\\u001b[31mred\\tdir"')

    result = s.scpd("check")

    assert result.returncode == 0, result.stdout + result.stderr
    assert_clean(result)
    assert ("ok", f"{remote_dir}/a\\x1b[31mred\\tdir writable (made it; probe file created"
                  " and removed)") in steps(result.stdout)
    assert (remote_dir / "a\x1b[31mred\tdir").is_dir()


# -- the protocol ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sftp_only_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    """A server that runs internal-sftp whatever the client asks (an SFTP-only account)."""
    with ThrowawaySshd(tmp_path_factory.mktemp("sshd-sftp-only"),
                       extra_config="ForceCommand internal-sftp\n") as server:
        yield server


@pytest.fixture(scope="module")
def no_sftp_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    with ThrowawaySshd(tmp_path_factory.mktemp("sshd-no-sftp"), has_sftp=False) as server:
        yield server


def test_check_with_scp_against_an_sftp_only_account_says_set_protocol_sftp(
        tmp_path: Path, sftp_only_sshd: ThrowawaySshd, remote_dir: Path):
    scp = with_protocol(tmp_path, sftp_only_sshd, remote_dir, "scp")

    result = scp.scpd("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert_clean(result)
    text, fixes = failure(result.stdout)
    assert text == "scp is not available: this account allows SFTP only"
    assert fixes == ['set protocol = "sftp" for this target']
    assert verdicts(result.stdout) == ["ok", "ok", "ok", "FAILED", "skipped"]
    assert 'protocol = "sftp"' in result.stderr


def test_check_with_sftp_against_an_sftp_only_account_passes(
        tmp_path: Path, sftp_only_sshd: ThrowawaySshd, remote_dir: Path):
    sftp = with_protocol(tmp_path, sftp_only_sshd, remote_dir, "sftp")

    result = sftp.scpd("check")

    assert result.returncode == 0, result.stdout + result.stderr
    assert verdicts(result.stdout) == ["ok"] * 5
    assert ("ok", "sftp subsystem available") in steps(result.stdout)


def test_check_with_sftp_against_a_server_without_sftp_suggests_scp(
        tmp_path: Path, no_sftp_sshd: ThrowawaySshd, remote_dir: Path):
    sftp = with_protocol(tmp_path, no_sftp_sshd, remote_dir, "sftp")
    (tmp_path / "scp").mkdir()
    scp = with_protocol(tmp_path / "scp", no_sftp_sshd, remote_dir, "scp")

    refused = sftp.scpd("check")
    accepted = scp.scpd("check")

    assert refused.returncode == 69, refused.stdout + refused.stderr
    assert_clean(refused)
    text, fixes = failure(refused.stdout)
    assert text == "sftp is not available: 127.0.0.1 refused the SFTP subsystem"
    assert 'protocol = "scp"' in fixes[0]
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


# -- fixtures of other servers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def password_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    """An sshd that takes passwords, checked against a shadow file of its own (a private
    mount namespace: the machine's /etc/shadow is never touched), where the login user's
    password is one nobody knows."""
    require_private_mount_namespace()
    workdir = tmp_path_factory.mktemp("password-sshd")
    with make_password_sshd(workdir, os.urandom(16).hex()) as server:
        yield server
