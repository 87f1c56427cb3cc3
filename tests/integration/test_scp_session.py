"""The long-lived SCP session: renames over SFTP where the server has it, by mv where it has
not, with the same results; names that are data, never shell or requests."""

from __future__ import annotations

import os
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


# -- the session against odd servers and odd turns, driven directly --------------------------


def uploader_for(tmp_path: Path, server: ThrowawaySshd, remote_dir: Path, **options: str):
    from scpd import config as config_module
    from scpd.transport import Throttle, load_credentials, open_uploader

    known_hosts = server.write_known_hosts(tmp_path / f"known_hosts_{server.port}")
    extra = "\n".join(f"{key} = {value}" for key, value in options.items())
    s = write_config(tmp_path, server, known_hosts, remote_dir, target_extra=extra)
    target = config_module.load(s.config).targets["local"]
    return open_uploader(target, load_credentials(target), Throttle([])), s.watch_dir


def send_batch(uploader, watch_dir: Path, remote_dir: Path, names: list[str]) -> list:
    from scpd.transport import Upload

    outcomes: dict[int, object] = {}
    uploads = [Upload(make_file(watch_dir / name, 3000), str(remote_dir / name))
               for name in names]
    uploader.upload_batch(uploads, lambda told: outcomes.update(told))
    return [outcomes[i] for i in range(len(names))]


@pytest.mark.parametrize("preserve_times", ["true", "false"])
def test_a_file_the_sink_refuses_fails_alone_and_the_batch_goes_on(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path, monkeypatch, preserve_times):
    from scpd.errors import ScpdError
    from scpd.fileversion import FileVersion
    from scpd.transport import scp

    # Fixed temporary names, and a directory where b's must go: the sink refuses b's C record.
    monkeypatch.setattr(scp, "temp_name", lambda name, is_per_attempt: f".{name}.T.scpd-part")
    (remote_dir / ".b.T.scpd-part").mkdir()
    uploader, watch_dir = uploader_for(tmp_path, sshd, remote_dir,
                                       preserve_times=preserve_times)
    try:
        a, b, c = send_batch(uploader, watch_dir, remote_dir, ["a", "b", "c"])
    finally:
        uploader.close()

    assert isinstance(a, FileVersion) and isinstance(c, FileVersion), (a, c)
    assert isinstance(b, ScpdError) and "Is a directory" in str(b)
    assert sha256(remote_dir / "a") == sha256(watch_dir / "a")
    assert sha256(remote_dir / "c") == sha256(watch_dir / "c")
    assert not (remote_dir / "b").exists()


def test_a_remote_directory_removed_between_batches_is_made_again(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path):
    import shutil

    uploader, watch_dir = uploader_for(tmp_path, sshd, remote_dir)
    try:
        assert not isinstance(send_batch(uploader, watch_dir, remote_dir, ["day/1"])[0],
                              Exception)
        shutil.rmtree(remote_dir / "day")  # a consumer clears what it processed
        outcome = send_batch(uploader, watch_dir, remote_dir, ["day/2"])[0]
    finally:
        uploader.close()

    assert not isinstance(outcome, Exception), outcome
    assert sha256(remote_dir / "day" / "2") == sha256(watch_dir / "day" / "2")


@pytest.mark.parametrize(("subsystem", "says"), [
    (None, "offers no SFTP"),
    ("internal-sftp -P posix-rename", "refuses renames over SFTP"),
    ("/bin/echo garbage", "offers no SFTP"),
], ids=["no sftp", "posix-rename refused", "not sftp at all"])
def test_a_server_whose_sftp_cannot_rename_still_gets_every_file_by_mv(
        tmp_path: Path, remote_dir: Path, subsystem: str | None, says: str):
    server = ThrowawaySshd(tmp_path / "sshd", has_sftp=False,
                           extra_config=f"Subsystem sftp {subsystem}" if subsystem else "")
    with server.start():
        known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
        s = write_config(tmp_path, server, known_hosts, remote_dir)
        for i in range(30):
            make_file(s.watch_dir / f"f{i:02d}.bin", 2000)

        result = run_scpd("run", "--once", "--timeout", "20s", "-c", str(s.config))

    assert result.returncode == 0, result.stderr
    assert says in result.stderr and "renamed into place by mv" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(list(remote_dir.glob("f*.bin"))) == 30
    assert not temp_files(remote_dir)
