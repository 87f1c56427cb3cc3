"""`scpd check`: prove a target usable one step at a time, and say how to fix a failing one.

The steps, each standing on the one before: the TCP connect, the SSH handshake and host key,
the login, the protocol (`scp` on the remote, or its SFTP subsystem), then each remote_dir
(made if missing, a probe file created and removed, through the same means the transport
writes with: the remote shell for scp, SFTP for sftp). After a failure the steps that stand
on it are skipped; the remote directories do not stand on each other, so each is tried.

Every step is a Step, data; cli.py prints them. Text from the remote and from the config may
hold control characters: logs.printable escapes them, so that each report line stays one line.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko

from scpd.config import Target
from scpd.errors import (
    AuthError,
    ConnectError,
    HostKeyError,
    IncompatibleServerError,
    ProtocolUnavailableError,
    RetryableError,
    ScpdError,
    classify,
    classify_sftp,
    shortened,
)
from scpd.logs import printable
from scpd.transport import Credentials
from scpd.transport.sftp import SftpUploader
from scpd.transport.ssh import (
    SshConnection,
    known_hosts_name,
    make_transport,
    open_tcp,
    recorded_keys,
    run_remote,
)
from scpd.transport.throttle import Throttle

OK, FAILED, SKIPPED, NOTE = "ok", "FAILED", "skipped", "note"
_FIX_INDENT = " " * 11  # under the text of a step line: two spaces, the verdict, two spaces
_REMOTE_WORDS_CHARS = 300  # of what the remote said, at each end of a long message


@dataclass(frozen=True)
class Step:
    """One line of the report: `label` names the step (when it is skipped, and in the
    verdict), `text` says what was proven or what failed and why, `fixes` what to do."""

    label: str
    verdict: str
    text: str
    fixes: tuple[str, ...] = ()

    @property
    def is_failed(self) -> bool:
        return self.verdict == FAILED


def check_target(target: Target, credentials: Credentials, remote_dirs: list[str]
                 ) -> Iterator[Step]:
    """The steps of one target, each as soon as it is done."""
    probe = _Probe(target, credentials)
    try:
        yield from probe.steps(remote_dirs)
    finally:
        probe.close()


# -- the report's lines ------------------------------------------------------------------------


def header(name: str, target: Target) -> str:
    return printable(f"target {name} ({target.user}@{target.host}:{target.port}):")


def step_lines(step: Step) -> list[str]:
    return [f"  {step.verdict:<7}  {printable(step.text)}",
            *(f"{_FIX_INDENT}fix: {printable(fix)}" for fix in step.fixes)]


def verdict(name: str, steps: list[Step], seconds: float) -> str:
    failed = [step.label for step in steps if step.is_failed]
    if failed:
        return printable(f"target {name}: FAILED ({'; '.join(failed)})")
    return printable(f"target {name}: ok ({_duration(seconds)})")


def summary(step: Step) -> str:
    """A failed step in one line, for stderr: what is wrong (what to do)."""
    fix = f" ({step.fixes[0]})" if step.fixes else ""
    return printable(f"{step.text}{fix}")


def _duration(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


# -- the steps ---------------------------------------------------------------------------------


class _Probe:
    def __init__(self, target: Target, credentials: Credentials):
        self.target = target
        self.credentials = credentials
        # Logs in on the TCP step's socket, keeping the Transport seen on the way.
        self.connection = SshConnection(target, credentials, open_socket=self._take_socket,
                                        transport_factory=self._observed_transport)
        self.sock: socket.socket | None = None
        self.seen: paramiko.Transport | None = None  # also when the login failed
        self.transport: paramiko.Transport | None = None  # once logged in
        self.error: ScpdError | None = None  # why the connection could not be opened
        self.sftp: paramiko.SFTPClient | None = None

    def close(self) -> None:
        if self.sftp is not None:
            self.sftp.close()
        self.connection.close()
        if self.sock is not None:
            self.sock.close()

    def steps(self, remote_dirs: list[str]) -> Iterator[Step]:
        t = self.target
        is_sftp = t.protocol == "sftp"
        chain = [
            (f"TCP {t.host}:{t.port}", self._tcp),
            ("host key", self._host_key),
            (f"login as {t.user}", self._login),
            ("SFTP subsystem" if is_sftp else "scp on the remote",
             self._sftp if is_sftp else self._scp),
        ]
        for index, (label, run) in enumerate(chain):
            step = run(label)
            yield step
            if step.is_failed:
                for later in [label for label, _ in chain[index + 1:]] + [
                        _dir_label(d) for d in remote_dirs]:
                    yield Step(later, SKIPPED, later)
                return
        if not remote_dirs:
            yield Step("remote_dir", NOTE, "no watch sends to this target: remote_dir not"
                       " checked")
        for directory in remote_dirs:
            yield (self._sftp_dir if is_sftp else self._scp_dir)(directory)

    # -- TCP, host key, login ------------------------------------------------------------------

    def _tcp(self, label: str) -> Step:
        t = self.target
        started = time.monotonic()
        try:
            self.sock = open_tcp(t)
        except ConnectError as exc:
            return Step(label, FAILED, str(exc), _connect_fixes(t, exc.cause))
        elapsed = time.monotonic() - started
        try:
            address, port = self.sock.getpeername()[:2]
            shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        except OSError:  # reset already: the handshake step says so
            shown = f"{t.host}:{t.port}"
        return Step(label, OK, f"TCP {shown} reachable ({_duration(elapsed)})")

    def _host_key(self, label: str) -> Step:
        t = self.target
        hostname = known_hosts_name(t)
        known = _recorded_keys(t.known_hosts, hostname)  # before accept-new adds one
        self.transport = self._connect()
        error, seen = self.error, self.seen
        if isinstance(error, HostKeyError):
            return Step(label, FAILED, error.problem, (error.remedy,) if error.remedy else ())
        key = seen.host_key if seen is not None else None
        if key is None:  # no key exchange: no SSH server there, or none scpd can talk to
            assert error is not None
            return Step(label, FAILED, f"SSH handshake with {t.host}:{t.port} failed: {error}",
                        _handshake_fixes(t, error))
        shown = f"host key {key.get_name()} {key.fingerprint}"
        if key in known:
            return Step(label, OK, f"{shown} matches {t.known_hosts}")
        return Step(label, OK, f"{shown} was new: recorded in {t.known_hosts}"
                    ' (host_key_policy = "accept-new")')

    def _take_socket(self, target: Target) -> socket.socket:
        """The TCP step's socket, which the connection then owns and closes; a new one if the
        connection is made again."""
        sock, self.sock = self.sock, None
        return sock if sock is not None else open_tcp(target)

    def _observed_transport(self, *args, **kwargs) -> paramiko.Transport:
        self.seen = make_transport(*args, **kwargs)
        return self.seen

    def _connect(self) -> paramiko.Transport | None:
        """Log in, keeping the paramiko Transport seen on the way (its host key and login
        method), also when the login fails."""
        try:
            return self.connection.transport()
        except ScpdError as exc:
            self.error = exc
            return None

    def _login(self, label: str) -> Step:
        t, error = self.target, self.error
        if error is None:
            return Step(label, OK, f"login as {t.user}{self._login_means()}")
        if isinstance(error, AuthError):
            return _login_refused(label, t, self.credentials, error)
        return Step(label, FAILED, f"login as {t.user}: the connection ended: {error}",
                    (f"the server's log on {t.host} says why (sshd: MaxAuthTries, AllowUsers,"
                     " LoginGraceTime)",))

    def _login_means(self) -> str:
        handler = getattr(self.seen, "auth_handler", None)
        method = getattr(handler, "auth_method", "")
        key = getattr(handler, "private_key", None)
        if method == "password":
            return f" with the password in {self.target.password_file}"
        if method == "publickey" and key is not None:
            if key is self.credentials.pkey:
                return f" with key {self.target.identity_file} ({_key_id(key)})"
            return f" with the ssh-agent's key {_key_id(key)}"
        return ""

    # -- the protocol --------------------------------------------------------------------------

    def _scp(self, label: str) -> Step:
        t = self.target
        assert self.transport is not None
        try:
            status, output = run_remote(self.transport, t, "command -v scp")
        except ProtocolUnavailableError:  # "This service allows sftp connections only."
            return Step(label, FAILED, "scp is not available: this account allows SFTP only",
                        ('set protocol = "sftp" for this target',))
        except ScpdError as exc:
            return _failed(label, exc)
        if status != 0:
            said = f" ({_remote_words(output)})" if output else ""
            return Step(label, FAILED, f"scp is not available: {t.user}'s shell on {t.host}"
                        f" finds no scp command{said}",
                        ("install it there (it comes with the OpenSSH client), or set"
                         ' protocol = "sftp" if the server offers SFTP',))
        where = output.splitlines()[-1] if output else ""
        return Step(label, OK, f"scp available ({where})" if where else "scp available")

    def _sftp(self, label: str) -> Step:
        t = self.target
        assert self.transport is not None
        try:
            self.sftp = paramiko.SFTPClient.from_transport(self.transport)
        except (EOFError, paramiko.SSHException, OSError) as exc:
            if self.transport.is_active():  # the connection lives: the request was refused
                return Step(label, FAILED, f"sftp is not available: {t.host} refused the SFTP"
                            " subsystem",
                            ('set protocol = "scp" (the default), or enable SFTP in the'
                             " server's sshd_config: Subsystem sftp internal-sftp",))
            return _failed(label, classify(exc))
        assert self.sftp is not None
        self.sftp.get_channel().settimeout(t.io_timeout_seconds)
        return Step(label, OK, "sftp subsystem available")

    # -- remote directories --------------------------------------------------------------------

    def _scp_dir(self, directory: str) -> Step:
        """Through the remote shell, as the SCP agent writes: mkdir -p, then a file of its own
        created (noclobber: never one that is there) and removed."""
        t, label = self.target, _dir_label(directory)
        assert self.transport is not None
        d = shlex.quote(directory)
        script = (f"d={d}; f=\"$d/.scpd-check.$$\"; set -C;"
                  ' if [ ! -d "$d" ]; then [ ! -e "$d" ] || exit 6;'
                  ' mkdir -p -- "$d" || exit 3; echo made; fi;'
                  ' : > "$f" || exit 4; rm -f -- "$f" || exit 5')
        try:
            status, output = run_remote(self.transport, t, script)
        except ScpdError as exc:
            return _failed(label, exc)
        said = _remote_words(output)
        if status == 0:
            return _dir_ok(label, directory, is_made=output.endswith("made"))
        if status == 3:
            return _dir_refused(label, t, directory, f"cannot be created ({said})")
        if status == 4:
            return _dir_refused(label, t, directory, f"is not writable for {t.user} ({said})",
                                is_read_only="Read-only file system" in output)
        if status == 5:
            return _unremovable(label, t, directory, said)
        if status == 6:
            return _dir_refused(label, t, directory, "is not a directory")
        return Step(label, FAILED, f"{directory}: the check exited {status} ({said})")

    def _sftp_dir(self, directory: str) -> Step:
        """Over SFTP, as the SFTP uploader writes: made like mkdir -p, then a file of its own
        created (O_EXCL: never one that is there) and removed."""
        t, label, sftp = self.target, _dir_label(directory), self.sftp
        assert sftp is not None
        raw = os.fsencode(directory)
        try:
            mode = _sftp_mode(sftp, raw)  # of where it leads: remote_dir may be a link
            if mode is None:
                SftpUploader(self.connection, Throttle([])).makedirs(sftp, raw)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            return _dir_refused(label, t, directory,
                                f"cannot be created ({classify_sftp(exc, directory)})")
        if mode is not None and not stat.S_ISDIR(mode):
            return _dir_refused(label, t, directory, "is not a directory")
        probe = posixpath.join(raw, b".scpd-check.%d" % os.getpid())
        try:
            sftp.open(probe, "wxb").close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            error = classify_sftp(exc, os.fsdecode(probe))
            if self.transport is None or not self.transport.is_active():
                return _failed(label, error)  # the connection, not the directory
            return _dir_refused(label, t, directory,
                                f"is not writable for {t.user} over SFTP ({error})",
                                is_unexplained=isinstance(error, RetryableError))
        try:
            sftp.remove(probe)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            return _unremovable(label, t, directory, str(classify_sftp(exc, directory)))
        return _dir_ok(label, directory, is_made=mode is None)


# -- what a failure means, and what to do ------------------------------------------------------


def _connect_fixes(t: Target, cause: str | None) -> tuple[str, ...]:
    if cause == "dns":
        return (f"check host = \"{t.host}\" for typos, and that this machine's DNS or"
                f" /etc/hosts knows it: getent hosts {shlex.quote(t.host)}",)
    if cause == "refused":
        return (f"nothing accepts connections on {t.host} port {t.port}: check that sshd runs"
                f" there and listens on port {t.port} (port = {t.port} in the config), and that"
                " no firewall rejects the connection",)
    if cause == "timeout":
        return (f"no answer from {t.host} port {t.port} within connect_timeout"
                f" ({t.connect_timeout_seconds:g}s): check that the host is up and the address"
                f" and port are right, and that no firewall drops port {t.port} on the way",)
    if cause == "unreachable":
        return (f"no route from here to {t.host}: check the address, this machine's network"
                " and routes, and any firewall in between",)
    return (f"check host = \"{t.host}\", port = {t.port}, and the network and firewalls"
            " between",)


def _handshake_fixes(t: Target, error: ScpdError) -> tuple[str, ...]:
    if isinstance(error, IncompatibleServerError):
        return ("scpd and the server share no key exchange, cipher or host key algorithm"
                " (scpd refuses CBC ciphers and SHA-1 MACs): update the server's OpenSSH, or"
                " enable a modern algorithm in its sshd_config",)
    return (f"is it an SSH server on port {t.port}? Compare with: ssh -v -p {t.port}"
            f" {shlex.quote(t.user)}@{shlex.quote(t.host)}; the server's log may also say"
            " why it closed the connection (MaxStartups, TCP wrappers)",)


def _login_refused(label: str, t: Target, c: Credentials, error: AuthError) -> Step:
    agent_keys = _agent_keys() if c.use_agent else []
    if c.pkey is None and c.password is None and not agent_keys:
        # ssh.py's "nothing to log in with" (use_agent, and the agent offers no key)
        return Step(label, FAILED, str(error),
                    ("start an ssh-agent where scpd runs (SSH_AUTH_SOCK) and ssh-add the key,"
                     " or set identity_file",) if c.use_agent
                    else ("set identity_file or password_file",))
    if error.allowed_methods is not None:
        tried = "password" if c.password is not None and not agent_keys else "publickey"
        allowed = ", ".join(error.allowed_methods) or "nothing"
        return Step(label, FAILED, f"login as {t.user} refused: {t.host} takes no {tried}"
                    f" login (it allows: {allowed})",
                    ("scpd logs in with a key (identity_file, use_agent) or a password"
                     " (password_file): configure one the server allows, or allow"
                     f" {tried} logins on the server (sshd_config)",))
    offered = []
    if c.pkey is not None:
        offered.append(f"key {t.identity_file} ({_key_id(c.pkey)})")
    if agent_keys:
        offered.append("the ssh-agent's keys " + ", ".join(_key_id(k) for k in agent_keys))
    where = (f"~{t.user}/.ssh/authorized_keys on {t.host} (or the file its sshd's"
             " AuthorizedKeysFile names)")
    if c.password is not None:
        also = f" (and refused {offered[0]})" if offered else ""
        fixes = [f"check the password in {t.password_file} (all of the file but a final"
                 f" newline), and that {t.host} takes passwords for {t.user} (sshd_config:"
                 f" PasswordAuthentication{', PermitRootLogin' if t.user == 'root' else ''})"]
        if agent_keys:
            fixes.append(f"for the agent's keys: the public half of one must be in {where}")
        return Step(label, FAILED, f"password refused for {t.user}{also}", tuple(fixes))
    fixes = [f"the public half must be in {where}, and user = \"{t.user}\" must be the"
             " account meant"]
    if c.pkey is not None:
        assert t.identity_file is not None
        public = f"{c.pkey.get_name()} {c.pkey.get_base64()}"
        pub_file = Path(f"{t.identity_file}.pub")
        if _public_line(pub_file) == public:
            port = f" -p {t.port}" if t.port != 22 else ""
            fixes.append(f"from a machine that can log in there: ssh-copy-id -i"
                         f" {shlex.quote(str(pub_file))}{port} {shlex.quote(t.user)}@"
                         f"{shlex.quote(t.host)}")
        fixes.append(f"or append this line to that file: {public}")
    if agent_keys:
        fixes.append("ssh-add -L prints the public halves of the agent's keys")
    return Step(label, FAILED, f"login as {t.user} refused for {' and for '.join(offered)}",
                tuple(fixes))


def _dir_refused(label: str, t: Target, directory: str, problem: str, *,
                 is_read_only: bool = False, is_unexplained: bool = False) -> Step:
    if is_read_only:
        fix = (f"{directory} is on a file system mounted read-only on {t.host}: remount it"
               " read-write, or point remote_dir elsewhere")
    elif is_unexplained:  # SFTPv3's bare "Failure"
        fix = (f"look on {t.host} why {t.user} cannot create a file in {directory}: a"
               " read-only mount, a full disk or quota, its owner or mode; or point remote_dir"
               " elsewhere")
    else:
        fix = (f"make {directory} on {t.host} a directory {t.user} can write (owner, mode,"
               " a read-write mount), or point remote_dir at one")
    return Step(label, FAILED, f"{directory} {problem}", (fix,))


def _unremovable(label: str, t: Target, directory: str, said: str) -> Step:
    return Step(label, FAILED, f"a probe file was created in {directory} but cannot be"
                f" removed ({said})",
                (f"{t.user} must be able to rename and remove files there (scpd puts each file"
                 " in place by renaming a temporary one): look at the sticky bit, ACLs, or an"
                 " append-only attribute",))


def _dir_ok(label: str, directory: str, *, is_made: bool) -> Step:
    made = "made it; " if is_made else ""
    return Step(label, OK, f"{directory} writable ({made}probe file created and removed)")


def _failed(label: str, error: ScpdError) -> Step:
    if isinstance(error, RetryableError):
        return Step(label, FAILED, str(error),
                    ("this may pass by itself: run scpd check again; if it stays, the server's"
                     " log may say why",))
    return Step(label, FAILED, str(error))


# -- small things ------------------------------------------------------------------------------


def _dir_label(directory: str) -> str:
    return f"{directory} writable"


def _key_id(key: paramiko.PKey) -> str:
    comment = getattr(key, "comment", "")
    if isinstance(comment, bytes):
        comment = comment.decode("utf-8", "replace")
    return f"{key.get_name()} {key.fingerprint}" + (f" {comment}" if comment else "")


def _remote_words(output: str) -> str:
    """What the remote printed, on one line, its middle left out if it is long."""
    if not output:
        return "the remote gave no reason"
    return "remote: " + shortened(" / ".join(output.splitlines()), _REMOTE_WORDS_CHARS)


def _recorded_keys(known_hosts: Path, hostname: str) -> list[paramiko.PKey]:
    """The keys known_hosts holds for hostname (none if it cannot be read: connecting then
    says why)."""
    try:
        return list(recorded_keys(known_hosts, hostname).values())
    except (OSError, UnicodeDecodeError, ValueError, paramiko.SSHException,
            paramiko.hostkeys.InvalidHostKey):
        return []


def _sftp_mode(sftp: paramiko.SFTPClient, path: bytes) -> int | None:
    """The mode of what path leads to, None if there is nothing there."""
    try:
        return sftp.stat(path).st_mode or 0
    except FileNotFoundError:
        return None


def _public_line(pub_file: Path) -> str | None:
    """"TYPE BASE64" of a .pub file, if it is one."""
    try:
        fields = pub_file.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    return " ".join(fields[:2]) if len(fields) >= 2 else None


def _agent_keys() -> list[paramiko.AgentKey]:
    """The keys $SSH_AUTH_SOCK's agent offers (none without an agent)."""
    try:
        agent = paramiko.Agent()
    except paramiko.SSHException:
        return []
    try:
        return list(agent.get_keys())
    finally:
        agent.close()
