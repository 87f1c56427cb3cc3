"""A throwaway OpenSSH sshd on 127.0.0.1 for tests and benchmarks.

Standard library only, so that it also serves tools that run without the project's venv.
Recipe and measurements: shared/research/libraries.md section 5.1 (about 0.2 s to ready).

    with ThrowawaySshd(tmp_path / "sshd") as server:
        server.write_known_hosts(tmp_path / "known_hosts")
        ...  # connect as server.user to 127.0.0.1:server.port with server.client_key

sshd runs as the current user. As root it can log in any user; as anyone else it can only
authenticate the user it runs as (section 5.2), which is why `user` is the current user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

SSHD = Path("/usr/sbin/sshd")
READY_TIMEOUT_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 5.0


class ThrowawaySshd:
    """One sshd process, its keys and config, all inside `workdir`.

    Keys are made once and kept, and `port` is kept after `stop()`, so a later `start()`
    brings the same server back on the same address with the same host key.
    """

    def __init__(self, workdir: Path, *, extra_config: str = "",
                 launcher: list[str] | None = None, has_sftp: bool = True,
                 password_login: bool = False) -> None:
        """launcher: a command prefix sshd runs under (e.g. unshare for a private mount).
        has_sftp=False: a server without the SFTP subsystem (SCP only).
        password_login=True: passwords are accepted too (checked against the shadow file the
        launcher shows sshd), and root may use one."""
        self.workdir = Path(workdir).absolute()
        self.extra_config = extra_config
        self.has_sftp = has_sftp
        self.password_login = password_login
        self.launcher = launcher or []
        self.port: int | None = None
        # The effective user, not $USER: it is the only one a non-root sshd can log in.
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.host_key = self.workdir / "host_ed25519"
        self.client_key = self.workdir / "client_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.config = self.workdir / "sshd_config"
        self.log = self.workdir / "sshd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ThrowawaySshd:
        if self.is_running:
            raise RuntimeError(f"sshd is already running (pid {self.pid})")
        if not SSHD.exists():
            raise RuntimeError("openssh-server is not installed (run make test, which installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # sshd reads authorized_keys as the target user (section 5.1): keep the way there open.
        self.workdir.chmod(0o755)
        for key in (self.host_key, self.client_key):
            if not key.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", key])
        self.authorized_keys.write_bytes(self.client_key.with_suffix(".pub").read_bytes())
        self.authorized_keys.chmod(0o644)
        if self.port is None:
            self.port = free_port()
        self.config.write_text(self._config_text())
        if os.geteuid() == 0:
            # Root's sshd wants its privilege separation directory (section 5.1).
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        _run([SSHD, "-t", "-f", self.config])

        log_offset = self.log.stat().st_size if self.log.exists() else 0
        command = [*self.launcher, str(SSHD), "-D", "-e", "-f", str(self.config)]
        if shutil.which("setpriv"):
            # If the test run dies without cleaning up, the kernel ends sshd too. The signal
            # follows the *thread* that started sshd, so start it from a long-lived thread.
            command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
        self._wait_until_listening(log_offset)
        return self

    def stop(self, *, kill_sessions: bool = True) -> None:
        """Stop sshd; idempotent.

        With `kill_sessions` (the default) the per-connection sshd processes and the commands
        they run are ended too, so clients see their connections drop, as after a crash or a
        reboot of the server. Without it, established sessions live on, as after
        `systemctl restart ssh`.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        sessions = _descendants(proc.pid) if kill_sessions else []
        if proc.poll() is None:
            proc.terminate()
        for pid in sessions:
            _signal(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # The sessions are not our children (we cannot wait for them): watch them go.
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while (alive := [pid for pid in sessions if _is_alive(pid)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
        for pid in alive:
            _signal(pid, signal.SIGKILL)

    def crash(self) -> None:
        """End sshd and every session with SIGKILL at one instant, as a power cut of the server
        would: no remote command gets to clean up after itself. Frozen first (SIGSTOP), so
        that none runs between the kills of its parent and its own."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        frozen = [proc.pid, *_descendants(proc.pid)]
        for pid in frozen:
            _signal(pid, signal.SIGSTOP)
        for pid in dict.fromkeys([*frozen, *_descendants(proc.pid)]):  # and any fork since
            _signal(pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while any(_is_alive(pid) for pid in frozen) and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> ThrowawaySshd:
        return self if self.is_running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what a test needs -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def host_key_line(self, port: int | None = None) -> str:
        """The known_hosts line for this server, `[127.0.0.1]:PORT ssh-ed25519 AAAA...`, as
        reached on its own port or on `port` (a proxy in front of it)."""
        if self.port is None:
            raise RuntimeError("sshd has no port yet: call start() first")
        port = port or self.port
        key_type, key_base64 = self.host_key.with_suffix(".pub").read_text().split()[:2]
        host = "127.0.0.1" if port == 22 else f"[127.0.0.1]:{port}"
        return f"{host} {key_type} {key_base64}"

    def write_known_hosts(self, path: Path, port: int | None = None) -> Path:
        path = Path(path)
        path.write_text(self.host_key_line(port) + "\n")
        return path

    def log_text(self) -> str:
        """Everything sshd has logged in this workdir, across restarts."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- internals ---------------------------------------------------------------------------

    def _log_since(self, offset: int) -> str:
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def _config_text(self) -> str:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            f"PasswordAuthentication {'yes' if self.password_login else 'no'}",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            f"PermitRootLogin {'yes' if self.password_login else 'prohibit-password'}",
            "LogLevel VERBOSE",
            "MaxStartups 100:30:200",
        ]
        if self.has_sftp:
            lines.append("Subsystem sftp internal-sftp")
        # Appended last: extra Port lines still come before any Match block they bring.
        return "\n".join(lines) + "\n" + self.extra_config.strip("\n") + "\n"

    def _wait_until_listening(self, log_offset: int) -> None:
        assert self._proc is not None
        ports = {int(p) for p in re.findall(r"(?mi)^\s*Port\s+(\d+)", self.config.read_text())}
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            log = self._log_since(log_offset)
            listening = {int(p) for p in re.findall(r"Server listening on \S+ port (\d+)", log)}
            if ports <= listening:
                return
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise RuntimeError(
                    f"sshd exited ({code}) while starting; its log:\n{self._log_since(log_offset)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"sshd not listening on port(s) {sorted(ports - listening)} after"
                    f" {READY_TIMEOUT_SECONDS:g} s; its log:\n{self._log_since(log_offset)}"
                )
            time.sleep(0.01)


def _run(command: list[str | Path]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        shown = " ".join(str(part) for part in command)
        raise RuntimeError(f"{shown} failed ({result.returncode}): {result.stderr.strip()}")


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on (now): a target that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the rest follows the last ')'.
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
