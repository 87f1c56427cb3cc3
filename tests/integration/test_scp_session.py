"""The long-lived SCP session: renames over SFTP where the server has it, by mv where it has
not, with the same results; names that are data, never shell or requests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import make_file, run_scpd, sha256, temp_files, write_config
from tools.sshd import ThrowawaySshd

# Every one of these is a file name scpd must deliver under exactly that name.
ODD_NAMES = [
    "plain.txt", "with space.pdf", "-rf", "$(touch pwned)", "`touch pwned`", "it's \"q\"",
    "back\\slash", "new\nline", "star*", "what?", "[ab]", "tab\there", "ünïcødé ✓",
    "R" + "x" * 40, "semi;colon&amp|pipe", "%b\\0101", "n" * 240,
]


@pytest.fixture(scope="module")
def scp_only_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    server = ThrowawaySshd(tmp_path_factory.mktemp("sshd-scp-only"), has_sftp=False)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(params=["sftp renames", "mv renames"])
def server(request, sshd: ThrowawaySshd, scp_only_sshd: ThrowawaySshd) -> ThrowawaySshd:
    return sshd if request.param == "sftp renames" else scp_only_sshd


def test_odd_names_in_one_batch_land_under_exactly_their_names(
        tmp_path: Path, server: ThrowawaySshd, remote_dir: Path):
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    s = write_config(tmp_path, server, known_hosts, remote_dir)
    digests = {}
    for i, name in enumerate(ODD_NAMES):
        path = make_file(s.watch_dir / "odd" / name, 1000 + i)
        os.chmod(path, 0o640 if i % 2 else 0o604)
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_000 + i * 1000))
        digests[name] = sha256(path)

    result = run_scpd("run", "--once", "--timeout", "20s", "-c", str(s.config))

    assert result.returncode == 0, result.stderr
    landed = remote_dir / "odd"
    assert sorted(os.listdir(landed)) == sorted(ODD_NAMES)
    for i, name in enumerate(ODD_NAMES):
        st = (landed / name).stat()
        assert sha256(landed / name) == digests[name], name
        assert st.st_mode & 0o777 == (0o640 if i % 2 else 0o604), name
        assert st.st_mtime_ns == 1_600_000_000_123_456_000 + i * 1000, name
    assert not list(tmp_path.rglob("pwned")) and not (Path.home() / "pwned").exists()
    assert not temp_files(remote_dir)


def test_a_server_without_sftp_renames_by_mv_and_says_so(
        tmp_path: Path, scp_only_sshd: ThrowawaySshd, remote_dir: Path):
    known_hosts = scp_only_sshd.write_known_hosts(tmp_path / "known_hosts")
    s = write_config(tmp_path, scp_only_sshd, known_hosts, remote_dir)
    for i in range(30):
        make_file(s.watch_dir / f"f{i:02d}.bin", 5000)

    result = run_scpd("run", "--once", "--timeout", "20s", "-c", str(s.config))

    assert result.returncode == 0, result.stderr
    assert "offers no SFTP" in result.stderr
    assert len(list(remote_dir.glob("f*.bin"))) == 30
    assert not temp_files(remote_dir)


def test_a_directory_in_the_way_fails_that_file_only(
        tmp_path: Path, server: ThrowawaySshd, remote_dir: Path):
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    s = write_config(tmp_path, server, known_hosts, remote_dir)
    (remote_dir / "b.bin").mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        make_file(s.watch_dir / name, 2000)

    result = run_scpd("run", "--once", "--timeout", "5s", "-c", str(s.config))

    assert result.returncode == 1, result.stderr
    assert "Is a directory" in result.stderr
    assert (remote_dir / "a.bin").is_file() and (remote_dir / "c.bin").is_file()
    assert (remote_dir / "b.bin").is_dir() and not list((remote_dir / "b.bin").iterdir())
    assert not temp_files(remote_dir)
