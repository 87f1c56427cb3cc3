"""The command line as an operator meets it: exit codes and one-line errors, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DaemonProcess, Setup, run_scpd, wait_until

import scpd

ONE_LINE_ERROR = re.compile(r"^scpd: \S.*$")


def assert_one_line_errors(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert lines, "no error printed"
    assert all(ONE_LINE_ERROR.match(line) for line in lines), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, f"{needle!r} not in {stderr!r}"


def edit(setup: Setup, old: str, new: str) -> None:
    text = setup.config.read_text()
    assert old in text
    setup.config.write_text(text.replace(old, new, 1))


BAD_CONFIGS = {
    "unparseable TOML": ("[daemon]", "[daemon", "not valid TOML"),
    "unknown key": ("[[watch]]", '[[watch]]\ncolour = "blue"', "watch.outbox.colour: unknown key"),
    "wrong type": ("port = ", 'port = "22x"\n#', 'targets.local.port: expected an integer'
                   ' 1-65535, got "22x"'),
    "missing identity file": ("identity_file = ", 'identity_file = "/nonexistent/id"\n#',
                              "targets.local.identity_file: file not found: /nonexistent/id"),
    "undefined target": ('targets = ["local"]', 'targets = ["local", "offsite"]',
                         'watch.outbox.targets: unknown target "offsite"'),
    "bad duration": ('settle = "300ms"', 'settle = "soon"', "watch.outbox.settle: expected a"
                     " duration"),
}


@pytest.mark.parametrize("command", [["check", "--offline"], ["run", "--once"]])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_with_exit_78_and_the_key_path(setup: Setup, case: str,
                                                             command: list[str]):
    old, new, message = BAD_CONFIGS[case]
    edit(setup, old, new)

    result = setup.scpd(*command)

    assert result.returncode == 78
    assert_one_line_errors(result.stderr, message)
    assert not setup.state_dir.exists(), "a refused config must not start anything"


def test_check_accepts_a_watch_directory_not_made_yet_and_says_so(setup: Setup):
    setup.watch_dir.rmdir()

    result = setup.scpd("check", "--offline")

    assert result.returncode == 0, result.stderr
    assert f"watch outbox: note: {setup.watch_dir} does not exist yet" in result.stdout


def test_every_problem_of_a_config_is_reported_at_once(setup: Setup):
    edit(setup, "port = ", 'port = 70000\n#')
    edit(setup, 'settle = "300ms"', 'settle = "soon"')

    result = setup.scpd("check", "--offline")

    assert result.returncode == 78
    assert_one_line_errors(result.stderr, "targets.local.port", "watch.outbox.settle")
    assert len(result.stderr.strip().splitlines()) == 2


def test_missing_config_file_is_named(tmp_path: Path):
    result = run_scpd("check", "--offline", "-c", str(tmp_path / "nope.toml"))

    assert result.returncode == 78
    assert_one_line_errors(result.stderr, "nope.toml: config file not found")


def test_config_comes_from_scpd_config_variable(setup: Setup):
    result = run_scpd("check", "--offline", env={"SCPD_CONFIG": str(setup.config)})

    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_key_that_is_not_a_private_key_is_a_config_error(setup: Setup, tmp_path: Path):
    bogus = tmp_path / "bogus_key"
    bogus.write_text("not a key\n")
    bogus.chmod(0o600)
    edit(setup, "identity_file = ", f'identity_file = "{bogus}"\n#')

    result = setup.scpd("check", "--offline")

    assert result.returncode == 78
    assert_one_line_errors(result.stderr, "targets.local.identity_file:", "not a usable"
                           " private key")


def test_usage_error_exits_64(setup: Setup):
    result = run_scpd("run", "--timeout", "forever")

    assert result.returncode == 64
    assert_one_line_errors(result.stderr, "--timeout")


def test_version_prints_the_version():
    result = run_scpd("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"scpd {scpd.__version__}"


def test_second_daemon_on_the_same_state_dir_is_refused(setup: Setup):
    first = setup.start_daemon()
    try:
        assert first.wait_for_log("scpd ready", 10), first.log()
        second = setup.scpd("run", "--once")
        assert second.returncode == 75
        assert_one_line_errors(second.stderr, "another scpd is running")
    finally:
        assert first.stop() == 0


def test_status_json_counts_delivered_files_and_bytes(setup: Setup):
    (setup.watch_dir / "a.txt").write_text("a")
    assert setup.scpd("run", "--once").returncode == 0

    result = setup.scpd("status", "--json")

    assert result.returncode == 0, result.stderr
    local = json.loads(result.stdout)["targets"]["local"]
    assert local["delivered"] == 1
    assert local["bytes_delivered"] == 1
    assert local["pending"] == local["failed"] == 0
    assert local["last_error"] is None


def test_retry_puts_failed_jobs_back(setup: Setup):
    (setup.remote_dir / "a.txt").mkdir()  # in the way: a permanent error of this one file
    (setup.watch_dir / "a.txt").write_text("a")
    assert setup.scpd("run", "--once", "--timeout", "3s").returncode == 1
    (setup.remote_dir / "a.txt").rmdir()
    assert setup.scpd("run", "--once").returncode == 1  # failed stays failed until retried

    retried = setup.scpd("retry")
    result = setup.scpd("run", "--once")

    assert retried.stdout.strip() == "1 failed job(s) queued again"
    assert result.returncode == 0, result.stderr
    assert (setup.remote_dir / "a.txt").read_text() == "a"


def test_a_refused_host_key_pauses_the_target_and_status_and_retry_say_so(
        setup: Setup, known_hosts: Path):
    good_keys = known_hosts.read_text()
    known_hosts.write_text("")
    (setup.watch_dir / "a.txt").write_text("a")

    run = setup.scpd("run", "--once", "--timeout", "30s")
    status = json.loads(setup.scpd("status", "--json").stdout)["targets"]["local"]
    text_status = setup.scpd("status").stdout

    assert run.returncode == 1, run.stderr
    assert "target local paused: " in run.stderr and "not found in known_hosts" in run.stderr
    assert "target local is paused" in run.stderr and "1 file(s) not sent" in run.stderr
    assert status["paused"] is True and status["pending"] == 1 and status["failed"] == 0
    assert "not found in known_hosts" in status["last_error"]
    assert "PAUSED since" in text_status and "scpd retry --target local" in text_status

    retried_file = setup.scpd("retry", str(setup.watch_dir / "a.txt"))  # about files only
    assert "resumed" not in retried_file.stdout
    assert json.loads(setup.scpd("status", "--json").stdout)["targets"]["local"]["paused"]

    known_hosts.write_text(good_keys)
    retried = setup.scpd("retry", "--target", "local")
    status = json.loads(setup.scpd("status", "--json").stdout)["targets"]["local"]
    result = setup.scpd("run", "--once")

    assert "target local resumed (it was paused: " in retried.stdout
    assert status["paused"] is False
    assert result.returncode == 0, result.stderr
    assert (setup.remote_dir / "a.txt").read_text() == "a"


@pytest.mark.parametrize("command", [["run", "--once"], ["status"], ["retry"]])
def test_unusable_state_dir_is_a_config_error(setup: Setup, tmp_path: Path, command: list[str]):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    edit(setup, f'state_dir = "{setup.state_dir}"', f'state_dir = "{blocker}/state"')

    result = setup.scpd(*command)

    assert result.returncode == 78
    assert_one_line_errors(result.stderr, "daemon.state_dir: cannot use")


def test_no_inotify_left_means_polling_and_the_sysctl_to_raise(setup: Setup):
    import shutil
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    edit(setup, 'settle = "300ms"', 'settle = "300ms"\npoll_interval = "200ms"')
    # The inotify limits are per user namespace: set this one's to zero, not the machine's.
    script = 'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"'
    daemon = DaemonProcess(["unshare", "-U", "-r", "sh", "-c", script, "sh", sys.executable,
                            "-m", "scpd", "run", "-c", str(setup.config)])
    try:
        if not daemon.wait_for_log("scpd ready", 20):
            if "unshare failed" in daemon.log() or "Permission denied" in daemon.log():
                pytest.skip(f"user namespaces are not permitted here: {daemon.log().strip()}")
            pytest.fail(daemon.log())
        (setup.watch_dir / "report.csv").write_text("polled, not missed\n")

        assert wait_until(lambda: (setup.remote_dir / "report.csv").exists(), 20), daemon.log()
    finally:
        daemon.stop()
    assert "inotify is not available" in daemon.log()
    assert "sysctl -w fs.inotify.max_user_instances=128" in daemon.log()
    assert "Traceback" not in daemon.log()



def test_delete_on_success_with_overlapping_watches_is_refused(setup: Setup):
    inner = setup.watch_dir / "reports"
    inner.mkdir()
    setup.config.write_text(setup.config.read_text().replace(
        'settle = "300ms"', 'settle = "300ms"\non_success = "delete"', 1) + f"""
