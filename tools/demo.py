"""make demo: scpd against a throwaway OpenSSH server on 127.0.0.1, from config to landed files.

Everything lives in a temporary directory that is removed at the end; nothing is installed
and no traffic leaves the machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.sshd import ThrowawaySshd  # noqa: E402

IS_TTY = sys.stdout.isatty()


def style(text: str, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if IS_TTY else text


def step(text: str) -> None:
    print(f"\n{style('==>', '1;34')} {style(text, '1')}", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


def stream_daemon_log(process: subprocess.Popen[str]) -> threading.Thread:
    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            print(f"    {style('scpd |', '2')} {line.rstrip()}", flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def wait_landed(local: Path, remote: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if remote.exists() and remote.stat().st_size == local.stat().st_size:
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"demo: {remote} did not arrive within {timeout:.0f}s")
    same = hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(
        remote.read_bytes()).digest()
    times = local.stat().st_mtime_ns // 1000 == remote.stat().st_mtime_ns // 1000
    mode = (local.stat().st_mode & 0o777) == (remote.stat().st_mode & 0o777)
    checks = ", ".join(name for name, ok in
                       [("sha256 matches", same), ("mtime kept", times),
                        (f"mode {remote.stat().st_mode & 0o777:o} kept", mode)] if ok)
    mark = style("landed", "1;32") if same and times and mode else style("MISMATCH", "1;31")
    say(f"{mark}: {remote}  ({checks})")


def scpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scpd", *args], capture_output=True, text=True,
                          check=False)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="scpd-demo-"))
    server = ThrowawaySshd(workdir / "sshd")
    daemon: subprocess.Popen[str] | None = None
    try:
        step("Starting a throwaway OpenSSH server on 127.0.0.1 with fresh keys")
        server.start()
        say(f"sshd pid {server.pid}, port {server.port}, login {server.user} by key only")
        known_hosts = server.write_known_hosts(workdir / "known_hosts")
        outbox, inbox = workdir / "outbox", workdir / "inbox"
        outbox.mkdir()
        config = workdir / "scpd.toml"
        config.write_text(f"""\
[daemon]
state_dir = "{workdir / 'state'}"

[targets.demo]
host = "127.0.0.1"
port = {server.port}
user = "{server.user}"
identity_file = "{server.client_key}"
known_hosts = "{known_hosts}"          # strict: only this server's key is trusted
remote_dir = "{inbox}/{{watch}}"

[[watch]]
name = "reports"
path = "{outbox}"
targets = ["demo"]
settle = "500ms"
""")
        step(f"The config ({config})")
        for line in config.read_text().splitlines():
            say(style(line, "36"))

        step("scpd check: host key, login, remote directory, scp")
        result = scpd("check", "-c", str(config))
        for line in (result.stdout + result.stderr).splitlines():
            say(line)
        if result.returncode != 0:
            return result.returncode

        step("Starting the daemon: scpd run")
        daemon = subprocess.Popen([sys.executable, "-m", "scpd", "run", "-c", str(config)],
                                  stderr=subprocess.PIPE, text=True)
        stream_daemon_log(daemon)
        time.sleep(1.0)
        remote_root = inbox / "reports"

        step("A report is written into the watched folder")
        report = outbox / "2026-11-25-sales.csv"
        report.write_text("region,total\nnorth,1200\nsouth,950\n")
        report.chmod(0o640)
        wait_landed(report, remote_root / report.name)

        step("A log in a new subdirectory (mkdir -p, then write)")
        log_file = outbox / "logs" / "app" / "app.log.1"
        log_file.parent.mkdir(parents=True)
        log_file.write_bytes(b"".join(b"line %d: all is well\n" % i for i in range(5000)))
        wait_landed(log_file, remote_root / "logs" / "app" / "app.log.1")

        step("A file written slowly: scpd waits until the writer is done")
        slow = outbox / "slow-export.bin"
        with slow.open("wb") as f:
            for _ in range(4):
                f.write(os.urandom(256 * 1024))
                f.flush()
                say(f"writer: {f.tell() // 1024} KiB so far ...")
                time.sleep(0.4)
        wait_landed(slow, remote_root / slow.name)

        step("An atomic writer: temp file first (ignored), then rename into place")
        temp = outbox / "summary.pdf.tmp"
        temp.write_bytes(os.urandom(2 * 1024 * 1024))
        time.sleep(0.8)
        say(f"remote has {'no ' if not (remote_root / temp.name).exists() else ''}"
            f"{temp.name} (temporary names are never sent)")
        final = temp.rename(outbox / "summary.pdf")
        wait_landed(final, remote_root / final.name)

        step("A file name with spaces, quotes and $(shell): data, never shell")
        odd = outbox / "Q4 'final' $(touch PWNED); ls.txt"
        odd.write_text("names are data\n")
        wait_landed(odd, remote_root / odd.name)

        step("scpd status")
        time.sleep(0.3)
        for line in scpd("status", "-c", str(config)).stdout.splitlines():
            say(line)

        step("Stopping the daemon (SIGTERM), then the server")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=15)
        say(f"scpd exited {daemon.returncode}")
        daemon = None
        print(f"\n{style('Done.', '1;32')} Every file landed whole, under its final name only,"
              " with its mtime and mode.\nNext: README.md (install as a service), "
              "config.example.toml (every key).\n")
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
