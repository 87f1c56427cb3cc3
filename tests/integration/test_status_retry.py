"""`scpd status` and `scpd retry` as an operator uses them: status reads the queue without
touching it (beside a running daemon, or with none), and retry is acted on by the running
daemon within seconds, without a restart."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Setup, run_scpd, wait_until, write_config

from tools.sshd import ThrowawaySshd, free_port

# The fields DESIGN.md section 2 promises; more may be added, none renamed.
STATUS_FIELDS = {"pending", "sending", "failed", "delivered", "bytes_delivered",
                 "oldest_pending_age_s", "paused", "last_error", "last_error_at"}
# From `scpd retry` returning to the file on the remote: the daemon looks for such a change
# once a second, and its workers otherwise sleep up to 5 s.
PICKUP_SECONDS = 3.0


def status_json(setup: Setup) -> dict:
    result = setup.scpd("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["targets"]


def seconds_ago(iso_time: str) -> float:
    return time.time() - datetime.datetime.fromisoformat(iso_time).timestamp()


def state_dir_snapshot(state_dir: Path) -> dict[str, tuple[int, str]]:
    """{name: (mtime_ns, sha256)} of every file in the state directory."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(state_dir.iterdir())}


def assert_one_line_error(stderr: str, needle: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scpd: "), stderr
    assert needle in lines[0], stderr


def test_status_after_deliveries_and_a_failure(setup: Setup):
    for name, size in (("a.csv", 1000), ("b.csv", 2000), ("sub/c.csv", 3000)):
        (setup.watch_dir / name).parent.mkdir(exist_ok=True)
        (setup.watch_dir / name).write_bytes(b"x" * size)
    (setup.remote_dir / "blocked.csv").mkdir()  # in the way: this file fails for good
    (setup.watch_dir / "blocked.csv").write_bytes(b"y" * 500)
    assert setup.scpd("run", "--once", "--timeout", "5s").returncode == 1

    local = status_json(setup)["local"]
    text = setup.scpd("status")

    assert set(local) >= STATUS_FIELDS | {"last_delivered_at"}
    assert (local["pending"], local["sending"], local["failed"], local["delivered"]) == \
        (0, 0, 1, 3)
    assert local["bytes_delivered"] == 6000
    assert local["oldest_pending_age_s"] is None
    assert local["paused"] is False
    assert "Is a directory" in local["last_error"]
    assert 0 <= seconds_ago(local["last_error_at"]) < 60
    assert 0 <= seconds_ago(local["last_delivered_at"]) < 60
    assert text.returncode == 0, text.stderr
    header, row, note = text.stdout.splitlines()
    assert header.split() == ["TARGET", "PENDING", "SENDING", "FAILED", "DELIVERED", "BYTES",
                              "OLDEST", "LAST", "SENT"]
    assert row.split()[:8] == ["local", "0", "0", "1", "3", "5.9", "KiB", "-"]
    assert row.endswith(" ago")
    assert note.startswith("local: last error ") and "Is a directory" in note
    assert note.endswith("(fix it, then: scpd retry --target local)")


def test_status_shows_the_age_of_what_an_unreachable_target_is_owed(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=free_port())  # no one there
    (s.watch_dir / "a.csv").write_text("owed\n")
    assert s.scpd("run", "--once", "--timeout", "1s").returncode == 75
    time.sleep(1.0)

    local = status_json(s)["local"]
    row = s.scpd("status").stdout.splitlines()[1]

    assert (local["pending"], local["delivered"], local["failed"]) == (1, 0, 0)
    assert 1.0 <= local["oldest_pending_age_s"] < 60
    assert local["last_delivered_at"] is None
    assert local["last_error"] is not None  # the refused connection, retried
    *_, bytes_unit, oldest, last_sent = row.split()
    assert (bytes_unit, last_sent) == ("B", "-")
    assert oldest.endswith("s") and oldest[:-1].isdigit()  # e.g. "2s"


def test_status_with_no_queue_yet_says_so_and_creates_nothing(setup: Setup):
    text = setup.scpd("status")
    as_json = status_json(setup)

    assert text.returncode == 0, text.stderr
    assert f"no queue yet in {setup.state_dir}" in text.stdout
    assert as_json["local"]["pending"] == as_json["local"]["delivered"] == 0
    assert not setup.state_dir.exists()
    retried = setup.scpd("retry")
    assert retried.returncode == 0 and retried.stdout.strip() == "0 failed job(s) queued again"
    assert not setup.state_dir.exists()


def test_status_writes_nothing_to_a_queue_no_daemon_has_open(setup: Setup):
    (setup.watch_dir / "a.csv").write_text("a\n")
    assert setup.scpd("run", "--once").returncode == 0
    before = state_dir_snapshot(setup.state_dir)

    assert setup.scpd("status").returncode == 0
    assert status_json(setup)["local"]["delivered"] == 1

    assert state_dir_snapshot(setup.state_dir) == before  # no -wal, no -shm, no change


def test_status_reads_beside_a_running_daemon_that_is_sending(setup: Setup):
    files = 200
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10), daemon.log()
        for i in range(files):
            (setup.watch_dir / f"f{i:03d}.csv").write_text(f"{i}\n" * 100)
        seen = []
        while not seen or seen[-1]["delivered"] < files:
            seen.append(status_json(setup)["local"])  # asserts exit 0 each time
            assert len(seen) < 200, seen[-1]
        landed = wait_until(lambda: len(list(setup.remote_dir.iterdir())) == files, 10)
    finally:
        returncode = daemon.stop()

    assert landed and returncode == 0, daemon.log()
    for local in seen:  # each a consistent moment: never more than were written
        assert local["pending"] + local["sending"] + local["delivered"] <= files, local
        assert local["failed"] == 0
    assert "Traceback" not in daemon.log() and "locked" not in daemon.log()


