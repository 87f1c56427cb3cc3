"""on_success post-actions, and the accept-new host key policy, against the real sshd."""

from __future__ import annotations

from pathlib import Path

from conftest import write_config

from tools.sshd import ThrowawaySshd


def test_on_success_delete_removes_the_source_after_delivery(tmp_path: Path, sshd: ThrowawaySshd,
                                                            known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir, watch_extra='on_success = "delete"')
    (s.watch_dir / "sub").mkdir()
    (s.watch_dir / "sub" / "a.txt").write_text("a")

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert (remote_dir / "sub" / "a.txt").read_text() == "a"
    assert not (s.watch_dir / "sub" / "a.txt").exists()


def test_on_success_move_keeps_the_relative_path_in_the_archive(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    archive = tmp_path / "archive"
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     watch_extra=f'on_success = "move"\narchive_dir = "{archive}"')
    (s.watch_dir / "sub").mkdir()
    (s.watch_dir / "sub" / "a.txt").write_text("a")

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert (remote_dir / "sub" / "a.txt").read_text() == "a"
    assert (archive / "sub" / "a.txt").read_text() == "a"
    assert not (s.watch_dir / "sub" / "a.txt").exists()


def test_on_success_delete_keeps_the_source_while_a_target_still_lacks_it(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir, watch_extra='on_success = "delete"')
    text = s.config.read_text()
    down = text.split("[targets.local]")[1].split("[[watch]]")[0]
    down = down.replace(f"port = {sshd.port}", "port = 1")  # nothing listens on port 1
    s.config.write_text(text.replace('targets = ["local"]', 'targets = ["local", "down"]')
                        .replace("[[watch]]", f"[targets.down]{down}[[watch]]"))
    (s.watch_dir / "a.txt").write_text("a")

    result = s.scpd("run", "--once", "--timeout", "2s")

    assert result.returncode == 75, result.stderr
    assert (remote_dir / "a.txt").read_text() == "a"
    assert (s.watch_dir / "a.txt").exists(), "deleted before every target had it"


def test_accept_new_remembers_the_first_key_and_refuses_a_changed_one(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path):
    known_hosts = tmp_path / "known_hosts"  # does not exist yet
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra='host_key_policy = "accept-new"')
    (s.watch_dir / "a.txt").write_text("a")

    first = s.scpd("run", "--once")

    assert first.returncode == 0, first.stderr
    assert "accepted new host key" in first.stderr
    assert known_hosts.read_text().split()[:2] == sshd.host_key_line().split()[:2]

    impostor = ThrowawaySshd(tmp_path / "impostor")
    impostor.start()
    impostor.stop()
    learned = known_hosts.read_text()
    known_hosts.write_text(learned.split()[0] + " " + " ".join(
        impostor.host_key_line().split()[1:]) + "\n")
    (s.watch_dir / "b.txt").write_text("b")

    second = s.scpd("run", "--once", "--timeout", "3s")

    assert second.returncode == 1, second.stderr
    assert "does not match known_hosts" in second.stderr
    assert not (remote_dir / "b.txt").exists()


def test_on_success_is_applied_to_a_file_delivered_before_a_crash_cut_it_short(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    # Delivered and recorded, but the daemon died before deleting the source: the next
    # start finds the file already delivered everywhere and finishes the job.
    s = write_config(tmp_path, sshd, known_hosts, remote_dir)
    (s.watch_dir / "a.txt").write_text("a")
    assert s.scpd("run", "--once").returncode == 0
    s.config.write_text(s.config.read_text().replace('settle = "300ms"',
                                                     'settle = "300ms"\non_success = "delete"'))

    result = s.scpd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert "sent" not in result.stderr  # not sent twice
    assert not (s.watch_dir / "a.txt").exists()
    assert (remote_dir / "a.txt").read_text() == "a"
