"""`scpd send`, the one-off push, as an operator runs it: against the real sshd, as a
subprocess, on a pipe and on a pseudo-terminal."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import Setup, make_file, sha256, temp_files, wait_until, write_config

from tools.sshd import ThrowawaySshd

ONE_LINE_ERROR = re.compile(r"^scpd: \S.*$")
CAP = 'bandwidth_limit = "256KiB/s"'  # 512 KiB take about 2 s
WEIRD_NAME = "weird\nname\x1b[2J.bin"  # a newline, and an escape sequence that clears a screen
WEIRD_SHOWN = "weird\\nname\\x1b[2J.bin"
PROTOCOLS = [("scp", 1000), ("sftp", 1_000_000_000)]  # and what each carries of an mtime


@pytest.fixture
def configure(tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    """A config with target `local` (these settings added) and watch `outbox`."""
    def make(target_extra: str = "", port: int | None = None) -> Setup:
        return write_config(tmp_path, sshd, known_hosts, remote_dir, target_extra=target_extra,
                            port=port)
    return make


def send(setup: Setup, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return setup.scpd("send", "--target", "local", *args, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert all(ONE_LINE_ERROR.match(line) for line in lines), stderr
    assert "Traceback" not in stderr
    return lines


def file_with(path: Path, size: int, mode: int, mtime_ns: int) -> Path:
    make_file(path, size)
    path.chmod(mode)
    os.utime(path, ns=(mtime_ns - 7_000_000_000, mtime_ns))
    return path


@pytest.mark.parametrize(("protocol", "mtime_resolution_ns"), PROTOCOLS)
def test_send_puts_each_file_in_remote_dir_with_its_bytes_mode_and_times(
        configure, tmp_path: Path, protocol: str, mtime_resolution_ns: int):
    setup = configure(f'protocol = "{protocol}"')
    elsewhere = tmp_path / "elsewhere"
    files = [file_with(elsewhere / "a.bin", 300_000, 0o640, 1_600_000_000_123_456_789),
             file_with(elsewhere / "b.txt", 10, 0o600, 1_500_000_000_987_654_321),
             file_with(elsewhere / "empty", 0, 0o755, 1_400_000_000_000_000_000)]

    result = send(setup, *map(str, files))

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for local, line in zip(files, result.stdout.splitlines(), strict=True):
        remote = setup.remote_dir / local.name
        assert line.startswith(f"sent {local} to local:{remote} (")
        assert sha256(remote) == sha256(local)
        assert stat.S_IMODE(remote.stat().st_mode) == stat.S_IMODE(local.stat().st_mode)
        assert remote.stat().st_mtime_ns // mtime_resolution_ns == \
            local.stat().st_mtime_ns // mtime_resolution_ns
    assert "(293.0 KiB in " in result.stdout
    assert temp_files(setup.remote_dir) == []
    assert not setup.state_dir.exists(), "send must not open the queue"


def test_send_keeps_the_path_of_a_file_under_a_watch_and_sends_any_other_by_name(
        configure, tmp_path: Path):
    setup = configure()
    in_watch = make_file(setup.watch_dir / "2024" / "05" / "report.csv", 1000)
    elsewhere = make_file(tmp_path / "elsewhere" / "deep" / "notes.txt", 100)

    result = send(setup, str(in_watch), str(elsewhere))

    assert result.returncode == 0, result.stderr
    assert sha256(setup.remote_dir / "2024" / "05" / "report.csv") == sha256(in_watch)
    assert sha256(setup.remote_dir / "notes.txt") == sha256(elsewhere)


def test_send_fills_watch_in_remote_dir_and_wants_remote_dir_for_a_file_outside_watches(
        configure, tmp_path: Path):
    setup = configure()
    old = f'remote_dir = "{setup.remote_dir}"'
    text = setup.config.read_text()
    assert old in text
    setup.config.write_text(text.replace(old, old[:-1] + '/{hostname}/{watch}"'))
    in_watch = make_file(setup.watch_dir / "sub" / "a.txt", 10)
    elsewhere = make_file(tmp_path / "elsewhere" / "b.txt", 10)

    in_watch_result = send(setup, str(in_watch))
    refused = send(setup, str(elsewhere))
    placed = send(setup, "--remote-dir", str(setup.remote_dir / "by-hand"), str(elsewhere))

    assert in_watch_result.returncode == 0, in_watch_result.stderr
    assert (setup.remote_dir / socket.gethostname() / "outbox" / "sub" / "a.txt").is_file()
    assert refused.returncode == 64
    [line] = error_lines(refused.stderr)
    assert "{watch}" in line and "--remote-dir" in line and str(elsewhere) in line
    assert placed.returncode == 0, placed.stderr
    assert sha256(setup.remote_dir / "by-hand" / "b.txt") == sha256(elsewhere)


def test_send_refuses_an_unknown_target_with_exit_64_naming_the_defined_ones(configure,
                                                                            tmp_path: Path):
    setup = configure()
    local = make_file(tmp_path / "a.txt", 10)

    result = setup.scpd("send", "--target", "offsite", str(local))

    assert result.returncode == 64
    [line] = error_lines(result.stderr)
    assert line == 'scpd: unknown target "offsite" (defined: local)'
    assert list(setup.remote_dir.iterdir()) == []


def test_send_refuses_a_bad_config_with_exit_78_and_the_key_path(configure, tmp_path: Path):
    setup = configure()
    text = setup.config.read_text()
    setup.config.write_text(text.replace("port = ", 'port = "22x"\n#', 1))

    result = send(setup, str(make_file(tmp_path / "a.txt", 10)))

    assert result.returncode == 78
    assert error_lines(result.stderr) == [
        'scpd: targets.local.port: expected an integer 1-65535, got "22x"']


def test_send_says_why_each_bad_file_is_not_sent_and_still_sends_the_others(
        configure, tmp_path: Path):
    setup = configure()
    good = [make_file(tmp_path / "one.txt", 10), make_file(tmp_path / "two.txt", 20)]
    missing = tmp_path / "missing.txt"
    link = tmp_path / "link.txt"
    link.symlink_to(good[0])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "a-directory"
    directory.mkdir()

    result = send(setup, str(good[0]), str(missing), str(link), str(fifo), str(directory),
                  str(good[1]))

    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"scpd: {missing}: No such file or directory; not sent",
        f"scpd: {link} is a symbolic link; not sent (name the file it leads to)",
        f"scpd: {fifo} is a FIFO; not sent (only regular files are sent)",
        f"scpd: {directory} is a directory; not sent (use -r to send the files below it)"]
    assert sorted(p.name for p in setup.remote_dir.iterdir()) == ["one.txt", "two.txt"]
    assert len(result.stdout.splitlines()) == 2


def test_send_r_sends_a_tree_and_skips_links_and_special_files_as_the_daemon_does(
        configure, tmp_path: Path):
    setup = configure()
    tree = tmp_path / "tree"
    files = [make_file(tree / "a.txt", 10), make_file(tree / "sub" / "b.txt", 20),
             make_file(tree / ".hidden", 5)]
    (tree / "link").symlink_to(files[0])
    os.mkfifo(tree / "sub" / "fifo")

    result = send(setup, "-r", str(tree))

    assert result.returncode == 0, result.stderr
    for local in files:
        assert sha256(setup.remote_dir / "tree" / local.relative_to(tree)) == sha256(local)
    assert error_lines(result.stderr) == [
        f"scpd: skipped {tree}/link: a symbolic link (only regular files are sent; links are"
        " not followed)",
        f"scpd: skipped {tree}/sub/fifo: a FIFO (only regular files are sent; links are not"
        " followed)"]
    assert sorted(p.name for p in (setup.remote_dir / "tree").rglob("*")) == [
        ".hidden", "a.txt", "b.txt", "sub"]


def test_send_without_a_terminal_prints_only_final_lines_without_control_characters(
        configure, tmp_path: Path):
    setup = configure(CAP)  # slow enough that a terminal would see the progress drawn
    local = make_file(tmp_path / WEIRD_NAME, 128 * 1024)

    result = send(setup, str(local))
    quiet = setup.scpd("-q", "send", "--target", "local", "--remote-dir",
                       str(setup.remote_dir / "quiet"), str(local))

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"sent {re.escape(str(tmp_path))}/{re.escape(WEIRD_SHOWN)} to local:"
                        rf"{re.escape(str(setup.remote_dir))}/{re.escape(WEIRD_SHOWN)}"
                        r" \(128\.0 KiB in [0-9.]+s, [0-9.]+ KiB/s\)\n", result.stdout)
    assert result.stderr == ""
    assert sha256(setup.remote_dir / WEIRD_NAME) == sha256(local)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert (setup.remote_dir / "quiet" / WEIRD_NAME).is_file()


def test_send_on_a_terminal_redraws_a_progress_line_then_says_what_it_sent(
        configure, tmp_path: Path):
    setup = configure(CAP)
    local = make_file(tmp_path / WEIRD_NAME, 512 * 1024)

    started = time.monotonic()
    status, output = run_on_terminal(
        [sys.executable, "-m", "scpd", "send", "-c", str(setup.config), "--target", "local",
         str(local)], columns=200, timeout=30)
    elapsed = time.monotonic() - started

    assert status == 0, output
    assert sha256(setup.remote_dir / WEIRD_NAME) == sha256(local)
    assert "\x1b" not in output, "nothing may drive the terminal, not even a name"
    *redraws, final, after = output.split("\r")
    assert after == f"sent {tmp_path}/{WEIRD_SHOWN} to local:{setup.remote_dir}/{WEIRD_SHOWN}" \
        f" ({after.split(' (', 1)[1]}"
    assert re.search(r"\(512\.0 KiB in [0-9.]+s, [0-9.]+ KiB/s\)\n\Z", after)
    assert final.strip() == "", "the progress line is wiped before the final line"
    assert "\n" not in "".join(redraws), "a redraw never starts a new line"
    assert redraws[0] == "", "nothing before the first redraw"
    drawn = [line.rstrip() for line in redraws[1:]
             if line.rstrip() != f"{tmp_path}/{WEIRD_SHOWN}  starting"]  # connecting
    progress = [re.fullmatch(rf"{re.escape(f'{tmp_path}/{WEIRD_SHOWN}')}  ([0-9.]+ [KM]?i?B)"
                             r" / 512\.0 KiB  ([0-9]+)%  (--|[0-9.]+ KiB)/s  ETA (--:--|0:0[0-9])",
                             line) for line in drawn]
    assert all(progress), redraws
    percents = [int(match[2]) for match in progress]
    assert len(percents) >= 8, redraws
    assert percents == sorted(percents) and percents[0] < 50 <= percents[-1], percents
    rates = [float(match[3].split()[0]) for match in progress if match[3] != "--"]
    assert rates and all(128 < rate < 512 for rate in rates), rates  # the cap: 256 KiB/s
    assert len(redraws) <= 10 * elapsed + 3, "at most ten redraws a second"


@pytest.mark.parametrize("protocol", ["scp", "sftp"])
def test_send_stops_on_ctrl_c_with_130_and_leaves_no_temporary_file(configure, tmp_path: Path,
                                                                    protocol: str):
    setup = configure(f'{CAP}\nprotocol = "{protocol}"')
    local = make_file(tmp_path / "big.bin", 2 * 1024 * 1024)  # 8 s at the cap
    later = make_file(tmp_path / "later.txt", 10)

    process = subprocess.Popen(
        [sys.executable, "-m", "scpd", "send", "-c", str(setup.config), "--target", "local",
         str(local), str(later)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: temp_files(setup.remote_dir), timeout=10)
        time.sleep(0.3)  # bytes on their way
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 130
    assert error_lines(stderr) == [
        f"scpd: interrupted by SIGINT: {local} not sent (1 more file(s) not sent)"]
    assert stdout == ""
    assert wait_until(lambda: not temp_files(setup.remote_dir), timeout=5), \
        temp_files(setup.remote_dir)
    assert list(setup.remote_dir.iterdir()) == []


def test_send_gives_up_on_an_unreachable_target_after_three_quick_attempts(
        configure, tmp_path: Path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    setup = configure(port=port)
    files = [make_file(tmp_path / "a.txt", 10), make_file(tmp_path / "b.txt", 10)]

    started = time.monotonic()
    result = send(setup, *map(str, files))
    elapsed = time.monotonic() - started

    assert result.returncode == 1
    reason = f"cannot connect to 127.0.0.1:{port}: Connection refused (3 attempts to connect)"
    assert error_lines(result.stderr) == [f"scpd: {files[0]} not sent to local: {reason}",
                                          f"scpd: {files[1]} not sent to local: {reason}"]
    assert elapsed < 5, "backoff of 200 ms doubling: about half a second of waits"


def run_on_terminal(argv: list[str], *, columns: int, timeout: float) -> tuple[int, str]:
    """Run argv with stdout and stderr on a pseudo-terminal; (exit status, all it wrote).
    The terminal turns no newline into \\r\\n (ONLCR off): every \\r read is the program's."""
    master, slave = os.openpty()
    try:
        attributes = termios.tcgetattr(slave)
        attributes[1] &= ~termios.ONLCR
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        termios.tcsetwinsize(slave, (24, columns))
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([master], [], [], 0.2)
            if not readable:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal is closed, the program is done
                break
            if not data:
                break
            output += data
        status = process.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, output.decode("utf-8", "replace")


def test_a_refusal_that_repeats_a_weird_name_stays_one_escaped_line(
        configure, tmp_path: Path):
    setup = configure()
    local = make_file(tmp_path / WEIRD_NAME, 1024)
    (setup.remote_dir / WEIRD_NAME).mkdir()  # the remote refuses: "...: Is a directory"

    result = send(setup, str(local))

    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and WEIRD_SHOWN in lines[0], lines
