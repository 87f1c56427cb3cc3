"""scpd under systemd logs each delivery event to journald with its SCPD_* fields.

Each test runs a throwaway systemd-journald in a private mount namespace (tmpfs over /run,
and over /var/log/journal when it exists), runs the real `scpd run --once` against it with
JOURNAL_STREAM set as systemd would set it, and reads the records back with journalctl.
The host's journal is never touched. The session sshd stays outside the namespace: only
the mount namespace is new, so 127.0.0.1 is the same network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Setup, require_private_mount_namespace, write_config

from scpd.logs import MESSAGE_IDS
from tools.sshd import ThrowawaySshd

JOURNALD = Path("/lib/systemd/systemd-journald")
RUN_SECONDS = 60  # the whole namespace, journald included, is killed after this

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private journald needs a"
                       " private mount namespace (unshare -m needs CAP_SYS_ADMIN)"),
    pytest.mark.skipif(not os.access(JOURNALD, os.X_OK),
                       reason=f"{JOURNALD} is missing (Debian: apt-get install systemd)"),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("journalctl") is None,
                       reason="unshare (util-linux) or journalctl (systemd) is missing"),
]

# Runs as `bash -c SCRIPT bash OUT_FILE COMMAND...` in the new mount namespace. The marker
# goes over the same datagram socket as scpd's records, after them: once journalctl shows
# it, journald has stored everything scpd sent.
_IN_NAMESPACE = r"""
set -euo pipefail
out=$1; shift
# -n: libmount would create /run/mount/utab in the host's /run, not yet covered.
mount -n -t tmpfs -o mode=0755 scpd-test-run /run
mkdir -p /run/systemd/journal /run/log/journal
if [ -d /var/log/journal ]; then mount -n -t tmpfs -o mode=0755 scpd-test-var /var/log/journal; fi
"$JOURNALD" &
journald_pid=$!
trap 'kill $journald_pid 2>/dev/null || true; wait $journald_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 500); do [ -S /run/systemd/journal/socket ] && break; sleep 0.01; done
[ -S /run/systemd/journal/socket ] || { echo "journald did not start" >&2; exit 90; }
rc=0
JOURNAL_STREAM=0:0 "$@" || rc=$?
"$PYTHON" -c 'from systemd import journal; journal.send("end", SYSLOG_IDENTIFIER="scpd-test-end")'
for _ in $(seq 1 500); do
  journalctl -D /run/log/journal -q --no-pager SYSLOG_IDENTIFIER=scpd-test-end | grep -q . && break
  sleep 0.01
