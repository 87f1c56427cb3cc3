"""What every transport shares: the Uploader interface and careful reading of the local file."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from scpd.errors import FileChangedError, LocalBusyError, LocalReadError, SourceVanished
from scpd.fileversion import FileVersion

if TYPE_CHECKING:
    from scpd.transport.ssh import SshConnection

_NAME_MAX_BYTES = 255
# A conflicting lease (Samba oplocks, knfsd), or out of file descriptors: try again later.
_TRANSIENT_OPEN_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EMFILE, errno.ENFILE,
                          errno.EINTR}


class Uploader(ABC):
    """Puts one local file at one remote path, atomically: all of it under the final name, or
    nothing there. Returns the version it sent; raises the scpd error family."""

    #: time.monotonic() of the last sign of life of the transfer in progress (a stall guard
    #: closes the connection when it gets too old: some paramiko waits have no timeout).
    progress_at: float = 0.0
    #: Each uploader has its own connection.
    connection: SshConnection

    @property
    def connected_at(self) -> float:
        """time.monotonic() when its connection last got through host key and login."""
        return self.connection.connected_at

    @abstractmethod
    def upload(self, local_path: str | os.PathLike[str], remote_path: str,
               expected: FileVersion | None = None, *, stale_temp_path: str | None = None,
               note_temp: Callable[[str], None] | None = None) -> FileVersion:
        """expected: send only this version (size, mtime) of the file. stale_temp_path: where
        an earlier attempt at this file wrote; a crash of the remote may have left it there,
        and it is removed first. note_temp(path) is told where this attempt will write, once
        connected, before anything is written there."""

    @abstractmethod
    def close(self) -> None:
        """Drop the connection; the next upload opens a new one."""

    @abstractmethod
    def retire(self) -> None:
        """Drop the connection for good: a later upload fails instead of reconnecting."""


def temp_name(final_name: str, *, is_per_attempt: bool) -> str:
    """The hidden name a file is written under before it is renamed into place.

    SCP needs a name per attempt: its remote command renames by itself when its scp exits 0,
    so a session cut by the network but still running on the remote must never share a name
    with the retry (it could rename the retry's partial file into place, or remove it).
    SFTP does nothing the client does not ask for, so it reuses one name, which the next
    attempt replaces: nothing stale is left behind by a cut.
    """
    token = f".{secrets.token_hex(4)}" if is_per_attempt else ""
    name = f".{final_name}{token}.scpd-part"
    if len(os.fsencode(name)) <= _NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(os.fsencode(final_name)).hexdigest()[:32]
    return f".{digest}{token}.scpd-part"


class LocalFile:
    """An open local file, its version at open, and the means to notice it changing."""

    def __init__(self, path: str | os.PathLike[str], expected: FileVersion | None = None):
        self.path = os.fspath(path)
        # O_NOFOLLOW: symlinks are never followed out of the watched tree.
        # O_NONBLOCK: opening a FIFO that slipped through must not hang the worker.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise SourceVanished(f"{self.path} no longer exists") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LocalReadError(f"{self.path} is a symbolic link; not sent") from None
            if exc.errno in _TRANSIENT_OPEN_ERRNOS:
                raise LocalBusyError(f"cannot open {self.path} now: {exc.strerror}") from None
            raise LocalReadError(f"cannot read {self.path}: {exc.strerror}") from None
        self.stat = os.fstat(self.fd)
        if not stat.S_ISREG(self.stat.st_mode):
            os.close(self.fd)
            raise LocalReadError(f"{self.path} is not a regular file; not sent")
        self.version = FileVersion.of(self.stat)
        if expected is not None and not self.version.same_content_as(expected):
            # Only the settled version is sent: a file changed since is still being written,
            # and the settler queues its new version once it is ready.
            os.close(self.fd)
            raise FileChangedError(f"{self.path} changed since it was queued")

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)

    def read_chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """Exactly `version.size` bytes, never more, however the file grows meanwhile."""
        remaining = self.version.size
        while remaining:
            try:
                data = os.read(self.fd, min(chunk_bytes, remaining))
            except OSError as exc:
                raise LocalReadError(f"cannot read {self.path}: {exc.strerror}") from None
            if not data:
                raise FileChangedError(f"{self.path} shrank while it was sent")
            remaining -= len(data)
            yield data

    def has_changed(self) -> bool:
        """True if the open file was written to, or the path now names another file."""
        if FileVersion.of(os.fstat(self.fd)) != self.version:
            return True
        try:
            return FileVersion.of(os.stat(self.path, follow_symlinks=False)) != self.version
        except OSError:
            return True