[[watch]]
name = "inner"
path = "{inner}"
targets = ["local"]
""")

    result = setup.scpd("check", "--offline")

    assert result.returncode == 78
    assert_one_line_errors(result.stderr, 'watch.outbox.on_success: "delete" cannot be used',
                           'overlaps watch "inner"')


@pytest.mark.parametrize("content", [b"\xff\xfe not text\n",
                                     b"[127.0.0.1]:22 ssh-ed25519 AAAA!!notbase64\n"])
def test_a_broken_known_hosts_is_a_config_error(setup: Setup, known_hosts: Path,
                                               content: bytes):
    known_hosts.write_bytes(content)

    result = setup.scpd("check", "--offline")

    assert result.returncode == 78, result.stderr
    assert_one_line_errors(result.stderr, "targets.local.known_hosts: cannot load")


def test_retry_of_a_path_outside_every_watch_is_a_usage_error(setup: Setup):
    result = setup.scpd("retry", "/etc/passwd")

    assert result.returncode == 64
    assert_one_line_errors(result.stderr, "/etc/passwd is not under any watched directory")


def test_log_level_comes_from_the_config_and_the_command_line_wins(setup: Setup):
    edit(setup, "[daemon]", '[daemon]\nlog_level = "warning"')
    (setup.watch_dir / "a.txt").write_text("a\n")
    (setup.watch_dir / "b.txt").write_text("b\n")

    quiet = setup.scpd("run", "--once")
    (setup.watch_dir / "b.txt").write_text("b, again\n")
    loud = setup.scpd("-v", "run", "--once")

    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert quiet.stderr == "", quiet.stderr  # info lines (queued, sent) are below warning
    assert "sent b.txt" in loud.stderr, loud.stderr


def test_quiet_flag_keeps_warnings_only(setup: Setup):
    (setup.watch_dir / "a.txt").write_text("a\n")

    result = setup.scpd("-q", "run", "--once")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (setup.remote_dir / "a.txt").read_text() == "a\n"


def test_log_target_stderr_keeps_lines_on_stderr_even_under_systemd(setup: Setup):
    (setup.watch_dir / "a.txt").write_text("a\n")
    under_systemd = {"JOURNAL_STREAM": "0:0"}

    to_journal = setup.scpd("run", "--once", env=under_systemd)
    (setup.watch_dir / "a.txt").write_text("a, again\n")
    edit(setup, "[daemon]", '[daemon]\nlog_target = "stderr"')
    to_stderr = setup.scpd("run", "--once", env=under_systemd)

    assert to_journal.returncode == 0 and to_stderr.returncode == 0
    assert "sent a.txt" not in to_journal.stderr  # went to journald (absent here: dropped)
    assert "sent a.txt" in to_stderr.stderr


def test_a_reader_that_went_away_ends_status_quietly(setup: Setup):
    # `scpd status --json | head -1`: the pipe's reader is gone before scpd writes.
    assert setup.scpd("run", "--once").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "scpd", "status", "--json", "-c",
                                 str(setup.config)], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=60, check=False)
    finally:
        os.close(write_end)

    assert result.returncode == 141, result.stderr
    assert result.stderr == ""