done
journalctl -D /run/log/journal -o json --no-pager SYSLOG_IDENTIFIER=scpd > "$out"
exit $rc
"""


@dataclass
class JournaldRun:
    returncode: int
    stderr: str
    entries: list[dict[str, str]]

    def events(self, name: str) -> list[dict[str, str]]:
        return [e for e in self.entries if e.get("SCPD_EVENT") == name]


def _run_scpd_with_private_journald(tmp_path: Path, setup: Setup, *args: str) -> JournaldRun:
    require_private_mount_namespace()
    out = tmp_path / "journal.json"
    command = [sys.executable, "-m", "scpd", "run", "--once", "-c", str(setup.config), *args]
    env = {**os.environ, "JOURNALD": str(JOURNALD), "PYTHON": sys.executable}
    for name in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    # Its own process group, so that journald and scpd die with it whatever happens.
    process = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", _IN_NAMESPACE, "bash",
         str(out), *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=RUN_SECONDS)
    finally:
        _kill_group(process)
    assert not _group_is_alive(process.pid), "journald or scpd outlived the namespace script"
    assert out.exists(), f"the namespace script ended early (rc {process.returncode}):\n{stderr}"
    entries = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return JournaldRun(process.returncode, stderr, entries)


def _kill_group(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # everything has exited, as it should
    process.communicate()


def _group_is_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A local port that refuses connections: bound, so nobody else takes it, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_sent_file_is_logged_to_journald_with_its_fields(tmp_path: Path, setup: Setup) -> None:
    name = "nightly report ü.csv"
    data = b"id,total\n1,42\n" * 100
    (setup.watch_dir / name).write_bytes(data)

    run = _run_scpd_with_private_journald(tmp_path, setup)

    assert run.returncode == 0, run.stderr
    assert (setup.remote_dir / name).read_bytes() == data
    queued, sent = run.events("queued"), run.events("sent")
    assert len(queued) == 1, run.entries
    assert len(sent) == 1, run.entries
    assert run.entries.index(queued[0]) < run.entries.index(sent[0])
    assert queued[0]["SCPD_PATH"].endswith(f"/{name}")
    entry = sent[0]
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "scpd"
    assert entry["SCPD_TARGET"] == "local"
    assert entry["SCPD_WATCH"] == "outbox"
    assert entry["SCPD_PATH"] == str(setup.watch_dir / name)
    assert entry["SCPD_REMOTE_PATH"] == f"{setup.remote_dir}/{name}"
    assert entry["SCPD_BYTES"] == str(len(data))
    assert int(entry["SCPD_DURATION_MS"]) >= 0
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["sent"]
    assert "MESSAGE_ID" not in queued[0]
    assert name in entry["MESSAGE"]


def test_a_delivery_failed_for_good_is_an_error_with_its_message_id(
        tmp_path: Path, setup: Setup) -> None:
    (setup.remote_dir / "in-the-way").mkdir()  # a directory where the file must go
    (setup.watch_dir / "in-the-way").write_bytes(b"x\n")

    run = _run_scpd_with_private_journald(tmp_path, setup, "--timeout", "10s")

    assert run.returncode == 1, run.stderr
    failed = run.events("failed")
    assert len(failed) == 1, run.entries
    entry = failed[0]
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["failed"]
    assert entry["SCPD_TARGET"] == "local"
    assert entry["SCPD_PATH"] == str(setup.watch_dir / "in-the-way")
    assert "Is a directory" in entry["SCPD_ERROR"]


def test_refused_connection_is_logged_to_journald_as_a_retry_warning(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        refusing_port: int) -> None:
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir, port=refusing_port)
    (setup.watch_dir / "a.txt").write_bytes(b"a\n")

    run = _run_scpd_with_private_journald(tmp_path, setup, "--timeout", "2s")

    assert run.returncode == 75, run.stderr  # still owed when --timeout ran out
    retries = run.events("retry")
    assert retries, run.entries
    entry = retries[0]
    assert entry["PRIORITY"] == "4"
    assert entry["SCPD_TARGET"] == "local"
    assert entry["SCPD_WATCH"] == "outbox"
    assert entry["SCPD_PATH"] == str(setup.watch_dir / "a.txt")
    assert entry["SCPD_ATTEMPT"] == "1"
    assert entry["SCPD_ERROR"]
    assert not run.events("sent")
    assert not (remote_dir / "a.txt").exists()


def test_a_file_name_that_is_not_utf8_reaches_journald_as_its_bytes(
        tmp_path: Path, setup: Setup) -> None:
    raw_name = b"caf\xe9.csv"
    (setup.watch_dir / os.fsdecode(raw_name)).write_bytes(b"1\n")

    run = _run_scpd_with_private_journald(tmp_path, setup)

    assert run.returncode == 0, run.stderr
    assert "Logging error" not in run.stderr
    sent = run.events("sent")
    assert len(sent) == 1, run.entries
    # journalctl -o json shows a field that is not UTF-8 as the list of its byte values.
    assert bytes(sent[0]["SCPD_PATH"]) == os.fsencode(setup.watch_dir) + b"/" + raw_name
    assert "caf\\xe9.csv" in sent[0]["MESSAGE"]
