"""Config files for scpd pointed at the session sshd, and scpd run as a real subprocess."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.harness import private_mount_namespace_problem, scpd_config_text
from tools.harness import wait_until as wait_until  # the tests import it from here
from tools.sshd import ThrowawaySshd


@dataclass
class Setup:
    """One scpd config: a watched directory, a remote directory, the config file."""

    config: Path
    watch_dir: Path
    remote_dir: Path
    state_dir: Path
    mtime_resolution_ns: int = 1000  # what the protocol carries: SCP microseconds

    def scpd(self, *args: str, timeout: float = 60, env: dict | None = None
             ) -> subprocess.CompletedProcess[str]:
        return run_scpd(*args, "-c", str(self.config), timeout=timeout, env=env)

    def start_daemon(self, *extra: str, env: dict | None = None) -> DaemonProcess:
        return DaemonProcess(
            [sys.executable, "-m", "scpd", "run", "-c", str(self.config), *extra], env=env)


class DaemonProcess:
    """`scpd run` as a child process, its stderr collected by a reader thread."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, **(env or {})})
        self.pid = self.process.pid
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.append(line)

    def log(self) -> str:
        return "".join(self._lines)

    def wait_for_log(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return True
            if self.process.poll() is not None:
                self._reader.join(1)
                return needle in self.log()
            time.sleep(0.05)
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the daemon and wait; kill it if it does not exit in time. Its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        self._reader.join(5)
        return self.process.returncode


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_file(path: Path, size: int) -> Path:
    """A file of `size` random bytes (its directory made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def temp_files(remote_dir: Path) -> list[Path]:
    """scpd's hidden temporary files anywhere under remote_dir."""
    return sorted(remote_dir.rglob("*.scpd-part"))


def require_private_mount_namespace() -> None:
    """Skip the calling test where a private mount namespace cannot be made."""
    if (problem := private_mount_namespace_problem()) is not None:
        pytest.skip(problem)


def run_scpd(*args: str, timeout: float = 60, env: dict | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scpd", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          check=False)


def write_config(tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
                 *, target_extra: str = "", watch_extra: str = "", port: int | None = None
                 ) -> Setup:
    watch_dir = tmp_path / "outbox"
    watch_dir.mkdir(exist_ok=True)
    state_dir = tmp_path / "state"
    config = tmp_path / "scpd.toml"
    config.write_text(scpd_config_text(sshd, known_hosts, remote_dir, watch_dir, state_dir,
                                       port=port, target_extra=target_extra,
                                       watch_extra=watch_extra))
    return Setup(config=config, watch_dir=watch_dir, remote_dir=remote_dir, state_dir=state_dir)


@pytest.fixture(scope="module")
def scp_only_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySshd]:
    """A server without the SFTP subsystem: the SCP agent renames with mv."""
    server = ThrowawaySshd(tmp_path_factory.mktemp("sshd-no-sftp"), has_sftp=False)
    try:
        yield server.start()
    finally:
        server.stop()


def make_password_sshd(workdir: Path, password: str) -> ThrowawaySshd:
    """An sshd (not started) that also takes a password: `password` for its login user,
    checked against a shadow file of its own in a private mount namespace, so the machine's
    /etc/shadow is never touched. Needs root (require_private_mount_namespace)."""
    user = ThrowawaySshd(workdir).user
    hashed = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password,
                            capture_output=True, text=True, check=True).stdout.strip()
    shadow = workdir / "shadow"
    shadow.write_text("".join(
        ":".join([fields[0], hashed, *fields[2:]] if fields[0] == user else fields) + "\n"
        for fields in (line.split(":") for line in Path("/etc/shadow").read_text().splitlines())))
    shadow.chmod(0o600)
    launcher = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/shadow && exec "$@"', str(shadow)]
    return ThrowawaySshd(workdir, launcher=launcher, password_login=True)


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A throwaway ssh-agent; the environment that points at it."""
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert socket_path.exists(), "ssh-agent did not create its socket within 5 s"
        yield {"SSH_AUTH_SOCK": str(socket_path)}
    finally:
        agent.terminate()
        agent.wait(5)


@pytest.fixture
def setup(tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path) -> Setup:
    return write_config(tmp_path, sshd, known_hosts, remote_dir)
