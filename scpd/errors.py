"""The error family of scpd, and the one place where foreign exceptions are sorted.

ScpdError
├── ConfigError          exit 78, never retried; carries the dotted key path
├── PermanentError       job failed (or target unusable); an operator must act
│   ├── HostKeyError, AuthError, IncompatibleServerError,  (target-level: the target pauses)
│   │   ProtocolUnavailableError
│   ├── RemotePathError, LocalReadError                      (this file only: the job fails)
├── RetryableError       job back to pending with a backoff
│   ├── ConnectError, TransferInterrupted, RemoteFullError, LocalBusyError
├── FileChangedError     the file changed while it was read: its new version is queued
└── SourceVanished       the file is gone before it could be sent: dropped, logged
"""

from __future__ import annotations

import errno
import socket

import paramiko


class ScpdError(Exception):
    """Root of every error scpd raises on purpose."""


class ConfigError(ScpdError):
    """A configuration problem, with the dotted key path (or file) it concerns."""

    def __init__(self, key_path: str, problem: str):
        super().__init__(f"{key_path}: {problem}" if key_path else problem)
        self.key_path = key_path
        self.problem = problem


class ConfigErrors(ScpdError):
    """Every problem found in one config file, reported together."""

    def __init__(self, errors: list[ConfigError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class PermanentError(ScpdError):
    """Retrying will not help until an operator changes something."""

    #: True when the whole target is unusable (auth, host key), not just this file.
    is_target_level = False


class HostKeyError(PermanentError):
    """`problem` and, when known, `remedy`: what to do about it (the message holds both)."""

    is_target_level = True

    def __init__(self, problem: str, remedy: str | None = None):
        super().__init__(f"{problem}. {remedy}" if remedy else problem)
        self.problem = problem
        self.remedy = remedy


class AuthError(PermanentError):
    """`allowed_methods`: what the server said it takes, when it refused the method offered
    outright (password only, say), else None."""

    is_target_level = True

    def __init__(self, message: str, allowed_methods: tuple[str, ...] | None = None):
        super().__init__(message)
        self.allowed_methods = allowed_methods


class IncompatibleServerError(PermanentError):
    """No key exchange, cipher or host key type in common with the server."""

    is_target_level = True


class ProtocolUnavailableError(PermanentError):
    """The server cannot serve the configured protocol (no scp; an SFTP-only account): every
    file would fail alike, so the target pauses instead."""

    is_target_level = True


class RemotePathError(PermanentError):
    """The remote refused the path: permission denied, not a directory, a name too long, a
    symbolic link where scpd makes and enters only real directories."""


class LocalReadError(PermanentError):
    """The local file exists but cannot be read."""


class RetryableError(ScpdError):
    """A fault that may go away by itself: the job waits and tries again."""


class ConnectError(RetryableError):
    """`cause`, for a TCP connect that failed: "dns", "refused", "timeout", "unreachable" or
    "other"; None when the connection failed later (SSH handshake, login)."""

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message)
        self.cause = cause


class TransferInterrupted(RetryableError):
    pass


class RemoteFullError(RetryableError):
    pass


class LocalBusyError(RetryableError):
    """The local file cannot be opened just now (a lease holder, no free file descriptors)."""


class FileChangedError(ScpdError):
    """The local file changed while it was being sent; its copy was discarded."""


class SourceVanished(ScpdError):
    """The local file disappeared before or while it was sent."""


# Remote scp/mv messages, in the order they are tried; the text is what OpenSSH prints.
_REMOTE_MESSAGES: list[tuple[str, type[ScpdError]]] = [
    ("No space left on device", RemoteFullError),
    ("Disk quota exceeded", RemoteFullError),
    ("Permission denied", RemotePathError),
    ("Read-only file system", RemotePathError),
    ("Not a directory", RemotePathError),
    ("No such file or directory", RemotePathError),
    ("Is a directory", RemotePathError),
    ("Operation not permitted", RemotePathError),  # EPERM: immutable, or not the owner
    ("File exists", RemotePathError),  # mkdir: a file where a directory must go
    # ENAMETOOLONG: a path over the remote's PATH_MAX, or a name over its NAME_MAX.
    ("File name too long", RemotePathError),
    ("sftp connections only", ProtocolUnavailableError),  # ForceCommand internal-sftp
    ("command not found", ProtocolUnavailableError),  # no scp on the remote
]


def classify_remote_message(message: str, context: str = "") -> ScpdError:
    """Sort an error the remote side printed (scp's \x01 line or the shell's stderr) by its
    reason alone: the words after the last ": " of its first line, as strerror() ends
    "scp: PATH: No space left on device". The rest holds paths, and a file name such as
    "x: command not found" must not decide how an error is sorted. context: added to the
    message (which file, which step), never sorted on."""
    first_line = message.strip().split("\n", 1)[0]
    reason = first_line.rsplit(": ", 1)[-1]
    text = f"remote: {message}{context}"
    for needle, cls in _REMOTE_MESSAGES:
        if needle in reason:
            return cls(text)
    # Unknown remote trouble: retry with backoff rather than lose the file.
    return TransferInterrupted(text)


def classify_connect(exc: OSError, where: str) -> ConnectError:
    """A failure to open the TCP connection to host:port."""
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve {where.rsplit(':', 1)[0]}: {exc.strerror}", "dns")
    if isinstance(exc, TimeoutError):
        return ConnectError(f"connection to {where} timed out", "timeout")
    if isinstance(exc, ConnectionRefusedError):
        cause = "refused"
    elif exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        cause = "unreachable"
    else:
        cause = "other"
    return ConnectError(f"cannot connect to {where}: {exc.strerror or exc}", cause)


def shortened(path: str, keep: int = 60) -> str:
    """A path fit for one log line: a 4 KB one keeps its start and its end."""
    return path if len(path) <= 2 * keep + 3 else f"{path[:keep]}...{path[-keep:]}"


def classify_sftp(exc: BaseException, path: str) -> ScpdError:
    """An error from an SFTP request about `path`."""
    path = shortened(path)
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
        if exc.errno is None and str(exc) == "Bad message":
            # OpenSSH's sftp-server answers ENAMETOOLONG (and EINVAL) with SSH_FX_BAD_MESSAGE:
            # the same path is refused again however often it is tried.
            return RemotePathError(f"remote: {path}: refused as Bad message (File name too"
                                   " long, most often: a name or path longer than the remote"
                                   " allows)")
        if exc.errno is None:
            # OpenSSH's generic SSH_FX_FAILURE, which is also how a full disk shows over
            # SFTPv3: retry rather than give the file up.
            return TransferInterrupted(f"remote: {exc} ({path}; the SFTP server gives no"
                                       " reason: a full disk or quota, most often)")
        return RemotePathError(f"remote: {exc.strerror or exc} ({path})")
    return classify(exc)


def classify(exc: BaseException) -> ScpdError:
    """Map a paramiko, socket or OS exception to the scpd family. Nothing else inspects them."""
    if isinstance(exc, ScpdError):
        return exc
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"host key for {exc.hostname} does not match known_hosts "
            f"(got {exc.key.get_name()} {exc.key.fingerprint}): possible man-in-the-middle"
        )
    if isinstance(exc, paramiko.AuthenticationException):
        # paramiko raises this also when the link died or stalled during authentication.
        if any(text in str(exc) for text in ("transport shut down or saw EOF",
                                             "Authentication timeout")):
            return ConnectError(f"connection lost during authentication: {exc}")
        allowed = getattr(exc, "allowed_types", None)  # BadAuthenticationType's
        return AuthError(f"authentication failed: {exc}",
                         tuple(allowed) if allowed is not None else None)
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return HostKeyError(f"{exc} (add the host key to the configured known_hosts)")
    if isinstance(exc, paramiko.ssh_exception.IncompatiblePeer):
        return IncompatibleServerError(f"incompatible SSH server: {exc}")
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return ConnectError(f"cannot connect: {exc}")
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve host name: {exc.strerror or exc}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransferInterrupted("timed out waiting for the remote")
    if isinstance(exc, EOFError | paramiko.SSHException | ConnectionError):
        return TransferInterrupted(f"connection lost: {str(exc) or type(exc).__name__}")
    if isinstance(exc, OSError):
        return TransferInterrupted(f"network error: {exc}")
    raise exc