def test_a_queue_of_a_newer_scpd_is_refused_in_one_line(setup: Setup):
    assert setup.scpd("run", "--once").returncode == 0
    db = sqlite3.connect(setup.state_dir / "queue.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.close()

    for command in (["status"], ["status", "--json"], ["retry"], ["run", "--once"]):
        result = setup.scpd(*command)
        assert result.returncode == 78, (command, result.stderr)
        assert result.stdout == ""
        assert_one_line_error(result.stderr, "holds the queue of a newer scpd, schema version"
                                             " 99 where")


def test_status_without_permission_to_read_the_state_dir_is_one_line(setup: Setup):
    assert setup.scpd("run", "--once").returncode == 0
    prefix = []
    if os.geteuid() == 0:  # root reads anything: take away the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is missing")
        prefix = ["setpriv", "--inh-caps=-all",
                  "--bounding-set=-dac_override,-dac_read_search"]
    setup.state_dir.chmod(0o000)
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "scpd", "status", "-c",
                                 str(setup.config)], capture_output=True, text=True, check=False)
    finally:
        setup.state_dir.chmod(0o700)

    assert result.returncode == 78, result.stderr
    assert_one_line_error(result.stderr, f"daemon.state_dir: cannot read the queue in"
                                         f" {setup.state_dir}: permission denied")


def test_retry_of_a_failed_file_is_sent_by_the_running_daemon_within_seconds(setup: Setup):
    (setup.remote_dir / "a.txt").mkdir()  # in the way: a permanent error of this one file
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10), daemon.log()
        (setup.watch_dir / "a.txt").write_text("a\n")
        assert daemon.wait_for_log("failed a.txt", 10), daemon.log()
        failed = status_json(setup)["local"]
        (setup.remote_dir / "a.txt").rmdir()  # the operator fixes the cause
        time.sleep(0.5)  # the daemon's worker is idle now, waiting for work

        retried = setup.scpd("retry")
        retried_at = time.monotonic()
        landed = wait_until(lambda: (setup.remote_dir / "a.txt").is_file(), PICKUP_SECONDS)
        took = time.monotonic() - retried_at
        after = status_json(setup)["local"]
    finally:
        returncode = daemon.stop()

    assert failed["failed"] == 1 and "Is a directory" in failed["last_error"]
    assert retried.stdout.strip() == "1 failed job(s) queued again"
    assert landed, f"not sent {took:.1f}s after retry: {daemon.log()}"
    assert (setup.remote_dir / "a.txt").read_text() == "a\n"
    assert (after["failed"], after["delivered"], after["last_error"]) == (0, 1, None)
    assert returncode == 0, daemon.log()


def test_retry_resumes_a_target_paused_by_a_refused_login_within_seconds(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f",
                    str(stranger)], check=True)
    s = write_config(tmp_path, sshd, known_hosts, remote_dir)
    # A key the server does not accept, and no probe of the paused target within the test.
    s.config.write_text(s.config.read_text()
                        .replace(str(sshd.client_key), str(stranger))
                        .replace('retry_max = "1s"', 'retry_max = "10m"'))
    (s.watch_dir / "a.txt").write_text("a\n")
    accepted = sshd.authorized_keys.read_bytes()
    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("target local paused: ", 10), daemon.log()
        assert daemon.wait_for_log("queued a.txt", 10), daemon.log()
        paused = status_json(s)["local"]
        time.sleep(0.5)  # the workers are waiting for the next probe now
        # The operator fixes it: the server now accepts the key.
        sshd.authorized_keys.write_bytes(accepted + stranger.with_suffix(".pub").read_bytes())

        retried = s.scpd("retry", "--target", "local")
        retried_at = time.monotonic()
        landed = wait_until(lambda: (remote_dir / "a.txt").is_file(), PICKUP_SECONDS)
        took = time.monotonic() - retried_at
        after = status_json(s)["local"]
    finally:
        sshd.authorized_keys.write_bytes(accepted)
        returncode = daemon.stop()

    assert paused["paused"] is True and paused["pending"] + paused["sending"] == 1
    assert "target local resumed (it was paused: " in retried.stdout, retried.stdout
    assert landed, f"not sent {took:.1f}s after retry: {daemon.log()}"
    assert (remote_dir / "a.txt").read_text() == "a\n"
    assert (after["paused"], after["delivered"]) == (False, 1)
    assert "resumed by an operator" in daemon.log()
    assert returncode == 0, daemon.log()


def test_status_of_a_missing_config_is_a_config_error(tmp_path: Path):
    result = run_scpd("status", "-c", str(tmp_path / "nope.toml"))

    assert result.returncode == 78
    assert_one_line_error(result.stderr, "config file not found")
